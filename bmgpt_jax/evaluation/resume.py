"""`evaluate --resume`: continue an interrupted evaluation from the rows its predictions file holds.

Evaluate writes each record's row to `predictions.jsonl` as soon as it is final, so a run that dies keeps
what it finished; `--resume` reads those rows back (a torn last line dropped), checks that the earlier run
was the same evaluation (its `metrics.json` settings), and hands each source's finished rows to
`evaluate(..., done=...)`, which scores them with the new ones and asks only the rest. With several
processes, process 0 reads the folder and broadcasts what it found, so every process skips the same
records and the batches stay the same on all of them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

import jax

from bmgpt_jax.data.records import Record
from bmgpt_jax.distributed import broadcast_json
from bmgpt_jax.inputs import one_line, written_rows

# what must match for --resume to continue a run (`system`: None for the default; `dtype`: the LM's compute
# dtype; `stop`: "eos", or "separator" with --stop-at-separator)
RESUME_KEYS = ("checkpoint", "mode", "limit", "generation", "stop", "system", "dtype")


def finished_rows(out: Path, run: dict, sources: Mapping[str, Sequence[Record]]) -> dict[str, dict[int, dict]]:
    """`--resume`: the finished rows of `out/predictions.jsonl` (a torn last line dropped), by source and
    record index. Process 0 reads the folder and every process gets the same rows, so all skip the same
    records. ValueError when the earlier run (its metrics.json) differs in a `RESUME_KEYS` setting, a
    row's source or index is not one of this run's, or its `id` or `reference` is not that of this run's
    record at its index (the split's contents changed: a rebuilt dataset or other raw files). A setting the
    earlier run did not record (a metrics.json of an older version, before `system` and `dtype` were
    recorded, or none at all) cannot be compared: its rows are kept as this run's, and stderr says which
    settings were assumed; except `stop`, which a metrics.json without it ran as "separator" (no earlier
    version stopped at EOS only)."""
    path = out / "predictions.jsonl"
    found: dict = {"rows": [], "run": None, "error": None}
    if jax.process_index() == 0:
        try:
            if path.exists():
                found["rows"] = written_rows(path, lambda r: isinstance(r.get("source"), str)
                                             and isinstance(r.get("index"), int), "a predictions row of `evaluate`")
            if (out / "metrics.json").exists():
                found["run"] = json.loads((out / "metrics.json").read_text()).get("run")
        except (OSError, ValueError) as e:
            found["error"] = one_line(e)
    found = broadcast_json(found)
    if found["error"]:
        raise ValueError(found["error"])
    before = found["run"] or {}
    if found["run"] is not None and "stop" not in before:   # recorded before `stop` was: every such version
        before = {**before, "stop": "separator"}            # stopped at `###` and cut the answer there
    unrecorded = [key for key in RESUME_KEYS if key not in before]
    if unrecorded and found["rows"] and jax.process_index() == 0:
        assumed = ", ".join(f"{key}={run[key]!r}" for key in unrecorded)
        where = (f"{out / 'metrics.json'} does not record {', '.join(unrecorded)} (an older run)"
                 if found["run"] is not None else f"{out} has no metrics.json")
        print(f"evaluate: --resume: {where}; its rows are kept as if evaluated with this run's {assumed}",
              file=sys.stderr)
    for key in RESUME_KEYS:
        same = (Path(before[key]).resolve() == Path(run[key]).resolve() if key == "checkpoint"
                else before[key] == run[key]) if key in before else True
        if not same:
            raise ValueError(f"{out} was evaluated with {key}={before[key]!r}, this run has {run[key]!r}; "
                             "--resume continues only the same evaluation")
    done: dict[str, dict[int, dict]] = {spec: {} for spec in sources}
    for row in found["rows"]:
        spec, i = row.pop("source"), row["index"]
        if spec not in sources or not 0 <= i < len(sources[spec]):
            raise ValueError(f"{path} holds a row of {spec} record {i}, which this run does not evaluate; "
                             "--resume needs the same --source and --limit")
        record = sources[spec][i]
        for key, now in (("id", record.id), ("reference", record.answer)):
            if key in row and row[key] != now:
                raise ValueError(f"{path} holds a row of {spec} record {i} with {key} {_short(row[key])}, but "
                                 f"this run's record {i} has {key} {_short(now)}: the split's contents changed "
                                 "(another --raw-dir / --data-dir or a rebuilt dataset); --resume continues only "
                                 "the same records")
        done[spec][i] = row
    return done


def _short(value, width: int = 40) -> str:
    """`value`'s repr, cut to `width` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."

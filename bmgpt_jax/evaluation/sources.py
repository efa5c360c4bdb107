"""The records an evaluation asks: one source's split, and what its dataset's build left out of it.

A builder skips records it cannot use (an invalid SMILES, an empty answer, a malformed line) and saves their
count per reason, with the first few examples, in the build's `metadata.json` ("bad_records"); the demo set
keeps the same counts on its records (`demo.DemoRecords`). They never
reach the records read back, so evaluation would not see them: `load_records` hands them over with the
records (`SourceRecords.dropped`), on a fresh build and a cached one alike, and `evaluate` counts them as
skipped: without a `--limit` that cuts the split, a source's `n` plus `skipped` is every record of its split.
"""
from __future__ import annotations

import sys
from typing import Mapping, Sequence

import jax

from bmgpt_jax.data.records import Record


class SourceRecords(list):
    """The records of one source (`load_records`) and `dropped`, what the build of its dataset left out of
    the split (`{reason: {"count": n, "examples": [...]}}`): those never become rows, and `evaluate` counts
    them as skipped."""

    def __init__(self, records: Sequence[Record] = (), dropped: Mapping[str, dict] | None = None):
        super().__init__(records)
        self.dropped = dict(dropped or {})


def load_records(spec: str, raw_dir: str | None = None, data_dir: str | None = None,
                 limit: int | None = None) -> SourceRecords:
    """The first `limit` records of source `spec` (`name:split`, `demo:test`, ...), built under `data_dir` if
    needed, with the records the build left out (its `metadata.json`, so a cached build's too) as `dropped`
    when the whole split is taken. A `limit` that cuts the split leaves them out (the build counted the
    whole split, not its first records) and says so on stderr. `auto` (training's mixture) is a ValueError."""
    from bmgpt_jax.data.pipeline import AUTO_SAMPLES, DataConfig, Records
    name = spec.partition(":")[0]
    if name == "auto":   # refused before anything is built
        raise ValueError(f"source {spec!r} is training's default mixture (demo:train, and {', '.join(AUTO_SAMPLES)} "
                         "when the sample data is there): evaluating it scores the data training reads; name a "
                         "source and split, e.g. demo:test")
    cfg = DataConfig(sources=(spec,), raw_dirs={name: raw_dir} if raw_dir else {}, data_dir=data_dir or "")
    records = Records(cfg)
    n = len(records) if limit is None else min(limit, len(records))
    dropped: dict[str, dict] = {}
    for part in records.parts:
        for reason, info in getattr(part, "bad_records", {}).items():   # a build's (RecordSource) or the demo's
            mine = dropped.setdefault(reason, {"count": 0, "examples": []})
            mine["count"] += info["count"]
            mine["examples"] += info["examples"]
    if dropped and n < len(records):
        if jax.process_index() == 0:
            counts = ", ".join(f"{reason}: {info['count']}" for reason, info in dropped.items())
            print(f"evaluate: {spec}: the build left out {sum(d['count'] for d in dropped.values())} record(s) of "
                  f"the split ({counts}); not counted: --limit {limit} evaluates {n} of the {len(records)} it kept",
                  file=sys.stderr)
        dropped = {}
    return SourceRecords((records[i] for i in range(n)), dropped)

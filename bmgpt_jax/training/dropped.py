"""Examples the data pipeline left out of a training run: counted per reason, reported, bounded.

Every process's `BatchIterator.counts()` says how many examples it read and how many it dropped per
reason (`data.examples.DROP_REASONS`: bad records, too long, over the atom cap, over a graph or protein
budget). `DropTally.update` sums them over the processes once a step (one small all-gather), and the
loop shows the sums in the progress bar, `metrics.jsonl` and TensorBoard and in the end-of-run summary.
The counts as of a checkpoint's data position go into its metadata, so a resumed run goes on counting
where the interrupted one stood (the window the position points into is re-encoded, and recounted, by
the restored pipeline, so it is left out of the saved counts); so do the run's totals at that step, which
a run resumed at its last step (nothing left to train) reports as they were. A pipeline restored on
another number of processes in the middle of a window does not re-encode that window but moves on to the
next one (`BatchIterator.restore`): the interrupted run read all of it, so the resumed run goes on from
the saved totals, which include it.

Plain-text examples longer than the last bucket are kept, cut to it; they and the tokens cut away are
counted too (`truncated`, `truncated_tokens`) and reported, but are not dropped.

Past `data.max_dropped` (a share of the examples read, judged once `CHECK_AFTER` examples are read, and
at the end of a shorter run beyond sampling noise: `DropTally.exceeded`) the run stops with `TooManyDropped`, naming the setting that would keep the
most frequent kind of dropped example (the loop saves that step first, and the message says so).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Mapping

import jax
import numpy as np

from bmgpt_jax.data.examples import DROP_REASONS

CHECK_AFTER = 1000      # examples read before the share is judged mid-run (one window can be unlucky)
CUT = ("truncated", "truncated_tokens")   # plain text cut to the last bucket: kept, counted, not dropped
KEYS = ("examples", *CUT, *DROP_REASONS)


def _counter(counts: Mapping[str, int] | None) -> Counter:
    return Counter({k: int(v) for k, v in (counts or {}).items() if k in KEYS})


def _position(state: Mapping) -> tuple:
    return tuple(int(state.get(k, 0)) for k in ("epoch", "window", "batch"))


def wilson_low(k: int, n: int, z: float = 2.0) -> float:
    """The lower end of the Wilson score interval of a share `k / n` (`z` = 2: ~95%)."""
    p, zz = k / n, z * z
    return (p + zz / (2 * n) - z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n))) / (1 + zz / n)


class TooManyDropped(ValueError):
    """The pipeline dropped more than `data.max_dropped` of the examples it read."""


class DropTally:
    """Global counts `{"examples": read, reason: dropped, "truncated": n, "truncated_tokens": n}` of a run;
    `restored` continues a checkpoint's counts as of its data position, `restored_totals` are the run's
    totals when it was saved (what `totals` holds until the first `update`). `saved_position`: the data
    state that checkpoint saved; when the restored pipeline does not stand there (it moved on to the next
    window, on another process count) the window it left was wholly read, and the count goes on from
    `restored_totals`."""

    def __init__(self, pipeline, max_dropped: float, restored: Mapping[str, int] | None = None,
                 restored_totals: Mapping[str, int] | None = None, saved_position: Mapping | None = None):
        self.pipeline = pipeline if hasattr(pipeline, "counts") else None  # a test's stream may not count
        self.max_dropped = max_dropped
        moved = (saved_position is not None and restored_totals and hasattr(pipeline, "state")
                 and _position(pipeline.state()) != _position(saved_position))
        self.offset = _counter(restored_totals if moved else restored)
        self.totals = _counter(restored_totals) if restored_totals else Counter(self.offset)
        self.at_position = Counter(self.offset)

    def update(self, position: dict) -> None:
        """Sum every process's counts: now, and as of the data `position` (an iterator `state()`) that a
        checkpoint saved now would restore. A collective: every process calls it at the same step."""
        if self.pipeline is None:
            return
        local = np.array([[c.get(k, 0) for k in KEYS] for c in (self.pipeline.counts(),
                                                                  self.pipeline.counts(position))], np.int64)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            local = np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)
        self.totals = self.offset + Counter(dict(zip(KEYS, local[0].tolist())))
        self.at_position = self.offset + Counter(dict(zip(KEYS, local[1].tolist())))

    @property
    def dropped(self) -> int:
        return sum(self.totals[k] for k in DROP_REASONS)

    def metrics(self) -> dict[str, int]:
        """`{"examples", "dropped", "dropped_<reason>"..., "truncated", "truncated_tokens"}` for the metrics
        record (reasons and truncations seen so far)."""
        if self.pipeline is None and not self.offset:
            return {}
        return {"examples": self.totals["examples"], "dropped": self.dropped,
                **{f"dropped_{k}": self.totals[k] for k in DROP_REASONS if self.totals[k]},
                **{k: self.totals[k] for k in CUT if self.totals[k]}}

    def checkpoint_counts(self) -> dict[str, dict[str, int]]:
        """The metadata to store with a checkpoint of the current data position: `data_counts` (as of the
        position, the `restored` of a resumed run) and `data_totals` (the run's, its `restored_totals`)."""
        return {"data_counts": {k: int(v) for k, v in self.at_position.items() if v},
                "data_totals": {k: int(v) for k, v in self.totals.items() if v}}

    def summary(self) -> str:
        """One line: examples read, dropped in all and per reason with the setting behind each, and the
        plain-text examples cut to the last bucket."""
        n, (cut, tokens) = self.totals["examples"], (self.totals[k] for k in CUT)
        truncated = (f"; {cut:,} plain-text examples cut to the last bucket ({tokens:,} tokens left out -> "
                     "data.seq_buckets: a larger last bucket)") if cut else ""
        if not self.dropped:
            return f"data: {n:,} examples read, none dropped{truncated}"
        reasons = "; ".join(f"{k} {self.totals[k]:,} -> {DROP_REASONS[k]}" for k in DROP_REASONS if self.totals[k])
        return (f"data: {n:,} examples read, {self.dropped:,} dropped ({self.dropped / max(n, 1):.1%}): "
                f"{reasons}{truncated}")

    def exceeded(self, final: bool = False) -> bool:
        """Whether the dropped share exceeds `max_dropped`: from `CHECK_AFTER` examples read, the share
        itself; before that only at the end of the run (`final`), and only beyond sampling noise (the lower
        end of the share's ~95% Wilson interval above `max_dropped`), so a short run of the default config
        whose first 256 examples hold 13 over-long ones (5.1%, 2.8% over the whole mix) is not stopped, and
        one that drops a third of its examples is."""
        n, d = self.totals["examples"], self.dropped
        if not n or d <= self.max_dropped * n:
            return False
        return n >= CHECK_AFTER or (final and wilson_low(d, n) > self.max_dropped)

    def check(self, final: bool = False, saved_step: int | None = None) -> None:
        """Raise TooManyDropped when `exceeded(final)`; `saved_step`: the step saved before, named in the
        message as the one `--resume` goes on from."""
        if not self.exceeded(final):
            return
        n = self.totals["examples"]
        worst = max((k for k in DROP_REASONS if self.totals[k]), key=lambda k: self.totals[k])
        raise TooManyDropped(f"the data pipeline dropped {self.dropped:,} of the {n:,} examples read "
                             f"({self.dropped / n:.1%}), more than data.max_dropped={self.max_dropped:g}; most "
                             f"are {worst} ({self.totals[worst]:,}): change {DROP_REASONS[worst]}, or raise "
                             "data.max_dropped to accept the loss"
                             + (f" (step {saved_step} is saved: --resume goes on from there)"
                                if saved_step else "") + ". " + self.summary())

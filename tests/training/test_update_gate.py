"""The train step's update gate seen from the loop (`training.step.make_train_step`): a non-finite step is never
applied (`nonfinite: stop` saves the step before it, `skip` goes on) and a batch without an answer token changes
nothing, is logged without a loss and is counted."""
import re

import numpy as np
import pytest

from bmgpt_jax.data.pipeline import BatchIterator
from bmgpt_jax.training import loop as train
from bmgpt_jax.training import messages
from tests.training.runs import _rows, cfg_for, params


class Wrapped:
    """The pipeline's stream, `__next__` to be changed by a subclass; `n` counts the batches taken."""

    def __init__(self, it):
        self.it, self.tokenizer, self.n = it, it.tokenizer, 0

    def state(self):
        return self.it.state()

    def restore(self, state):
        self.it.restore(state)


def test_nonfinite_loss_stops_naming_the_step_or_skips(tmp_path):
    """`stop` names the step, its batch and the checkpoint to go back to; `skip` skips, counts the skipped
    steps in the end lines (no NaN ratio), and stops past max_nonfinite_in_a_row, that step saved."""
    from bmgpt_jax.training.checkpoint import saved_steps
    from bmgpt_jax.training.monitor import NonFiniteLossError
    blowup = ["stage=align", "steps=4", "optim.lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=0"]
    with pytest.raises(NonFiniteLossError, match=r"step [2-4] on the batch at data position epoch 0, window 0, batch "
                                                 r"[1-3], the first such step; stopping \(step [1-3] is saved, the state "
                                                 r"before it: --resume goes on from there\)") as stopped:
        train.run(cfg_for(tmp_path, *blowup, name="stop"))
    first_bad = int(re.search(r"at step (\d)", str(stopped.value)).group(1))
    assert saved_steps(tmp_path / "stop" / "checkpoints") == [first_bad - 1]   # the update was never applied
    out = train.run(cfg_for(tmp_path, *blowup, "nonfinite=skip", name="skip"))
    assert out["last_step"] == 4 and not np.isfinite(out["losses"][4])
    bad = [s for s, v in out["losses"].items() if not np.isfinite(v)]
    assert out["skipped"] == len(bad) and bad == list(range(min(bad), 5))
    lines = messages.summary(out)
    assert lines[0] == f"steps 1..4: loss {out['losses'][1]:.4f} -> nan" and "nan%" not in "".join(lines)
    assert lines[1].startswith(f"nonfinite=skip: {len(bad)} step(s) of the run had a non-finite loss")
    with pytest.raises(NonFiniteLossError, match=rf"nonfinite=skip: 2 steps in a row \(steps {min(bad)}..{min(bad) + 1}\) "
                                                 r"had a non-finite loss or gradient, max_nonfinite_in_a_row=2; stopping"):
        train.run(cfg_for(tmp_path, *blowup, "nonfinite=skip", "max_nonfinite_in_a_row=2", name="streak"))
    assert saved_steps(tmp_path / "streak" / "checkpoints") == [min(bad) + 1]
    upto = train.run(cfg_for(tmp_path, *blowup, "nonfinite=skip", f"steps={min(bad) - 1}", name="upto"))
    a, b = params(upto["model"]), params(out["model"])  # the skipped steps changed nothing
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    assert first_bad == min(bad)                          # `stop` saved what `skip` trained up to that step
    resumed = train.run(cfg_for(tmp_path, *blowup, "nonfinite=skip", f"steps={first_bad - 1}", name="stop"),
                        resume=True)
    c = params(resumed["model"])                          # restored, nothing left to train: the saved state
    assert all(np.array_equal(a[k], c[k]) for k in a)


class EmptiedBatch(Wrapped):
    """The pipeline's stream with the second batch's examples all gone, as the pipeline pads a window whose
    examples were dropped: no answer token (its attention kept, so the forward still runs on real rows)."""

    def __next__(self):
        batch, self.n = next(self.it), self.n + 1
        return dict(batch, loss_mask=np.zeros_like(batch["loss_mask"])) if self.n == 2 else batch


def test_a_batch_without_answer_tokens_is_no_step_and_is_counted(tmp_path, capsys):
    """It updated the weights (Adam's momentum, weight decay), advanced the schedule and logged loss 0.0 into
    metrics.jsonl and the run's first/last losses: now nothing changes, metrics.jsonl has no loss for it
    (`applied` 0), and the end lines count it."""
    cfg = cfg_for(tmp_path, "steps=3", name="empty")
    out = train.run(cfg, batches=EmptiedBatch(BatchIterator(cfg.data)))
    assert out["empty"] == 1 and sorted(out["losses"]) == [1, 3]
    rows = {r["step"]: r for r in _rows(tmp_path / "empty")}
    assert "loss" not in rows[2] and (rows[2]["n_tokens"], rows[2]["applied"]) == (0.0, 0.0)
    assert rows[1]["applied"] == rows[3]["applied"] == 1.0
    assert rows[3]["lr"] == pytest.approx(rows[2]["lr"])                # the schedule did not move on step 2
    said = capsys.readouterr()
    assert "step 2: no answer token in the batch (all its examples dropped), no update (1 so far)" in \
        said.out + said.err
    assert messages.summary(out)[-1].startswith("1 step(s) of the run had no answer token in their batch")
    two = cfg_for(tmp_path, "steps=2", name="two")                     # batches 1 and 3 only: the same weights
    ours, theirs = params(out["model"]), params(train.run(two, batches=Dropping(BatchIterator(two.data)))["model"])
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


class Dropping(Wrapped):
    """The pipeline's stream without its second batch: steps 1 and 2 here are batches 1 and 3."""

    def __next__(self):
        batch, self.n = next(self.it), self.n + 1
        if self.n == 2:
            batch, self.n = next(self.it), self.n + 1
        return batch

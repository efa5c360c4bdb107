"""The training job survives: SIGKILL then resume (bit-exact), SIGTERM / Ctrl-C save and exit, a restore
onto another mesh (two processes reaching one process's weights bit for bit: tests/convert/test_export.py)."""
import glob
import os
import signal
import time

import numpy as np
import pytest
from flax import nnx

from bmgpt_jax.training import loop as train
from tests.children import communicate
from tests.training.runs import SMALL, _losses, _spawn, _wait_for_checkpoint, cfg_for, params


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    args = ["--config", "tiny_finetune"] + SMALL + ["steps=12", "checkpoint.every=3"]
    full = train.run(cfg_for(tmp_path, *args[2 + len(SMALL):], name="full"))
    killed_dir = tmp_path / "killed"
    proc = _spawn(args + [f"out_dir={killed_dir}"])
    _wait_for_checkpoint(proc, killed_dir / "checkpoints", 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = train.run(cfg_for(tmp_path, *args[2 + len(SMALL):], name="killed"), resume=True)
    assert min(resumed["losses"]) > 3 and max(resumed["losses"]) == 12  # it really resumed, then finished
    a, b = params(full["model"], nnx.Param), params(resumed["model"], nnx.Param)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _losses(killed_dir) == full["losses"]


def test_a_stop_signal_saves_and_exits(tmp_path):
    """`kill PID` (SIGTERM to the run alone, as a preempted VM's agent sends it); Ctrl-C and scancel signal
    the whole process group, below."""
    sig = signal.SIGTERM
    out_dir = tmp_path / "term"
    proc = _spawn(SMALL + ["steps=100000", "checkpoint.every=1000", f"out_dir={out_dir}"])
    deadline = time.time() + 240
    try:
        while not (out_dir / "metrics.jsonl").exists() or len(_losses(out_dir)) < 3:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
    except BaseException:
        proc.kill()         # a 100000-step run must not outlive its test
        raise
    proc.send_signal(sig)
    output, = communicate([proc], timeout=120)
    assert proc.returncode == 0, output[-3000:]
    steps = [int(d) for d in os.listdir(out_dir / "checkpoints") if d.isdigit()]
    assert steps and max(steps) == max(_losses(out_dir)) and max(steps) < 1000
    assert f"{sig.name}: checkpoint saved at step {max(steps)}" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert f"stopped by {sig.name} at step {max(steps)} of 100000; continue with: python -m bmgpt_jax.train" in output
    assert output.rstrip().endswith(f"TensorBoard:  tensorboard --logdir {out_dir / 'tensorboard'}")


def _living_in_group(pgid: int) -> list[int]:
    """The processes of process group `pgid` that are not zombies (an orphan's exit status waits on init)."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue                        # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.split("/")[2]))
    return pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_to_the_process_group_with_encoding_workers(tmp_path, sig):
    """A terminal's Ctrl-C and slurm's scancel signal every process of the group, the encoding workers
    too: they ignore it, the run saves and exits 0 with the resume command, and no worker is left."""
    out_dir = tmp_path / "group"
    proc = _spawn(SMALL + ["steps=100000", "checkpoint.every=1000", "data.workers=2", "data.window_batches=2",
                           f"out_dir={out_dir}"], start_new_session=True)
    deadline = time.time() + 240
    try:
        while not (out_dir / "metrics.jsonl").exists() or len(_losses(out_dir)) < 2:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        os.killpg(proc.pid, sig)
        output, = communicate([proc], timeout=60)
    finally:
        end = time.time() + 5                  # the resource tracker ends when it reads the run's exit
        while (left := _living_in_group(proc.pid)) and time.time() < end:
            time.sleep(0.1)
        for pid in left:                       # the run and its workers must not outlive the test
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert not left, f"processes of the run's group (encoding workers) outlived it: {left}"
    steps = [int(d) for d in os.listdir(out_dir / "checkpoints") if d.isdigit()]
    assert steps and max(steps) == max(_losses(out_dir))
    assert f"{sig.name}: checkpoint saved at step {max(steps)}" in output
    assert f"stopped by {sig.name} at step {max(steps)} of 100000; continue with: python -m bmgpt_jax.train" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]


def test_restore_onto_another_mesh(tmp_path):
    args = ["steps=6", "checkpoint.every=3", "stage=align"]
    full = train.run(cfg_for(tmp_path, *args, "mesh=[8,1,1]", name="a"))
    train.run(cfg_for(tmp_path, "steps=3", *args[1:], "mesh=[8,1,1]", "optim.total_steps=40", name="b"))
    resumed = train.run(cfg_for(tmp_path, *args, "mesh=[2,2,2]", name="b"), resume=True)
    assert sorted(resumed["losses"]) == [4, 5, 6]
    for s in (4, 5, 6):
        assert abs(resumed["losses"][s] - full["losses"][s]) < 1e-5

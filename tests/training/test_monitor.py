"""Monitor: JSONL + TensorBoard files, MFU arithmetic, measured matmul rate, non-finite policy."""
import json
import math

import pytest

from bmgpt_jax.training.monitor import (Monitor, NonFiniteLossError, check_loss, measure_matmul_flops,
                                        train_flops_per_token)


def test_monitor_writes_jsonl_and_tensorboard(tmp_path):
    with Monitor(tmp_path, total_steps=3, flops_per_token=1e6, peak_flops=1e12, progress=True) as mon:
        for step in (1, 2, 3):
            rec = mon.log(step, {"loss": 2.0 / step, "grad_norm": 1.0, "finite": 1.0}, tokens=1000)
        assert rec["tokens_per_s"] > 0
        assert rec["mfu"] == pytest.approx(1e6 * rec["tokens_per_s"] / 1e12)
        mon.log(4, {"loss": math.nan, "finite": 0.0})
        assert mon.skipped == 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert lines[1]["loss"] == 1.0 and "mfu" in lines[2] and math.isnan(lines[3]["loss"])
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_disabled_monitor_writes_nothing(tmp_path):
    with Monitor(tmp_path / "off", total_steps=2, enabled=False) as mon:
        assert mon.log(1, {"loss": 1.0}, tokens=10)["tokens_per_s"] > 0
    assert not (tmp_path / "off").exists()


def test_nonfinite_policy():
    assert check_loss(7, 1.5, "stop")
    with pytest.raises(NonFiniteLossError, match="at step 42 on the batch at data position 3, the first"):
        check_loss(42, float("nan"), "stop", batch="the batch at data position 3")
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        check_loss(3, 1.0, "stop", grad_norm=float("inf"))
    assert check_loss(42, float("inf"), "skip") is False
    with pytest.raises(ValueError, match="'ignore'"):
        check_loss(1, 1.0, "ignore")


def test_flop_counts():
    assert train_flops_per_token(100) == 600
    assert train_flops_per_token(100, n_trainable=10, n_layers=2, seq_len=8, d_model=4) == 400 + 20 + 12 * 64
    rate = measure_matmul_flops(n=128, repeats=2)
    assert rate > 1e6 and measure_matmul_flops(n=128, repeats=2) == rate     # measured once a process


def test_a_resumed_run_cuts_the_replayed_steps(tmp_path):
    with Monitor(tmp_path, total_steps=10, progress=False) as mon:
        for step in range(1, 9):
            mon.log(step, {"loss": float(step)}, data={"examples": 8 * step, "dropped": step // 4})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"time": 1, "step": 9, "lo')                      # torn by a kill mid-write
    with Monitor(tmp_path, total_steps=10, start_step=5, progress=True) as mon:   # resumed from step 5
        for step in range(6, 11):
            rec = mon.log(step, {"loss": 10.0 * step}, data={"examples": 8 * step, "dropped": 2})
    assert rec["examples"] == 80 and rec["dropped"] == 2
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 11))
    assert [x["loss"] for x in lines] == [1.0, 2.0, 3.0, 4.0, 5.0, 60.0, 70.0, 80.0, 90.0, 100.0]
    assert lines[3]["dropped"] == 1 and lines[3]["examples"] == 32


def test_tensorboard_writer_starts_without_torch(tmp_path):
    """The monitor's TensorBoard writer does not import torch (1.6-3 s of every training start), its event
    file holds the logged scalars, and torch still imports afterwards."""
    import subprocess
    import sys
    code = f"""
import struct, sys
from bmgpt_jax.training.monitor import Monitor
with Monitor({str(tmp_path)!r}, total_steps=2, progress=False) as mon:
    mon.log(1, {{"loss": 2.5}}, tokens=10)
assert "torch" not in sys.modules, "torch was imported"
from tensorboardX.proto.event_pb2 import Event
import pathlib
data = next(pathlib.Path({str(tmp_path)!r}, "tensorboard").glob("events.out.tfevents.*")).read_bytes()
values, i = [], 0
while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    event = Event.FromString(data[i + 12:i + 12 + n])
    values += [(v.tag, v.simple_value, event.step) for v in event.summary.value]
    i += 12 + n + 4
print(values)
import torch
print(torch.ones(2).sum().item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "('train/loss', 2.5, 1)" in lines[0] and lines[-1] == "2.0", out.stdout

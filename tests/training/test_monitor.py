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
    with pytest.raises(NonFiniteLossError, match="at step 42"):
        check_loss(42, float("nan"), "stop")
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        check_loss(3, 1.0, "stop", grad_norm=float("inf"))
    assert check_loss(42, float("inf"), "skip") is False
    with pytest.raises(ValueError, match="'ignore'"):
        check_loss(1, 1.0, "ignore")


def test_flop_counts():
    assert train_flops_per_token(100) == 600
    assert train_flops_per_token(100, n_trainable=10, n_layers=2, seq_len=8, d_model=4) == 400 + 20 + 12 * 64
    assert measure_matmul_flops(n=128, repeats=2) > 1e6

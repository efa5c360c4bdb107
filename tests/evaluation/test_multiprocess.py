"""Evaluation with two processes (127.0.0.1, gloo) x 2 CPU devices on an fsdp=2 (one per process) x tensor=2
mesh: the weights are loaded into their shards, each process reading its own slices (a weight split across
the processes is never fetched whole to a host: `parallel.shard` keeps what is already laid out), each process
encodes and feeds its block of every batch, process 0 alone writes the run folder, and the predictions and
option log-likelihoods equal those of one process on one device; `--resume` (process 0 reads the folder,
both skip the records it holds) keeps the finished rows as written; the datasets they share a fresh folder
for are built once, by process 0, while process 1 waits (`builders.prepare`)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bmgpt_jax import evaluate as ev
from tests.children import communicate, xla_flags
from tests.test_evaluate import tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--source", "demo:test", "--source", "medqa:test", "--limit", "3", "--batch-size", "8",
        "--max-new-tokens", "3", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_two_processes_match_one(shared_data, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    data = ["--data-dir", str(tmp_path / "tfds")]
    assert ev.main(["--checkpoint", str(checkpoint), *ARGS, *data, "--mesh", "1,1,1",
                    "--out-dir", str(tmp_path / "single")]) == 0
    one = rows_of(tmp_path / "single")
    # the two processes resume a run that finished two records (one planted): process 0 reads it and both
    # must skip the same records, or their blocks of each batch disagree
    kept = [dict(one[0], prediction="PLANTED"), one[1]]
    (tmp_path / "run0").mkdir()
    (tmp_path / "run0" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags(2),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2",
               BMGPT_SHARED_DATA=str(shared_data))
    procs = [subprocess.Popen([sys.executable, "-m", "bmgpt_jax.evaluate", "--checkpoint", str(checkpoint), *ARGS,
                               "--data-dir", str(tmp_path / "tfds2"), "--mesh", "1,2,2",
                               "--out-dir", str(tmp_path / f"run{i}"), "--resume"], cwd=REPO,
                              env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = communicate(procs, timeout=400)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    # both read one fresh tfds folder: process 0 builds medqa (demo is not a tfds set), process 1 waits
    # and reads that build
    built = [out.count("medqa: built into") for out in outs]
    assert built == [1, 0], built
    assert not (tmp_path / "run1").exists()                         # only process 0 writes
    assert json.loads((tmp_path / "run0" / "metrics.json").read_text())["run"]["processes"] == 2
    two = rows_of(tmp_path / "run0")
    assert two[:2] == kept and "--resume keeps 2 finished row(s)" in outs[0]
    assert [(r["source"], r["index"], r["prediction"]) for r in two[2:]] == \
        [(r["source"], r["index"], r["prediction"]) for r in one[2:]]
    for a, b in zip(two[3:], one[3:]):
        assert a["ll_logprobs"] == pytest.approx(b["ll_logprobs"], abs=1e-3)

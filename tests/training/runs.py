"""Shared by the training-job tests: the small tiny-config overrides, config and parameter helpers, a
training subprocess and what its metrics say, and what two processes feed as one stream (`MergedShards`)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from bmgpt_jax.data.pipeline import BatchIterator, offset_for_process, repad
from bmgpt_jax.training import loop as train
from tests.children import xla_flags

# one bucket, demo data only, small budgets: one compile per mesh
SMALL = ["data.sources=[demo]", "data.seq_buckets=[160]", "data.demo_molecules=200", "progress=false",
         "optim.warmup_steps=2", "optim.total_steps=40", "export=false", "eval.every=0"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cfg_for(tmp_path, *extra, name="run"):
    """The tiny config of the stage named in `extra` (default finetune), made small."""
    stage = next((e.split("=")[1] for e in extra if e.startswith("stage=")), "finetune")
    return train.load_config(f"tiny_{stage}", SMALL + [f"out_dir={tmp_path / name}", *extra])


def params(model, filt=nnx.Param):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.state(model, filt).flat_state()}


def _rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def _losses(out_dir):
    """step -> loss from metrics.jsonl, which must hold each step once (a resumed run cuts what it replays)."""
    rows = [r for r in _rows(out_dir) if "eval_loss" not in r]   # training's rows (held-out passes have their own)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _spawn(args, env_extra=None, **popen):
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu",
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "bmgpt_jax.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _wait_for_checkpoint(proc, ckpt_dir, min_step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if any(s >= min_step for s in steps):
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint appeared")


class MergedShards:
    """What two processes feed, concatenated in process order, as one process's stream (the reference)."""

    def __init__(self, cfg):
        gin = cfg.model.gin
        self.its = [BatchIterator(cfg.data, p, 2, max_atoms=gin.max_atoms, over_cap=gin.over_cap) for p in range(2)]
        self.tokenizer = self.its[0].tokenizer

    def __next__(self):
        parts = [next(it) for it in self.its]
        T = max(p["input_ids"].shape[1] for p in parts)
        L = max(p["prot_ids"].shape[1] for p in parts)
        parts = [offset_for_process(repad(p, T, L), i) for i, p in enumerate(parts)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def state(self):
        return self.its[0].state()

    def restore(self, state):
        for it in self.its:
            it.restore(state)

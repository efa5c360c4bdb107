"""Synthetic checkpoints of any layout, written one tensor at a time (for tests and bench/convert.py), and
a child-process runner that reports the child's own peak resident memory (`os.wait4`'s rusage)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bmgpt_jax.convert import stream
from bmgpt_jax.convert.tensor_map import Entry, Layout

REPO = Path(__file__).resolve().parent.parent.parent


def _dtype(e: Entry, dtype) -> np.dtype:
    own = np.dtype(e.save_dtype or e.dtype)
    return np.dtype(dtype) if dtype is not None and jnp.issubdtype(own, jnp.floating) else own


def specs(layout: Layout, dtype=None) -> list[tuple[str, tuple, np.dtype]]:
    return [(e.key, e.shape, _dtype(e, dtype)) for e in layout.entries]


def tensors(layout: Layout, dtype=None, seed: int = 0, scale: float = 0.02):
    """`(key, array)` for every entry, deterministic in `seed`: floats ~ N(0, scale) in `dtype` (default:
    the entry's own), integer tensors (counters) small random integers. `scale=None`: 2-byte floats
    from random bit patterns with the top exponent bit cleared (finite, |x| < 2; ten times faster, for
    the memory and speed benchmarks)."""
    rng = np.random.default_rng(seed)
    for e in layout.entries:
        want = _dtype(e, dtype)
        if jnp.issubdtype(want, jnp.integer):
            yield e.key, rng.integers(0, 1000, e.shape).astype(want)
        elif scale is None and want.itemsize == 2:
            yield e.key, (rng.integers(0, 2**16, e.shape, dtype=np.uint16) & 0xBFFF).view(want)
        else:
            yield e.key, (rng.standard_normal(e.shape, dtype=np.float32) * (scale or 0.02)).astype(want)


def write(layout: Layout, dst, fmt: str = "safetensors", dtype=None, seed: int = 0,
          max_shard_bytes: int = stream.SHARD_BYTES, extra_files=None, scale: float | None = 0.02) -> Path:
    """A synthetic checkpoint of `layout` at `dst` (a folder for safetensors, a file for pth)."""
    return stream.write(dst, fmt, specs(layout, dtype), tensors(layout, dtype, seed, scale), extra_files,
                        max_shard_bytes)


# Starts the command and reports its peak RSS (RUSAGE_CHILDREN: this launcher has just that one child).
# A launcher, because a child forked straight from a big parent (pytest after writing a checkpoint)
# inherits the parent's peak as its own `ru_maxrss` when it execs; the launcher's exec absorbs that.
LAUNCHER = r"""
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(code)
"""


def run_child(args: list[str], env: dict | None = None, timeout: float = 600) -> tuple[str, int]:
    """Run `python *args` from the repo root; return (stdout, the child's peak RSS in bytes)."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "maxrss"
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(report), sys.executable, *args], cwd=REPO,
                              env=full_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise AssertionError(f"child {args[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc.stdout, int(report.read_text())


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])

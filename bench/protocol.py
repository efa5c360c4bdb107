"""The benchmark protocol every bench/*.py follows (issue 16), so that a figure survives a second look.

- `header(title)` prints the machine before anything is timed: CPU model (/proc/cpuinfo "model name"), the
  vector extensions that matter here (avx2, avx512f, avx512_bf16, amx_*), cores (`os.cpu_count` and the
  affinity set this process may run on), library versions, the date and the 1-minute load average; a load
  >= 1 is flagged: such a run checks the code, its figures do not go into README/docs. `footer(load)`
  prints the load average after and how many cores other processes kept busy during the run (from
  /proc/stat: all busy CPU time minus this process's own); a quiet run started below load 1 and others
  kept under a quarter of a core busy.
- `interleave(sides, trials)` warms every side up once (compilation, caches), then runs the sides one
  after the other, trial by trial, rotating which goes first, so load from other processes hits all sides
  alike; each timed call starts after a short idle pause, so no side runs while the other's thread pool is
  still spinning. Each side gets `trials` (>= 5 for a published figure) wall-clock times.
- `Stats` reports the median and the min-max; `rate(stats, work)` turns them into items/s (the median
  rate is work / median time; the range is work / slowest .. work / fastest); the ratio of two sides is
  the ratio of their medians.
- `read_bandwidth()` measures this machine's memory read rate (bytes/s) for the decode-bandwidth rows.

Scripts run as `python bench/x.py`, so this module is imported as `protocol` (bench/ is sys.path[0]).
Importing it puts the repository root first on `sys.path`: a bench measures the `bmgpt_jax` of the
checkout it lives in, not whichever copy is installed (an A/B run from a second worktree would
otherwise time the installed code twice). Every bench imports it before `bmgpt_jax`.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Mapping

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [REPO]:
    sys.path.insert(0, REPO)

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
LIBRARIES = ("jax", "jaxlib", "flax", "torch", "transformers")


def cpu() -> tuple[str, set[str]]:
    """(CPU model name, its flags) from /proc/cpuinfo; (platform's processor name, empty set) elsewhere."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def has_flag(flag: str) -> bool:
    """Whether the CPU advertises `flag` (e.g. "avx512_bf16")."""
    return flag in cpu()[1]


def _version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "absent"


def add_trials_arg(ap: argparse.ArgumentParser, default: int = 5) -> None:
    """The `--trials` option every bench has."""
    ap.add_argument("--trials", type=int, default=default,
                    help=f"interleaved timed trials per side (default {default}; >= 5 for a published figure)")


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, CPU s busy on the whole machine, CPU s of this process) -- Linux /proc/stat, else None."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def others_busy(a, b) -> float | None:
    """Cores kept busy by other processes between two `cpu_snapshot`s (a clean benchmark wants ~0)."""
    if a is None or b is None:
        return None
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / max(b[0] - a[0], 1e-9))


_START: list = []


def header(title: str) -> float:
    """Print the machine description; return the 1-minute load average before the run."""
    name, flags = cpu()
    present = [f for f in FLAGS if f in flags] + sorted(f for f in flags if f.startswith("amx") and f not in FLAGS)
    load = os.getloadavg()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    libs = ", ".join(f"{lib} {_version(lib)}" for lib in LIBRARIES)
    print(f"# {title}")
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; CPU: {name}; "
          f"{os.cpu_count()} cores ({usable} usable by this process); "
          f"extensions: {' '.join(present) or 'none of ' + ' '.join(FLAGS)}")
    print(f"# python {platform.python_version()}, {libs}")
    print(f"# load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("" if load[0] < 1 else "  ** >= 1: the machine is busy; figures below are not for publication **"),
          flush=True)
    _START[:] = [cpu_snapshot()]
    return load[0]


def footer(load_before: float) -> None:
    """Print the load average after the run (and whether the whole run was on a quiet machine)."""
    load = os.getloadavg()
    busy = others_busy(_START[0], cpu_snapshot()) if _START else None
    # the load average after counts this run's own threads (2 busy cores on a 2-core machine read ~2),
    # so where /proc/stat tells what other processes used, that decides; elsewhere the load after does
    quiet = load_before < 1 and (busy < 0.25 if busy is not None else load[0] < 1.5)
    print(f"\n# load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("" if busy is None else f"; other processes kept {busy:.2f} of {os.cpu_count()} cores busy during the run")
          + f" ({'quiet run' if quiet else 'busy machine: ratios only indicative, absolute figures not comparable'})")


@dataclass
class Stats:
    """Wall-clock seconds of one side's trials."""
    times: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def fastest(self) -> float:
        return float(min(self.times))

    @property
    def slowest(self) -> float:
        return float(max(self.times))


# idle seconds before each timed call, so the previous side's worker threads stop spinning; the
# environment variable BENCH_PAUSE_S changes it (0: the calls back to back, as before issue 16's fix)
PAUSE_S = float(os.environ.get("BENCH_PAUSE_S", "0.2"))


def interleave(sides: Mapping[str, Callable[[], object]], trials: int, warmup: int = 1,
               pause: float = PAUSE_S) -> dict[str, Stats]:
    """Time every side `trials` times, trial by trial, rotating the order; `warmup` untimed calls first.

    Each timed call starts after `pause` idle seconds: PyTorch's OpenMP threads (and XLA's pool) keep
    spinning on the cores for a while after a call returns, and a call started at once would share the
    cores with them (measured here: an XLA matmul right after a torch one ran at 0.7x its speed)."""
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    names = list(sides)
    for name in names:
        for _ in range(warmup):
            sides[name]()
    times = {n: [] for n in names}
    for t in range(trials):
        for name in names[t % len(names):] + names[:t % len(names)]:
            time.sleep(pause)
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return {n: Stats(v) for n, v in times.items()}


def rate(stats: Stats, work: float, fmt: str = ",.0f") -> str:
    """`work` per second as "median (min-max)"."""
    return (f"{work / stats.median:{fmt}} ({work / stats.slowest:{fmt}}-{work / stats.fastest:{fmt}})")


def seconds(stats: Stats, scale: float = 1e3, fmt: str = ".1f") -> str:
    """Time per trial (default ms) as "median (min-max)"."""
    return f"{stats.median * scale:{fmt}} ({stats.fastest * scale:{fmt}}-{stats.slowest * scale:{fmt}})"


def ratio(ours: Stats, theirs: Stats) -> str:
    """Speed of ours over theirs: the ratio of the median times (> 1: ours is faster)."""
    return f"{theirs.median / ours.median:.2f}x"


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Memory read rate in bytes/s: the best of `repeats` passes over a `mib` MiB float32 array (far larger
    than any cache) by a numpy sum (one thread), a jitted XLA sum and a jitted XLA vector-matrix product
    `[1, 512] @ [512, n]` (all cores). The last is the decode step's own access pattern and the fastest
    reader on the 2-core Ice Lake of docs/benchmarks.md's earlier runs (the benches printed 23.5-26.4 GB/s
    with it, 23.2 with the sums alone), so a batch-1 decode, whose LM-head product reads at that rate,
    cannot beat the bound."""
    import jax
    import jax.numpy as jnp
    a = np.ones(mib * 2 ** 20 // 4, np.float32)
    x = jax.device_put(a)
    w = jnp.ones((512, a.size // 512), jnp.float32)
    vec = jnp.ones((1, 512), jnp.float32)
    total, product = jax.jit(jnp.sum), jax.jit(jnp.matmul)
    passes = (a.sum, lambda: total(x).block_until_ready(), lambda: product(vec, w).block_until_ready())
    for run in passes[1:]:
        run()  # compile
    best = np.inf
    for _ in range(repeats):
        for run in passes:
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return mib * 2 ** 20 / best


def decode_bytes_per_token(cfg, prompt: int, new: int, itemsize: int) -> float:
    """For a Llama config `cfg`: bytes that must be read from memory per new token at batch 1: all parameters but the embedding
    table (one row of it), plus the keys and values cached so far (mean over the `new` steps)."""
    weights = (cfg.num_params() - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * itemsize
    kv_per_pos = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.dim_per_head * itemsize
    return weights + kv_per_pos * (prompt + (new - 1) / 2)


def table(columns: list[str], rows: list[list[str]]) -> None:
    """Print a Markdown table."""
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    sys.stdout.flush()

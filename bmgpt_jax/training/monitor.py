"""Training feedback: progress bar, TensorBoard + JSONL metrics, MFU, and the non-finite-loss policy.

MFU (model FLOPs utilisation) = useful training FLOPs per second / the device's peak rate. The FLOPs
come from `train_flops_per_token` (6·N + attention, the PaLM appendix-B count); the peak is *measured* by `measure_matmul_flops` (a timed square
matmul on the current device) rather than taken from a spec sheet, so a CPU run reports a meaningful
number too. Only process 0 writes (`enabled` defaults to `jax.process_index() == 0`).
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Literal, Mapping

import jax
import jax.numpy as jnp
import tqdm
from flax import nnx

from bmgpt_jax.models.layers import dense

NonFinitePolicy = Literal["stop", "skip"]


def summary_writer(log_dir: str, purge_step: int | None):
    """tensorboardX's `SummaryWriter`, imported without torch when torch is not loaded yet.

    tensorboardX imports torch (if installed) only to accept torch tensors, which the monitor never
    passes; that import is 1.6-3 s of every training start. A `None` entry in `sys.modules` makes its
    `import torch` raise ImportError, which tensorboardX catches; the entry is removed right after, so a
    later `import torch` works as usual.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter(log_dir, purge_step=purge_step)


class NonFiniteLossError(FloatingPointError):
    """Raised by the "stop" policy when a step's loss (or gradient norm) is NaN or infinite."""


def check_loss(step: int, loss: float, policy: NonFinitePolicy = "stop", grad_norm: float = 0.0,
               batch: str = "", note: str = "") -> bool:
    """True when `loss` and `grad_norm` are finite. Otherwise "stop" raises NonFiniteLossError naming the
    step and `batch` (where that step's data came from, e.g. the pipeline position), plus `note` (e.g. which
    step is saved), and "skip" returns False (the step, `make_train_step`, left the state unchanged)."""
    if policy not in ("stop", "skip"):
        raise ValueError(f"non-finite policy must be 'stop' or 'skip', got {policy!r}")
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    if policy == "stop":
        where = f" on {batch}" if batch else ""
        note = f" ({note})" if note else ""
        raise NonFiniteLossError(f"non-finite loss {loss} (grad norm {grad_norm}) at step {step}{where}, the first "
                                 f"such step; stopping{note}. Inspect that batch; if the loss was finite and rising "
                                 "before, lower the learning rate; or set nonfinite: skip.")
    return False


@functools.cache
def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5, device=None) -> float:
    """Peak matmul rate (FLOP/s) of `device` (default: the first): best of `repeats` timed n×n @ n×n, computed
    as the models compute their products (`layers.dense`: in bfloat16 on CPU, the bfloat16 GEMM). Measured
    once per process and arguments (about a second on a CPU): later runs in the same process reuse it."""
    device = device or jax.devices()[0]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (n, n), dtype), device)
    matmul = jax.jit(dense)
    matmul(a, b).block_until_ready()  # compile + warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def train_flops_per_token(n_params: int, *, n_trainable: int | None = None, n_layers: int = 0,
                          seq_len: int = 0, d_model: int = 0) -> float:
    """Training FLOPs per token: forward 2N + backward 4N, less 2 per frozen parameter (no weight
    gradient), plus attention 12·L·T·d (scores and weighted sum, forward and backward).

    `n_params` counts matmul parameters (exclude embedding tables, which are gathers); `n_trainable`
    defaults to all of them. Activation gradients are counted through every layer, an upper bound when
    frozen layers come first (frozen encoders need no backward at all).
    """
    n_trainable = n_params if n_trainable is None else n_trainable
    return 4.0 * n_params + 2.0 * n_trainable + 12.0 * n_layers * seq_len * d_model


def matmul_params(model: nnx.Module) -> int:
    """Parameters that take part in matmuls (embedding tables are gathers), of a concrete or abstract model."""
    return sum(math.prod(v.shape) for p, v in nnx.state(model, nnx.Param).flat_state()
               if p[-1] != "weight" or len(v.shape) < 2)


class Monitor:
    """Progress bar, `metrics.jsonl` and TensorBoard events under `log_dir` for one run.

    Call `log(step, metrics, tokens=..., data=...)` after each logged step with host floats (e.g.
    `jax.device_get(metrics)`); `tokens` is how many token positions were processed since the previous
    call (real tokens: the attention mask's sum, padding excluded); `data` holds the pipeline's counts
    (examples read, dropped in all and per reason), recorded as they are (TensorBoard: `data/...`) and
    shown in the bar. A step whose batch had no loss token (`n_tokens` 0, the update not applied) is
    recorded without `loss` and counted in `empty`; one with a non-finite loss is counted in `skipped`.
    tokens/s uses wall time since the previous call, so the first value includes compilation. MFU needs
    `flops_per_token` and `peak_flops`.

    A run resumed at `start_step` continues the same files: `metrics.jsonl` is first cut back to the rows
    of steps up to `start_step` (the steps after it are about to be replayed), and TensorBoard is told to
    purge its events from `start_step + 1` on, so neither holds a step twice.
    """

    def __init__(self, log_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 progress: bool = True, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.skipped = 0
        self.empty = 0
        self._step = start_step
        self._last_time = time.perf_counter()
        self._bar = self._jsonl = self._tb = None
        if not self.enabled:
            return
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cut_jsonl(self.log_dir / "metrics.jsonl", start_step)
        self._jsonl = open(self.log_dir / "metrics.jsonl", "a")
        self._tb = summary_writer(str(self.log_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if progress:
            self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, float], *, tokens: int = 0,
            data: Mapping[str, int] | None = None) -> dict:
        """Record `metrics` (and the pipeline counts `data`) for `step`; returns the record with tokens_per_s
        (and mfu) added."""
        now = time.perf_counter()
        elapsed, self._last_time = max(now - self._last_time, 1e-9), now
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()},
                  **{k: int(v) for k, v in (data or {}).items()}}
        if tokens:
            record["tokens_per_s"] = tokens / elapsed
            if self.flops_per_token and self.peak_flops:
                record["mfu"] = self.flops_per_token * tokens / elapsed / self.peak_flops
        if "finite" in record and record["finite"] == 0.0:
            self.skipped += 1
            self.write(f"step {step}: non-finite loss, update skipped ({self.skipped} so far)")
        elif record.get("n_tokens") == 0.0:   # no loss to record: its 0.0 would read as a perfect step
            record.pop("loss", None)
            self.empty += 1
            self.write(f"step {step}: no answer token in the batch (all its examples dropped), no update "
                       f"({self.empty} so far)")
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and math.isfinite(value):
                self._tb.add_scalar(f"{'data' if key in (data or {}) else 'train'}/{key}", value, step)
        if self._bar is not None:
            postfix = {"loss": f"{record.get('loss', math.nan):.4f}"}
            if "tokens_per_s" in record:
                postfix["tok/s"] = f"{record['tokens_per_s']:.3g}"
            if "mfu" in record:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            if record.get("dropped"):
                postfix["dropped"] = f"{record['dropped']}/{record['examples']}"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(step - self._step)
        self._step = step
        return record

    def log_eval(self, step: int, loss: float, tokens: float, *, batches: int) -> None:
        """Record a held-out pass after `step` (`training.validate`): a `metrics.jsonl` row with `eval_loss`,
        `eval_tokens` and `eval_batches`, TensorBoard's `eval/loss` and a console line. The pass's time is
        left out of the next step's tokens/s."""
        self._last_time = time.perf_counter()
        if not self.enabled:
            return
        record = {"step": int(step), "eval_loss": float(loss), "eval_tokens": int(tokens), "eval_batches": int(batches)}
        self._jsonl.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._jsonl.flush()
        if math.isfinite(loss):
            self._tb.add_scalar("eval/loss", loss, step)
        self.write(f"step {step}: held-out loss {loss:.4f} over {int(tokens):,} answer tokens ({batches} batches)")

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar (process 0 only)."""
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(message)

    def close(self) -> None:
        """Flush and close the bar, the JSONL file and the TensorBoard writer."""
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        self._bar = self._jsonl = self._tb = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cut_jsonl(path: Path, last_step: int) -> None:
    """Keep only the rows of `path` (JSON lines with a "step") up to `last_step`; a torn last line (a
    killed run) goes too. Rewritten through a temporary file, so an interruption leaves either version."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)

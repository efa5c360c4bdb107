"""Optimizer and trainable subset: AdamW with warmup + cosine decay and global-norm clipping.

Only the *trainable* parameters are handed to optax, so frozen parameters (the decoder and encoders in
the `align` stage, everything but LoRA in a LoRA fine-tune) get neither a gradient nor Adam moments:
`split_trainable` cuts the model state into `(graphdef, trainable, frozen)` with `nnx.split`, the train
step differentiates with respect to `trainable` only, and `tx.init(trainable)` sizes the optimizer state.
Master parameters stay float32; a lower compute dtype is applied at use inside the step (see training/step.py).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import optax
from flax import nnx

from bmgpt_jax.config import check_range


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + schedule hyper-parameters (the `optim:` section of a training config).

    `total_steps` counts optimizer updates (one update = `grad_accum` micro-batches); 0 (the default)
    means "the run's length": the training job sets it to its `steps`. The learning rate rises linearly
    from 0 to `lr` over `warmup_steps`, then follows a cosine down to `lr * end_lr_ratio` at `total_steps`.
    `clip_norm <= 0` disables clipping. Weight decay applies to matrices only (ndim >= 2): norms and biases
    are not decayed. Ranges: `lr`, `weight_decay`, `eps` >= 0; `end_lr_ratio` in [0, 1]; `b1`, `b2` in [0, 1).
    """

    lr: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 0
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        check_range(self, ("lr", "weight_decay", "eps"), 0)
        check_range(self, "end_lr_ratio", 0, 1)
        check_range(self, ("b1", "b2"), 0, 1, high_open=True)
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        if self.total_steps < 0 or self.warmup_steps < 0:
            raise ValueError(f"optim.total_steps ({self.total_steps}) and optim.warmup_steps "
                             f"({self.warmup_steps}) must be >= 0")
        if self.total_steps and self.warmup_steps > self.total_steps:
            raise ValueError(f"optim.warmup_steps ({self.warmup_steps}) exceeds optim.total_steps "
                             f"({self.total_steps})")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate as a function of the update count: linear warmup 0 -> lr, cosine to lr*end_lr_ratio."""
    if cfg.total_steps < 1:
        raise ValueError("optim.total_steps is 0 (\"the run's length\"): set it, or let the training job "
                         "resolve it from `steps` (training.loop.load_config)")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps, end_value=cfg.lr * cfg.end_lr_ratio)


def _decay_mask(params: Any) -> Any:
    """True for matrices: at least two axes besides a scanned `layers` axis (so a stack of norm weights
    `[layers, D]` is not decayed). Variables are judged by their logical axes, bare arrays by ndim."""
    def decays(v):
        if isinstance(v, nnx.Variable):
            axes = v.get_metadata().get("out_sharding")
            n = sum(1 for a in axes if a != "layers") if axes else v.ndim
            return v.replace(n >= 2)
        return v.ndim >= 2
    return jax.tree.map(decays, params, is_leaf=lambda v: isinstance(v, nnx.Variable))


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(schedule); the gradients given to it are token-averaged."""
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def update_count(opt_state: Any) -> jax.Array:
    """Number of updates applied so far (Adam's `count`; unchanged by a skipped non-finite step)."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    if not counts:
        raise ValueError("optimizer state has no `count` entry; was it built by make_optimizer?")
    return counts[0][1]


def path_str(path: Sequence[Any]) -> str:
    """An NNX state path as a dotted name: ('layers', 0, 'self_attn', 'q_proj', 'kernel') -> 'layers.0...'."""
    return ".".join(str(p) for p in path)


def trainable_filter(patterns: Sequence[str] | Callable[[str], bool] | None = None) -> nnx.filterlib.Filter:
    """An nnx filter selecting the trainable `nnx.Param`s.

    `patterns`: None = every Param; a list of regular expressions searched in the dotted parameter path
    (`["adaptor"]`, `[r"\\.lora_"]`, `["^decoder\\.", "adaptor"]`); or a predicate on the dotted path.
    Non-Param variables (RNG counters, caches) are never trainable.
    """
    if patterns is None:
        return nnx.Param
    if callable(patterns):
        pred = patterns
    else:
        regexes = [_compile(p) for p in patterns]
        pred = lambda name: any(r.search(name) for r in regexes)  # noqa: E731
    return nnx.All(nnx.Param, lambda path, _: bool(pred(path_str(path))))


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"trainable pattern {pattern!r} is not a regular expression ({e})") from None


def check_patterns_match(model: nnx.Module, patterns: Sequence[str]) -> None:
    """ValueError naming each pattern that selects no `Param` of `model` (e.g. a layer index when the
    layers are scanned into one stacked parameter): a pattern that silently selects nothing leaves
    weights frozen that the config meant to train."""
    names = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    unmatched = [p for p in patterns if not any(_compile(p).search(n) for n in names)]
    if unmatched:
        raise ValueError(f"trainable pattern(s) {unmatched} select no parameter (the paths look like "
                         f"{names[:3]}; with scanned layers there is no layer index)")


def split_trainable(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param
                    ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, trainable_state, frozen_state)`; frozen holds every other variable (frozen Params too).

    Raises ValueError when the filter selects no parameter, which is always a config mistake.
    """
    graphdef, train_state, frozen_state = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(train_state):
        names = [path_str(p) for p, _ in nnx.to_flat_state(frozen_state)][:8]
        raise ValueError(f"the trainable filter selects no parameter (first parameters: {names})")
    return graphdef, train_state, frozen_state


def count_params(state: nnx.State) -> int:
    """Total number of array elements in a state (parameters or optimizer state)."""
    return sum(int(x.size) for x in jax.tree.leaves(state))

"""The generic train step: a pure function of (graphdef, trainable, frozen, opt_state, batch), and its jit.

`make_train_step(loss_fn, tx, ...)` builds the step for any model whose loss is written as
`loss_fn(model, batch) -> (loss_sum, n_tokens)`: the *sum* of per-token losses and how many tokens it
covers. Gradients of `loss_sum` are summed over `grad_accum` micro-batches (a `jax.lax.scan`) and divided
once by the total token count, so k micro-batches give the update of one k-times batch (token-weighted,
up to float re-association). Only `trainable` is differentiated and updated; `frozen` is read only.

`jit_train_step` jits it on a mesh with explicit in/out shardings from the logical-axis rules
(`parallel.tree_shardings`) and donates the trainable and optimizer state buffers.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bmgpt_jax.parallel import tree_shardings, within
from bmgpt_jax.training.optim import update_count

LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, jax.Array]]
StepFn = Callable[[nnx.GraphDef, nnx.State, nnx.State, Any, Any], tuple[nnx.State, Any, dict]]


def cast_floating(tree: Any, dtype) -> Any:
    """`tree` with floating leaves cast to `dtype` (None = unchanged); integer leaves (ids, counters) kept.
    Of nnx variables only `Param`s are cast: BatchNorm statistics (`BatchStat`) stay float32, as at
    inference (in bfloat16 a running mean of 100.3 would read 100.5)."""
    if dtype is None:
        return tree

    def cast(x):
        if isinstance(x, nnx.Variable):
            return x.replace(cast(x[...])) if isinstance(x, nnx.Param) else x
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    compute_dtype=None,
                    schedule: optax.Schedule | None = None) -> StepFn:
    """Build `train_step(graphdef, trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)`.

    grad_accum: with k > 1 every batch leaf carries a leading micro-batch axis `[k, ...]` (see
      `data.pipeline.stack_batches`); the step scans over it. Each micro-batch keeps its own static shapes, so a
      multimodal batch (graphs, proteins) is split by the pipeline, not by reshaping.
    compute_dtype: e.g. jnp.bfloat16: float parameters are cast at use (master copy stays float32; the
      cast's transpose returns float32 gradients).
    schedule: the learning-rate schedule, reported as `metrics["lr"]` at the update count.

    The update is applied only when the loss and the gradient norm are finite and the batch holds a loss
    token; otherwise the trainable and optimizer state come back unchanged (Adam's count too: the schedule
    does not advance). A non-finite step would ruin the weights (the loop then stops or skips it, per
    `nonfinite`, and can save the state before it); a batch without a loss token (`n_tokens` 0: every
    example of its window dropped, the pipeline's padding batch) has a zero gradient, but an update would
    still move the weights by Adam's momentum and the weight decay. The update is a `lax.cond` branch, so
    keeping the state costs no second copy of it (a `where` select over the new and old state holds both).

    metrics (float32 scalars): loss (token mean), loss_sum, n_tokens, grad_norm (before clipping),
    finite (1.0 / 0.0), applied (1.0 / 0.0: whether the update was applied) and lr when `schedule` is given.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

    def train_step(graphdef, trainable, frozen, opt_state, batch):
        frozen_c = cast_floating(frozen, compute_dtype)

        def micro(params, mb):
            model = nnx.merge(graphdef, cast_floating(params, compute_dtype), frozen_c)
            loss_sum, n_tokens = loss_fn(model, mb)
            return loss_sum.astype(jnp.float32), jnp.asarray(n_tokens, jnp.float32)

        grad_fn = jax.value_and_grad(micro, has_aux=True)
        if grad_accum == 1:
            (loss_sum, n_tokens), grads = grad_fn(trainable, batch)
        else:
            for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
                if leaf.ndim == 0 or leaf.shape[0] != grad_accum:
                    raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has shape {leaf.shape}; with "
                                     f"grad_accum={grad_accum} it needs a leading micro-batch axis of {grad_accum}")

            def body(carry, mb):
                ls, nt, g = carry
                (l_i, n_i), g_i = grad_fn(trainable, mb)
                return (ls + l_i, nt + n_i, jax.tree.map(jnp.add, g, g_i)), None

            zero = jnp.zeros((), jnp.float32)
            init = (zero, zero, jax.tree.map(jnp.zeros_like, trainable))
            (loss_sum, n_tokens, grads), _ = jax.lax.scan(body, init, batch)

        denom = jnp.maximum(n_tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        applied = (n_tokens > 0) & finite

        def update(state):
            params, opt = state
            updates, new_opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), new_opt

        new_trainable, new_opt_state = jax.lax.cond(applied, update, lambda state: state, (trainable, opt_state))
        metrics = {"loss": loss, "loss_sum": loss_sum, "n_tokens": n_tokens, "grad_norm": grad_norm,
                   "finite": finite.astype(jnp.float32), "applied": applied.astype(jnp.float32)}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(update_count(opt_state)), jnp.float32)
        return new_trainable, new_opt_state, metrics

    return train_step


def jit_opt_init(tx: optax.GradientTransformation, trainable: Any, mesh: Mesh):
    """`jax.jit(tx.init)` with the rule shardings as `out_shardings`: each device creates only its shards of
    the optimizer state (Adam moments sharded like the params). `trainable` may be abstract."""
    return jax.jit(tx.init, out_shardings=tree_shardings(jax.eval_shape(tx.init, trainable), mesh))


def init_opt_state(tx: optax.GradientTransformation, trainable: nnx.State, mesh: Mesh) -> Any:
    """`tx.init(trainable)` created directly in its sharded layout (`jit_opt_init`)."""
    return jit_opt_init(tx, trainable, mesh)(trainable)


def jit_train_step(train_step: StepFn, graphdef: nnx.GraphDef, trainable: Any, frozen: Any, opt_state: Any,
                   batch_sharding: Mapping[str, NamedSharding], mesh: Mesh):
    """`jax.jit` of `train_step` bound to `graphdef`: call it as `f(trainable, frozen, opt_state, batch)`.

    `trainable`, `frozen`, `opt_state` may be concrete or abstract (only their structure and metadata are
    read). In/out shardings follow the logical-axis rules; trainable and optimizer state are donated, so
    the caller must drop its references to the old ones. The step traces under the mesh's abstract mesh,
    so `parallel.constrain` calls in the model take effect. Metrics come back replicated.
    """
    t_sh, f_sh, o_sh = (tree_shardings(x, mesh) for x in (trainable, frozen, opt_state))

    def step(tr, fr, os, batch):
        with within(mesh):
            return train_step(graphdef, tr, fr, os, batch)

    return jax.jit(step, in_shardings=(t_sh, f_sh, o_sh, dict(batch_sharding)),
                   out_shardings=(t_sh, o_sh, NamedSharding(mesh, P())), donate_argnums=(0, 2))

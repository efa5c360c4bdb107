"""Token cross-entropy without `[batch, seq, vocab]` float32 logits.

A 32001-token vocabulary makes the logits of a 16 x 4096 batch 8 GiB in float32, more than the rest of
a layer's activations. `chunked_cross_entropy` cuts the sequence into chunks of `chunk_size` tokens and
visits them in a `jax.lax.scan` whose body is `jax.checkpoint`ed: the forward keeps one chunk's logits
`[batch, chunk, vocab]` at a time, and the backward recomputes each chunk's logits from its hidden
states instead of storing them. The result equals the dense form (same per-token log-softmax, summed).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def chunked_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                          weights: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """(sum of `weights * nll`, sum of `weights`), float32 scalars.

    logits_fn: hidden `[b, c, embed]` -> logits `[b, c, vocab]`; hidden `[b, t, embed]`; targets `[b, t]`
    int (the token each position predicts); weights `[b, t]` (0 = not counted). chunk_size: tokens per
    chunk along the sequence; 0 (or >= t) computes all logits at once. The last chunk is zero-padded
    with weight 0.
    """
    weights = weights.astype(jnp.float32)
    b, t, d = hidden.shape
    if chunk_size <= 0 or chunk_size >= t:
        nll = optax.softmax_cross_entropy_with_integer_labels(logits_fn(hidden), targets)
        return jnp.sum(nll * weights), jnp.sum(weights)
    n = -(-t // chunk_size)
    pad = n * chunk_size - t

    def chunks(x):  # [b, t, ...] -> [n, b, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n, chunk_size) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(total, xs):
        h, y, w = xs
        nll = optax.softmax_cross_entropy_with_integer_labels(logits_fn(h), y)
        return total + jnp.sum(nll * w), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(hidden), chunks(targets), chunks(weights)))
    return total, jnp.sum(weights)

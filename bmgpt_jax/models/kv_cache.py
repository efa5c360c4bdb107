"""The decoder's KV cache (`KVCache`) and the operations on its buffers: writing a step's slots in place,
reading a layer's slots, and the beam-search reorders (`repeat_rows` at the start, `reorder_layer` /
`follow_beams` per step). Buffers are `[(layers,) batch, kv_heads, slots, head_dim]`, the batch dim dropped
for a batch of one (see `KVCache`)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bmgpt_jax.models.layers import take


class KVCache(NamedTuple):
    """Decoding state. k/v: per layer `[batch, kv_heads, max_len, head_dim]` (heads before slots: the layout the
    attention products read without a transposed copy), a tuple of one buffer per layer, or for a scanned
    model (`scan_layers`) one array `[layers, ...]` that rides in the scan's carry; either way each step
    writes its slots in place. A batch of one stores `[kv_heads, max_len, head_dim]`: XLA drops a size-1
    batch dim from the score products, and on CPU the reshape between the buffer a step writes and the
    one the products read made it copy every layer's keys per token (docs/chat.md). `valid [batch,
    max_len]` marks filled slots that are real tokens; `index` is the next slot to write; `next_pos [batch]`
    the next rotary position of each row (padding does not advance it, so left-padded prompts decode
    correctly)."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array
    next_pos: jax.Array

    def repeat_rows(self, n: int) -> "KVCache":
        """The cache with each batch row repeated `n` times in place (rows `0, 0, .., 1, 1, ..`): beam search's
        start, every beam a copy of its prompt. A broadcast: as a gather of those rows, the TPU compiler
        assembled the grown cache from per-128-slot pieces, holding it twice."""
        b = self.valid.shape[0]

        def repeat(x):
            full = with_batch(x, b)                                  # [(layers,) b, h, s, d]
            return stored(jnp.repeat(full, n, axis=full.ndim - 4))  # a static count: broadcast + reshape
        return self._replace(k=jax.tree.map(repeat, self.k), v=jax.tree.map(repeat, self.v),
                             valid=jnp.repeat(self.valid, n, axis=0), next_pos=jnp.repeat(self.next_pos, n, axis=0))


def check_room(cache: KVCache, t: int) -> None:
    """ValueError if `t` new tokens do not fit the cache's slots: always when `t` alone exceeds them, and
    past the next free slot when `cache.index` is concrete (an eager call). Under jit the index is traced
    and an overflow cannot be raised; `generation.generate` sizes its caches to the prompt plus
    `max_new_tokens`, so only a caller's own too-small cache can overflow (its logits then turn NaN)."""
    slots = cache.valid.shape[1]
    index = None if isinstance(cache.index, jax.core.Tracer) else int(cache.index)
    if t > slots or (index is not None and index + t > slots):
        raise ValueError(f"{t} new token(s) at slot {'?' if index is None else index} overflow the KV cache's "
                         f"{slots} slots (init_cache(batch, max_len) with a larger max_len)")


def stored(x: jax.Array) -> jax.Array:
    """Cache buffer(s) `[(layers,) b, kv_heads, s, d]` in their stored form (see `KVCache`): b == 1 dropped."""
    return jnp.squeeze(x, x.ndim - 4) if x.shape[-4] == 1 else x


def with_batch(x: jax.Array, batch: int) -> jax.Array:
    """A stored cache buffer back as `[(layers,) b, kv_heads, s, d]`."""
    return jnp.expand_dims(x, x.ndim - 3) if batch == 1 else x


def write_slots(buf: jax.Array, new: jax.Array, layer, index) -> jax.Array:
    """`new [b, t, kv_heads, d]` written into the cache buffer at slot `index` (and layer `layer` of a stacked one)."""
    new = stored(jnp.swapaxes(new, 1, 2).astype(buf.dtype))
    start = (0,) * (new.ndim - 2) + (index, 0)
    if layer is None:
        return jax.lax.dynamic_update_slice(buf, new, start)
    return jax.lax.dynamic_update_slice(buf, new[None], (layer, *start))


def follow_beams(x: jax.Array, beams: jax.Array) -> jax.Array:
    """`x [b * nb, ...]` (beam j of batch row i at row `i * nb + j`) with beam j of each row taking that row's
    beam `beams[i, j]`; `beams [b, nb]`. A gather along the beams of each row only, so under a mesh that
    splits the rows no row moves to another device (a gather by flat row ids made the partitioner all-gather
    the cache). `layers.take`: bfloat16 as its bits on CPU."""
    b, nb = beams.shape
    return jax.vmap(lambda group, idx: take(group, idx, axis=0))(x.reshape(b, nb, *x.shape[1:]), beams).reshape(x.shape)


def reorder_layer(buf: jax.Array, layer, beams: jax.Array) -> jax.Array:
    """The cache buffer with (layer `layer`'s) slots following `beams` (`follow_beams`), the other layers
    untouched: beam search reorders the cache one layer at a time inside the layer loop, so one layer's
    slots are copied at a time (reordering the whole `[layers, ...]` cache at once held a second cache and
    the while loop's copies of it beside the first). A stored batch dim (b * nb > 1) is assumed.

    A layer's own buffer (an unscanned model: the small CPU ones) is gathered by flat row ids, which XLA:CPU
    writes in place (`follow_beams`' batched gather held about half the cache in temporaries there); the
    stacked cache of a scanned model (the 10B configs, on meshes) by `follow_beams`."""
    if layer is None:
        b, nb = beams.shape
        return take(buf, (beams + nb * jnp.arange(b)[:, None]).reshape(-1), axis=0)   # bfloat16 as its bits on CPU
    moved = follow_beams(jax.lax.dynamic_index_in_dim(buf, layer, keepdims=False), beams)
    return jax.lax.dynamic_update_slice(buf, moved[None], (layer,) + (0,) * moved.ndim)


def layer_slots(buf: jax.Array, layer, batch: int) -> jax.Array:
    """The layer's `[b, kv_heads, s, d]` slots: the buffer itself, or its `layer` of a stacked one."""
    return with_batch(buf if layer is None else jax.lax.dynamic_index_in_dim(buf, layer, keepdims=False), batch)

"""Per-token attention mask inputs (`Segments`), the mask they imply, and the sequence padding and
blocking the blockwise implementations share (`bmgpt_jax.models.attention`, `bmgpt_jax.models.flash`).

Query i may attend key j iff their segment ids are equal and, when causal, key slot j <= query slot
(`q_offset + i`). Implementations build that mask block by block from the ids, never whole.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MASKED = -1e30           # finite: a row without any allowed key averages instead of producing NaN


class Segments(NamedTuple):
    """Per-token mask inputs. `q [b, t]`, `kv [b, s]` int32 segment ids; `q_offset`: scalar slot of the
    first query among the keys (a KV cache), or None when queries and keys are the same tokens (t == s).
    `num_ids`: a static promise that every id lies in `[0, num_ids)` (ESM's padding ids: 2), which lets
    `rows` fold a bidirectional mask into the score product and skip keys no query can attend; None (the
    default) promises nothing. A pytree whose leaves are `q`, `kv` and `q_offset`; `num_ids` is static."""

    q: jax.Array
    kv: jax.Array
    q_offset: jax.Array | None = None
    num_ids: int | None = None

    @classmethod
    def self_attention(cls, segment_ids: jax.Array, num_ids: int | None = None) -> "Segments":
        """Queries and keys are the same tokens with ids `[b, t]` (all in `[0, num_ids)` when given)."""
        ids = segment_ids.astype(jnp.int32)
        return cls(ids, ids, num_ids=num_ids)


# `num_ids` is static: it lives in the tree structure, not among the leaves, so it stays a Python int
# through `jax.checkpoint`, `lax.scan`, `shard_map` and `jit` arguments (as a leaf, remat turned it into
# a tracer, and code that branches on it failed to trace)
jax.tree_util.register_pytree_node(
    Segments, lambda s: ((s.q, s.kv, s.q_offset), s.num_ids), lambda num_ids, leaves: Segments(*leaves, num_ids))


def allowed(q_ids, kv_ids, q_slots, kv_slots, causal: bool) -> jax.Array:
    """`[b, tq, tk]` bool from ids `[b, tq]`/`[b, tk]` and slots `[tq]`/`[tk]`."""
    ok = q_ids[:, :, None] == kv_ids[:, None, :]
    if causal:
        ok = ok & (kv_slots[None, None, :] <= q_slots[None, :, None])
    return ok


def offset(segments: Segments) -> jax.Array:
    """The scalar int32 slot of the first query among the keys (0 without a KV cache)."""
    return jnp.zeros((), jnp.int32) if segments.q_offset is None else jnp.asarray(segments.q_offset, jnp.int32)


def pad_to(x: jax.Array, n: int, fill=0) -> jax.Array:
    """`x [b, t, ...]` padded with `fill` along the sequence axis to length n."""
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def blocks(n: int, largest: int) -> tuple[int, int]:
    """(block, count) covering n with the fewest blocks of at most `largest` and little padding."""
    count = -(-n // largest)
    block = -(-n // count)
    block = -(-block // 8) * 8 if block > 8 else block
    return block, -(-n // block)

"""The blockwise attention path in XLA (`attention="flash"`): online softmax over key blocks with a
FlashAttention-2-style custom VJP. The forward saves q, k, v, the output and the log-sum-exp; the
backward recomputes each block's scores. Causal blocks above the diagonal are skipped in both passes.
Runs on any backend; O(t + s) memory. Shapes: q `[b, t, heads, d]`, k/v `[b, s, kv_heads, d]`.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from bmgpt_jax.models.segments import MASKED, Segments, allowed, blocks, offset, pad_to

FLASH_BLOCK = 256        # largest query/key block


def flash_attention(q, k, v, segments: Segments, *, causal: bool, scale: float) -> jax.Array:
    """The blockwise path: `[b, t, heads, d]`, O(t + s) memory in the forward and the backward pass."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    bq, nq = blocks(t, FLASH_BLOCK)
    bk, nk = blocks(s, FLASH_BLOCK)
    qg = pad_to(q, bq * nq).reshape(b, bq * nq, kvh, h // kvh, d)
    out = _flash(qg, pad_to(k, bk * nk), pad_to(v, bk * nk), pad_to(segments.q, bq * nq),
                 pad_to(segments.kv, bk * nk), offset(segments), causal, scale, bq, bk, s)
    return out[:, :t].reshape(b, t, h, d)


def _kv_blocks_seen(i, off, bq: int, bk: int, nk: int, causal: bool):
    """Number of key blocks query block i can see (causal: up to its last slot)."""
    return jnp.clip((off + (i + 1) * bq - 1) // bk + 1, 0, nk) if causal else nk


def _scores(qi, kj, q_ids, kv_ids, q_slots, kv_slots, causal, scale, kv_len):
    """Masked float32 scores `[b, kv_heads, group, bq, bk]` of one block pair."""
    sc = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    ok = allowed(q_ids, kv_ids, q_slots, kv_slots, causal) & (kv_slots < kv_len)[None, None]
    return jnp.where(ok[:, None, None], sc, MASKED)


def _slice(x, start, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(qg, k, v, q_ids, kv_ids, off, causal, scale, bq, bk, kv_len):
    return _flash_forward(qg, k, v, q_ids, kv_ids, off, causal, scale, bq, bk, kv_len)[0]


def _flash_forward(qg, k, v, q_ids, kv_ids, off, causal, scale, bq, bk, kv_len):
    """qg `[b, T, kv_heads, group, d]` (T = nq * bq), k/v `[b, S, kv_heads, d]` -> (out like qg, lse
    `[b, kv_heads, group, T]` float32). Query blocks in a scan, key blocks in a loop that stops at the
    causal diagonal, with the online softmax (running max, normaliser, unnormalised output)."""
    b, tq, kvh, g, d = qg.shape
    nq, nk = tq // bq, k.shape[1] // bk

    def q_block(_, i):
        qi, ids = _slice(qg, i * bq, bq), _slice(q_ids, i * bq, bq)
        q_slots = off + i * bq + jnp.arange(bq)

        def kv_block(j, carry):
            acc, norm, run_max = carry
            sc = _scores(qi, _slice(k, j * bk, bk), ids, _slice(kv_ids, j * bk, bk), q_slots,
                         j * bk + jnp.arange(bk), causal, scale, kv_len)
            new_max = jnp.maximum(run_max, sc.max(-1))
            p = jnp.exp(sc - new_max[..., None])
            rescale = jnp.exp(run_max - new_max)
            acc = acc * rescale[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), _slice(v, j * bk, bk),
                                                        preferred_element_type=jnp.float32)
            return acc, norm * rescale + p.sum(-1), new_max

        init = (jnp.zeros((b, kvh, g, bq, d), jnp.float32), jnp.zeros((b, kvh, g, bq), jnp.float32),
                jnp.full((b, kvh, g, bq), MASKED, jnp.float32))
        acc, norm, run_max = jax.lax.fori_loop(0, _kv_blocks_seen(i, off, bq, bk, nk, causal), kv_block, init)
        return None, ((acc / norm[..., None]).astype(qg.dtype), run_max + jnp.log(norm))

    _, (out, lse) = jax.lax.scan(q_block, None, jnp.arange(nq))
    out = jnp.moveaxis(out, 0, 3).reshape(b, kvh, g, tq, d).transpose(0, 3, 1, 2, 4)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kvh, g, tq)
    return out, lse


def _flash_fwd(qg, k, v, q_ids, kv_ids, off, causal, scale, bq, bk, kv_len):
    out, lse = _flash_forward(qg, k, v, q_ids, kv_ids, off, causal, scale, bq, bk, kv_len)
    return out, (qg, k, v, q_ids, kv_ids, off, out, lse)


def _flash_bwd(causal, scale, bq, bk, kv_len, res, dout):
    """Key blocks in a scan (emitting dk, dv per block), query blocks in a loop starting at the causal
    diagonal; dq is accumulated in place. p = exp(s - lse), ds = p * (dp - rowsum(dout * out))."""
    qg, k, v, q_ids, kv_ids, off, out, lse = res
    b, tq, kvh, g, d = qg.shape
    nq, nk = tq // bq, k.shape[1] // bk
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", dout.astype(jnp.float32), out.astype(jnp.float32))

    def kv_block(dq, j):
        kj, vj, kv_i = _slice(k, j * bk, bk), _slice(v, j * bk, bk), _slice(kv_ids, j * bk, bk)
        kv_slots = j * bk + jnp.arange(bk)

        def q_block(i, carry):
            dq, dk, dv = carry
            qi, doi = _slice(qg, i * bq, bq), _slice(dout, i * bq, bq)
            sc = _scores(qi, kj, _slice(q_ids, i * bq, bq), kv_i, off + i * bq + jnp.arange(bq), kv_slots,
                         causal, scale, kv_len)
            p = jnp.exp(sc - _slice(lse, i * bq, bq, axis=3)[..., None])
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - _slice(delta, i * bq, bq, axis=3)[..., None])).astype(qi.dtype)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32) * scale
            dqi = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32) * scale
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, i * bq, bq) + dqi, i * bq, 1)
            return dq, dk, dv

        first = jnp.clip((j * bk - off) // bq, 0, nq) if causal else 0
        zeros = jnp.zeros((b, bk, kvh, d), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(first, nq, q_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(qg.shape, jnp.float32), jnp.arange(nk))
    dk, dv = (jnp.moveaxis(x, 0, 1).reshape(k.shape).astype(k.dtype) for x in (dk, dv))
    return dq.astype(qg.dtype), dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)

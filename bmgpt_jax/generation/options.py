"""Decoding options (Hugging Face's names) and the logit processors every decoding loop shares: repetition
penalty, greedy / temperature / top-k / top-p token choice, stop-sequence detection.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding options (HF names). `stop_sequences`: token-id sequences that end a row (e.g. `###`)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    eos_token_id: int = 2
    pad_token_id: int = 0
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    seed: int = 0


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's rule: a seen token's logit is divided by `penalty` if positive, multiplied if negative.
    logits `[b, vocab]` float32, seen `[b, vocab]` bool."""
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def sample_logits(logits: jax.Array, key: jax.Array, cfg: GenerationConfig) -> jax.Array:
    """Next tokens `[b]` from float32 logits `[b, vocab]`: argmax, or temperature/top-k/top-p sampling."""
    if not cfg.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    neg = jnp.finfo(jnp.float32).min
    logits = logits / max(cfg.temperature, 1e-6)
    if cfg.top_k > 0:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) >= cfg.top_p  # keep the first token always
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def ends_with_stop(tokens: jax.Array, step: jax.Array, stops: tuple[tuple[int, ...], ...]) -> jax.Array:
    """[b] bool: the tokens up to and including `step` end with one of `stops`."""
    hit = jnp.zeros(tokens.shape[0], bool)
    for seq in stops:
        n = len(seq)
        start = jnp.maximum(step - n + 1, 0)
        tail = jax.lax.dynamic_slice_in_dim(tokens, start, n, axis=1)
        hit = hit | (jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=1) & (step >= n - 1))
    return hit


def last_real_index(mask: jax.Array) -> jax.Array:
    """Index of the last 1 in each row of `mask [b, t]` (works for left and right padding)."""
    t = mask.shape[1]
    return t - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)

"""Decoding options (Hugging Face's names) and what every decoding loop shares: the prompt's prefill, the
logit processors (repetition penalty, greedy / temperature / top-k / top-p token choice) and stop-sequence
detection.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bmgpt_jax.models.layers import argmax


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding options (HF names and HF's defaults: a draw keeps the 50 most likely tokens unless `top_k=0`).
    `eos_token_id`: an id, or several (a row ends at any of them, as HF's list); `stop_sequences`: token-id
    sequences that end a row (e.g. `###`)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    eos_token_id: int | tuple[int, ...] = 2
    pad_token_id: int = 0
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    seed: int = 0

    def __post_init__(self):
        """ValueError naming the first option out of its range (HF's ranges), an empty stop sequence (it
        would end every row at its first token), or beam search with sampling (beam sampling is not
        implemented): before any model loads or anything compiles."""
        if isinstance(self.eos_token_id, list):   # hashable: the options are static under jit
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        bad = [(name, rule) for name, ok, rule in (
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"), ("num_beams", self.num_beams >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0 (greedy decoding is do_sample=False)"),
            ("top_k", self.top_k >= 0, ">= 0 (0: no top-k cut)"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1: none)"),
            ("eos_token_id", len(self.eos_ids) > 0, "an id or a non-empty list of ids"),
            ("stop_sequences", all(len(s) for s in self.stop_sequences), "non-empty token sequences")) if not ok]
        if bad:
            name, rule = bad[0]
            raise ValueError(f"generation option {name}={getattr(self, name)!r} must be {rule}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError(f"generation options num_beams={self.num_beams} and do_sample=True cannot be combined "
                             "(beam sampling is not supported): use one or the other")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The EOS ids, a tuple however `eos_token_id` was given."""
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def stops(self) -> tuple[tuple[int, ...], ...]:
        """Every token sequence that ends a row: each EOS id alone, then `stop_sequences`."""
        return tuple((e,) for e in self.eos_ids) + tuple(tuple(s) for s in self.stop_sequences)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's rule: a seen token's logit is divided by `penalty` if positive, multiplied if negative.
    logits `[b, vocab]` float32, seen `[b, vocab]` bool."""
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def filter_logits(logits: jax.Array, cfg: GenerationConfig) -> jax.Array:
    """HF's sampling warpers in HF's order (`_get_logits_processor`): temperature, then top-k, then top-p, on
    float32 logits `[b, vocab]`. A filtered-out token gets float32's lowest value (HF: -inf; both give it
    probability 0 and keep the softmax finite). Top-p keeps the smallest set of most likely tokens whose
    probability reaches `top_p`, the token that crosses it included, and always the most likely token."""
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
    return logits


def sample_logits(logits: jax.Array, key: jax.Array, cfg: GenerationConfig) -> jax.Array:
    """Next tokens `[b]` from float32 logits `[b, vocab]`: argmax, or a draw from `filter_logits`' softmax."""
    if not cfg.do_sample:
        return argmax(logits, axis=-1)
    return jax.random.categorical(key, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)


def ends_with_stop(tokens: jax.Array, step: jax.Array, stops: tuple[tuple[int, ...], ...]) -> jax.Array:
    """[b] bool: the tokens up to and including `step` end with one of `stops`. A stop sequence longer than
    the buffer (`max_new_tokens=1` and Llama's two-token `###`) can never be generated whole: skipped."""
    hit = jnp.zeros(tokens.shape[0], bool)
    for seq in stops:
        n = len(seq)
        if n > tokens.shape[1]:
            continue
        start = jnp.maximum(step - n + 1, 0)
        tail = jax.lax.dynamic_slice_in_dim(tokens, start, n, axis=1)
        hit = hit | (jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=1) & (step >= n - 1))
    return hit


def last_real_index(mask: jax.Array) -> jax.Array:
    """Index of the last 1 in each row of `mask [b, t]` (works for left and right padding)."""
    t = mask.shape[1]
    return t - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)


def prefill(model, prompt_ids, prompt_embeds, mask: jax.Array, cache):
    """The prompt (ids `[b, t]`, or embeddings `[b, t, embed]` when `prompt_ids` is None) run through the
    causal LM `model` into `cache`. Returns the float32 logits `[b, vocab]` at each row's last real
    position, the filled cache and `seen [b, vocab]`: the prompt's token ids, for the repetition penalty
    (none from embeddings: HF has no ids to penalise then).

    Only those positions go through the LM head (HF's `logits_to_keep=1`): the head over the whole prompt
    would cost `2 t embed vocab` FLOPs and a `[b, t, vocab]` float32 array (0.5 GB per 4k-token row at
    vocab 32k) of which one row is read."""
    b, vocab = mask.shape[0], model.config.vocab_size
    if prompt_ids is None:
        hidden, cache = model.model(inputs_embeds=prompt_embeds, attention_mask=mask, cache=cache)
        seen = jnp.zeros((b, vocab), bool)
    else:
        hidden, cache = model.model(prompt_ids, mask, cache=cache)
        # padding -> an out-of-range index that the scatter drops, so a pad id never un-marks a real token
        # (a scatter's duplicate indices resolve in no defined order)
        prompt_tokens = jnp.where(mask.astype(bool), prompt_ids, vocab)
        seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], prompt_tokens].set(True, mode="drop")
    return model.logits(hidden[jnp.arange(b), last_real_index(mask)]), cache, seen

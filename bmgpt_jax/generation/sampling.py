"""Jitted KV-cache decoding for our causal LM: greedy, sampling (temperature, top-k, top-p), repetition
penalty and stop sequences (the processors are in `options`; `num_beams > 1` hands over to
`beam.beam_search`). One `jax.jit` holds prefill and the whole decode loop (`lax.while_loop`), so no
Python runs per token.

Prompts may be padded on either side: padding slots are invalid in the cache and do not advance the
rotary position, so a row decodes exactly as it would alone. Option names follow Hugging Face's
`generate` (`max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `repetition_penalty`).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmgpt_jax import parallel
from bmgpt_jax.generation.beam import beam_search
from bmgpt_jax.generation.options import (GenerationConfig, apply_repetition_penalty, ends_with_stop, prefill,
                                          sample_logits)
from bmgpt_jax.models.llama import LlamaForCausalLM, check_ids


@partial(jax.jit, static_argnames=("graphdef", "cfg", "mesh"))
def _decode(graphdef, state, prompt_ids, prompt_embeds, mask, key, *, cfg: GenerationConfig, mesh=None):
    with parallel.within(mesh, parallel.DECODE_RULES):  # the mesh `state` is laid out on (`parallel.mesh_of`), or None
        return _decode_loop(nnx.merge(graphdef, state), prompt_ids, prompt_embeds, mask, key, cfg)


def _decode_loop(model: LlamaForCausalLM, prompt_ids, prompt_embeds, mask, key, cfg: GenerationConfig):
    b, t = mask.shape
    cache = model.init_cache(b, t + cfg.max_new_tokens)
    logits, cache, seen = prefill(model, prompt_ids, prompt_embeds, mask, cache)
    tokens = jnp.full((b, cfg.max_new_tokens), cfg.pad_token_id, jnp.int32)
    stops = cfg.stops

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < cfg.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, tokens, seen, done, key = carry
        key, sub = jax.random.split(key)
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        tok = jnp.where(done, cfg.pad_token_id, sample_logits(logits, sub, cfg))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
        seen = seen.at[jnp.arange(b), tok].set(True)
        done = done | ends_with_stop(tokens, step, stops)
        logits, cache = model(tok[:, None], jnp.ones((b, 1), jnp.int32), cache=cache)
        return step + 1, cache, logits[:, -1], tokens, seen, done, key

    init = (jnp.zeros((), jnp.int32), cache, logits, tokens, seen, jnp.zeros(b, bool), key)
    step, _, _, tokens, _, done, _ = jax.lax.while_loop(cond, body, init)
    return parallel.constrain(tokens, (None, None))  # replicated: every process reads all rows


def generate(model: LlamaForCausalLM, input_ids=None, attention_mask=None, *, inputs_embeds=None,
             config: GenerationConfig | None = None, **options) -> np.ndarray:
    """New tokens `[batch, max_new_tokens]` (pad after a row's EOS/stop), from token ids `[b, t]` or
    input embeddings `[b, t, embed]` with `attention_mask [b, t]` (either padding side).

    `options` override `config` fields by their HF names, e.g. `max_new_tokens=32, do_sample=True`.
    """
    cfg = dataclasses.replace(config or GenerationConfig(eos_token_id=model.config.eos_token_id), **options)
    if cfg.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, inputs_embeds=inputs_embeds, config=cfg)
    ref = input_ids if inputs_embeds is None else inputs_embeds
    if attention_mask is None:
        attention_mask = jnp.ones(np.shape(ref)[:2], jnp.int32)
    graphdef, state = nnx.split(model)
    key = jax.random.key(cfg.seed)
    if input_ids is not None:
        check_ids(input_ids, model.config.vocab_size)
    ids = None if input_ids is None else jnp.asarray(input_ids, jnp.int32)
    embeds = None if inputs_embeds is None else jnp.asarray(inputs_embeds)
    out = _decode(graphdef, state, ids, embeds, jnp.asarray(attention_mask, jnp.int32), key, cfg=cfg,
                  mesh=parallel.mesh_of(state))
    return np.asarray(out)

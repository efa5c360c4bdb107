"""Jitted beam search for our causal LM, equal token for token to transformers' `generate(num_beams=n,
do_sample=False)` (the vectorised `_beam_search` of transformers 5, `early_stopping=False`).

Each step, per batch row: log-softmax of every beam's last logits, then the repetition penalty on those
log-probs (HF runs its logits processors after the log-softmax in beam search), plus the beam's running
score; the top `max(2, 1 + number of EOS ids) * num_beams` (beam, token) candidates over all beams (HF's
`beams_to_keep`). Candidates ending in an EOS id or a stop sequence (all of them at the last step) are
offered, when among the first `num_beams`, to the row's `num_beams` finished hypotheses, scored
`sum_logprob / new_tokens ** length_penalty`; the best
`num_beams` unfinished candidates run on, and the KV cache rows (`batch * num_beams`) follow them, each
layer's slots reordered inside the next step's layer loop (`cache_beams`: one layer copied at a time). A
row stops accepting hypotheses once all `num_beams` are finished and its best running beam, normalised by
the current length, cannot beat the worst of them; the loop ends when no row can improve or every
candidate has finished. Prefill, the loop (`lax.while_loop`) and the cache reordering
are one `jax.jit`.

HF's `-1e9` "impossible" offsets are reproduced as is (same float32 rounding, same tie behaviour).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmgpt_jax import parallel
from bmgpt_jax.generation.options import GenerationConfig, apply_repetition_penalty, ends_with_stop, prefill
from bmgpt_jax.models.llama import LlamaForCausalLM, check_ids

_NEG = -1.0e9


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Beams `idx [b, m]` of each row of `x [b, k, ...]` -> `[b, m, ...]`."""
    return x[jnp.arange(x.shape[0])[:, None], idx]


@partial(jax.jit, static_argnames=("graphdef", "cfg", "mesh"))
def _beam_decode(graphdef, state, prompt_ids, prompt_embeds, mask, *, cfg: GenerationConfig, mesh=None):
    """Best finished hypothesis `[b, max_new_tokens]` int32 (pad after its end) for prompt ids `[b, t]` or
    embeddings `[b, t, embed]` with `mask [b, t]`, traced within `mesh` (the one `state` is laid out on)."""
    with parallel.within(mesh, parallel.DECODE_RULES):
        return _beam_loop(nnx.merge(graphdef, state), prompt_ids, prompt_embeds, mask, cfg)


def _beam_loop(model: LlamaForCausalLM, prompt_ids, prompt_embeds, mask, cfg: GenerationConfig):
    b, t = mask.shape
    nb, n, vocab = cfg.num_beams, cfg.max_new_tokens, model.config.vocab_size
    k = max(2, 1 + len(cfg.eos_ids)) * nb  # candidates kept per row, as HF's `beams_to_keep`
    cache = model.init_cache(b, t + n)
    logits, cache, seen = prefill(model, prompt_ids, prompt_embeds, mask, cache)
    # every beam starts as its row's prompt; only beam 0 is live (HF: running score 0, others -1e9)
    logits = jnp.repeat(logits, nb, axis=0)
    cache = cache.repeat_rows(nb)
    seen = jnp.broadcast_to(seen[:, None], (b, nb, vocab))
    stops = cfg.stops
    # new_tokens ** length_penalty for new_tokens = 1..n, in float64 then float32 like HF's Python scalar
    norm = jnp.asarray((np.arange(1, n + 1, dtype=np.float64) ** cfg.length_penalty).astype(np.float32))
    rows, cand_rank = jnp.arange(b)[:, None], jnp.arange(k)
    pad_seqs = jnp.full((b, nb, n), cfg.pad_token_id, jnp.int32)

    def body(carry):
        step, cache, logits, run_seqs, run_scores, seen, fin_seqs, fin_scores, fin_flag, improvable, _ = carry
        # candidates: [b, k] accumulated scores, source beams and tokens
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, nb, vocab)
        logp = apply_repetition_penalty(logp, seen, cfg.repetition_penalty)
        acc = (logp + run_scores[:, :, None]).reshape(b, nb * vocab)
        cand_scores, flat = jax.lax.top_k(acc, k)
        src, tok = flat // vocab, flat % vocab
        cand_seqs = _gather(run_seqs, src).at[:, :, step].set(tok)
        hits = ends_with_stop(cand_seqs.reshape(b * k, n), step, stops).reshape(b, k) | (step == n - 1)

        # the best num_beams unfinished candidates run on
        run_k = cand_scores + hits.astype(jnp.float32) * _NEG
        keep = jax.lax.top_k(run_k, nb)[1]
        run_seqs, run_scores, parent = _gather(cand_seqs, keep), _gather(run_k, keep), _gather(src, keep)

        # finished candidates among the first num_beams join the finished hypotheses if good enough
        just = hits & (cand_rank < nb)
        fs = cand_scores / norm[step]
        fs = fs + (~improvable)[:, None].astype(jnp.float32) * _NEG
        fs = fs + (~just).astype(jnp.float32) * _NEG
        merged = jnp.concatenate([fin_scores, fs], axis=1)
        best = jax.lax.top_k(merged, nb)[1]
        fin_seqs = _gather(jnp.concatenate([fin_seqs, cand_seqs], axis=1), best)
        fin_flag = _gather(jnp.concatenate([fin_flag, just], axis=1), best)
        fin_scores = _gather(merged, best)

        # seen-token sets follow the running beams, and the cache too (reordered layer by layer in the step)
        new_tok = run_seqs[:, :, step]
        seen = _gather(seen, parent).at[rows, jnp.arange(nb)[None], new_tok].set(True)

        # HF's early_stopping=False heuristic: can the best running beam still beat the worst finished one?
        worst = jnp.where(fin_flag, fin_scores.min(axis=1, keepdims=True), _NEG)
        improvable = improvable & jnp.any(run_scores[:, :1] / norm[step] > worst, axis=1)
        go = jnp.any(improvable) & ~jnp.all(hits)

        logits, cache = model(new_tok.reshape(b * nb, 1), jnp.ones((b * nb, 1), jnp.int32), cache=cache,
                              cache_beams=parent)
        return (step + 1, cache, logits[:, -1], run_seqs, run_scores, seen, fin_seqs, fin_scores, fin_flag,
                improvable, go)

    run_scores = jnp.where(jnp.arange(nb) == 0, 0.0, _NEG).astype(jnp.float32)[None].repeat(b, axis=0)
    init = (jnp.zeros((), jnp.int32), cache, logits, pad_seqs, run_scores, seen, pad_seqs,
            jnp.full((b, nb), _NEG, jnp.float32), jnp.zeros((b, nb), bool), jnp.ones(b, bool), jnp.ones((), bool))
    out = jax.lax.while_loop(lambda c: c[-1], body, init)
    return parallel.constrain(out[6][:, 0], (None, None))  # replicated: every process reads all rows


def beam_search(model: LlamaForCausalLM, input_ids=None, attention_mask=None, *, inputs_embeds=None,
                config: GenerationConfig) -> np.ndarray:
    """Best beam `[batch, max_new_tokens]` (pad after its EOS/stop) from token ids `[b, t]` or input
    embeddings `[b, t, embed]` with `attention_mask [b, t]` (either padding side), as HF's `generate` with
    `num_beams=config.num_beams, do_sample=False, length_penalty=..., repetition_penalty=...`."""
    if config.do_sample:
        raise ValueError("beam search with do_sample=True (beam sampling) is not supported")
    ref = input_ids if inputs_embeds is None else inputs_embeds
    if attention_mask is None:
        attention_mask = jnp.ones(np.shape(ref)[:2], jnp.int32)
    if input_ids is not None:
        check_ids(input_ids, model.config.vocab_size)
    graphdef, state = nnx.split(model)
    ids = None if input_ids is None else jnp.asarray(input_ids, jnp.int32)
    embeds = None if inputs_embeds is None else jnp.asarray(inputs_embeds)
    out = _beam_decode(graphdef, state, ids, embeds, jnp.asarray(attention_mask, jnp.int32), cfg=config,
                       mesh=parallel.mesh_of(state))
    return np.asarray(out)

"""Llama 2 decoder (BioMedGPT-LM-7B) in Flax NNX, with Hugging Face parameter names.

Module tree mirrors `transformers.LlamaForCausalLM`: `model.embed_tokens`, `model.layers[i].self_attn.
{q,k,v,o}_proj`, `model.layers[i].mlp.{gate,up,down}_proj`, `model.layers[i].{input,post_attention}_layernorm`,
`model.norm`, `lm_head`. Rotary embeddings use HF's rotate_half layout, so HF q/k weights load unpermuted.

With `scan_layers=True` the layers are one module whose parameters are stacked on a leading `layers`
axis and applied with `jax.lax.scan` (one compiled layer body: fast compiles at 32+ layers); `remat`
rematerialises each layer in the backward pass. The KV cache is an explicit pytree (`KVCache`), so
prefill and every decode step are the same pure call and a whole generation loop can live in one `jit`.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmgpt_jax.config import check_range
from bmgpt_jax.models.attention import IMPLEMENTATIONS, Segments, attention
from bmgpt_jax.models.kv_cache import KVCache, check_room, follow_beams, layer_slots, reorder_layer, write_slots
from bmgpt_jax.models.layers import Embedding, Linear, RMSNorm, apply_rotary, dense, dtype_of, rotary_cos_sin
from bmgpt_jax.parallel import constrain, constrain_to_weight


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama decoder. Defaults: BioMedGPT-LM-7B (Llama2-7B + `[PAD]`)."""

    vocab_size: int = 32001
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | tuple[int, ...] = 2   # several (a config.json list): generation stops at any of them
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    dtype: str = "float32"          # compute dtype
    param_dtype: str = "float32"    # storage dtype of parameters (master weights)
    scan_layers: bool = False
    remat: Literal["none", "full", "dots"] = "none"
    attention: Literal["auto", "xla", "rows", "flash", "splash", "cudnn"] = "auto"  # bmgpt_jax.models.attention
    loss_chunk_size: int = 512      # tokens per chunk of the training loss's logits (0: all at once)
    lora_rank: int = 0                                   # > 0: LoRA adapters on `lora_targets`
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):   # hashable: the config is static under jit
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        check_range(self, ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                           "max_position_embeddings"), 1)
        # vocab_size 0: "the tokenizer's" (a training config)
        check_range(self, ("vocab_size", "lora_rank", "rms_norm_eps", "initializer_range"), 0)
        check_range(self, "rope_theta", 0, low_open=True)
        if self.hidden_size % self.num_heads and self.head_dim is None:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        bad = set(self.lora_targets) - {"q_proj", "k_proj", "v_proj", "o_proj"}
        if bad:
            raise ValueError(f"lora_targets {sorted(bad)} are not attention projections (q/k/v/o_proj)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {list(IMPLEMENTATIONS)}")
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size} must be >= 0 (0: no chunking)")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Parameter count (embeddings and head included)."""
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.dim_per_head
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.dim_per_head
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                  kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)

        def lora(name):
            return dict(lora_rank=cfg.lora_rank if name in cfg.lora_targets else 0, lora_alpha=cfg.lora_alpha)
        self.q_proj = Linear(d, cfg.num_heads * hd, axes=("embed", "heads"), **kw, **lora("q_proj"))
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw, **lora("k_proj"))
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw, **lora("v_proj"))
        self.o_proj = Linear(cfg.num_heads * hd, d, axes=("heads", "embed"), **kw, **lora("o_proj"))
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.implementation = cfg.attention

    def __call__(self, x, cos, sin, segments: Segments, cache=None, index=None):
        """x `[b, t, embed]`; segments: per-token mask inputs (causal). cache: None, or (k, v, layer, beams): this
        layer's own buffers `[b, kv_heads, s, head_dim]` (layer None) or the stacked cache `[layers, b, kv_heads,
        s, head_dim]` and this layer's index (stored as `KVCache` says: b == 1 dropped), and None or the
        `[rows, beams]` the layer's slots first follow (beam search; `follow_beams`). This step's keys
        and values are written in place at slot `index` and attention reads the layer's slots. Returns
        (`[b, t, embed]`, the updated (k, v) or None)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = constrain(apply_rotary(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            *bufs, layer, beams = cache
            if beams is not None:
                bufs = [reorder_layer(buf, layer, beams) for buf in bufs]
            cache = tuple(write_slots(buf, new, layer, index) for buf, new in zip(bufs, (k, v)))
            # the layer's [b, kv_heads, s, d] slots as attention's [b, s, kv_heads, d] view: the score
            # products read the cache in its own layout (batch and head dims leading), no transposed copy
            k, v = (jnp.swapaxes(layer_slots(buf, layer, b), 1, 2) for buf in cache)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), segments, causal=True,
                        implementation=self.implementation)
        return self.o_proj(out.reshape(b, t, -1)), cache


class LlamaMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                  kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(h, ("batch", "seq", "mlp")))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.mlp = LlamaMLP(cfg, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def __call__(self, x, cos, sin, segments, cache=None, index=None):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, segments, cache, index)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "act_embed")), cache


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _apply_layer(gdef, remat: str):
    """A pure function (layer_state, x, cos, sin, segments, cache, index) -> (x, cache), rematerialised if
    asked (cache: see `LlamaAttention`)."""
    def fn(state, x, cos, sin, segments, cache, index):
        return nnx.merge(gdef, state)(x, cos, sin, segments, cache, index)
    if remat != "none":
        fn = jax.checkpoint(fn, policy=_REMAT_POLICIES[remat])
    return fn


class LlamaModel(nnx.Module):
    """Embeddings, decoder layers, final norm. Returns hidden states `[batch, seq, embed]`."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype_of(cfg.dtype),
                                      param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return LlamaDecoderLayer(cfg, rngs=r)
            self.layers = make(rngs)
        else:
            self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype_of(cfg.dtype),
                            param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)

    def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, positions=None,
                 segment_ids=None, cache: KVCache | None = None, cache_beams: jax.Array | None = None):
        """Hidden states `[b, t, embed]` (and the new cache when `cache` is given).

        cache_beams `[rows, beams]` (with `cache`; beam search, b = rows x beams): beam j of each row first
        takes over the cache of that row's beam `cache_beams[i, j]`, each layer's slots inside the layer
        loop (`follow_beams`).

        attention_mask `[b, t]`: 1 = real token, 0 = padding (either side); padding is a segment of its
        own, never attended by real tokens, and does not advance the rotary position. segment_ids `[b, t]`
        (no cache; instead of attention_mask): packed sequences, each id attending only to itself, 0 for
        padding; positions then restart at every segment. Attention gets only these per-token ids (and the
        cache's slot offset), never a dense mask: see `bmgpt_jax.models.attention`.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_ids(input_ids, cfg.vocab_size)
            x = self.embed_tokens(input_ids)
        else:
            x = inputs_embeds.astype(dtype_of(cfg.dtype))
        b, t, _ = x.shape
        if cache is None and t > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        if segment_ids is not None and (cache is not None or attention_mask is not None):
            raise ValueError("segment_ids replaces attention_mask and takes no cache")
        x = constrain(x, ("batch", "seq", "act_embed"))
        own_positions = positions is not None
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if segment_ids is not None:
            segments = Segments.self_attention(segment_ids)
            if positions is None:
                positions = _positions_in_segments(segments.q)
            index = None
        elif cache is None:
            if positions is None:
                positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            segments, index = Segments.self_attention(mask, num_ids=2), None   # ids 0/1: one example a row
        else:
            if cache_beams is not None:
                cache = cache._replace(valid=follow_beams(cache.valid, cache_beams),
                                       next_pos=follow_beams(cache.next_pos, cache_beams))
            index = cache.index
            check_room(cache, t)
            if positions is None:
                positions = cache.next_pos[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            kv_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
            segments = Segments(mask.astype(jnp.int32), kv_valid.astype(jnp.int32), index)
        # positions derived here lie below the sequence length (or the cache's), so CPU gathers them from a
        # table that long (`rotary_cos_sin`); a caller's own positions are computed as given
        table = t if cache is None else cache.valid.shape[1]
        cos, sin = rotary_cos_sin(positions, cfg.dim_per_head, cfg.rope_theta,
                                  table_size=None if own_positions else table)

        kv = None if cache is None else (cache.k, cache.v)
        if cfg.scan_layers:
            gdef, state = nnx.split(self.layers)
            fn = _apply_layer(gdef, cfg.remat)
            if kv is None:
                def body(h, st):
                    h, _ = fn(st, h, cos, sin, segments, None, None)
                    return h, None
                x, _ = jax.lax.scan(body, x, state)
            else:  # the cache rides in the carry: updated in place, never sliced out and restacked
                def body(carry, xs):
                    h, kv = carry
                    st, i = xs
                    h, kv = fn(st, h, cos, sin, segments, (*kv, i, cache_beams), index)
                    return (h, kv), None
                (x, kv), _ = jax.lax.scan(body, (x, kv), (state, jnp.arange(cfg.num_layers)))
        else:  # each layer's own cache buffers, updated in place and read without slicing
            new = []
            for i, layer in enumerate(self.layers):
                gdef, state = nnx.split(layer)
                x, layer_kv = _apply_layer(gdef, cfg.remat)(state, x, cos, sin, segments,
                                                             None if kv is None else (kv[0][i], kv[1][i], None, cache_beams),
                                                             index)
                new.append(layer_kv)
            if kv is not None:
                kv = tuple(zip(*new))
        x = self.norm(x)
        if cache is None:
            return x
        next_pos = cache.next_pos + mask.sum(axis=1).astype(cache.next_pos.dtype)
        return x, KVCache(*kv, kv_valid, index + t, next_pos)


def _positions_in_segments(ids: jax.Array) -> jax.Array:
    """`[b, t]` index of each token within its run of equal segment ids (packed rows restart at 0)."""
    i = jnp.arange(ids.shape[1])
    first = jnp.concatenate([jnp.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    return i - jax.lax.cummax(jnp.where(first, i, 0), axis=1)


class LlamaForCausalLM(nnx.Module):
    """Causal LM: `model(input_ids, attention_mask)` -> logits `[batch, seq, vocab]` (float32).

    Also accepts `inputs_embeds [batch, seq, embed]` instead of ids (BioMedGPT splices molecule and
    protein embeddings into the sequence). With `cache=` it returns `(logits, new_cache)`.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = LlamaModel(cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"),
                                  dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                                  kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Hidden states `[..., embed]` -> float32 logits `[..., vocab]`."""
        axes = ("batch",) + ("seq",) * (hidden.ndim - 2) + ("act_embed",)
        if self.config.tie_word_embeddings:
            hidden = constrain_to_weight(hidden, axes, self.model.embed_tokens.weight, 1)
            out = dense(hidden, self.model.embed_tokens.weight[...].astype(hidden.dtype).T)
        else:
            hidden = constrain_to_weight(hidden, axes, self.lm_head.kernel, 0)
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings `[batch, seq, embed]` in the compute dtype."""
        return self.model.embed_tokens(input_ids)

    def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, positions=None,
                 segment_ids=None, cache: KVCache | None = None, cache_beams: jax.Array | None = None):
        out = self.model(input_ids, attention_mask, inputs_embeds=inputs_embeds, positions=positions,
                         segment_ids=segment_ids, cache=cache, cache_beams=cache_beams)
        if cache is None:
            return self.logits(out)
        hidden, cache = out
        return self.logits(hidden), cache

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for `batch` rows and `max_len` slots (prompt + new tokens)."""
        cfg = self.config
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        shape = (batch, cfg.num_kv_heads, max_len, cfg.dim_per_head)[batch == 1:]  # KVCache: b == 1 dropped
        dtype = dtype or dtype_of(cfg.dtype)
        def buffers():  # one stacked array for a scanned model, else one buffer per layer
            if cfg.scan_layers:
                return jnp.zeros((cfg.num_layers, *shape), dtype)
            return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return KVCache(buffers(), buffers(), jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32),
                       jnp.zeros((batch,), jnp.int32))


def check_ids(ids, vocab_size: int) -> None:
    """Out-of-vocabulary ids raise (only where the ids are concrete; under jit they cannot be inspected)."""
    if isinstance(ids, jax.core.Tracer):
        return
    arr = np.asarray(ids)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"token id {int(arr[pos])} at position {pos} is outside the vocabulary [0, {vocab_size})")

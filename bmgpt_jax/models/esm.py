"""ESM-2 protein encoder (Lin et al. 2022) in Flax NNX, numerically matching transformers' `EsmModel`.

Embeddings (token-dropout rescaling as at inference, no position table) -> `num_layers` pre-LN blocks
(rotary self-attention with the query scaled before rotary, erf-GELU FFN) -> `emb_layer_norm_after`.
The output is the whole last hidden state `[batch, seq, hidden]`, `<cls>` and `<eos>` included, which
is what BioMedGPT feeds to its protein adaptor.

Parameter paths mirror the HF names (`embeddings.word_embeddings.weight`,
`encoder.layer.{i}.attention.self.query.kernel`, ..., `encoder.emb_layer_norm_after.weight`), so
`bmgpt_jax.convert.hf_esm` is a table. With `scan_layers=True`, `encoder.layer` is a single `EsmLayer`
whose parameters are stacked on a leading `layers` axis and the blocks run under `nnx.scan`.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from bmgpt_jax.config import check_range
from bmgpt_jax.models.attention import IMPLEMENTATIONS, Segments, attention
from bmgpt_jax.models.layers import Embedding, LayerNorm, Linear, apply_rotary, dtype_of, rotary_table
from bmgpt_jax.parallel import constrain

ROPE_THETA = 10000.0
MASK_RATIO_TRAIN = 0.15 * 0.8  # ESM-2 training: 15% of tokens selected, 80% of those replaced by <mask>
ACT = ("batch", "seq", "act_embed")


@dataclasses.dataclass(frozen=True)
class EsmConfig:
    """ESM-2 hyper-parameters (HF names in brackets); defaults are the 650M model."""
    vocab_size: int = 33
    hidden_size: int = 1280
    num_layers: int = 33            # [num_hidden_layers]
    num_heads: int = 20             # [num_attention_heads]
    intermediate_size: int = 5120
    layer_norm_eps: float = 1e-5
    token_dropout: bool = True
    mask_token_id: int = 32
    pad_token_id: int = 1
    max_positions: int = 1026       # [max_position_embeddings]; rotary, informational only
    dtype: str = "float32"          # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: bool = False
    attention: Literal["auto", "xla", "rows", "flash", "splash", "cudnn"] = "auto"  # bmgpt_jax.models.attention

    def __post_init__(self):
        check_range(self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"), 1)
        check_range(self, "layer_norm_eps", 0)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head_dim={self.hidden_size // self.num_heads} must be even for rotary")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {list(IMPLEMENTATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _linear(cfg: EsmConfig, n_in: int, n_out: int, axes, rngs: nnx.Rngs) -> Linear:
    return Linear(n_in, n_out, axes=axes, use_bias=True, dtype=dtype_of(cfg.dtype),
                  param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)


def _norm(cfg: EsmConfig, rngs: nnx.Rngs) -> LayerNorm:
    return LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype_of(cfg.dtype),
                     param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)


class EsmEmbeddings(nnx.Module):
    """Token embeddings with ESM's inference-time token-dropout rescaling; zero on padding."""

    def __init__(self, cfg: EsmConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # The 33-row table is split by its columns only ("vocab" would need 33 % tensor == 0).
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, axes=(None, "embed"),
                                         param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)

    def __call__(self, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        """input_ids, mask `[b, s]` (mask 1 on real tokens) -> `[b, s, hidden]` in the compute dtype."""
        cfg = self.cfg
        x = self.word_embeddings(input_ids).astype(jnp.float32)   # layers.embedding_lookup, mesh-aware
        if cfg.token_dropout:
            is_mask = input_ids == cfg.mask_token_id
            x = jnp.where(is_mask[..., None], 0.0, x)
            # A fully padded row (a padding protein) counts as length 1, so it stays finite (zero).
            lengths = jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)
            observed = is_mask.sum(-1).astype(jnp.float32) / lengths
            x = x * ((1.0 - MASK_RATIO_TRAIN) / (1.0 - observed))[:, None, None]
        x = x * mask[..., None].astype(x.dtype)
        return x.astype(dtype_of(cfg.dtype))


class EsmSelfAttention(nnx.Module):
    """query/key/value projections `[hidden, heads*head_dim]`."""

    def __init__(self, cfg: EsmConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.query = _linear(cfg, h, h, ("embed", "heads"), rngs)
        self.key = _linear(cfg, h, h, ("embed", "heads"), rngs)
        self.value = _linear(cfg, h, h, ("embed", "heads"), rngs)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.implementation = cfg.attention

    def __call__(self, x: jax.Array, segments: Segments, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x `[b, s, hidden]`, segments: per-token mask inputs (bidirectional), cos/sin `[1, s, head_dim]`
        -> `[b, s, hidden]`."""
        b, s, _ = x.shape
        split = lambda t: t.reshape(b, s, self.num_heads, self.head_dim)
        # ESM scales the query before rotary (not the logits), as HF and fair-esm do.
        q = split(self.query(x)) * self.head_dim ** -0.5
        k = split(self.key(x))
        v = split(self.value(x))
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        out = attention(q, k, v, segments, causal=False, scale=1.0, implementation=self.implementation)
        return out.reshape(b, s, self.num_heads * self.head_dim)


class EsmDense(nnx.Module):
    """A holder of one `dense` Linear (HF's EsmSelfOutput / EsmIntermediate / EsmOutput); `x -> dense(x)`."""

    def __init__(self, cfg: EsmConfig, n_in: int, n_out: int, axes, *, rngs: nnx.Rngs):
        self.dense = _linear(cfg, n_in, n_out, axes, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(x)


class EsmAttention(nnx.Module):
    """Pre-LN attention sub-block: x + output.dense(self(LayerNorm(x)))."""

    def __init__(self, cfg: EsmConfig, *, rngs: nnx.Rngs):
        self.self = EsmSelfAttention(cfg, rngs=rngs)
        self.output = EsmDense(cfg, cfg.hidden_size, cfg.hidden_size, ("heads", "embed"), rngs=rngs)
        self.LayerNorm = _norm(cfg, rngs)

    def __call__(self, x, segments, cos, sin):
        return x + self.output(self.self(self.LayerNorm(x), segments, cos, sin))


class EsmLayer(nnx.Module):
    """One pre-LN transformer block; `[b, s, hidden] -> [b, s, hidden]`."""

    def __init__(self, cfg: EsmConfig, *, rngs: nnx.Rngs):
        self.attention = EsmAttention(cfg, rngs=rngs)
        self.intermediate = EsmDense(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs=rngs)
        self.output = EsmDense(cfg, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), rngs=rngs)
        self.LayerNorm = _norm(cfg, rngs)

    def __call__(self, x: jax.Array, segments: Segments, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = self.attention(x, segments, cos, sin)
        h = jax.nn.gelu(self.intermediate(self.LayerNorm(x)), approximate=False)
        return constrain(x + self.output(h), ACT)


class EsmEncoder(nnx.Module):
    """`layer` (a list, or one stacked layer when scanning) followed by `emb_layer_norm_after`."""

    def __init__(self, cfg: EsmConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r: nnx.Rngs) -> EsmLayer:
                return EsmLayer(cfg, rngs=r)
            self.layer = make(rngs)
        else:
            self.layer = nnx.List([EsmLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.emb_layer_norm_after = _norm(cfg, rngs)

    def __call__(self, x: jax.Array, segments: Segments, cos: jax.Array, sin: jax.Array) -> jax.Array:
        # Layers run as pure functions of their split state (jax.lax.scan / jax.checkpoint rather than
        # nnx.scan / nnx.remat), so a frozen encoder traces inside a train step that differentiates
        # only other parameters.
        def step(gdef: nnx.GraphDef, state: nnx.State, h: jax.Array) -> jax.Array:
            return nnx.merge(gdef, state)(h, segments, cos, sin)
        if self.cfg.remat:
            step = jax.checkpoint(step, static_argnums=0, policy=jax.checkpoint_policies.nothing_saveable)
        if self.cfg.scan_layers:
            gdef, state = nnx.split(self.layer)
            x, _ = jax.lax.scan(lambda h, st: (step(gdef, st, h), None), x, state)
        else:
            for layer in self.layer:
                x = step(*nnx.split(layer), x)
        return self.emb_layer_norm_after(x)


class Esm(nnx.Module):
    """ESM-2 encoder: `model(input_ids, attention_mask)` -> last hidden state `[batch, seq, hidden]`."""

    def __init__(self, cfg: EsmConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = EsmEmbeddings(cfg, rngs=rngs)
        self.encoder = EsmEncoder(cfg, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids `[b, s]` int (right-padded with `<pad>`), attention_mask `[b, s]` (1 = real token;
        default: every position) -> `[b, s, hidden]` in the compute dtype. Rows that are all padding give
        finite values that mean nothing."""
        input_ids = jnp.asarray(input_ids)
        mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        x = constrain(self.embeddings(input_ids, mask), ACT)
        cos, sin = rotary_table(input_ids.shape[1], self.config.head_dim, ROPE_THETA)
        return self.encoder(x, padding_segments(mask), cos, sin)


def padding_segments(mask: jax.Array) -> Segments:
    """HF's key-padding mask as segment ids: keys `mask [b, s]` (1 real, 0 padding); every query of a row
    with a real token sees that row's real keys (padding queries too, as in HF), and a row that is all
    padding attends to itself (finite, meaningless), so no query is left without a key. The ids are 0/1
    (`num_ids=2`): the CPU `rows` path folds this mask into its score product and reads only the real keys."""
    kv = (mask != 0).astype(jnp.int32)
    q = jnp.broadcast_to(jnp.max(kv, axis=1, keepdims=True), kv.shape)
    return Segments(q, kv, num_ids=2)

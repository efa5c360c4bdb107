"""Building blocks shared by the decoder and the encoders, with HF/PyTorch parameter names (attention
lives in `bmgpt_jax.models.attention`).

Leaf names: `Linear.kernel` is `[in, out]` (PyTorch's `weight` transposed) and `Linear.bias`;
`Embedding.weight` is `[num, dim]`; norms hold `weight` (and `bias`), as in PyTorch. A converter is
then "same dotted name, except Linear weights transpose to kernel". Every parameter carries logical
axis names (`out_sharding` metadata) that `bmgpt_jax.parallel` maps to mesh axes.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from bmgpt_jax import parallel

Initializer = nnx.initializers.Initializer


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
    """A parameter with logical axis names (`out_sharding`), created where it is called.

    Training builds models inside `parallel.sharded_init`'s jit, whose outputs carry the shardings
    `parallel.tree_shardings` derives from these names: each device then computes only its own shard of
    `init(key, shape)`. Called eagerly (small models, tests), the value is made whole on the default device.
    """
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x `[..., in]` @ w `[in, out]` -> `[..., out]`, as one 2-D product over the flattened leading dims.

    Why 2-D: the weight gradient of a `[batch, seq, in]` product contracts two dims (batch and seq), and
    XLA:CPU canonicalises such a dot by writing the activation gradient transposed (`[out, batch*seq]`)
    inside the elementwise fusion that produces it, a strided write that cost 21% of the Llama train
    step (bench/profile_step.py). Flattened, the gradient contracts a single dim and the GEMM reads both
    operands in place. Numerically identical; the leading dims merge batch-major, so a batch sharding
    stays a sharding of the merged dim.

    bfloat16 `x` and `w` take `_dense_bf16_cpu` when compiled for a CPU (`lax.platform_dependent`, so an
    AOT compile for TPU or GPU from a CPU host keeps the plain product).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype == w.dtype == jnp.bfloat16:
        y = lax.platform_dependent(x2, w, cpu=_dense_bf16_cpu, default=jnp.dot)
    else:
        y = jnp.dot(x2, w)
    return y.reshape(*lead, w.shape[-1])


def _dot_bf16(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """A 2-D bfloat16 product contracting `a`'s dim `contract[0]` with `b`'s `contract[1]`, accumulated
    and returned by the GEMM in float32, then rounded to bfloat16 (what the plain product computes).

    A one-row `a` (batch-1 decoding) is padded to two rows: XLA:CPU turns a one-row product into a
    matrix-vector product over a float32 copy of all of `b`, which a decode loop hoists, holding every
    weight a second time at twice the size (docs/chat.md); two rows stay on the bfloat16 GEMM."""
    one_row = contract[0] == 1 and a.shape[0] == 1
    if one_row:
        a = jnp.concatenate([a, jnp.zeros_like(a)])
    dims = (((contract[0],), (contract[1],)), ((), ()))
    out = lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    return out[:1] if one_row else out


@jax.custom_vjp
def _dense_bf16_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    """x `[m, in]` @ w `[in, out]` in bfloat16 on XLA:CPU's bfloat16 GEMM (YNNPACK; avx512_bf16 where the
    CPU has it), forward and backward.

    Why: XLA:CPU runs a bfloat16 dot whose result is bfloat16 by converting both operands to float32 and
    using the float32 GEMM; asked for a float32 result it keeps the operands in bfloat16, about twice the
    rate on an AVX512-BF16 CPU, PyTorch's (`python bench/matmul.py --dtype bfloat16`). The weight gradient
    contracts the token dim, which is `x`'s major dim; XLA then converts again, so the backward reads
    `x` through an explicit `[in, m]` transpose (a reshape XLA cannot fold into the dot first). Every
    product rounds to bfloat16 as the plain path's do; only the order of float32 accumulation differs.
    """
    return _dot_bf16(x, w, (1, 0))


def _dense_bf16_cpu_fwd(x, w):
    return _dense_bf16_cpu(x, w), (x, w)


def _dense_bf16_cpu_bwd(res, g):
    x, w = res
    m, n = x.shape
    x_t = jnp.transpose(x.reshape(m, n, 1), (1, 0, 2)).reshape(n, m)  # [in, m], tokens minor
    return _dot_bf16(g, w, (1, 1)), _dot_bf16(x_t, g, (1, 0))


_dense_bf16_cpu.defvjp(_dense_bf16_cpu_fwd, _dense_bf16_cpu_bwd)


def dtype_of(name: str | jnp.dtype):
    """'float32' / 'bfloat16' / 'float16' -> a jnp dtype."""
    return jnp.dtype(name)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel `[in, out]`; computes in `dtype`, params stored in `param_dtype`.

    With `lora_rank > 0` a low-rank update `(x @ lora_a @ lora_b) * lora_alpha / lora_rank` is added
    (LoRA: `lora_a [in, r]` random, `lora_b [r, out]` zero, so training starts from the base model).
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init: Initializer | None = None, lora_rank: int = 0, lora_alpha: float = 16.0,
                 rngs: nnx.Rngs):
        init = kernel_init or nnx.initializers.normal(0.02)
        self.kernel = param(rngs, init, (in_features, out_features), axes, param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), (axes[1],), param_dtype)
                     if use_bias else None)
        if lora_rank:
            self.lora_a = param(rngs, nnx.initializers.normal(in_features ** -0.5), (in_features, lora_rank),
                                (axes[0], None), param_dtype)
            self.lora_b = param(rngs, nnx.initializers.zeros, (lora_rank, out_features), (None, axes[1]), param_dtype)
            self.lora_scale = lora_alpha / lora_rank
        else:
            self.lora_a = self.lora_b = None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = dense(x, self.kernel[...].astype(self.dtype))
        if self.lora_a is not None:
            y = y + dense(dense(x, self.lora_a[...].astype(self.dtype)),
                          self.lora_b[...].astype(self.dtype)) * self.lora_scale
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def merged_kernel(self) -> jax.Array:
        """The kernel with the LoRA update folded in (`[in, out]`, param dtype)."""
        if self.lora_a is None:
            return self.kernel[...]
        delta = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32) * self.lora_scale
        return (self.kernel[...].astype(jnp.float32) + delta).astype(self.kernel.dtype)


def take(x: jax.Array, idx: jax.Array, axis: int = 0) -> jax.Array:
    """`jnp.take(x, idx, axis)`. A bfloat16 `x` on CPU is gathered as its `uint16` bits (`_take_bits`):
    XLA:CPU gathers bfloat16 by first converting all of `x` to float32 and back (for the KV cache's beam
    reorder, the whole cache twice per step). That path has no gradient for `x`; `embedding_lookup` is
    the differentiable form."""
    if x.dtype != jnp.bfloat16:
        return jnp.take(x, idx, axis=axis)
    return lax.platform_dependent(x, idx, cpu=partial(_take_bits, axis=axis), default=partial(jnp.take, axis=axis))


def _take_bits(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
    """`jnp.take` of a bfloat16 array on its `uint16` bits (the same values, no conversion). Out-of-range
    ids give zeros, not `jnp.take`'s NaN fill (callers check ids: `llama.check_ids`)."""
    bits = jnp.take(lax.bitcast_convert_type(x, jnp.uint16), idx, axis=axis, mode="fill", fill_value=0)
    return lax.bitcast_convert_type(bits, jnp.bfloat16)


def argmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """`jnp.argmax(x, axis)` as int32 (the first maximum; the first NaN if there is one), e.g. greedy
    tokens from logits `[b, vocab] -> [b]`.

    On CPU it runs as two plain reductions (`_argmax_two_pass`): XLA:CPU runs `jnp.argmax`'s
    (value, index) reduction element by element, 0.58 ms of a 4.9 ms decode step at bench/generate.py's
    batch 8 (`bench/profile_step.py --decode`), 0.16 ms this way. Other platforms keep `jnp.argmax`."""
    axis = axis % x.ndim
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.argmax(x, axis=axis).astype(jnp.int32)
    return lax.platform_dependent(x, cpu=partial(_argmax_two_pass, axis=axis),
                                  default=lambda v: jnp.argmax(v, axis=axis).astype(jnp.int32))


def _argmax_two_pass(x: jax.Array, axis: int) -> jax.Array:
    """The smallest index holding the maximum (the max reduction, then a min over the indices that hit
    it). A NaN makes the maximum NaN, equal to nothing, so the NaN positions count as hits instead."""
    top = jnp.max(x, axis=axis, keepdims=True)
    hit = (x == top) | jnp.isnan(x)
    index = lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return jnp.min(jnp.where(hit, index, x.shape[axis]), axis=axis)


def embedding_lookup(table: jax.Array, ids: jax.Array, axes: Sequence[str | None] = ("vocab", "embed")) -> jax.Array:
    """Rows of `table [num, dim]` at integer `ids [batch, ...]` -> `[batch, ..., dim]` (`jnp.take` along
    axis 0); under a mesh, `_sharded_lookup` when the table's `axes` shard its columns.

    A bfloat16 table on CPU is gathered as its `uint16` bits (`_take_bf16_cpu`, with a gradient): XLA:CPU
    gathers a bfloat16 table by first converting all of it to float32, a `[num, dim]` float32 temporary per
    call (0.5 GB at 7B; in a decode loop it is hoisted and held for the whole generation).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and mesh.size > 1 and ids.ndim >= 1:
        plan = _lookup_plan(table.shape, ids.shape, axes, mesh)
        if plan is not None:
            return _sharded_lookup(table, ids, mesh, *plan)
    return _take(table, ids)


def _lookup_plan(table_shape, ids_shape, axes, mesh):
    """(table spec, ids spec, column axes) for `_sharded_lookup`, or None where the plain gather is the
    right one: the table's columns unsplit, or split with an axis that does not split the rows before
    one that does (`_sharded_lookup` gathers the minor column blocks). The table spec is its parameter's
    (`refit`, as laid out by `parallel.tree_shardings`)."""
    table_spec = parallel.fitted_spec(table_shape, axes, mesh, refit=True)
    ids_spec = parallel.fitted_spec(ids_shape, ("batch",), mesh)
    cols = parallel.axis_names(table_spec[1]) if len(table_spec) > 1 else ()
    rows = parallel.axis_names(ids_spec[0]) if len(ids_spec) else ()
    split_both = [a in rows for a in cols]
    if not cols or split_both != sorted(split_both, reverse=True):   # see `_sharded_lookup`'s column order
        return None
    return table_spec, ids_spec, cols


def _sharded_lookup(table, ids, mesh, table_spec, ids_spec, cols):
    """The lookup in `shard_map`, for a table whose columns are split over mesh axes `cols` (FSDP's
    "embed", and the tensor axis where the vocabulary does not divide it: `parallel.fitted_spec`'s
    refit). Left to the partitioner, such a gather comes out split on columns and is then re-split on
    rows by replicating the whole `[batch, seq, dim]` output on every device (SPMD's "involuntary full
    rematerialization": measured on a 2x2x2 and a 2x4x1 mesh at 7B width). Here each device gathers its
    peers' ids over the column axes that also split the rows (integers), looks them up in its own columns
    (rows outside its vocabulary shard masked, then summed over the vocabulary axes), gathers the column
    blocks of the axes that do not split the rows (tensor: a few rows of activations), and an all-to-all
    over the rest trades column blocks for row blocks: out `[batch / row shards, ..., dim]`, nothing whole."""
    vocab_axes = parallel.axis_names(table_spec[0])
    row_axes = parallel.axis_names(ids_spec[0]) if len(ids_spec) else ()
    shared = tuple(a for a in cols if a in row_axes)       # split both: traded by the all-to-all
    gathered = tuple(a for a in cols if a not in row_axes)  # split the columns only: all-gathered
    # the axes that split the rows but not the table (e.g. data): the table is whole on each of them
    extra = tuple(a for a in row_axes if a not in vocab_axes + cols)

    def local(t, i):                      # t [num / vocab shards, dim / col shards], i [batch / row shards, ...]
        i = jax.lax.all_gather(i, shared, axis=0, tiled=True) if shared else i
        # the table as varying over the row axes it is replicated on (e.g. data), as the ids are: the
        # transpose then sums its gradient over them (`_take`'s custom VJP must see matching types)
        t = jax.lax.pcast(t, extra, to="varying") if extra else t
        if vocab_axes:
            start = jax.lax.axis_index(vocab_axes) * t.shape[0]
            i = i - start
            ok = (i >= 0) & (i < t.shape[0])
            rows = jnp.where(ok[..., None], _take(t, jnp.where(ok, i, 0)), 0)
            rows = jax.lax.psum(rows, vocab_axes)
        else:
            rows = _take(t, i)
        # the columns as `cols` order them, major to minor: the minor (gathered) blocks join first
        rows = jax.lax.all_gather(rows, gathered, axis=rows.ndim - 1, tiled=True, to="invarying") if gathered else rows
        return jax.lax.all_to_all(rows, shared, 0, rows.ndim - 1, tiled=True) if shared else rows

    out_spec = jax.sharding.PartitionSpec(*ids_spec, *(None,) * (ids.ndim + 1 - len(ids_spec)))
    return jax.shard_map(local, mesh=mesh, in_specs=(table_spec, ids_spec), out_specs=out_spec)(table, ids)


def _take(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`jnp.take(table, ids, axis=0)`, a bfloat16 table on CPU as bits (see `embedding_lookup`)."""
    if table.dtype == jnp.bfloat16:
        return lax.platform_dependent(table, ids, cpu=_take_bf16_cpu, default=partial(jnp.take, axis=0))
    return jnp.take(table, ids, axis=0)


@jax.custom_vjp
def _take_bf16_cpu(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`table[ids]` for a bfloat16 table, gathered as bits (`_take_bits`), differentiable in `table`."""
    return _take_bits(table, ids, 0)


def _take_bf16_cpu_fwd(table, ids):
    return _take_bf16_cpu(table, ids), (jnp.zeros((table.shape[0], 0), table.dtype), ids)  # [num, 0]: the shape


def _take_bf16_cpu_bwd(res, g):
    """The table's gradient: `g` scatter-added into zeros (in float32, as `jnp.take`'s transpose is on
    CPU), rounded to bfloat16; ids get none."""
    shape, ids = res
    rows = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
    grad = jnp.zeros((shape.shape[0], rows.shape[1]), jnp.float32).at[ids.reshape(-1)].add(rows, mode="drop")
    return grad.astype(jnp.bfloat16), None


_take_bf16_cpu.defvjp(_take_bf16_cpu_fwd, _take_bf16_cpu_bwd)


class Embedding(nnx.Module):
    """Token embedding table `weight [num, dim]`, looked up by `embedding_lookup`."""

    def __init__(self, num: int, dim: int, *, axes=("vocab", "embed"), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.weight = param(rngs, nnx.initializers.normal(0.02), (num, dim), axes, param_dtype)
        self.dtype, self.axes = dtype, tuple(axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return embedding_lookup(self.weight[...], ids, self.axes).astype(self.dtype)


class RMSNorm(nnx.Module):
    """Llama RMSNorm, computed in float32 whatever the compute dtype: x / rms(x) * weight."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.weight = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before scaling by the (float32) weight.
        return (self.weight[...].astype(jnp.float32) * x32.astype(x.dtype)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with `weight`/`bias`, statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.weight = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def rotary_inv_freq(head_dim: int, base: float = 10000.0) -> np.ndarray:
    """The rotary frequencies `[head_dim / 2]` float32 as PyTorch/HF round them: `1 / base ** (2i / d)`
    with the power correctly rounded to float32 (taken in float64 here; XLA's float32 `pow` is off by
    an ulp for some head dims), then the float32 reciprocal. A constant of the traced program."""
    power = np.float64(base) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)).astype(np.float64)
    return np.float32(1.0) / power.astype(np.float32)


def rotary_cos_sin(positions: jax.Array, head_dim: int, base: float = 10000.0, *,
                   table_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[..., seq, head_dim]` of integer `positions [..., seq]` in HF's rotate_half layout
    (frequencies repeated twice; angles `position * inv_freq` in float32, as HF).

    `table_size`: a promise that every position lies in `[0, table_size)`. On CPU the rows are then
    gathered from `rotary_table(table_size)` instead of computed: computed, `cos` and `sin` are cheap
    elementwise ops to XLA:CPU, which fuses them into their consumers, the rotations of q and k
    `[batch, seq, heads, head_dim]`, and evaluates them once per head (2.2 ms against 0.24 ms for one
    rotation of 8 x 255 tokens x 8 heads x 64). Other platforms compute them (`lax.platform_dependent`).
    A position outside the table gives NaN, never a wrong angle."""
    inv_freq = jnp.asarray(rotary_inv_freq(head_dim, base))

    def computed(pos):
        freqs = pos.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    if table_size is None:
        return computed(positions)

    def gathered(pos):
        return tuple(jnp.take(table[0], pos, axis=0, mode="fill", fill_value=jnp.nan)
                     for table in rotary_table(table_size, head_dim, base))

    return lax.platform_dependent(positions, cpu=gathered, default=computed)


def rotary_table(length: int, head_dim: int, base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """`rotary_cos_sin` of positions `0 .. length-1` (`[1, length, head_dim]` each), computed in NumPy
    when the model is traced, so the compiled program holds the tables as constants: ESM-2, whose
    positions are always `0 .. seq-1`, on every platform, and `rotary_cos_sin(table_size=)` on CPU.

    Why (see `rotary_cos_sin`): computed in the program, XLA:CPU evaluates cos and sin once per head and
    batch row (160 times per position and layer at ESM-2 8M's batch of 8); bench/esm.py's passes ran
    5-14% faster with constants (docs/proteins.md). The angles are rounded to float32 as
    `rotary_cos_sin` (and PyTorch) computes them; their cos and sin are taken in float64, rounded once."""
    freqs = np.arange(length, dtype=np.float32)[:, None] * rotary_inv_freq(head_dim, base)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)[None]
    return jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[batch, seq, heads, head_dim]`, cos/sin `[batch or 1, seq, head_dim]`: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rot * sin

"""Softmax attention behind one switch: `xla` | `flash` | `splash` | `cudnn` | `auto`.

No caller builds a mask. Each passes per-token `Segments`: a segment id per query and per key, and for
a KV cache the slot of the first query. Query i may attend key j iff their segment ids are equal and,
when causal, key slot j <= query slot (`q_offset + i`). Each implementation builds the mask it needs from
these, block by block, so memory stays linear in the sequence length:

  xla     the plain form: all `[q, kv]` scores at once (fastest for decode steps and short sequences).
  rows    for the CPU: per (batch row, kv head), a block of queries against all keys; each step's scores
          (at most ROWS_SCORES of them) stay in cache, and each step is rematerialised in the backward.
          O(t + s) memory; causal blocks are masked, not skipped.
  flash   blockwise online softmax in XLA with a flash-style custom VJP (FlashAttention-2; its own
          module, `bmgpt_jax.models.flash`). Causal blocks above the diagonal are skipped. Runs on any
          backend; O(T) memory.
  splash  JAX's Pallas TPU kernel (`splash_attention`), causal or full `MultiHeadMask` and `SegmentIds`,
          under `shard_map` with the kernel's own sharding spec. TPU only (or `interpret=True`).
  cudnn   cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`. GPU only,
          bfloat16/float16 compute; padding is expressed as key lengths, so only right-padded single-segment
          rows can be represented: any other row comes out NaN rather than silently wrong.
  auto    `xla` for decode steps (<= PLAIN_MAX_QUERIES queries), and off the CPU or with a KV cache for
          short keys (<= PLAIN_MAX_KEYS); otherwise by platform (of the context mesh, else the default
          backend): CPU `rows`, with or without a KV cache (`flash` under a multi-device mesh, and for a
          causal sequence longer than ROWS_CAUSAL_MAX, where skipping the blocks above the diagonal wins;
          bench/attention.py); elsewhere with a KV cache `flash`, else TPU `splash`, GPU `cudnn`
          (bf16/fp16 compute and one example a row, `Segments.num_ids` <= 2; else `flash`).

An explicit choice that cannot run here (splash off TPU, cudnn off GPU or in float32, splash/cudnn with
a KV cache) raises ValueError; nothing falls back silently. Outputs at a query with no allowed key are
finite and meaningless, like those of padding queries, which callers never read.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from bmgpt_jax import parallel
from bmgpt_jax.models.flash import flash_attention
from bmgpt_jax.models.segments import MASKED, Segments, allowed, blocks, offset, pad_to

IMPLEMENTATIONS = ("auto", "xla", "rows", "flash", "splash", "cudnn")
PLAIN_MAX_KEYS = 256     # auto: up to this many keys, the plain path
PLAIN_MAX_QUERIES = 16   # auto: decode steps (this many queries or fewer) too
ROWS_SCORES = 1 << 20    # rows: most float32 scores per step (4 MiB: one core's share of cache)
ROWS_FOLD_IDS = 4        # rows: fold a bidirectional mask of at most this many segment ids into the scores
ROWS_CAUSAL_MAX = 4096   # auto on CPU: causal sequences up to this long take `rows` (measured on par with
                         # `flash` at 4096, ahead below), longer ones `flash`
ROWS_SKIP_MIN = 512      # rows: from this many keys, read only the keys a step's queries can attend
ROWS_WINDOWS = 8         # rows: key windows come in at most this many widths (compiled branches), multiples of 64
SPLASH_BLOCKS = (512, 256, 128)  # MaxText's 512 where the padded length allows it


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: Segments, *, causal: bool,
              scale: float | None = None, implementation: str = "auto", interpret: bool = False) -> jax.Array:
    """q `[b, t, heads, d]`, k/v `[b, s, kv_heads, d]` (heads a multiple of kv_heads) -> `[b, t, heads, d]`.

    Softmax in float32 whatever the input dtype; `scale` defaults to d ** -0.5. `interpret` runs the
    splash kernel in Pallas interpret mode (any backend; for tests).
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = resolve(implementation, q.shape[1], k.shape[1], q.dtype, segments.q_offset is not None,
                   causal=causal, interpret=interpret, packed=segments.num_ids is None or segments.num_ids > 2)
    if impl == "splash":  # its own shard_map: the kernel carries a sharding spec of its own
        return splash_attention(q, k, v, segments, causal=causal, scale=scale, interpret=interpret)
    fn = {"xla": plain_attention, "rows": rows_attention, "flash": flash_attention, "cudnn": cudnn_attention}[impl]
    return per_shard(partial(fn, causal=causal, scale=scale), q, k, v, segments)


def shard_axes(mesh, b: int, h: int, kvh: int) -> tuple:
    """`(batch, heads)` PartitionSpec entries attention runs under on `mesh`: the batch over the rule
    table's batch axes that divide `b`, the heads over its heads axes when they divide both head counts
    (else None: that dimension is whole on every device)."""
    batch = parallel.fitted_spec((b,), ("batch",), mesh)
    heads = parallel.logical_to_spec(("heads",))[0]
    shards = math.prod(mesh.shape[a] for a in parallel.axis_names(heads))
    return (batch[0] if len(batch) else None), (None if h % shards or kvh % shards else heads)


def per_shard(fn, q, k, v, segments: Segments) -> jax.Array:
    """`fn(q, k, v, segments)` on each device's own batch rows and heads (`shard_map`, `shard_axes`)
    under a multi-device mesh; a plain call otherwise.

    Attention is independent per (batch row, head), but left to the partitioner its reshapes and
    transposes (the grouped-query `[b, t, kv_heads, group, d]` view, the KV cache's layer slice, the
    flash blocks) lose the heads sharding: compiled for TPU with heads over a tensor axis, the prefill
    all-gathered each layer's whole KV cache and computed all heads on every chip (docs/attention.md). Here
    each device reads only its own slice and nothing is communicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return fn(q, k, v, segments)
    batch, heads = shard_axes(mesh, q.shape[0], q.shape[2], k.shape[2])
    x, ids = jax.sharding.PartitionSpec(batch, None, heads, None), jax.sharding.PartitionSpec(batch, None)

    def local(q, k, v, q_ids, kv_ids, off):
        return fn(q, k, v, segments._replace(q=q_ids, kv=kv_ids, q_offset=None if segments.q_offset is None else off))
    # check_vma=False: the implementations' loops start from constants (not "varying" over the mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=(x, x, x, ids, ids, jax.sharding.PartitionSpec()),
                         out_specs=x, check_vma=False)(q, k, v, segments.q, segments.kv, offset(segments))


def platform() -> str:
    """The platform attention compiles for: the context mesh's devices (an AOT TPU topology counts),
    else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def _multi_device() -> bool:
    """Whether the computation is traced under a mesh of several devices. `rows` maps over (batch row,
    head) chunks, an axis the partitioner cannot split by the mesh's batch sharding (measured: on 8
    CPU devices its compiled temporaries were 2x flash's), so sharded CPU programs keep `flash`."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh is not None and not mesh.empty and mesh.size > 1


def resolve(implementation: str, q_len: int, kv_len: int, dtype, cached: bool, *, causal: bool = True,
            interpret: bool = False, packed: bool = False) -> str:
    """The implementation `implementation` runs as for these shapes here; ValueError when impossible.
    `packed`: a row may hold several segments (`Segments.num_ids` unknown or above 2: packed examples),
    which `cudnn` cannot represent."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r} is not one of {list(IMPLEMENTATIONS)}")
    where = platform()
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if implementation == "auto":
        if q_len <= PLAIN_MAX_QUERIES or (kv_len <= PLAIN_MAX_KEYS and (cached or where != "cpu")):
            return "xla"
        if where == "cpu":
            return "flash" if _multi_device() or (causal and kv_len > ROWS_CAUSAL_MAX) else "rows"
        if cached:
            return "flash"
        return {"tpu": "splash", "gpu": "cudnn" if half and not packed else "flash"}.get(where, "flash")
    if implementation in ("splash", "cudnn") and cached:
        raise ValueError(f"attention={implementation!r} takes no KV cache (queries at a slot offset); "
                         "decoding uses attention='auto', 'rows', 'flash' or 'xla'")
    if implementation == "splash" and where != "tpu" and not interpret:
        raise ValueError(f"attention='splash' is a TPU kernel and this computation is for {where!r}; "
                         "use attention='flash' (or 'auto')")
    if implementation == "cudnn":
        if where != "gpu":
            raise ValueError(f"attention='cudnn' needs a GPU and this computation is for {where!r}; "
                             "use attention='flash' (or 'auto')")
        if not half:
            raise ValueError(f"attention='cudnn' needs bfloat16/float16 compute, got {jnp.dtype(dtype).name}; "
                             "set dtype=bfloat16 or use attention='flash'")
        if packed:
            raise ValueError("attention='cudnn' holds one example a row (padding as key lengths), and these rows "
                             "may hold several (packed: data.pack); use attention='flash' (or 'auto')")
    return implementation


def plain_attention(q, k, v, segments: Segments, *, causal: bool, scale: float) -> jax.Array:
    """All `[b, kv_heads, group, t, s]` scores at once; the mask is built from `segments` in place."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    ok = allowed(segments.q, segments.kv, offset(segments) + jnp.arange(t), jnp.arange(s), causal)
    probs = jax.nn.softmax(jnp.where(ok[:, None, None], scores, MASKED), axis=-1).astype(v.dtype)
    # v as the first operand: for one query XLA:CPU then reads the values where they lie (with probs first
    # it transposed every layer's cached values per decode step at batch 1)
    return jnp.einsum("bskd,bkgts->btkgd", v, probs).reshape(b, t, h, d)


def rows_attention(q, k, v, segments: Segments, *, causal: bool, scale: float) -> jax.Array:
    """The CPU path: `[b, t, heads, d]` attention one (batch row, kv head) block at a time.

    XLA:CPU runs each op of a loop body on all cores but does not fuse a matmul with the softmax that
    reads its output, so every score goes to memory and is read back by the max, exp and sum passes.
    `plain_attention` holds all `[b, heads, t, s]` scores and `flash` vectorises each block over every
    batch row and head (`[b, heads, 256, 256]`: 42 MB at ESM-2 8M's 8 x 20 heads), so those passes run
    at DRAM speed. Here a step is `rows` (batch row, kv head) pairs x `bq` query positions (x the query
    heads sharing that kv head) against the keys, at most ROWS_SCORES scores, which stay in cache;
    the output `[.., d]` is normalised instead of the scores. A bidirectional mask with
    `segments.num_ids` <= ROWS_FOLD_IDS ids rides in the score product as extra dimensions (query: the
    one-hot of its id; key: 0 at its own id, MASKED at the others; exactly one term can be nonzero, so
    nothing cancels), which saves a select pass over the scores. `lax.map` over row chunks, and inside
    over query blocks, each step under `jax.checkpoint`: the backward recomputes a step's scores rather
    than storing `[b, heads, t, s]` probabilities, so memory is O(t + s), as with `flash`.

    From ROWS_SKIP_MIN keys on, a step reads only the window of keys its queries can attend (`key_window`:
    the span of keys whose ids its rows' queries hold, cut at the causal diagonal), rounded up to one of
    ROWS_WINDOWS widths (`lax.switch` over static shapes): padding keys at either end and, causal, the
    keys above the diagonal are skipped; the keys left out could only add exact zeros."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g, n = h // kvh, b * kvh
    per_query = g * s
    bq, nq = (t, 1) if t * per_query <= ROWS_SCORES else blocks(t, max(8, ROWS_SCORES // per_query))
    rows = max(c for c in range(1, n + 1) if n % c == 0 and c * bq * per_query <= max(ROWS_SCORES, bq * per_query))
    off = offset(segments)
    widths = window_widths(s) if s >= ROWS_SKIP_MIN else (s,)
    per_chunk = lambda x, reduce: reduce(jnp.repeat(x, kvh).reshape(n // rows, rows), axis=1)   # [b] -> [n/rows]
    lo, hi = key_window(segments, s) if len(widths) > 1 else (jnp.zeros((b,), jnp.int32),) * 2   # unread: one width
    lo, hi = per_chunk(lo, jnp.min), per_chunk(hi, jnp.max)
    fold = not causal and segments.num_ids is not None and segments.num_ids <= ROWS_FOLD_IDS
    if fold:  # extra score dimensions: query one-hot of its id . key 0 at its own id, MASKED at the others
        ids = segments.num_ids
        q = jnp.concatenate([q, jnp.broadcast_to(jax.nn.one_hot(segments.q, ids, dtype=q.dtype)[:, :, None],
                                                 (b, t, h, ids))], axis=-1)
        masked = max(MASKED, float(jnp.finfo(k.dtype).min) / 4)   # finite in k's dtype (float16 too)
        bias = jnp.where(jax.nn.one_hot(segments.kv, ids, dtype=jnp.bool_), 0.0, masked).astype(k.dtype)
        k = jnp.concatenate([k, jnp.broadcast_to(bias[:, :, None], (b, s, kvh, ids))], axis=-1)
    dq = q.shape[-1]
    # [b, t, kvh, g, dq] -> [n/rows, nq, rows, bq * g, dq]: one leading step index per (row chunk, query block)
    qr = pad_to(q, bq * nq).reshape(b, nq, bq, kvh, g, dq).transpose(0, 3, 1, 2, 4, 5)
    qr = qr.reshape(n // rows, rows, nq, bq * g, dq).swapaxes(1, 2)
    kr = k.transpose(0, 2, 1, 3).reshape(n // rows, rows, s, dq)
    vr = v.transpose(0, 2, 1, 3).reshape(n // rows, rows, s, d)
    per_row = lambda ids: jnp.repeat(ids, kvh, axis=0).reshape(n // rows, rows, ids.shape[1])
    q_ids = per_row(pad_to(segments.q, bq * nq)).reshape(n // rows, rows, nq, bq).swapaxes(1, 2)
    kv_ids = per_row(segments.kv)

    def chunk(args):
        # [nq, rows, bq*g, dq], [nq, rows, bq], [rows, s, dq|d] twice, [rows, s], the chunk's key window [lo, hi)
        q_c, qid_c, k_c, v_c, kvid_c, lo_c, hi_c = args

        def window(width):
            def attend(qi, qid, i):
                start = jnp.minimum(lo_c, s - width)            # the window [lo, hi) lies inside [start, start + width)
                kw, vw, kid = (jax.lax.dynamic_slice_in_dim(x, start, width, axis=1) for x in (k_c, v_c, kvid_c))
                sc = jnp.einsum("rqd,rsd->rqs", qi, kw, preferred_element_type=jnp.float32) * scale
                if not fold:
                    ok = allowed(qid, kid, off + i * bq + jnp.arange(bq), start + jnp.arange(width), causal)
                    sc = jnp.where(jnp.repeat(ok, g, axis=1) if g > 1 else ok, sc, MASKED)
                p = jnp.exp(sc - sc.max(-1, keepdims=True))
                out = jnp.einsum("rqs,rsd->rqd", p.astype(vw.dtype), vw, preferred_element_type=jnp.float32)
                return (out / p.sum(-1)[..., None]).astype(q.dtype)
            return attend

        @jax.checkpoint
        def step(args):
            qi, qid, i = args                  # [rows, bq*g, dq], [rows, bq], block index
            if len(widths) == 1:
                return window(s)(qi, qid, i)
            end = jnp.minimum(hi_c, off + (i + 1) * bq) if causal else hi_c
            branch = jnp.searchsorted(jnp.asarray(widths), end - lo_c)
            return jax.lax.switch(branch, [window(w) for w in widths], qi, qid, i)

        return jax.lax.map(step, (q_c, qid_c, jnp.arange(nq)))

    out = jax.lax.map(chunk, (qr, q_ids, kr, vr, kv_ids, lo, hi))            # [n/rows, nq, rows, bq*g, d]
    out = out.swapaxes(1, 2).reshape(b, kvh, nq * bq, g, d).transpose(0, 2, 1, 3, 4)
    return out[:, :t].reshape(b, t, h, d)


def window_widths(s: int) -> tuple[int, ...]:
    """The key-window widths `rows` compiles for `s` keys: at most ROWS_WINDOWS, multiples of 64, up to s."""
    step = 64 * -(-s // (64 * ROWS_WINDOWS))
    return tuple(sorted({min(s, j * step) for j in range(1, -(-s // step) + 1)}))


def key_window(segments: Segments, s: int) -> tuple[jax.Array, jax.Array]:
    """Per batch row `[b]`, the span `[lo, hi)` of the keys whose ids some query of the row holds: every
    key a query may attend lies inside. With `num_ids` unknown (or a row whose queries attend nothing),
    all `s` keys."""
    b = segments.kv.shape[0]
    if segments.num_ids is None:
        return jnp.zeros((b,), jnp.int32), jnp.full((b,), s, jnp.int32)
    held = (segments.q[:, :, None] == jnp.arange(segments.num_ids)).any(1)      # [b, num_ids]
    needed = jnp.take_along_axis(held, segments.kv, axis=1)                     # [b, s]
    pos, some = jnp.arange(s, dtype=jnp.int32), needed.any(1)
    lo = jnp.where(some, jnp.min(jnp.where(needed, pos, s), axis=1), 0)
    hi = jnp.where(some, jnp.max(jnp.where(needed, pos + 1, 0), axis=1), s)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def splash_attention(q, k, v, segments: Segments, *, causal: bool, scale: float, interpret: bool = False):
    """JAX's Pallas splash kernel; t == s. The sequence is padded to a multiple of 128 (padding in a
    segment of its own), blocks of 512 where that divides it; q is pre-scaled (the kernel does not scale).
    Under a mesh the kernel runs in `shard_map`: batch over the batch axes, heads over the heads axis when
    both head counts divide it."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    kvh = k.shape[2]
    if segments.q_offset is not None or k.shape[1] != t:
        raise ValueError(f"splash attention is self-attention: {t} queries, {k.shape[1]} keys, no KV cache")
    n = -(-t // 128) * 128
    block = next(bs for bs in SPLASH_BLOCKS if n % bs == 0)
    pad_id = jnp.iinfo(jnp.int32).min
    qh, kh, vh = (jnp.swapaxes(pad_to(x, n), 1, 2) for x in ((q * scale).astype(q.dtype), k, v))  # [b, h, n, d]
    q_ids, kv_ids = pad_to(segments.q, n, pad_id), pad_to(segments.kv, n, pad_id)
    one = (sm.CausalMask if causal else sm.FullMask)((n, n))
    mesh = jax.sharding.get_abstract_mesh()
    sharded = mesh is not None and not mesh.empty
    batch_axes, heads_axis = shard_axes(mesh, b, h, kvh) if sharded else (None, None)
    head_shards = math.prod(mesh.shape[a] for a in parallel.axis_names(heads_axis))
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * h), block_sizes=sizes, head_shards=head_shards,
                                q_seq_shards=1, interpret=interpret)

    def run(kernel, qh, kh, vh, q_ids, kv_ids):  # the kernel takes one row: vmap over the batch
        def row(q1, k1, v1, i, j):
            return kernel(q1, k1, v1, segment_ids=sk.SegmentIds(i, j))
        return jax.vmap(row)(qh, kh, vh, q_ids, kv_ids)

    if sharded:
        heads_spec = jax.sharding.PartitionSpec(batch_axes, heads_axis, None, None)
        ids_spec = jax.sharding.PartitionSpec(batch_axes, None)
        kernel_spec = kernel.manual_sharding_spec(
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(heads_axis, None)))
        run = jax.shard_map(run, mesh=mesh, in_specs=(kernel_spec, heads_spec, heads_spec, heads_spec, ids_spec,
                                                      ids_spec), out_specs=heads_spec, check_vma=False)
    out = run(kernel, qh, kh, vh, q_ids, kv_ids)
    return jnp.swapaxes(out, 1, 2)[:, :t].astype(q.dtype)


def cudnn_attention(q, k, v, segments: Segments, *, causal: bool, scale: float) -> jax.Array:
    """cuDNN flash attention; keys valid up to each row's length. Rows whose key ids are not a right-
    padded run of 1s followed by 0s, or whose query ids are not 0/1, are not representable: they come
    out NaN (a loss over them is NaN, and the train step does not apply it) rather than wrong."""
    s = k.shape[1]
    lengths = jnp.sum(segments.kv != 0, axis=1).astype(jnp.int32)
    right_padded = jnp.all(segments.kv == (jnp.arange(s)[None] < lengths[:, None]), axis=1)
    ok = right_padded & jnp.all((segments.q == 0) | (segments.q == 1), axis=1)
    # an all-padding row keeps one key, so it stays finite (and meaningless) like on the other paths
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                       key_value_seq_lengths=jnp.maximum(lengths, 1), implementation="cudnn")
    return jnp.where(ok[:, None, None, None], out, jnp.nan).astype(q.dtype)

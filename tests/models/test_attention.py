"""Attention: every path equals a float64 PyTorch reference (values and gradients) with GQA, left/right
padding and packed segments; the rows and flash paths' memory is linear in T; splash runs in Pallas interpret mode
and compiles for a TPU topology; the switch routes and refuses impossible choices."""
import dataclasses
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bmgpt_jax import parallel
from bmgpt_jax.models import attention as A
from bmgpt_jax.models.biomedgpt import lm_loss
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM

MiB = 2 ** 20


def segment_ids(layout: str, b: int, t: int) -> np.ndarray:
    """[b, t] ids: 1 = real, 0 = padding; `packed`: several sequences per row, then padding."""
    rs = np.random.RandomState(len(layout))
    lens = rs.randint(t // 4, t, b)
    lens[0] = t
    ids = np.zeros((b, t), np.int32)
    for i, n in enumerate(lens):
        if layout == "left":
            ids[i, t - n:] = 1
        elif layout == "right":
            ids[i, :n] = 1
        else:
            cuts = np.sort(rs.choice(np.arange(1, n), 3, replace=False))
            ids[i, :n] = 1 + np.searchsorted(cuts, np.arange(n), side="right")
    return ids


def reference(torch, q, k, v, q_ids, kv_ids, off, causal, scale, cot):
    """Dense float64 softmax attention in PyTorch (GQA by repeating kv heads) and its gradients."""
    q, k, v = (torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(g, 2)) * scale
    ok = torch.tensor(q_ids)[:, :, None] == torch.tensor(kv_ids)[:, None, :]
    if causal:
        ok &= torch.arange(k.shape[1])[None, None, :] <= (off + torch.arange(q.shape[1]))[None, :, None]
    probs = torch.softmax(scores.masked_fill(~ok[:, None], float("-inf")), -1)
    out = torch.einsum("bhts,bshd->bthd", probs, v.repeat_interleave(g, 2))
    (out * torch.tensor(np.asarray(cot), dtype=torch.float64)).sum().backward()
    return [x.detach().numpy() for x in (out, q.grad, k.grad, v.grad)]


def ours(impl, q, k, v, segments, causal, cot, **kw):
    def loss(q, k, v):
        out = A.attention(q, k, v, segments, causal=causal, implementation=impl, **kw)
        return jnp.sum(out * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x) for x in (out, *grads)]


def inputs(b, t, s, h, kvh, d, seed=0):
    rs = np.random.RandomState(seed)
    return [jnp.asarray(rs.randn(*shape).astype(np.float32))
            for shape in ((b, t, h, d), (b, s, kvh, d), (b, s, kvh, d), (b, t, h, d))]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("layout", ["left", "right", "packed"])
@pytest.mark.parametrize("impl", ["xla", "rows", "flash"])
def test_values_and_grads_equal_float64_reference(torch, impl, layout, causal):
    b, t, h, kvh, d = 3, 600, 4, 2, 16          # flash: 3 query and 3 key blocks of 200, GQA 2 per group
    q, k, v, cot = inputs(b, t, t, h, kvh, d)
    ids = segment_ids(layout, b, t)
    got = ours(impl, q, k, v, A.Segments.self_attention(jnp.asarray(ids)), causal, cot)
    want = reference(torch, q, k, v, ids, ids, 0, causal, d ** -0.5, cot)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert np.abs(a - r).max() < 1e-5, (name, np.abs(a - r).max())


@pytest.mark.parametrize("impl", ["xla", "rows", "flash"])
def test_kv_cache_queries_at_a_slot_offset(torch, impl):
    """Queries at slots 290..369 of a 400-slot cache: slots after a query and invalid slots are not seen."""
    b, t, s, off, h, kvh, d = 2, 80, 400, 290, 4, 1, 16
    q, k, v, cot = inputs(b, t, s, h, kvh, d, seed=1)
    kv_ids = (np.arange(s)[None] < np.array([[off + t], [off + t]])).astype(np.int32)
    kv_ids[1, :100] = 0                             # a left-padded prompt
    q_ids = np.ones((b, t), np.int32)
    segs = A.Segments(jnp.asarray(q_ids), jnp.asarray(kv_ids), jnp.asarray(off))
    got = ours(impl, q, k, v, segs, True, cot)
    want = reference(torch, q, k, v, q_ids, kv_ids, off, True, d ** -0.5, cot)
    for a, r in zip(got, want):
        assert np.abs(a - r).max() < 1e-5


@pytest.mark.parametrize("heads", [(8, 4), (4, 2)], ids=["heads-split", "heads-whole"])
@pytest.mark.parametrize("impl", ["xla", "rows", "flash"])
def test_under_a_mesh_each_device_computes_its_own_rows_and_heads(torch, impl, heads):
    """On a 2 x 1 x 4 mesh (batch over data, heads over tensor) attention runs per shard (`per_shard`): values
    and gradients equal the float64 reference, a KV cache's slot offset included, and the compiled program
    communicates nothing but the loss. 2 kv heads do not divide the tensor axis: every device then computes all heads of
    its rows, and each gradient is counted once (not once per device)."""
    mesh = parallel.make_mesh((2, 1, 4), jax.devices()[:8])
    h, kvh = heads
    b, t, s, off, d = 4, 40, 96, 50, 16
    q, k, v, cot = inputs(b, t, s, h, kvh, d, seed=3)
    kv_ids = (np.arange(s)[None] < off + t).astype(np.int32).repeat(b, 0)
    kv_ids[1, :20] = 0                                          # a left-padded prompt
    q_ids = np.ones((b, t), np.int32)
    rows = NamedSharding(mesh, P("data", None, "tensor" if h == 8 else None))
    q, k, v, cot = (jax.device_put(x, rows) for x in (q, k, v, cot))
    segs = A.Segments(jnp.asarray(q_ids), jnp.asarray(kv_ids), jnp.asarray(off))

    def loss(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            out = A.attention(q, k, v, segs, causal=True, implementation=impl)
        return jnp.sum(out * cot), out
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    (_, out), grads = step(q, k, v)
    want = reference(torch, q, k, v, q_ids, kv_ids, off, True, d ** -0.5, cot)
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        assert np.abs(np.asarray(a) - r).max() < 1e-5, (name, np.abs(np.asarray(a) - r).max())
    if h == 8:
        hlo = step.lower(q, k, v).compile().as_text()
        collectives = re.findall(r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute)\(", hlo)
        assert collectives and set(collectives) == {("f32[]", "all-reduce")}  # the loss's sum, nothing of attention's


@pytest.mark.parametrize("scores, layout", [(4096, "packed"), (40_000, "left")], ids=["query-blocks", "row-chunks"])
def test_rows_query_blocks_and_row_chunks_equal_float64_reference(torch, monkeypatch, scores, layout):
    """`rows` with a small step budget: 4096 scores cut 100 queries x 2 heads x 100 keys into 5 blocks of
    24 queries (20 of them padding), 40,000 keep the queries whole and take two (batch, kv head) rows a step."""
    monkeypatch.setattr(A, "ROWS_SCORES", scores)
    b, t, h, kvh, d = 2, 100, 4, 2, 8
    q, k, v, cot = inputs(b, t, t, h, kvh, d, seed=2)
    ids = segment_ids(layout, b, t)
    for causal in (True, False):
        got = ours("rows", q, k, v, A.Segments.self_attention(jnp.asarray(ids)), causal, cot)
        want = reference(torch, q, k, v, ids, ids, 0, causal, d ** -0.5, cot)
        for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
            assert np.abs(a - r).max() < 1e-5, (name, causal, np.abs(a - r).max())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("layout", ["left", "right", "packed"])
def test_rows_key_windows_and_skipped_query_blocks_equal_float64_reference(torch, monkeypatch, layout, causal):
    """From ROWS_SKIP_MIN keys `rows` reads only the keys a step's queries can attend (padding at either
    end, and causal, the keys above the diagonal of a query block): 200 tokens as 4 query blocks of 56,
    ids promised below 5 (`num_ids`), padding queries holding a real id (as ESM's do). Values and
    gradients at the real queries equal the float64 reference (the cotangent is zero at padding queries:
    the reference's causal left-padding rows see no key); the windows are those the ids imply."""
    monkeypatch.setattr(A, "ROWS_SKIP_MIN", 64)
    monkeypatch.setattr(A, "ROWS_SCORES", 56 * 2 * 200)
    b, t, h, kvh, d = 3, 200, 4, 2, 8
    q, k, v, cot = inputs(b, t, t, h, kvh, d, seed=4)
    ids = segment_ids(layout, b, t)
    first = np.array([r[np.flatnonzero(r).min()] for r in ids])
    q_ids = np.where(ids > 0, ids, first[:, None])           # padding queries see real keys (ESM's padding) ...
    if causal and layout == "left":
        q_ids = ids                                          # ... unless no real key precedes them
    cot = cot * (ids > 0)[:, :, None, None]       # padding queries' outputs are unread (left ones see no key)
    segs = A.Segments(jnp.asarray(q_ids), jnp.asarray(ids), num_ids=5)
    got = ours("rows", q, k, v, segs, causal, cot)
    want = reference(torch, q, k, v, q_ids, ids, 0, causal, d ** -0.5, cot)
    real = ids > 0
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        a, r = (a[real] if name in ("out", "dq") else a), (r[real] if name in ("out", "dq") else r)
        assert np.abs(a - r).max() < 1e-5, (name, np.abs(a - r).max())
    assert np.isfinite(got[0]).all()
    lo, hi = (np.asarray(x) for x in A.key_window(segs, t))
    needed = [np.flatnonzero(np.isin(kv, qi)) for qi, kv in zip(q_ids, ids)]
    assert lo.tolist() == [n.min() for n in needed] and hi.tolist() == [n.max() + 1 for n in needed]
    assert A.window_widths(1024) == (128, 256, 384, 512, 640, 768, 896, 1024)
    assert A.window_widths(600) == (128, 256, 384, 512, 600)


@pytest.mark.parametrize("kvh", [4, 2], ids=["mha", "gqa"])
def test_rows_folds_a_bidirectional_mask_of_few_ids_into_the_scores(torch, kvh):
    """`Segments(num_ids=3)`: the mask rides in the score product (no select over the scores); values
    and gradients equal the float64 reference, bidirectional with query ids that differ from the key ids
    along a row, and causal (which cannot fold) with ids shared by queries and keys."""
    b, t, h, d = 2, 120, 4, 16
    q, k, v, cot = inputs(b, t, t, h, kvh, d, seed=3)
    rs = np.random.RandomState(3)
    q_ids, kv_ids = rs.randint(0, 3, (b, t)).astype(np.int32), rs.randint(0, 3, (b, t)).astype(np.int32)
    kv_ids[:, :3] = [0, 1, 2]                        # every query id has keys
    for causal, qi in ((False, q_ids), (True, kv_ids)):
        folded = A.Segments(jnp.asarray(qi), jnp.asarray(kv_ids), num_ids=3)
        got = ours("rows", q, k, v, folded, causal, cot)
        want = reference(torch, q, k, v, qi, kv_ids, 0, causal, d ** -0.5, cot)
        for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
            assert np.abs(a - r).max() < 1e-5, (name, causal, np.abs(a - r).max())

    lo = [x.astype(jnp.float16) for x in (q, k, v)]  # the fold's MASKED must stay finite: 0 * -inf is NaN
    half = A.rows_attention(*lo, A.Segments(jnp.asarray(q_ids), jnp.asarray(kv_ids), num_ids=3), causal=False,
                            scale=d ** -0.5)
    want = reference(torch, q, k, v, q_ids, kv_ids, 0, False, d ** -0.5, cot)[0]
    assert np.abs(np.asarray(half, np.float32) - want).max() < 5e-3

    def score_selects(segments):                     # selects over `[rows, queries, keys]` scores
        jaxpr = jax.make_jaxpr(lambda q, k, v: A.rows_attention(q, k, v, segments, causal=False, scale=1.0))
        return len(re.findall(rf"f32\[\d+,\d+,{t}\] = select_n", str(jaxpr(q, k, v))))
    assert score_selects(A.Segments(jnp.asarray(q_ids), jnp.asarray(kv_ids))) == 1
    assert score_selects(A.Segments(jnp.asarray(q_ids), jnp.asarray(kv_ids), num_ids=3)) == 0


def flash_temp(t: int, impl: str = "flash") -> float:
    """Compiled temporary MiB of forward + backward of one attention call at sequence length t."""
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731

    def loss(q, k, v, ids):
        return jnp.sum(A.attention(q, k, v, A.Segments.self_attention(ids), causal=True, implementation=impl))
    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).lower(sds(1, t, 4, 16), sds(1, t, 2, 16), sds(1, t, 2, 16),
                                                       jax.ShapeDtypeStruct((1, t), jnp.int32))
    return lowered.compile().memory_analysis().temp_size_in_bytes / MiB


@pytest.mark.parametrize("impl", ["rows", "flash"])
def test_flash_and_rows_memory_is_linear_in_sequence_length(impl):
    a, b = flash_temp(4096, impl), flash_temp(8192, impl)
    assert b / a < 2.3, (a, b)
    assert b < flash_temp(8192, "xla") / 20   # the plain path holds [heads, T, T] scores


def test_decoder_training_memory_is_linear_in_sequence_length():
    """A 1-layer, 64-wide Llama with the 32001-token vocabulary: compiled temporaries of the gradient of
    `lm_loss` (flash attention + chunked loss) at 4096 and 8192 tokens. The quadratic paths needed
    1.75 GiB and 5 GiB; one [4, 8192, 8192] float32 score matrix alone is 1 GiB."""
    def temp(t):
        cfg = LlamaConfig(vocab_size=32001, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                          intermediate_size=128, max_position_embeddings=8192)
        gdef, params = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
        batch = {k: jax.ShapeDtypeStruct((1, t), jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
        grad = jax.jit(jax.grad(lambda p, b: lm_loss(nnx.merge(gdef, p), b)[0]))
        return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes / MiB
    a, b = temp(4096), temp(8192)
    assert b / a < 2.3 and b < 512, (a, b)


@pytest.mark.parametrize("impl", ["flash", "rows"])
def test_blockwise_attention_under_scanned_remat_layers_gives_the_dense_gradients(impl):
    """A 2-layer Llama (scan_layers, remat full, GQA), right-padded batch of 520 tokens: the gradients of
    `lm_loss` with flash's custom VJP, or `rows` reading key windows (from ROWS_SKIP_MIN keys; the mask's
    static `Segments.num_ids` branches it), inside `jax.checkpoint` + `lax.scan` equal the plain path's."""
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, scan_layers=True, remat="full", loss_chunk_size=128)
    rs = np.random.RandomState(3)
    t = 520
    assert t >= A.ROWS_SKIP_MIN
    mask = (np.arange(t)[None] < np.array([[t], [170]])).astype(np.int32)
    batch = {"input_ids": jnp.asarray(rs.randint(3, 101, (2, t)) * mask), "attention_mask": jnp.asarray(mask),
             "loss_mask": jnp.asarray(mask)}
    _, params = nnx.split(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))

    def grads(impl):
        gdef = nnx.graphdef(nnx.eval_shape(lambda: LlamaForCausalLM(dataclasses.replace(cfg, attention=impl),
                                                                    rngs=nnx.Rngs(0))))
        return jax.jit(jax.value_and_grad(lambda p: lm_loss(nnx.merge(gdef, p), batch)[0]))(params)
    (la, ga), (lb, gb) = grads("xla"), grads(impl)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_splash_interpret_equals_flash_padded_gqa(causal):
    """JAX's Pallas splash kernel in interpret mode (CPU): T = 200 is padded to 256 inside the wrapper."""
    b, t, h, kvh, d = 2, 200, 4, 2, 64
    q, k, v, cot = inputs(b, t, t, h, kvh, d, seed=2)
    ids = segment_ids("left", b, t)
    ids[1] = segment_ids("right", b, t)[1]
    segs = A.Segments.self_attention(jnp.asarray(ids))
    want = ours("flash", q, k, v, segs, causal, cot)
    got = ours("splash", q, k, v, segs, causal, cot, interpret=True)
    # padding queries (their own segment on both paths) are compared too: whole arrays
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        tol = 2e-5 if name == "out" else 2e-4 * max(1.0, np.abs(r).max())
        assert np.abs(a - r).max() < tol, (name, np.abs(a - r).max())
    assert np.isfinite(got[0]).all()


def test_auto_routing_and_impossible_choices():
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert A.resolve("auto", 1, 4096, f32, cached=True) == "xla"          # a decode step
    assert A.resolve("auto", 200, 200, f32, cached=False) == "rows"       # CPU, short
    assert A.resolve("auto", 20, 200, f32, cached=True) == "xla"          # a short prefill into a cache
    assert A.resolve("auto", 2048, 2048, f32, cached=False) == "rows"     # CPU, long
    assert A.resolve("auto", 8192, 8192, f32, cached=False, causal=False) == "rows"
    assert A.resolve("auto", 8192, 8192, f32, cached=False) == "flash"    # CPU, long and causal
    if len(jax.devices()) >= 8:                                            # CPU, sharded over a mesh
        with jax.sharding.use_abstract_mesh(parallel.make_mesh((1, 8, 1), jax.devices()[:8]).abstract_mesh):
            assert A.resolve("auto", 2048, 2048, f32, cached=False) == "flash"
            assert A.resolve("auto", 300, 4096, f32, cached=True) == "flash"
    assert A.resolve("auto", 300, 4096, f32, cached=True) == "rows"       # a long prefill into a cache, CPU
    assert A.resolve("auto", 300, 8192, f32, cached=True) == "flash"      # ... longer than ROWS_CAUSAL_MAX
    assert A.resolve("splash", 8, 8, f32, cached=False, interpret=True) == "splash"
    q = k = v = jnp.zeros((1, 512, 2, 8))
    segs = A.Segments.self_attention(jnp.ones((1, 512), jnp.int32))
    with pytest.raises(ValueError, match="attention='splash' is a TPU kernel .* for 'cpu'"):
        A.attention(q, k, v, segs, causal=True, implementation="splash")
    with pytest.raises(ValueError, match="attention='cudnn' needs a GPU .* for 'cpu'"):
        A.attention(q.astype(bf16), k.astype(bf16), v.astype(bf16), segs, causal=True, implementation="cudnn")
    with pytest.raises(ValueError, match="takes no KV cache"):
        A.resolve("splash", 1, 512, f32, cached=True, interpret=True)
    with pytest.raises(ValueError, match="'fast' is not one of"):
        A.resolve("fast", 512, 512, f32, cached=False)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        A.attention(jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)), segs, causal=True)
    with pytest.raises(ValueError, match="attention='fast'"):
        LlamaConfig(attention="fast")


def test_on_gpu_packed_rows_never_reach_cudnn(monkeypatch):
    """cuDNN's padding is a key length per row, so a row of several packed examples would come out NaN:
    on a GPU, `auto` sends packed rows (segment ids, `data.pack`) to `flash` and keeps `cudnn` for rows of
    one example (the attention mask: ids 0/1); an explicit `cudnn` with packed rows is refused. Traced
    with the platform set to GPU, the decoder asks for each as it should."""
    monkeypatch.setattr(A, "platform", lambda: "gpu")
    bf16 = jnp.bfloat16
    assert A.resolve("auto", 2048, 2048, bf16, cached=False) == "cudnn"
    assert A.resolve("auto", 2048, 2048, bf16, cached=False, packed=True) == "flash"
    assert A.resolve("auto", 2048, 2048, jnp.float32, cached=False) == "flash"
    with pytest.raises(ValueError, match="attention='cudnn' holds one example a row .* data.pack"):
        A.resolve("cudnn", 2048, 2048, bf16, cached=False, packed=True)
    seen, real = [], A.resolve
    monkeypatch.setattr(A, "resolve", lambda *a, **kw: seen.append(real(*a, **kw)) or "xla")  # run: plain
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=2, max_position_embeddings=512, dtype="bfloat16")
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.ones((1, 300), jnp.int32)
    jax.eval_shape(lambda: model(ids, jnp.ones((1, 300), jnp.int32)))
    jax.eval_shape(lambda: model.model(ids, segment_ids=jnp.repeat(jnp.arange(1, 4), 100)[None]))
    assert seen == ["cudnn", "flash"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e .[tpu-plan])")
@pytest.mark.parametrize("mesh_shape", [(1, 16, 1), (1, 4, 4)], ids=["fsdp16", "fsdp4-tensor4"])
def test_splash_compiles_for_v5e_topology(mesh_shape):
    """Forward + backward of a 7B-shaped attention (32 heads of 128, T = 4096, bf16) compiled by libtpu
    for a v5e:4x4 slice; under the TPU mesh `auto` is splash, in shard_map over batch (and heads)."""
    from bmgpt_jax.training.targets import tpu_devices
    mesh = parallel.make_mesh(mesh_shape, tpu_devices("v5e:4x4"))
    b, t, h, d = 16, 4096, 32, 128
    seen = []

    def loss(q, k, v, ids):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            seen.append(A.resolve("auto", t, t, q.dtype, cached=False))
            out = A.attention(q, k, v, A.Segments.self_attention(ids), causal=True)
        return jnp.sum(out.astype(jnp.float32))
    act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    sds = lambda *s, dt=jnp.bfloat16, sh=act: jax.ShapeDtypeStruct(s, dt, sharding=sh)  # noqa: E731
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(
        sds(b, t, h, d), sds(b, t, h, d), sds(b, t, h, d),
        sds(b, t, dt=jnp.int32, sh=NamedSharding(mesh, P(("data", "fsdp"))))).compile()
    assert seen == ["splash"]
    assert "splash" in compiled.as_text() or "tpu_custom_call" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < 256 * MiB   # dense scores would be 2 GiB per chip

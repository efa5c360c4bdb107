"""`layers.dense` in bfloat16: PyTorch float64 parity of the product and both gradients, the compiled CPU
program's GEMMs reading bfloat16, the plain product when lowered for TPU / GPU, remat, batch-1 decoding;
`layers.embedding_lookup` in bfloat16: exact rows, the gradient, no float32 copy of the table; `layers.argmax`;
the rotary tables (`rotary_cos_sin`'s CPU gather, PyTorch's frequencies)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax.models.layers import argmax, dense, embedding_lookup, rotary_cos_sin, rotary_inv_freq, take
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM


def bf16_operands(seed=0, m=(3, 40), k=96, n=72):
    rs = np.random.RandomState(seed)
    return [jnp.asarray(rs.randn(*shape), jnp.bfloat16) for shape in ((*m, k), (k, n), (*m, n))]  # x, w, dy


def test_bfloat16_dense_and_its_gradients_match_float64(torch):
    x, w, dy = bf16_operands()
    y, vjp = jax.vjp(jax.jit(dense), x, w)
    dx, dw = vjp(dy)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16 and y.shape == (3, 40, 72) and dw.shape == w.shape
    tx, tw, tdy = (torch.tensor(np.asarray(a, np.float64)) for a in (x, w, dy))
    tx.requires_grad_(True)
    tw.requires_grad_(True)
    ty = tx @ tw
    ty.backward(tdy)
    for got, want in ((y, ty.detach()), (dx, tx.grad), (dw, tw.grad)):
        want = want.numpy()
        err = np.abs(np.asarray(got, np.float64) - want)
        assert (err <= 2 ** -8 * np.abs(want) + 1e-3).all(), err.max()  # one bfloat16 rounding of the f32 sum
    # and the plain bfloat16 product (what TPU / GPU run) agrees to within a rounding of each other
    py, pvjp = jax.vjp(lambda a, b: jnp.dot(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], -1), x, w)
    for ours, plain in zip((y, dx, dw), (py, *pvjp(dy))):
        ours, plain = np.asarray(ours, np.float64), np.asarray(plain, np.float64)
        assert (np.abs(ours - plain) <= 2 ** -7 * np.abs(plain) + 1e-3).all()


def dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in a compiled HLO module (instruction names are unique)."""
    types, dots = {}, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
        if m:
            types[m.group(1)] = m.group(2)
        d = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
        if d:
            dots.append(d.groups())
    return [(types[a], types[b]) for a, b in dots]


@pytest.mark.parametrize("rows", [(3, 40), (1, 1)], ids=["batch", "one-row"])
def test_bfloat16_gemms_read_bfloat16_on_cpu(rows):
    """XLA:CPU converts a bfloat16 dot with a bfloat16 result to float32 GEMMs (half the rate on an
    AVX512-BF16 CPU), and a one-row product (batch-1 decoding) to a float32 matrix-vector product after
    converting the whole weight; `dense`'s forward and both gradient products must reach the GEMM in
    bfloat16 (a one-row weight gradient is an outer product, no dot)."""
    x, w, dy = bf16_operands(m=rows)

    def step(x, w, dy):
        y, vjp = jax.vjp(dense, x, w)
        return y, *vjp(dy)

    ours = dot_operand_dtypes(jax.jit(step).lower(x, w, dy).compile().as_text())
    assert len(ours) == (3 if rows[-1] > 1 else 2) and all(t == ("bf16", "bf16") for t in ours), ours
    plain = jax.jit(lambda x, w: jnp.dot(x, w)).lower(x.reshape(-1, x.shape[-1]), w).compile().as_text()
    assert dot_operand_dtypes(plain) == [("f32", "f32")]  # what the test guards against
    got = jax.jit(step)(x, w, dy)
    want = jax.vjp(lambda a, b: jnp.einsum("...k,kn->...n", a.astype(jnp.float32), b.astype(jnp.float32)), x, w)
    for a, b in zip(got, (want[0], *want[1](dy.astype(jnp.float32)))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_bfloat16_dense_lowers_the_plain_product_elsewhere(platform):
    """The CPU form is chosen at lowering (`lax.platform_dependent`): an AOT compile for TPU or GPU from
    this CPU host gets the plain bfloat16 product, no float32 results and no extra transpose."""
    x, w, dy = bf16_operands()
    plain_dense = lambda a, b: jnp.dot(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], -1)  # noqa: E731

    def lowered(fn, platform):
        text = jax.jit(lambda x, w, dy: jax.vjp(fn, x, w)[1](dy)).trace(x, w, dy).lower(
            lowering_platforms=(platform,)).as_text()
        return re.findall(r"dot_general .*-> tensor<\w+x(\w+)>", text), text.count("stablehlo.transpose")

    assert lowered(dense, platform) == lowered(plain_dense, platform) == (["bf16", "bf16"], 1)
    assert lowered(dense, "cpu") == (["f32", "f32"], 1)  # the CPU form: float32 results (x transposed)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_bfloat16_llama_gradients_under_remat(remat):
    """The custom-VJP product inside scanned, rematerialised layers: the gradients without remat, to within
    bfloat16 rounding (recomputing fuses differently, so not bit for bit, as with the plain product)."""
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              max_position_embeddings=64, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 97, (2, 16)))

    def grads(**extra):
        graphdef, state = nnx.split(LlamaForCausalLM(LlamaConfig(**kw, **extra), rngs=nnx.Rngs(0)))
        loss = lambda st: nnx.merge(graphdef, st)(ids).astype(jnp.float32).mean()  # noqa: E731
        return jax.tree.leaves(jax.jit(jax.grad(loss))(state))

    for a, b in zip(grads(remat=remat), grads()):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 2 ** -6 * np.abs(b).max()


def test_bfloat16_batch1_decode_holds_no_float32_weights():
    """A batch-1 bfloat16 decode step must not convert weights to float32: XLA:CPU's one-row product did,
    and in the decode loop it hoisted float32 copies of every layer's weights (twice the bfloat16 model's
    bytes in temporaries; ~27 GB for a 6.7B LM)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4,
                      num_kv_heads=4, max_position_embeddings=64, dtype="bfloat16", param_dtype="bfloat16")
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda st, c, tok: nnx.merge(graphdef, st)(tok, jnp.ones_like(tok), cache=c), donate_argnums=1)
    compiled = step.lower(state, model.init_cache(1, 64), jnp.ones((1, 1), jnp.int32)).compile()
    mlp_weight_bytes = 3 * 256 * 1024 * 2  # one layer's gate/up/down in bfloat16
    assert compiled.memory_analysis().temp_size_in_bytes < mlp_weight_bytes  # 8.5 MB without the padding


def test_bfloat16_embedding_lookup_is_exact_without_a_float32_table():
    """A bfloat16 table's rows come back bit for bit, its gradient is the scatter-add of the cotangent (ids
    repeated), and the compiled CPU lookup holds no float32 `[num, dim]` table (XLA:CPU's bfloat16 gather
    converts the whole table first: 0.5 GB at 7B)."""
    rs = np.random.RandomState(0)
    table = jnp.asarray(rs.randn(50, 16), jnp.bfloat16)
    ids = jnp.asarray([[3, 7, 3], [49, 0, 7]])
    out, vjp = jax.vjp(lambda t: embedding_lookup(t, ids), table)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(table, np.float32)[np.asarray(ids)])
    g = jnp.asarray(rs.randn(2, 3, 16), jnp.bfloat16)
    want = np.zeros((50, 16))
    np.add.at(want, np.asarray(ids).reshape(-1), np.asarray(g, np.float64).reshape(-1, 16))
    got = np.asarray(vjp(g)[0], np.float64)
    assert (np.abs(got - want) <= 2 ** -8 * np.abs(want)).all()  # one bfloat16 rounding of the sum
    hlo = jax.jit(embedding_lookup).lower(table, ids).compile().as_text()
    plain = jax.jit(lambda t, i: jnp.take(t, i, axis=0)).lower(table, ids).compile().as_text()
    assert "f32[50,16]" not in hlo and "f32[50,16]" in plain
    assert jax.jit(embedding_lookup).trace(table, ids).lower(lowering_platforms=("tpu",)).as_text().count(
        "bitcast_convert") == 0  # TPU gathers bfloat16 as it is


def test_bfloat16_take_along_an_axis_is_exact_without_float32():
    """`layers.take` (the KV cache's beam reorder) on a bfloat16 array: exact, and no float32 copy."""
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 3, 4), jnp.bfloat16)
    rows = jnp.asarray([4, 0, 4, 2])
    out = jax.jit(take, static_argnums=2)(x, rows, 1)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x, np.float32)[:, [4, 0, 4, 2]])
    hlo = jax.jit(take, static_argnums=2).lower(x, rows, 1).compile().as_text()
    assert "f32[" not in hlo and "f32[" in jax.jit(lambda a, r: jnp.take(a, r, axis=1)).lower(x, rows).compile().as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_argmax_is_numpys_first_maximum_as_two_plain_reductions_on_cpu(dtype):
    """`layers.argmax` (greedy decoding's token choice) gives numpy's answer along every axis: the first of
    tied maxima, the first NaN when there is one, 0 for a row of -inf. On CPU it compiles to two plain
    reductions and no (value, index) reduction, which XLA:CPU runs element by element (3x slower at
    8 x 32k logits); the TPU lowering keeps `jnp.argmax`'s."""
    x = np.random.RandomState(0).randn(4, 6, 33).astype(np.float32)
    x[0, 1, [3, 9, 20]] = 9.0                      # ties along the last axis
    x[1, 2, [5, 11]] = np.nan                      # NaNs: the first one wins
    x[2, 3, :] = -np.inf
    x[3, :, 7] = 12.0                              # ties along axis 1
    x[:, 0, 0] = np.inf
    x = np.asarray(jnp.asarray(x, dtype), np.float32)
    for axis in (0, 1, 2, -1):
        got = jax.jit(argmax, static_argnums=1)(jnp.asarray(x, dtype), axis)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), np.argmax(x, axis=axis))
    hlo = jax.jit(argmax).lower(jnp.asarray(x, dtype)).compile().as_text()
    pair_reduce = r", s32\[[\d,]*\](\{[\d,]*\})?\) reduce\("  # a (value, index) reduction's result type
    assert re.search(pair_reduce, hlo) is None
    assert re.search(pair_reduce, jax.jit(lambda v: jnp.argmax(v, -1)).lower(jnp.asarray(x)).compile().as_text())
    tpu = jax.jit(argmax).trace(jnp.asarray(x, dtype)).lower(lowering_platforms=("tpu",)).as_text()
    assert "stablehlo.minimum" not in tpu and re.search(r"stablehlo.reduce\(%\w+ init: %\w+\), \(%\w+ init", tpu)


def test_rotary_frequencies_are_pytorchs_and_cpu_gathers_the_angles(torch):
    """`rotary_inv_freq` equals HF's float32 `1 / base ** (arange(0, d, 2) / d)` bit for bit (XLA's float32
    pow is an ulp off at some head dims, e.g. 80). With `table_size`, the CPU gathers cos/sin rows from
    a constant table, within one float32 ulp of computing them, NaN past the table; the compiled CPU
    Llama forward then evaluates no cos or sin (XLA:CPU fused them into every head's rotation), while
    the TPU lowering still computes them, and a caller's own positions are computed as given."""
    for d in (16, 64, 80, 128):
        hf = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        np.testing.assert_array_equal(rotary_inv_freq(d, 10000.0), hf.numpy())
    pos = jnp.asarray(np.random.RandomState(0).randint(0, 4096, (2, 33)))
    gathered = jax.jit(lambda p: rotary_cos_sin(p, 128, table_size=4096))(pos)
    for got, want in zip(gathered, rotary_cos_sin(pos, 128)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1.2e-7)
    past = jax.jit(lambda p: rotary_cos_sin(p, 16, table_size=8))(jnp.asarray([[7, 8]]))[0]
    assert np.isfinite(past[0, 0]).all() and np.isnan(past[0, 1]).all()

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                      max_position_embeddings=64)
    graphdef, state = nnx.split(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    ids = jnp.ones((2, 16), jnp.int32)
    fwd = jax.jit(lambda st, i, p=None: nnx.merge(graphdef, st)(i, positions=p))
    transcendental = re.compile(r" (cosine|sine)\(")
    assert not transcendental.search(fwd.lower(state, ids).compile().as_text())
    assert transcendental.search(fwd.lower(state, ids, jnp.zeros((2, 16), jnp.int32)).compile().as_text())
    assert "stablehlo.cosine" in fwd.trace(state, ids).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 4, 1), (1, 4, 2)])
@pytest.mark.parametrize("vocab, dtype", [(64, jnp.float32), (63, jnp.bfloat16)])
def test_embedding_lookup_under_a_mesh_equals_the_gather_and_stays_batch_sharded(shape, vocab, dtype, capfd):
    """Under a data x fsdp x tensor mesh, with the table's columns FSDP-sharded and its rows tensor-sharded
    where the vocabulary divides (else its columns over fsdp x tensor: `fitted_spec`'s refit), the lookup (`layers._sharded_lookup`) gives one device's rows and table
    gradient, its output is split over the batch axes, and the partitioner replicates nothing to get there
    (before: XLA's "Involuntary full rematerialization" of the whole `[batch, seq, dim]` output)."""
    from jax.sharding import NamedSharding

    from bmgpt_jax import parallel
    rs = np.random.RandomState(0)
    table = jnp.asarray(rs.randn(vocab, 32), dtype)
    ids = jnp.asarray(rs.randint(0, vocab, (8, 12)))
    g = jnp.asarray(rs.randn(8, 12, 32), jnp.float32)
    step = jax.jit(lambda t, i: jax.value_and_grad(
        lambda t: (embedding_lookup(t, i).astype(jnp.float32) * g).sum(), has_aux=False)(t) + (embedding_lookup(t, i),))
    _, want_grad, want = step(table, ids)
    mesh = parallel.make_mesh(shape)
    spec = lambda x, axes, **kw: NamedSharding(mesh, parallel.fitted_spec(x.shape, axes, mesh, **kw))  # noqa: E731
    laid_out = jax.device_put(table, spec(table, ("vocab", "embed"), refit=True))
    assert laid_out.addressable_shards[0].data.size == table.size // (mesh.shape["fsdp"] * mesh.shape["tensor"])
    with jax.sharding.set_mesh(mesh):
        capfd.readouterr()
        _, grad, out = step(laid_out, jax.device_put(ids, spec(ids, ("batch",))))
        assert "rematerialization" not in capfd.readouterr().err
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    exact, size = np.zeros((vocab, 32)), np.zeros((vocab, 32))   # the gradient in float64, and its terms' sizes
    np.add.at(exact, np.asarray(ids).reshape(-1), np.asarray(g, np.float64).reshape(-1, 32))
    np.add.at(size, np.asarray(ids).reshape(-1), np.abs(np.asarray(g, np.float64)).reshape(-1, 32))
    tol = 2 ** -7 if dtype == jnp.bfloat16 else 1e-6    # bfloat16: partial sums (per data shard) rounded too
    for got in (grad, want_grad):
        assert (np.abs(np.asarray(got, np.float64) - exact) <= tol * size).all()
    assert out.sharding.is_equivalent_to(spec(out, ("batch",)), out.ndim)

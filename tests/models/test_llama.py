"""Llama decoder: parity with transformers' PyTorch LlamaForCausalLM, HF round trip, KV cache, errors."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import config as config_lib
from bmgpt_jax.convert import hf_llama
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM
from tests.torch_refs.hf_llama import make_hf_llama

VOCAB = 211


@pytest.fixture(scope="session", params=[4, 2], ids=["mha", "gqa"])
def hf_model(request, tmp_path_factory, torch):
    path = tmp_path_factory.mktemp(f"hf_llama_kv{request.param}")
    return path, make_hf_llama(path, num_kv_heads=request.param, vocab_size=VOCAB)


def padded_batch(seed=0, lens=(12, 7, 3), t=12):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, VOCAB, (len(lens), t))
    mask = (np.arange(t)[None] < np.asarray(lens)[:, None]).astype(np.int32)
    return ids * mask, mask


def torch_logits(hf, ids, mask, torch):
    with torch.no_grad():
        return hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="session")
def rope_model(tmp_path_factory, torch):
    """A non-default RoPE base (Llama 3's 500000): with the default 10000 alone, a forward or an export that
    ignored the config's base would match transformers all the same."""
    path = tmp_path_factory.mktemp("hf_llama_rope5e5")
    return path, make_hf_llama(path, num_kv_heads=2, vocab_size=VOCAB, seed=6, rope_theta=5e5)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_logits_match_transformers(hf_model, scan, torch):
    check_logits_match_transformers(hf_model, scan, torch)


def test_logits_match_transformers_at_rope_theta_5e5(rope_model, torch):
    """The forward rotates by the config's RoPE base (read from config.json as 5e5), as transformers does."""
    assert hf_llama.config_from_hf(rope_model[0]).rope_theta == 5e5
    check_logits_match_transformers(rope_model, True, torch)


def check_logits_match_transformers(hf_model, scan, torch):
    path, hf = hf_model
    model = hf_llama.load(path, scan_layers=scan)
    ids, mask = padded_batch()
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(hf, ids, mask, torch)
    assert ours.shape == (3, 12, VOCAB)
    err = np.abs(ours - ref)[mask.astype(bool)].max()
    assert err < 1e-4, err


@pytest.fixture(scope="session")
def long_model(tmp_path_factory, torch):
    path = tmp_path_factory.mktemp("hf_llama_long")
    return path, make_hf_llama(path, num_kv_heads=2, vocab_size=VOCAB, max_positions=512, seed=5)


@pytest.mark.parametrize("pad_left", [True, False], ids=["left-padded", "right-padded"])
def test_long_padded_batch_matches_transformers(long_model, torch, pad_left):
    """300 tokens: `auto` (the CPU's rows path), the plain and the blockwise flash paths all agree."""
    path, hf = long_model
    lens, t = (300, 211, 57), 300
    ids, mask = padded_batch(seed=4, lens=lens, t=t)
    if pad_left:
        ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
    ref = torch_logits(hf, ids, mask, torch)
    for attention in ("auto", "xla", "flash"):
        model = hf_llama.load(path, scan_layers=True, attention=attention)
        ours = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask)))
        assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4, attention


def test_packed_rows_equal_separate_rows(hf_model):
    """segment_ids: three sequences packed in one row (then padding) give each sequence's own logits."""
    path, _ = hf_model
    model = hf_llama.load(path)
    ids, _ = padded_batch(seed=3, lens=(12, 12, 12), t=12)
    lens = (5, 3, 2)
    packed = np.concatenate([ids[i, :n] for i, n in enumerate(lens)] + [np.zeros(2, ids.dtype)])[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)] + [np.zeros(2, int)])[None]
    out = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(seg)))
    start = 0
    for i, n in enumerate(lens):
        alone = np.asarray(model(jnp.asarray(ids[i:i + 1, :n])))
        np.testing.assert_allclose(out[0, start:start + n], alone[0], atol=1e-5)
        start += n
    with pytest.raises(ValueError, match="segment_ids replaces attention_mask"):
        model(jnp.asarray(packed), jnp.ones_like(jnp.asarray(packed)), segment_ids=jnp.asarray(seg))


def test_padding_does_not_change_real_rows(hf_model):
    path, _ = hf_model
    model = hf_llama.load(path)
    ids, mask = padded_batch()
    batched = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    alone = np.asarray(model(jnp.asarray(ids[2:3, :3])))
    np.testing.assert_allclose(batched[2, :3], alone[0], atol=1e-5)


def test_export_loads_in_transformers_and_reimports_bit_exact(hf_model, tmp_path, torch):
    check_export_round_trip(hf_model, tmp_path, torch)


def test_export_keeps_rope_theta_5e5(rope_model, tmp_path, torch):
    """The exported config.json carries the model's RoPE base (transformers reads 5e5 back), so the exported
    model's logits are ours."""
    reloaded = check_export_round_trip(rope_model, tmp_path, torch)
    assert reloaded.config.rope_parameters["rope_theta"] == 5e5


def check_export_round_trip(hf_model, tmp_path, torch):
    """Export with `hf_llama.save`: transformers loads it with our logits, we re-import it bit-exact.
    Returns transformers' model."""
    from transformers import LlamaForCausalLM
    path, _ = hf_model
    model = hf_llama.load(path, scan_layers=True)
    hf_llama.save(model, tmp_path / "export")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids, mask = padded_batch(seed=1)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(reloaded, ids, mask, torch)
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-5
    again = hf_llama.load(tmp_path / "export", scan_layers=True)
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, hf_llama.to_state_dict(model))),
                    jax.tree.leaves(jax.tree.map(np.asarray, hf_llama.to_state_dict(again)))):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    return reloaded


def test_scan_and_loop_layouts_hold_the_same_weights(hf_model):
    path, _ = hf_model
    loop = hf_llama.load(path)
    scan = hf_llama.with_config(loop, scan_layers=True)
    assert scan.model.layers.self_attn.q_proj.kernel.shape[0] == loop.config.num_layers
    a, b = hf_llama.to_state_dict(loop), hf_llama.to_state_dict(scan)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_kv_cache_decoding_matches_full_forward(hf_model, scan):
    path, _ = hf_model
    model = hf_llama.load(path, scan_layers=scan)
    ids, mask = padded_batch(seed=2, lens=(10, 6, 8), t=10)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    cache = model.init_cache(3, 16)
    logits, cache = model(jnp.asarray(ids[:, :4]), jnp.asarray(mask[:, :4]), cache=cache)
    steps = [np.asarray(logits)]
    for t in range(4, 10):  # one token at a time
        logits, cache = model(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache=cache)
        steps.append(np.asarray(logits))
    inc = np.concatenate(steps, axis=1)
    assert np.abs(inc - full)[mask.astype(bool)].max() < 1e-4
    with pytest.raises(ValueError, match=r"7 new token\(s\) at slot 10 overflow the KV cache's 16 slots"):
        model(jnp.asarray(ids[:, :7]), cache=cache)                  # eager: the index is known
    with pytest.raises(ValueError, match=r"17 new token\(s\) at slot \? overflow the KV cache's 16 slots"):
        jax.jit(lambda c: model(jnp.ones((3, 17), jnp.int32), cache=c))(model.init_cache(3, 16))


@pytest.mark.parametrize("batch", [2, 1])
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_decode_step_updates_the_cache_in_place(scan, batch):
    """A decode step (cache donated) writes its keys/values into the cache buffers in place and never copies
    the whole cache: unscanned, each layer reads its own buffer as it is (temporaries well under one
    layer's k + v); scanned, the stacked cache rides in the carry and one layer's slots are read at a
    time (under one layer's k + v). The old slice-per-layer + restack held more than the cache. At batch 1
    the buffers drop the batch dim (`KVCache`): with it, XLA:CPU wrote a second copy of each layer's keys
    and a transposed copy of its values (half a layer's k + v each)."""
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                      num_kv_heads=4, max_position_embeddings=4096, scan_layers=scan)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cache = model.init_cache(batch, 4096)
    per_layer = (batch, 4, 4096, 32)[batch == 1:]         # [batch, kv_heads, slots, head_dim], batch 1 dropped
    if scan:
        assert cache.k.shape == (4, *per_layer)
    else:
        assert len(cache.k) == 4 and all(k.shape == per_layer for k in cache.k)
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves((cache.k, cache.v)))
    step = jax.jit(lambda st, c, tok: nnx.merge(graphdef, st)(tok, jnp.ones_like(tok), cache=c)[1], donate_argnums=1)
    mem = step.lower(state, cache, jnp.ones((batch, 1), jnp.int32)).compile().memory_analysis()
    layer_kv = cache_bytes // cfg.num_layers
    assert mem.alias_size_in_bytes >= cache_bytes
    assert mem.temp_size_in_bytes < (1.25 if scan else 0.25) * layer_kv, (mem.temp_size_in_bytes, layer_kv)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_beam_reorder_copies_one_layer_at_a_time(scan):
    """`cache_beams` (beam search: beam j of row i continues that row's beam `cache_beams[i, j]`) reorders each
    layer's slots inside the layer loop: the step equals reordering the whole cache first (a gather of every buffer, as beam search did) and
    then stepping. With the stacked cache of a scanned model (the 10B configs') its temporaries stay under two
    layers' k + v where the whole-cache reorder holds a second cache; per-layer buffers were already
    reordered one at a time."""
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=8, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=2048, scan_layers=scan)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b = 4
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 128, (b, 5)), jnp.int32)
    _, cache = model(ids, jnp.ones_like(ids), cache=model.init_cache(b, 2048))
    beams, tok = jnp.asarray([[1, 1], [0, 1]]), jnp.asarray([[5], [6], [7], [8]], jnp.int32)  # 2 rows x 2 beams
    rows = jnp.asarray([1, 1, 2, 3])                                                          # the same, flat
    per_row = jax.jit(lambda st, c, t, r: nnx.merge(graphdef, st)(t, jnp.ones_like(t), cache=c, cache_beams=beams),
                      donate_argnums=1)
    def reordered(c, r):
        return c._replace(k=jax.tree.map(lambda x: jnp.take(x, r, axis=x.ndim - 4), c.k),
                          v=jax.tree.map(lambda x: jnp.take(x, r, axis=x.ndim - 4), c.v),
                          valid=c.valid[r], next_pos=c.next_pos[r])
    whole = jax.jit(lambda st, c, t, r: nnx.merge(graphdef, st)(t, jnp.ones_like(t), cache=reordered(c, r)),
                    donate_argnums=1)
    copy = lambda c: jax.tree.map(jnp.copy, c)  # noqa: E731  (each call donates its own cache)
    (got, got_cache), (want, want_cache) = per_row(state, copy(cache), tok, rows), whole(state, copy(cache), tok, rows)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for a, w in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
    layer_kv = sum(x.nbytes for x in jax.tree.leaves((cache.k, cache.v))) // cfg.num_layers
    temp = {name: f.lower(state, cache, tok, rows).compile().memory_analysis().temp_size_in_bytes
            for name, f in (("per_row", per_row), ("whole", whole))}
    assert temp["per_row"] < 2 * layer_kv, (temp, layer_kv)
    if scan:
        assert temp["whole"] > 6 * layer_kv, (temp, layer_kv)


def test_remat_gives_same_loss_and_grads(hf_model):
    from flax import nnx
    path, _ = hf_model
    ids, mask = padded_batch()

    def loss_and_grads(model):
        def loss(m):
            return jnp.mean(m(jnp.asarray(ids), jnp.asarray(mask)) ** 2)
        return nnx.value_and_grad(loss)(model)

    l0, g0 = loss_and_grads(hf_llama.load(path, scan_layers=True))
    l1, g1 = loss_and_grads(hf_llama.load(path, scan_layers=True, remat="full"))
    assert abs(float(l0) - float(l1)) < 1e-6
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_stays_close(hf_model):
    path, _ = hf_model
    ids, mask = padded_batch()
    f32 = np.asarray(hf_llama.load(path)(jnp.asarray(ids), jnp.asarray(mask)))
    bf16_model = hf_llama.load(path, dtype="bfloat16")
    assert bf16_model.model.layers[0].mlp.up_proj.kernel.dtype == jnp.float32  # master weights stay f32
    bf16 = np.asarray(bf16_model(jnp.asarray(ids), jnp.asarray(mask)))
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - f32)[mask.astype(bool)].max() < 0.1


def test_inputs_embeds_equal_token_path(hf_model):
    path, _ = hf_model
    model = hf_llama.load(path)
    ids, mask = padded_batch()
    a = model(jnp.asarray(ids), jnp.asarray(mask))
    b = model(inputs_embeds=model.embed(jnp.asarray(ids)), attention_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_parameters_carry_logical_axes(hf_model):
    from flax import nnx
    path, _ = hf_model
    model = hf_llama.load(path, scan_layers=True)
    meta = {"/".join(map(str, p)): v.get_metadata()["out_sharding"]
            for p, v in nnx.state(model, nnx.Param).flat_state()}
    assert meta["model/embed_tokens/weight"] == ("vocab", "embed")
    assert meta["model/layers/self_attn/q_proj/kernel"] == ("layers", "embed", "heads")
    assert meta["model/layers/mlp/down_proj/kernel"] == ("layers", "mlp", "embed")
    assert meta["lm_head/kernel"] == ("embed", "vocab")


def test_bad_token_ids_and_lengths_raise(hf_model):
    path, _ = hf_model
    model = hf_llama.load(path)
    with pytest.raises(ValueError, match=r"token id 211 at position \(0, 1\)"):
        model(jnp.asarray([[5, VOCAB, 3]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(jnp.asarray([[-1]]))
    with pytest.raises(ValueError, match="sequence length 300 exceeds max_position_embeddings 256"):
        model(jnp.zeros((1, 300), jnp.int32))


def test_checkpoint_shape_mismatch_names_key_and_shapes(hf_model, tmp_path):
    path, _ = hf_model
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 144\) "
                                         r"but the model expects \(64, 152\)"):
        hf_llama.load(tmp_path)


def test_missing_and_extra_keys_are_named(hf_model):
    path, _ = hf_model
    from bmgpt_jax.convert.sources import read_state_dict
    sd = read_state_dict(path)
    cfg = hf_llama.config_from_hf(path)
    broken = dict(sd)
    del broken["model.norm.weight"]
    with pytest.raises(KeyError, match="missing tensor 'model.norm.weight'"):
        hf_llama.from_state_dict(broken, cfg)
    extra = dict(sd, **{"model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match="model.extra.weight"):
        hf_llama.from_state_dict(extra, cfg)


def test_7b_config_file_has_the_real_shape():
    cfg = config_lib.load(LlamaConfig, "biomedgpt_lm_7b")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.rms_norm_eps, cfg.rope_theta, cfg.tie_word_embeddings) == \
           (4096, 32, 32, 32, 11008, 32001, 1e-6, 10000.0, False)
    assert 6.7e9 < cfg.num_params() < 6.8e9
    abstract = hf_llama.abstract_model(dataclasses.replace(cfg, num_layers=1))
    assert abstract.model.layers.mlp.gate_proj.kernel.shape == (1, 4096, 11008)


def test_lora_starts_at_base_model_and_merges_on_export(hf_model, tmp_path, torch):
    """LoRA starts as the base model; the export merges the adapters into the kernels so that transformers
    computes our LoRA forward, and each merged q_proj / v_proj weight is the base weight plus
    `lora_a @ lora_b * lora_alpha / lora_rank` (16 / 4), written out here: our forward against our own
    merge alone could not tell a wrong scale (e.g. rsLoRA's alpha / sqrt(rank)) that both share."""
    from flax import nnx
    from transformers import LlamaForCausalLM
    path, hf = hf_model
    base = hf_llama.load(path, scan_layers=True)
    lora = hf_llama.load(path, scan_layers=True, lora_rank=4)  # B = 0: the same function at first
    ids, mask = padded_batch()
    np.testing.assert_allclose(np.asarray(lora(jnp.asarray(ids), jnp.asarray(mask))),
                               np.asarray(base(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-6)
    for seed, proj in enumerate((lora.model.layers.self_attn.q_proj, lora.model.layers.self_attn.v_proj)):
        proj.lora_b[...] = jax.random.normal(jax.random.key(seed + 1), proj.lora_b.shape) * 0.1  # both merged
    assert lora.model.layers.self_attn.k_proj.lora_a is None  # only q_proj and v_proj by default
    ours = np.asarray(lora(jnp.asarray(ids), jnp.asarray(mask)))
    hf_llama.save(lora, tmp_path / "merged")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ref = torch_logits(merged, ids, mask, torch)
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4
    assert (lora.config.lora_alpha, lora.config.lora_rank) == (16.0, 4)
    for name in ("q_proj", "v_proj"):
        proj = getattr(lora.model.layers.self_attn, name)
        a = np.asarray(proj.lora_a[...], np.float64)                                   # [layers, in, rank]
        b = np.asarray(proj.lora_b[...], np.float64)                                   # [layers, rank, out]
        for i in range(lora.config.num_layers):
            base_w = getattr(hf.model.layers[i].self_attn, name).weight.detach().double().numpy()       # [out, in]
            got = getattr(merged.model.layers[i].self_attn, name).weight.detach().double().numpy()
            np.testing.assert_allclose(got, base_w + (a[i] @ b[i] * (16.0 / 4)).T, atol=1e-6, err_msg=f"{name} {i}")
    names = [".".join(map(str, p)) for p, _ in nnx.state(lora, nnx.Param).flat_state()]
    assert "model.layers.self_attn.q_proj.lora_a" in names

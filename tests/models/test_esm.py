"""ESM-2 encoder: parity with transformers' EsmModel on real padded sequences, layouts, configs, sharding."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bmgpt_jax import parallel
from bmgpt_jax.config import load
from bmgpt_jax.convert import hf_esm
from bmgpt_jax.data import proteins
from bmgpt_jax.models.esm import Esm, EsmConfig
from tests.torch_refs.hf_esm import hf_config, random_esm

SIZES = ("8m", "35m", "150m", "650m", "3b")


@pytest.fixture(scope="module")
def tiny():
    return load(EsmConfig, "configs/esm2_tiny.yaml")


@pytest.fixture(scope="module")
def batch(shared_data):
    """The seven shortest Swiss-Prot sequences (35 to 106 residues; one given two <mask>s), right-padded."""
    seqs, names = proteins.read_sequences_tsv(shared_data / "proteins" / "swissprot_function_pairs.tsv")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pick = [seqs[i] for i in order[:7]]
    pick[1] = pick[1][:5] + "<mask>" + pick[1][6:20] + "<mask>" + pick[1][21:]
    return proteins.tokenize(pick)


@pytest.fixture(scope="module")
def hf_pair(torch, tiny):
    """(random HF EsmModel, our Esm with its weights)."""
    hf = random_esm(tiny)
    return hf, hf_esm.from_state_dict({k: v.numpy() for k, v in hf.state_dict().items()}, tiny)


def hf_forward(torch, hf, ids, mask):
    with torch.no_grad():
        out = hf(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("attention", ["auto", "xla", "flash"])
def test_parity_with_hf_on_padded_real_batch(torch, hf_pair, tiny, batch, attention):
    """All positions, padding included (padding queries see the real keys, as in HF), on the CPU's rows
    path (`auto`), the plain path and the blockwise flash path."""
    hf, ours = hf_pair
    ours = hf_esm.from_state_dict(hf_esm.to_state_dict(ours), dataclasses.replace(tiny, attention=attention))
    ids, mask = batch
    assert len(set(mask.sum(1))) == len(mask) and (ids == proteins.MASK_ID).sum() == 2
    ref = hf_forward(torch, hf, ids, mask)
    got = np.asarray(ours(ids, mask))
    assert got.shape == ref.shape == (*ids.shape, 32)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_parity_without_token_dropout(torch, tiny, batch):
    cfg = dataclasses.replace(tiny, token_dropout=False)
    hf = random_esm(cfg, seed=1)
    ours = hf_esm.from_state_dict({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    ids, mask = batch
    np.testing.assert_allclose(np.asarray(ours(ids, mask)), hf_forward(torch, hf, ids, mask), atol=1e-4, rtol=0)


def test_each_sequence_alone_equals_its_batch_row(hf_pair, batch):
    _, ours = hf_pair
    ids, mask = batch
    full = np.asarray(ours(ids, mask))
    forward = nnx.jit(lambda model, i, m: model(i, m))
    for row in (0, 1, len(ids) - 2):  # the shortest, the one with <mask>s, a long one
        n = int(mask[row].sum())
        alone = np.asarray(forward(ours, ids[row:row + 1, :n], mask[row:row + 1, :n]))[0]
        np.testing.assert_allclose(full[row, :n], alone, atol=1e-5, rtol=0, err_msg=f"row {row}")


def test_token_dropout_rescales_and_zeroes_mask(hf_pair):
    _, ours = hf_pair
    ids = np.array([[0, 5, 32, 7, 2, 1]])
    mask = (ids != proteins.PAD_ID).astype(np.int32)
    emb = np.asarray(ours.embeddings(ids, mask))
    table = np.asarray(ours.embeddings.word_embeddings.weight[...])
    scale = (1 - 0.15 * 0.8) / (1 - 1 / 5)  # one <mask> among five real tokens
    np.testing.assert_allclose(emb[0, 1], table[5] * scale, rtol=1e-6)
    assert not emb[0, 2].any() and not emb[0, 5].any()


def test_scan_and_remat_agree_with_layer_loop(hf_pair, tiny, batch):
    _, ours = hf_pair
    ids, mask = batch
    sd = hf_esm.to_state_dict(ours)
    want = np.asarray(ours(ids, mask))
    for kw in ({"scan_layers": True}, {"scan_layers": True, "remat": True}, {"remat": True}):
        other = hf_esm.from_state_dict(sd, dataclasses.replace(tiny, **kw))
        np.testing.assert_allclose(np.asarray(other(ids, mask)), want, atol=1e-5, rtol=0, err_msg=str(kw))


def test_padding_protein_rows_stay_finite(hf_pair, batch):
    _, ours = hf_pair
    ids, mask = batch
    ids = np.concatenate([ids, np.full_like(ids[:1], proteins.PAD_ID)])
    mask = np.concatenate([mask, np.zeros_like(mask[:1])])
    out = np.asarray(ours(ids, mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:-1], np.asarray(ours(*batch)), atol=1e-6, rtol=0)


def test_sharded_scanned_model_matches_unsharded(hf_pair, tiny, batch):
    _, ours = hf_pair
    ids, mask = batch
    model = hf_esm.from_state_dict(hf_esm.to_state_dict(ours), dataclasses.replace(tiny, scan_layers=True))
    graphdef, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.value.ndim and all(a is None or a in dict(parallel.RULES) for a in axes), path
        assert (axes[0] == "layers") == (path[:2] == ("encoder", "layer")), path
    mesh = parallel.make_mesh((2, 2, 2))
    state = jax.device_put(state, parallel.tree_shardings(state, mesh))
    assert state["encoder"]["layer"]["intermediate"]["dense"]["kernel"].value.sharding.spec == P(None, "fsdp", "tensor")

    @jax.jit
    def run(state, ids, mask):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return nnx.merge(graphdef, state)(ids, mask)
    np.testing.assert_allclose(np.asarray(run(state, ids, mask)), np.asarray(ours(ids, mask)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_real_configs_have_hf_architecture(torch, size):
    """Each configs/esm2_*.yaml builds the same parameter shapes as the HF model of that size."""
    cfg = load(EsmConfig, f"configs/esm2_{size}.yaml")
    with torch.device("meta"):
        hf = __import__("transformers").EsmModel(hf_config(cfg), add_pooling_layer=False)
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items() if not hf_esm.IGNORED.search(k)}
    abstract = nnx.eval_shape(lambda: Esm(cfg, rngs=nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == sum(int(np.prod(s)) for s in want.values())
    assert cfg.layer_norm_eps == 1e-5 and cfg.vocab_size == 33 and cfg.token_dropout
    expected = {"8m": (6, 320, 20, 1280), "35m": (12, 480, 20, 1920), "150m": (30, 640, 20, 2560),
                "650m": (33, 1280, 20, 5120), "3b": (36, 2560, 40, 10240)}[size]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == expected


def test_config_rejects_bad_head_split():
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        EsmConfig(hidden_size=30, num_heads=4)


def test_rotary_tables_are_constants_of_the_compiled_forward(hf_pair, batch):
    """The rotary cos/sin tables come from `layers.rotary_table` (NumPy, at trace time), so the compiled
    forward evaluates no cos or sin: traced from positions, XLA:CPU fused them into the q and k rotations
    and evaluated them per head and batch row. The tables equal `rotary_cos_sin`'s within one float32 ulp."""
    from bmgpt_jax.models.layers import rotary_cos_sin, rotary_table
    _, model = hf_pair
    ids, mask = batch
    graphdef, state = nnx.split(model)
    hlo = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m)).lower(state, ids, mask).compile().as_text()
    assert " cosine(" not in hlo and " sine(" not in hlo
    for got, want in zip(rotary_table(300, 16, 10000.0), rotary_cos_sin(np.arange(300)[None], 16, 10000.0)):
        assert got.shape == (1, 300, 16)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2.4e-7)

"""GIN against the plain-torch reference (eval parity on 256 real molecules, train-mode BatchNorm),
padding invariance, pooling, dropout, the atom cap in `encode_smiles`, one compile per bucket, and
replicated parameter shardings."""
import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax.config import load
from bmgpt_jax.convert import graphmvp_gin
from bmgpt_jax.data import molecules as M
from bmgpt_jax.models import gin as G
from tests.data.test_molecules import read_chebi


def random_torch_gin(torch, num_layer, emb_dim, seed=0):
    """A TorchGIN with random weights and random BatchNorm running statistics (eval is then non-trivial)."""
    from tests.torch_refs.gin import TorchGIN
    torch.manual_seed(seed)
    ref = TorchGIN(num_layer, emb_dim)
    with torch.no_grad():
        for bn in ref.batch_norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(3)
    return ref.eval()


def torch_nodes(torch, ref, feats):
    from tests.torch_refs.gin import graph_batch
    x, edge_index, edge_attr, batch = graph_batch(feats)
    return ref(x, edge_index, edge_attr), batch


@pytest.fixture(scope="module")
def real_feats(shared_data):
    """256 real ChEBI-20 molecules within the 256-atom cap."""
    feats = [f for f in M.featurize_many(read_chebi(shared_data)[:300]) if len(f[0]) <= 256]
    return feats[:256]


@pytest.fixture(scope="module")
def tiny(torch):
    ref = random_torch_gin(torch, 2, 16, seed=1)
    return ref, graphmvp_gin.load(ref.state_dict(), config=load(G.GinConfig, "gin_tiny"))


def test_eval_parity_full_size_256_molecules(torch, real_feats):
    ref = random_torch_gin(torch, 5, 300)
    model = graphmvp_gin.load(ref.state_dict())
    assert model.config == load(G.GinConfig, "configs/gin_graphmvp.yaml")
    graph = M.batch_graphs(real_feats)
    ours = np.asarray(nnx.jit(lambda m, g: m(g))(model, graph))
    from tests.torch_refs.gin import mean_pool
    with torch.no_grad():
        want, batch = torch_nodes(torch, ref, real_feats)
        want_pool = mean_pool(want, batch)
    n = want.shape[0]
    assert n > 5000 and np.abs(want.numpy()).max() > 1.0
    np.testing.assert_allclose(ours[:n], want.numpy(), rtol=0, atol=1e-5)
    pooled = np.asarray(G.mean_pool(ours, graph))
    np.testing.assert_allclose(pooled[:256], want_pool.numpy(), rtol=0, atol=1e-5)
    assert not pooled[256:].any()


def test_padding_never_changes_real_outputs(tiny, real_feats):
    _, model = tiny
    feats = real_feats[:20]
    small = M.batch_graphs(feats)
    big = M.batch_graphs(feats, n_node=small.nodes.shape[0] * 2 + 3, n_edge=small.edges.shape[0] + 7, n_graph=40)
    n = sum(len(f[0]) for f in feats)
    a, b = np.asarray(model(small))[:n], np.asarray(model(big))[:n]
    np.testing.assert_array_equal(a, b)
    alone = np.asarray(model(M.batch_graphs(feats[3:4])))[: len(feats[3][0])]
    start = sum(len(f[0]) for f in feats[:3])
    np.testing.assert_allclose(alone, a[start:start + len(feats[3][0])], atol=1e-6)


def test_train_mode_batchnorm_matches_torch(torch, real_feats):
    ref = random_torch_gin(torch, 2, 16, seed=2)
    model = graphmvp_gin.load(ref.state_dict())
    feats = real_feats[:16]
    model.train()
    ref.train()
    graph = M.batch_graphs(feats, n_node=1024)     # lots of padding: must not enter the statistics
    ours = np.asarray(model(graph))
    want, _ = torch_nodes(torch, ref, feats)
    n = want.shape[0]
    np.testing.assert_allclose(ours[:n], want.detach().numpy(), atol=1e-5, rtol=1e-5)
    exported = graphmvp_gin.to_state_dict(model)
    for key, value in ref.state_dict().items():
        if key.startswith("batch_norms"):
            np.testing.assert_allclose(exported[key], value.numpy(), atol=1e-6, err_msg=key)
    assert exported["batch_norms.0.num_batches_tracked"] == 4
    model.eval()
    ref.eval()
    eval_out = np.asarray(model(graph))[:n]
    with torch.no_grad():
        np.testing.assert_allclose(eval_out, torch_nodes(torch, ref, feats)[0].numpy(), atol=1e-5)
    assert np.abs(eval_out - ours[:n]).max() > 1e-3     # train and eval really differ


def test_train_mode_without_real_nodes_keeps_stats(tiny):
    _, model = tiny
    before = graphmvp_gin.to_state_dict(model)
    model.train()
    model(M.batch_graphs([]))
    model.eval()
    after = graphmvp_gin.to_state_dict(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_dropout_only_in_train_mode(real_feats):
    model = G.GIN(G.GinConfig(num_layers=2, emb_dim=16, drop_ratio=0.5), rngs=nnx.Rngs(0, dropout=1))
    graph = M.batch_graphs(real_feats[:4])
    eval_a, eval_b = np.asarray(model(graph)), np.asarray(model(graph))
    np.testing.assert_array_equal(eval_a, eval_b)
    model.train()
    drop_a, drop_b = np.asarray(model(graph)), np.asarray(model(graph))
    n = sum(len(f[0]) for f in real_feats[:4])
    assert (drop_a[:n] == 0).mean() > 0.3 and not np.array_equal(drop_a, drop_b)


def test_encode_smiles_cap_and_one_compile_per_bucket(tiny):
    from bmgpt_jax import encode as E
    _, model = tiny
    smiles = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C"]
    out = E.encode_smiles(model, smiles)
    assert [o.shape for o in out] == [(3, 16), (7, 16), (11, 16), (1, 16)]
    graph = M.batch_graphs(M.featurize_many(smiles))
    np.testing.assert_allclose(np.concatenate(out), np.asarray(model(graph))[:22], atol=1e-6)
    compiled = E._forward._cache_size()
    E.encode_smiles(model, ["CCCCO", "c1ccccc1N", "CC(=O)Oc1ccccc1", "N"])   # same bucket (24, 48, 16)
    assert E._forward._cache_size() == compiled
    with pytest.raises(ValueError, match=r"molecule 1: SMILES 'C1CC'"):
        E.encode_smiles(model, ["CCO", "C1CC"])
    capped = nnx.clone(model)
    capped.config = G.GinConfig(num_layers=2, emb_dim=16, max_atoms=8)
    with pytest.raises(ValueError, match=r"molecule 2: SMILES 'CC\(=O\)Nc1ccc\(O\)cc1': 11 atoms exceed"):
        E.encode_smiles(capped, smiles)
    capped.config = G.GinConfig(num_layers=2, emb_dim=16, max_atoms=8, over_cap="subsample")
    sub = E.encode_smiles(capped, smiles)
    assert [len(o) for o in sub] == [3, 7, 8, 1]
    np.testing.assert_allclose(sub[2], out[2][M.kept_atoms(11, 8, "subsample")], atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="over_cap"):
        load(G.GinConfig, "gin_tiny", ["over_cap=truncate"])
    with pytest.raises(ValueError, match="jk"):
        load(G.GinConfig, "gin_tiny", ["jk=concat"])


def test_parameters_replicated_on_a_mesh(tiny):
    from bmgpt_jax import parallel
    _, model = tiny
    mesh = parallel.make_mesh((1, 1, 1))
    specs = [s.spec for s in jax.tree.leaves(parallel.tree_shardings(nnx.state(model, nnx.Param), mesh))]
    assert len(specs) == 2 + 2 * 6 + 2 * 2 and all(all(e is None for e in s) for s in specs)

"""GraphMVP GIN weight import/export: bit-exact round trip, prefixes, `.pth` files, and errors that
name the key and the shapes."""
import numpy as np
import pytest

from bmgpt_jax.convert import graphmvp_gin
from bmgpt_jax.models.gin import GinConfig


@pytest.fixture(scope="module")
def ref(torch):
    from tests.torch_refs.gin import TorchGIN
    torch.manual_seed(0)
    model = TorchGIN(num_layer=3, emb_dim=24)
    with torch.no_grad():
        for bn in model.batch_norms:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.num_batches_tracked.fill_(12345)
    return model


def test_round_trip_is_bit_exact(torch, ref):
    sd = ref.state_dict()
    model = graphmvp_gin.load(sd)
    assert (model.config.num_layers, model.config.emb_dim) == (3, 24)
    out = graphmvp_gin.to_state_dict(model)
    assert list(out) == list(sd)      # same keys, same order as torch
    for key, value in sd.items():
        assert out[key].dtype == value.numpy().dtype and np.array_equal(out[key], value.numpy()), key
    assert np.array_equal(np.asarray(model.gnns[1].mlp_0.kernel[...]), sd["gnns.1.mlp.0.weight"].numpy().T)


def test_pth_file_under_prefix_and_back_into_torch(torch, ref, tmp_path):
    nested = {f"mol_structure_encoder.{k}": v for k, v in ref.state_dict().items()}
    nested["llm.lm_head.weight"] = torch.zeros(3, 3)          # other parts of a BioMedGPT checkpoint
    torch.save(nested, tmp_path / "biomedgpt.pth")
    model = graphmvp_gin.load(tmp_path / "biomedgpt.pth", prefix="mol_structure_encoder.")
    graphmvp_gin.save(model, tmp_path / "gin.pth")
    from tests.torch_refs.gin import TorchGIN
    back = TorchGIN(num_layer=3, emb_dim=24)
    back.load_state_dict(torch.load(tmp_path / "gin.pth", weights_only=True), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_a_ddp_training_checkpoint_loads(torch, ref, tmp_path):
    """`{"model": {"module.<key>": ...}, "epoch": ...}`, as a DistributedDataParallel training loop saves it."""
    sd = ref.state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 7}, tmp_path / "ddp.pth")
    out = graphmvp_gin.to_state_dict(graphmvp_gin.load(tmp_path / "ddp.pth"))
    assert list(out) == list(sd) and all(np.array_equal(out[k], v.numpy()) for k, v in sd.items())


def test_unrelated_keys_without_prefix_are_errors(torch, ref):
    sd = dict(ref.state_dict(), **{"projector.weight": torch.zeros(2, 2)})
    with pytest.raises(KeyError, match=r"unexpected tensors not used by the GraphMVP GIN: \['projector.weight \(2, 2\)'\]"):
        graphmvp_gin.load(sd)
    with pytest.raises(KeyError, match="no key starts with prefix 'main_model.'"):
        graphmvp_gin.load(ref.state_dict(), prefix="main_model.")


def test_missing_key_is_named(ref):
    sd = dict(ref.state_dict())
    del sd["gnns.2.edge_embedding2.weight"]
    with pytest.raises(KeyError, match=r"missing tensor 'gnns.2.edge_embedding2.weight' \(shape \(3, 24\)"):
        graphmvp_gin.load(sd)
    del sd["x_embedding1.weight"]
    with pytest.raises(KeyError, match="x_embedding1.weight"):
        graphmvp_gin.load(sd)


def test_shape_mismatch_names_key_and_shapes(torch, ref):
    sd = dict(ref.state_dict(), **{"gnns.0.mlp.2.weight": torch.zeros(24, 47)})
    with pytest.raises(ValueError, match=r"tensor 'gnns.0.mlp.2.weight' has shape \(24, 47\) but the model expects \(24, 48\)"):
        graphmvp_gin.load(sd)
    # a 5-layer config against a 3-layer file
    with pytest.raises(KeyError, match=r"missing tensor 'gnns.3.mlp.0.weight'.*22 missing in all"):
        graphmvp_gin.load(ref.state_dict(), config=GinConfig(num_layers=5, emb_dim=24))
    with pytest.raises(ValueError, match=r"tensor 'x_embedding1.weight' has shape \(120, 24\) but the model expects \(120, 300\)"):
        graphmvp_gin.load(ref.state_dict(), config=GinConfig(num_layers=3))

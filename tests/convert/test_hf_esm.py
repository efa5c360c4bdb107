"""HF ESM-2 import/export: directories transformers writes and reads, key variants, round trips, errors."""
import dataclasses
import json
import logging

import numpy as np
import pytest

from bmgpt_jax.config import load as load_config
from bmgpt_jax.convert import hf_esm
from bmgpt_jax.models.esm import EsmConfig
from tests.torch_refs.hf_esm import hf_config, random_esm

IDS = np.array([[0, 20, 15, 7, 4, 32, 5, 9, 2, 1, 1], [0, 8, 12, 22, 13, 2, 1, 1, 1, 1, 1]], np.int32)
MASK = (IDS != 1).astype(np.int32)


@pytest.fixture(scope="module")
def tiny():
    return load_config(EsmConfig, "configs/esm2_tiny.yaml")


@pytest.fixture(scope="module")
def hf(torch, tiny):
    return random_esm(tiny, seed=3)


@pytest.fixture(scope="module")
def hf_sd(hf):
    return {k: v.numpy() for k, v in hf.state_dict().items()}


def hf_out(torch, model):
    with torch.no_grad():
        return model(torch.tensor(IDS).long(), attention_mask=torch.tensor(MASK).long()).last_hidden_state.numpy()


def test_load_hf_save_pretrained_dir(torch, hf, tmp_path):
    hf.save_pretrained(tmp_path)
    ours = hf_esm.load(tmp_path)
    assert ours.config == load_config(EsmConfig, "configs/esm2_tiny.yaml")
    np.testing.assert_allclose(np.asarray(ours(IDS, MASK)), hf_out(torch, hf), atol=1e-4, rtol=0)


def test_save_loads_in_transformers_and_reproduces_ours(torch, tiny, hf_sd, tmp_path):
    import transformers
    ours = hf_esm.from_state_dict(hf_sd, dataclasses.replace(tiny, scan_layers=True))
    hf_esm.save(ours, tmp_path)
    back = transformers.EsmModel.from_pretrained(tmp_path).float().eval()
    np.testing.assert_allclose(hf_out(torch, back), np.asarray(ours(IDS, MASK)), atol=1e-5, rtol=0)
    tok = transformers.EsmTokenizer.from_pretrained(tmp_path)
    assert tok("MKVL")["input_ids"] == [0, 20, 15, 7, 4, 2]


@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_is_bit_exact(tiny, hf_sd, tmp_path, scan):
    cfg = dataclasses.replace(tiny, scan_layers=scan)
    first = hf_esm.from_state_dict(hf_sd, cfg)
    sd = hf_esm.to_state_dict(first)
    assert set(sd) == {k for k in hf_sd if not hf_esm.IGNORED.search(k)}
    for k in sd:
        assert sd[k].dtype == hf_sd[k].dtype and np.array_equal(sd[k], hf_sd[k]), k
    hf_esm.save(first, tmp_path)
    second = hf_esm.load(tmp_path, scan_layers=scan)
    for k, v in hf_esm.to_state_dict(second).items():
        assert np.array_equal(v, sd[k]), k


def test_masked_lm_bin_with_gamma_beta_names(torch, tiny, hf, hf_sd, tmp_path, caplog):
    """An EsmForMaskedLM-style `.bin`: `esm.` prefix, old LayerNorm.gamma/beta names, lm/contact heads."""
    legacy = {"esm." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
              torch.from_numpy(v) for k, v in hf_sd.items()}
    legacy["esm.embeddings.position_ids"] = torch.arange(1026)[None]
    legacy["lm_head.dense.weight"] = torch.zeros(32, 32)
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    with caplog.at_level(logging.INFO, logger="bmgpt_jax.convert"):
        ours = hf_esm.load(tmp_path)
    assert "contact_head.regression.weight" in caplog.text and "inv_freq" in caplog.text
    assert "lm_head.dense.weight" in caplog.text        # outside the prefix: counted and named too
    np.testing.assert_allclose(np.asarray(ours(IDS, MASK)), hf_out(torch, hf), atol=1e-4, rtol=0)


@pytest.mark.parametrize("head", ["EsmModel", "EsmForMaskedLM"])
def test_convert_keeps_what_the_encoder_does_not_use(torch, tiny, tmp_path, head):
    """The pooler, contact head, rotary buffer and an EsmForMaskedLM's `lm_head` are carried over, so
    transformers loads the converted folder as the source: nothing missing or unexpected, equal tensors."""
    import transformers
    cls = getattr(transformers, head)
    torch.manual_seed(0)
    source = cls(hf_config(tiny)).eval()
    source.save_pretrained(tmp_path / "src")
    hf_esm.convert(tmp_path / "src", tmp_path / "dst", check=True)
    back, info = cls.from_pretrained(tmp_path / "dst", output_loading_info=True)
    assert not any(info.values()), info
    want, got = source.state_dict(), back.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_prefix_selects_the_encoder_inside_a_larger_checkpoint(tiny, hf_sd):
    big = {"prot_structure_encoder." + k: v for k, v in hf_sd.items()}
    big["llm.model.embed_tokens.weight"] = np.zeros((4, 4), np.float32)
    ours = hf_esm.from_state_dict(big, tiny, prefix="prot_structure_encoder.")
    out = hf_esm.to_state_dict(ours, prefix="prot_structure_encoder.")
    assert all(np.array_equal(v, big[k]) for k, v in out.items())


def test_errors_name_the_key_and_shapes(tiny, hf_sd):
    missing = {k: v for k, v in hf_sd.items() if k != "encoder.layer.1.output.dense.bias"}
    with pytest.raises(KeyError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        hf_esm.from_state_dict(missing, tiny)
    bad = dict(hf_sd, **{"encoder.layer.0.intermediate.dense.weight": np.zeros((32, 64), np.float32)})
    with pytest.raises(ValueError, match=r"intermediate\.dense\.weight.*\(32, 64\).*\(32, 64\)"):
        hf_esm.from_state_dict(bad, tiny)
    extra = dict(hf_sd, **{"encoder.layer.2.attention.self.query.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(KeyError, match=r"unexpected.*encoder\.layer\.2"):
        hf_esm.from_state_dict(extra, tiny)


def test_non_esm2_configs_are_refused(tmp_path):
    base = hf_esm.config_to_hf(EsmConfig())
    with pytest.raises(ValueError, match="position_embedding_type='absolute'"):
        hf_esm.config_from_hf(dict(base, position_embedding_type="absolute"))
    with pytest.raises(ValueError, match="emb_layer_norm_before"):
        hf_esm.config_from_hf(dict(base, emb_layer_norm_before=True))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        (tmp_path / "config.json").write_text(json.dumps(base))
        hf_esm.load(tmp_path)

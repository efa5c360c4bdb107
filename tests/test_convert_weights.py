"""convert_weights.py: every conversion round-trips bit for bit through our converters."""
import numpy as np
import pytest

import convert_weights
from tests.torch_refs.hf_llama import make_hf_llama


def test_hf_llama_round_trip(tmp_path, torch, capsys):
    make_hf_llama(tmp_path / "src", num_kv_heads=2)
    assert convert_weights.main(["hf_llama", str(tmp_path / "src"), str(tmp_path / "dst"), "--check"]) == 0
    assert "checked bit for bit" in capsys.readouterr().out
    from bmgpt_jax.convert.sources import read_state_dict
    a, b = read_state_dict(tmp_path / "src"), read_state_dict(tmp_path / "dst")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_gin_round_trip_with_prefix(tmp_path, torch):
    from tests.torch_refs.gin import TorchGIN
    sd = {f"mol_structure_encoder.{k}": v for k, v in TorchGIN(2, 16).state_dict().items()}
    torch.save(sd, tmp_path / "gin.pth")
    convert_weights.main(["graphmvp_gin", str(tmp_path / "gin.pth"), str(tmp_path / "out.pth"),
                          "--prefix", "mol_structure_encoder.", "--check"])
    out = torch.load(tmp_path / "out.pth")
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


def test_openbiomed_to_checkpoint_dir_and_back(tmp_path, torch, shared_data):
    import json

    from bmgpt_jax import config as config_lib
    from bmgpt_jax.models.esm import EsmConfig
    from tests.torch_refs.biomedgpt import TorchBioMedGPT
    from tests.torch_refs.hf_esm import hf_config
    esm_cfg = config_lib.load(EsmConfig, "esm2_tiny")
    ref = TorchBioMedGPT(esm_cfg, vocab_size=32001)
    torch.save(ref.state_dict(), tmp_path / "biomedgpt_10b.pth")
    (tmp_path / "lm.json").write_text(json.dumps(ref.llm_config()))
    (tmp_path / "esm.json").write_text(json.dumps(hf_config(esm_cfg).to_dict()))
    tok = str(shared_data / "tokenizer" / "llama2_tokenizer.model")
    convert_weights.main(["openbiomed", str(tmp_path / "biomedgpt_10b.pth"), str(tmp_path / "ckpt"),
                          "--lm-config", str(tmp_path / "lm.json"), "--esm-config", str(tmp_path / "esm.json"),
                          "--tokenizer", tok, "--check"])
    convert_weights.main(["to_openbiomed", str(tmp_path / "ckpt"), str(tmp_path / "back.pth"), "--check"])
    back = torch.load(tmp_path / "back.pth")
    src = ref.state_dict()
    assert all(torch.equal(back[k], src[k]) for k in back)


def test_bad_source_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found: a Hugging Face Llama directory"):
        convert_weights.main(["hf_llama", str(tmp_path), str(tmp_path / "x")])

"""convert_weights.py: every conversion round-trips bit for bit through our converters."""
import numpy as np

import convert_weights
from tests.torch_refs.hf_llama import make_hf_llama


def test_hf_llama_round_trip(tmp_path, torch, capsys):
    make_hf_llama(tmp_path / "src", num_kv_heads=2)
    assert convert_weights.main(["hf_llama", str(tmp_path / "src"), str(tmp_path / "dst"), "--check"]) == 0
    assert "checked bit for bit" in capsys.readouterr().out
    from bmgpt_jax.convert.torch_io import read_state_dict
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


def test_bad_inputs_are_one_line_naming_the_file(tmp_path, torch, capsys):
    from bmgpt_jax.data.text import load_tokenizer
    from tests.torch_refs.gin import TorchGIN

    def error(*argv):
        assert convert_weights.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    out = tmp_path / "out"
    assert "config.json not found: a Hugging Face Llama directory" in error("hf_llama", tmp_path, out)
    torch.save(TorchGIN(2, 16).state_dict(), tmp_path / "gin.pth")
    whole = (tmp_path / "gin.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    assert error("graphmvp_gin", tmp_path / "cut.pth", out).startswith(
        f"convert_weights.py graphmvp_gin: ValueError: {tmp_path / 'cut.pth'} is truncated or corrupt")
    assert f"{tmp_path / 'empty.pth'} is empty (0 bytes)" in error("graphmvp_gin", tmp_path / "empty.pth", out)
    (tmp_path / "lm.json").write_text('{"vocab_size": 32001, "hidden')
    (tmp_path / "esm.json").write_text("{}")
    (tmp_path / "tok.model").write_bytes(load_tokenizer(None).model_proto[:500])
    opts = ["--lm-config", tmp_path / "lm.json", "--esm-config", tmp_path / "esm.json",
            "--tokenizer", tmp_path / "tok.model"]
    assert f"{tmp_path / 'lm.json'} is not valid JSON" in error("openbiomed", tmp_path / "gin.pth", out, *opts)
    (tmp_path / "lm.json").write_text("{}")
    assert f"{tmp_path / 'tok.model'} is not a readable SentencePiece tokenizer" in \
        error("openbiomed", tmp_path / "gin.pth", out, *opts)
    make_hf_llama(tmp_path / "hf", num_kv_heads=2)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    capsys.readouterr()                                   # transformers' progress bar while saving
    assert f"{weights} is truncated: " in error("hf_llama", tmp_path / "hf", out)
    assert f"model folder {tmp_path / 'none'} does not exist" in error("to_openbiomed", tmp_path / "none", out)

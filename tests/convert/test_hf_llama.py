"""Hugging Face Llama checkpoints as older transformers saved them, and config.json settings our model
does not compute as transformers does: refused, in one line naming the file, the key and the value."""
import json

import numpy as np
import pytest

import convert_weights
from bmgpt_jax.convert import hf_llama
from bmgpt_jax.convert.sources import read_state_dict
from bmgpt_jax.models.llama import LlamaConfig
from tests.convert import synthetic

SMALL = LlamaConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
DROP = object()


def hf_dir(path, **changes):
    """A synthetic HF Llama folder of SMALL whose config.json has `changes` (DROP: the key removed)."""
    cfg = {k: v for k, v in {**hf_llama.config_to_hf(SMALL), **changes}.items() if v is not DROP}
    return synthetic.write(hf_llama.layout(SMALL), path,
                           extra_files=lambda t: (t / "config.json").write_text(json.dumps(cfg)))


def refused(tmp_path, capsys, **changes) -> str:
    """The one stderr line of `convert_weights.py hf_llama` on a folder with `changes` (exit status 2,
    nothing written)."""
    src, dst = hf_dir(tmp_path / "src", **changes), tmp_path / "dst"
    capsys.readouterr()
    assert convert_weights.main(["hf_llama", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not dst.exists(), err
    return err[0]


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_an_activation_other_than_silu_is_refused(tmp_path, capsys, act):
    """`hidden_act: gelu` used to convert (and be written back as silu): our MLP is SwiGLU."""
    assert refused(tmp_path, capsys, hidden_act=act) == (
        f"convert_weights.py hf_llama: ValueError: {tmp_path / 'src' / 'config.json'}: hidden_act={act!r} is not "
        "supported (the Llama MLP here is SwiGLU: 'silu' only)")


def test_silu_spellings_and_pretraining_tp_are_accepted():
    """transformers maps `swish` to SiLU too, and does not read `pretraining_tp` (transformers 4 only split
    each projection into that many slices: the same function)."""
    base = hf_llama.config_to_hf(SMALL)
    for changes in ({"hidden_act": "swish"}, {"pretraining_tp": 2}, {"hidden_act": DROP}):
        hf = {k: v for k, v in {**base, **changes}.items() if v is not DROP}
        assert hf_llama.config_from_hf(hf) == hf_llama.config_from_hf(base)


def test_tied_checkpoint_with_a_saved_lm_head_loads_and_converts(torch, tmp_path, capsys):
    """`tie_word_embeddings: true` with `lm_head.weight` stored too (a `.bin` of `model.state_dict()`) used
    to be refused as an unexpected tensor; it is skipped, logged, as transformers skips it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    ref = LlamaForCausalLM(cfg).eval()
    src = tmp_path / "src"
    src.mkdir()
    sd = ref.state_dict()
    assert "lm_head.weight" in sd
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(cfg.to_dict()))
    capsys.readouterr()
    assert convert_weights.main(["hf_llama", str(src), str(tmp_path / "dst"), "--check"]) == 0
    notes = capsys.readouterr().err.splitlines()      # the command line's notes: bare lines on stderr, once
    assert notes == [f"{src / 'pytorch_model.bin'}: ignored 1 tensor(s) the Hugging Face Llama does not use: "
                     "lm_head.weight"], notes
    out = read_state_dict(tmp_path / "dst")
    assert set(out) == set(sd) - {"lm_head.weight"} and all(np.array_equal(out[k], sd[k].numpy()) for k in out)
    ids = np.array([[1, 5, 17, 42, 99]])
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    for d in (src, tmp_path / "dst"):
        np.testing.assert_allclose(np.asarray(hf_llama.load(d)(ids)), want, atol=1e-4)


LINEAR = {"type": "linear", "factor": 2.0}
ROPE_ACCEPTED = [   # config.json's RoPE keys -> transformers 5 resolves them to plain RoPE with some base
    dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rope_scaling=None),
    dict(rope_parameters=DROP, rope_theta=2e4),
    dict(rope_parameters={"rope_type": "default"}, rope_theta=2e4),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 3e4}, rope_theta=2e4),
    dict(rope_parameters=DROP, rope_theta=2e4, rope_scaling={"type": "default"}),
    # the legacy `rope_scaling` wins over `rope_parameters`, its base included: 10000 here, not 5e5
    dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rope_theta=DROP,
         rope_scaling={"type": "default"}),
    dict(rope_parameters=DROP, rope_theta=DROP),
]


@pytest.mark.parametrize("changes", ROPE_ACCEPTED, ids=range(len(ROPE_ACCEPTED)))
def test_rope_base_is_read_as_transformers_reads_it(changes):
    from transformers import LlamaConfig as HFLlamaConfig
    hf = {k: v for k, v in {**hf_llama.config_to_hf(SMALL), **changes}.items() if v is not DROP}
    want = HFLlamaConfig(**json.loads(json.dumps(hf))).rope_parameters   # (transformers edits the dicts)
    assert want["rope_type"] == "default"
    assert hf_llama.config_from_hf(hf).rope_theta == want["rope_theta"]


@pytest.mark.parametrize("changes, key, kind", [
    (dict(rope_scaling=LINEAR), "rope_scaling", "linear"),   # beside rope_parameters' default: used to pass
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_theta": 5e5}), "rope_parameters", "llama3"),
    (dict(rope_parameters=DROP, rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling", "dynamic"),
], ids=["rope_scaling-beside-rope_parameters", "llama3", "legacy-dynamic"])
def test_rope_scaling_is_refused_naming_its_type(tmp_path, capsys, changes, key, kind):
    from transformers import LlamaConfig as HFLlamaConfig
    hf = {k: v for k, v in {**hf_llama.config_to_hf(SMALL), **changes}.items() if v is not DROP}
    assert HFLlamaConfig(**json.loads(json.dumps(hf))).rope_parameters["rope_type"] == kind
    err = refused(tmp_path, capsys, **changes)
    assert err.startswith(f"convert_weights.py hf_llama: ValueError: {tmp_path / 'src' / 'config.json'}: {key}=")
    assert err.endswith(f"has rope_type {kind!r}: only plain RoPE ('default', as in Llama 2) is supported")


@pytest.mark.parametrize("eos", [[2, 7], [2], 2], ids=["list", "one-element-list", "id"])
def test_eos_token_id_is_written_back_as_given(tmp_path, eos):
    """A config.json `eos_token_id` list (Llama-3 style) used to be cut to its first id and written back as
    that number; it is kept whole (generation stops at any of its ids) and written back as given."""
    src = hf_dir(tmp_path / "src", eos_token_id=eos)
    assert hf_llama.config_from_hf(src).eos_token_id == (tuple(eos) if isinstance(eos, list) else eos)
    assert convert_weights.main(["hf_llama", str(src), str(tmp_path / "dst")]) == 0
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["eos_token_id"] == eos

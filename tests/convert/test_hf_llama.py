"""Hugging Face Llama checkpoints as older transformers saved them."""
import json

import numpy as np

import convert_weights
from bmgpt_jax.convert import hf_llama
from bmgpt_jax.convert.sources import read_state_dict


def test_tied_checkpoint_with_a_saved_lm_head_loads_and_converts(torch, tmp_path, caplog):
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
    with caplog.at_level("INFO", logger="bmgpt_jax.convert.tensor_map"):
        assert convert_weights.main(["hf_llama", str(src), str(tmp_path / "dst"), "--check"]) == 0
    assert "ignored 1 tensor(s) the Hugging Face Llama does not use: lm_head.weight" in caplog.text
    out = read_state_dict(tmp_path / "dst")
    assert set(out) == set(sd) - {"lm_head.weight"} and all(np.array_equal(out[k], sd[k].numpy()) for k in out)
    ids = np.array([[1, 5, 17, 42, 99]])
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    for d in (src, tmp_path / "dst"):
        np.testing.assert_allclose(np.asarray(hf_llama.load(d)(ids)), want, atol=1e-4)

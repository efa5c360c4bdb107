"""Tiny random Hugging Face Llama models built offline (the reference for parity tests)."""
from pathlib import Path


def make_hf_llama(out_dir: Path, num_kv_heads: int = 4, vocab_size: int = 211, seed: int = 0,
                  num_layers: int = 2, hidden_size: int = 64, init_range: float = 0.1, max_positions: int = 256,
                  rope_theta: float = 10000.0):
    """Build, save and return (in eval mode) a random `LlamaForCausalLM` in float32 (`rope_theta`: the RoPE
    base, Llama 2's 10000 by default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 16,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_positions, rms_norm_eps=1e-6, initializer_range=init_range,
                      bos_token_id=1, eos_token_id=2, attn_implementation="eager",
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out_dir)
    return model

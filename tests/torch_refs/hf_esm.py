"""Offline Hugging Face ESM-2 references for tests: a random `EsmModel` and an `EsmTokenizer`, built from
transformers' own classes and ESM-2's published vocabulary, independently of `bmgpt_jax`'s converter
and alphabet (only the sizes are read from our `EsmConfig`)."""
from __future__ import annotations

from pathlib import Path

# facebook/esm2_t*_UR50D vocab.txt, in file order (the token ids)
ESM2_VOCAB = ("<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q",
              "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")


def hf_config(cfg):
    """transformers' `EsmConfig` for ESM-2 with `cfg`'s sizes (rotary, pre-LN, token dropout, no dropout),
    written out here rather than through our `hf_esm.config_to_hf`."""
    import transformers
    return transformers.EsmConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=cfg.max_positions,
        layer_norm_eps=cfg.layer_norm_eps, position_embedding_type="rotary", emb_layer_norm_before=False,
        token_dropout=cfg.token_dropout, mask_token_id=cfg.mask_token_id, pad_token_id=cfg.pad_token_id)


def random_esm(cfg, seed: int = 0):
    """A float32 `EsmModel` in eval mode whose every weight (norms included) is random, so a swapped or
    untransposed parameter cannot go unnoticed."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.EsmModel(hf_config(cfg)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def esm_tokenizer(tmp_dir: Path):
    """transformers' `EsmTokenizer` over ESM-2's vocabulary (`ESM2_VOCAB`, written into `tmp_dir`)."""
    import transformers
    vocab = Path(tmp_dir) / "vocab.txt"
    vocab.write_text("\n".join(ESM2_VOCAB) + "\n")
    return transformers.EsmTokenizer(str(vocab))

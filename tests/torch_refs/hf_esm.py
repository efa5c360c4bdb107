"""Offline Hugging Face ESM-2 references for tests: a random `EsmModel` and an `EsmTokenizer`."""
from __future__ import annotations

from pathlib import Path

from bmgpt_jax.convert.hf_esm import config_to_hf
from bmgpt_jax.data.proteins import write_vocab
from bmgpt_jax.models.esm import EsmConfig


def hf_config(cfg: EsmConfig):
    """transformers' `EsmConfig` equal to ours (rotary, no dropout)."""
    import transformers
    kw = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "dtype")}
    return transformers.EsmConfig(**kw)


def random_esm(cfg: EsmConfig, seed: int = 0):
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
    """transformers' `EsmTokenizer` built from the ESM-2 vocabulary written into `tmp_dir`."""
    import transformers
    vocab = Path(tmp_dir) / "vocab.txt"
    write_vocab(vocab)
    return transformers.EsmTokenizer(str(vocab))

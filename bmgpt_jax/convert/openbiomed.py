"""OpenBioMed `biomedgpt_10b.pth` (one flat state dict) <-> our `BioMedGPT`.

Layout: `llm.*` (HF Llama names, vocab 32001), `mol_structure_encoder.*` (GraphMVP GIN),
`prot_structure_encoder.*` (HF ESM names; `pooler.*`, `position_ids`, `inv_freq` ignored),
`proj_mol.{weight,bias}`, `proj_prot.{weight,bias}`. Each part goes through its own converter with
its prefix; a key under no known prefix is an error, as is a missing key or a shape mismatch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from bmgpt_jax.convert import graphmvp_gin, hf_esm, hf_llama
from bmgpt_jax.convert.torch_io import export_params, import_params, read_state_dict, to_numpy, to_torch
from bmgpt_jax.data.text import attach_tokenizer
from bmgpt_jax.models.biomedgpt import BioMedGPT, BioMedGPTConfig
from bmgpt_jax.models.gin import GinConfig

PREFIXES = ("llm.", "mol_structure_encoder.", "prot_structure_encoder.", "proj_mol.", "proj_prot.")


def _json(cfg: Mapping | str | os.PathLike) -> dict:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    p = Path(cfg)
    return json.loads((p / "config.json" if p.is_dir() else p).read_text())


def _check_prefixes(sd: Mapping[str, Any], source: str) -> None:
    stray = sorted(k for k in sd if not k.startswith(PREFIXES))
    if stray:
        raise KeyError(f"{source}: keys outside {list(PREFIXES)}: {stray[:10]}")


def from_state_dict(sd: Mapping[str, Any], lm_config, esm_config, gin_config: GinConfig | None = None,
                    source: str = "checkpoint", **lm_overrides) -> BioMedGPT:
    """Our BioMedGPT from the flat OpenBioMed state dict. `lm_config`/`esm_config`: HF `config.json`
    paths/folders or dicts; `lm_overrides`: LlamaConfig fields such as `scan_layers`, `dtype`."""
    sd = {k: to_numpy(v) for k, v in sd.items()}
    _check_prefixes(sd, source)
    lm_cfg = hf_llama.config_from_hf(_json(lm_config), **lm_overrides)
    esm_cfg = hf_esm.config_from_hf(_json(esm_config))
    llm = hf_llama.from_state_dict({k: v for k, v in sd.items() if k.startswith("llm.")}, lm_cfg,
                                   prefix="llm.", source=source)
    gin = graphmvp_gin.load(sd, prefix="mol_structure_encoder.", config=gin_config)
    esm = hf_esm.from_state_dict(sd, esm_cfg, prefix="prot_structure_encoder.")
    cfg = BioMedGPTConfig(lm=lm_cfg, gin=gin.config, esm=esm_cfg)
    model = nnx.eval_shape(lambda: BioMedGPT(cfg, rngs=nnx.Rngs(0)))
    model.llm, model.mol_structure_encoder, model.prot_structure_encoder = llm, gin, esm
    for name in ("proj_mol", "proj_prot"):
        part = {k: v for k, v in sd.items() if k.startswith(name + ".")}
        import_params(getattr(model, name), part, rename=lambda k, n=name: f"{n}.{k}", source=source)
    return model


def to_state_dict(model: BioMedGPT) -> dict[str, np.ndarray]:
    """The flat OpenBioMed state dict (numpy) of `model`."""
    out = hf_llama.to_state_dict(model.llm, prefix="llm.")
    out.update(graphmvp_gin.to_state_dict(model.mol_structure_encoder, prefix="mol_structure_encoder."))
    out.update(hf_esm.to_state_dict(model.prot_structure_encoder, prefix="prot_structure_encoder."))
    for name in ("proj_mol", "proj_prot"):
        out.update(export_params(getattr(model, name), rename=lambda k, n=name: f"{n}.{k}"))
    return out


def load(pth_path: str | os.PathLike, lm_config, esm_config, tokenizer=None,
         gin_config: GinConfig | None = None, **lm_overrides) -> BioMedGPT:
    """Our BioMedGPT from `biomedgpt_10b.pth`. `tokenizer`: a SentencePiece `.model` path, an HF
    tokenizer folder or a `bmgpt_jax.data.text` tokenizer; attached for `model.chat`."""
    model = from_state_dict(read_state_dict(pth_path), lm_config, esm_config, gin_config,
                            source=str(pth_path), **lm_overrides)
    if tokenizer is not None:
        attach_tokenizer(model, tokenizer)
    return model


def save(model: BioMedGPT, pth_path: str | os.PathLike) -> None:
    """Write the flat state dict with `torch.save`, loadable by OpenBioMed's `BioMedGPTV`."""
    import torch
    sd = {k: to_torch(v) for k, v in to_state_dict(model).items()}
    Path(pth_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, os.fspath(pth_path))

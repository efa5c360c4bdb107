"""Our on-disk model folder: the weights, the three configs and the tokenizer, in one directory.

The folder holds `biomedgpt_10b.pth` (OpenBioMed's flat layout), `llm_config.json` (HF Llama),
`esm_config.json` (HF ESM), the tokenizer (`tokenizer.model`, or a `tokenizer/` folder holding one) and
optionally `gin_config.json`. Training writes one at the end of a run (`save_pretrained`); chat,
evaluate and `convert_weights.py` read it (`from_pretrained`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bmgpt_jax.convert import hf_esm, hf_llama, openbiomed
from bmgpt_jax.data.text import as_tokenizer, tokenizer_of
from bmgpt_jax.models.gin import GinConfig

FILES = {"pth": "biomedgpt_10b.pth", "lm": "llm_config.json", "esm": "esm_config.json", "gin": "gin_config.json",
         "tokenizer": "tokenizer.model"}


def save_pretrained(model, tokenizer, out_dir) -> Path:
    """Write `out_dir` in the model-folder layout (see the module docstring); `tokenizer=None`: the
    attached one. Returns the folder."""
    tok = tokenizer_of(model) if tokenizer is None else as_tokenizer(tokenizer)
    out = Path(out_dir)
    openbiomed.save(model, out / FILES["pth"])
    (out / FILES["lm"]).write_text(json.dumps(hf_llama.config_to_hf(model.config.lm), indent=1))
    (out / FILES["esm"]).write_text(json.dumps(hf_esm.config_to_hf(model.config.esm), indent=1))
    (out / FILES["gin"]).write_text(json.dumps(dataclasses.asdict(model.config.gin), indent=1))
    (out / FILES["tokenizer"]).write_bytes(tok.model_proto)
    return out


def from_pretrained(ckpt_dir, **lm_overrides):
    """BioMedGPT with its tokenizer from a model folder; `lm_overrides`: LlamaConfig fields (`dtype`...)."""
    d = Path(ckpt_dir)
    tok = next((p for p in (d / FILES["tokenizer"], d / "tokenizer") if p.exists()), None)
    missing = [d / FILES[k] for k in ("pth", "lm", "esm") if not (d / FILES[k]).exists()] + \
        ([] if tok else [d / FILES["tokenizer"]])
    if missing:
        raise FileNotFoundError(f"checkpoint folder {d} lacks {[str(m) for m in missing]}")
    gin = GinConfig(**json.loads((d / FILES["gin"]).read_text())) if (d / FILES["gin"]).exists() else None
    return openbiomed.load(d / FILES["pth"], d / FILES["lm"], d / FILES["esm"], tokenizer=tok, gin_config=gin,
                           **lm_overrides)

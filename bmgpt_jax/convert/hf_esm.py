"""Hugging Face ESM-2 <-> `bmgpt_jax.models.esm.Esm`: config, state dict, safetensors / `.bin` directories.

The key table is the module path itself: our `encoder.layer.3.attention.self.query.kernel` is HF's
`encoder.layer.3.attention.self.query.weight` transposed; embeddings and norms keep their names. With
`scan_layers=True` our `encoder.layer.attention.self.query.kernel` is `[layers, in, out]` and maps to
every `encoder.layer.{i}....weight` at once.

Import accepts `EsmModel` (no prefix) and `EsmForMaskedLM` (`esm.` prefix) checkpoints, or any prefix
you name (BioMedGPT's `prot_structure_encoder.`); old `LayerNorm.gamma/beta` names; and skips, with a
log note, what the encoder does not use: `rotary_embeddings.inv_freq` (recomputed), `position_ids`,
`contact_head.*`, `pooler.*` and `lm_head.*`.

    model = load("esm2_t33_650M_UR50D/")          # HF directory -> Esm
    save(model, "out/")                           # -> EsmModel.from_pretrained("out/") works
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmgpt_jax.convert.torch_io import read_state_dict, to_numpy
from bmgpt_jax.data.proteins import write_vocab
from bmgpt_jax.models.esm import ROPE_THETA, Esm, EsmConfig

log = logging.getLogger(__name__)

IGNORED = re.compile(r"(^|\.)(inv_freq|position_ids)$|^(contact_head|pooler|lm_head)\.")
_AUTO_PREFIXES = ("esm.", "")


# ----------------------------------------------------------------------------------------------- config
def config_from_hf(hf: Mapping, **overrides) -> EsmConfig:
    """Our `EsmConfig` from an HF `config.json` mapping (missing keys take HF's defaults); `overrides`
    set our own fields (`dtype`, `param_dtype`, `scan_layers`, `remat`)."""
    unsupported = []
    if hf.get("position_embedding_type", "absolute") != "rotary":
        unsupported.append(f"position_embedding_type={hf.get('position_embedding_type', 'absolute')!r} (need 'rotary')")
    if hf.get("emb_layer_norm_before"):
        unsupported.append("emb_layer_norm_before=true (ESM-1b; ESM-2 has false)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        unsupported.append("is_decoder/add_cross_attention")
    if float(hf.get("rope_theta", ROPE_THETA)) != ROPE_THETA:
        unsupported.append(f"rope_theta={hf['rope_theta']} (ESM-2 uses {ROPE_THETA})")
    if unsupported:
        raise ValueError(f"not an ESM-2 encoder config: {'; '.join(unsupported)}")
    cfg = EsmConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
        intermediate_size=int(hf["intermediate_size"]), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        token_dropout=bool(hf.get("token_dropout", False)), mask_token_id=_int_or(hf.get("mask_token_id"), 32),
        pad_token_id=_int_or(hf.get("pad_token_id"), 1), max_positions=int(hf.get("max_position_embeddings", 1026)))
    return dataclasses.replace(cfg, **overrides)


def _int_or(value, default: int) -> int:
    return default if value is None else int(value)


def config_to_hf(cfg: EsmConfig) -> dict:
    """The `config.json` mapping of an HF `EsmModel` equivalent to `cfg` (dropout off)."""
    return {
        "architectures": ["EsmModel"], "model_type": "esm", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": cfg.max_positions, "layer_norm_eps": cfg.layer_norm_eps,
        "position_embedding_type": "rotary", "rope_theta": ROPE_THETA, "emb_layer_norm_before": False,
        "token_dropout": cfg.token_dropout, "mask_token_id": cfg.mask_token_id,
        "pad_token_id": cfg.pad_token_id, "cls_token_id": 0, "eos_token_id": 2,
        "is_folding_model": False, "initializer_range": 0.02, "dtype": cfg.param_dtype,
    }


# ------------------------------------------------------------------------------------------ state dict
def _hf_name(path: tuple) -> tuple[str, bool]:
    """Our param path -> (HF key with `{i}` in place of the layer index when scanned, transpose?)."""
    parts = [str(p) for p in path]
    transpose = parts[-1] == "kernel"
    if transpose:
        parts[-1] = "weight"
    return ".".join(parts), transpose


def _normalize(key: str) -> str:
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))


def _layer_key(name: str, i: int) -> str:
    return name.replace("encoder.layer.", f"encoder.layer.{i}.", 1)


def _strip_prefix(sd: Mapping[str, np.ndarray], prefix: str | None) -> dict[str, np.ndarray]:
    """Keys under `prefix` with it removed (auto: `esm.` if any key has it, else none); gamma/beta renamed."""
    if prefix is None:
        prefix = next((p for p in _AUTO_PREFIXES if any(k.startswith(p + "embeddings.") for k in sd)), "")
    return {_normalize(k[len(prefix):]): v for k, v in sd.items() if k.startswith(prefix)}


def from_state_dict(sd: Mapping[str, np.ndarray], config: EsmConfig, prefix: str | None = None) -> Esm:
    """An `Esm` with parameters from an HF-named state dict (numpy or torch arrays).

    `prefix`: `None` detects `esm.` or no prefix; a string (e.g. "prot_structure_encoder.") selects the
    keys under it and leaves all others alone. Raises `KeyError` for missing or unexpected keys and
    `ValueError` for shape mismatches, naming the key and both shapes.
    """
    sd = {k: to_numpy(v) for k, v in _strip_prefix(sd, prefix).items()}
    abstract = nnx.eval_shape(lambda: Esm(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    used: set[str] = set()

    def fetch(key: str, shape: tuple, transpose: bool) -> np.ndarray:
        if key not in sd:
            raise KeyError(f"checkpoint has no {key!r} (prefix {prefix!r}); a few keys it has: {sorted(sd)[:5]}")
        arr = sd[key].T if transpose else sd[key]
        if arr.shape != shape:
            raise ValueError(f"{key!r}: checkpoint shape {sd[key].shape} (as ours {arr.shape}) != model shape {shape}")
        used.add(key)
        return arr

    flat = []
    for path, var in nnx.to_flat_state(state):
        name, transpose = _hf_name(path)
        dtype = var.value.dtype
        if config.scan_layers and path[:2] == ("encoder", "layer"):
            shape = var.value.shape[1:]
            arr = np.stack([fetch(_layer_key(name, i), shape, transpose) for i in range(config.num_layers)])
        else:
            arr = fetch(name, var.value.shape, transpose)
        flat.append((path, var.replace(jnp.asarray(arr, dtype=dtype))))
    extra = sorted(set(sd) - used)
    ignored = [k for k in extra if IGNORED.search(k)]
    unexpected = [k for k in extra if not IGNORED.search(k)]
    if unexpected:
        raise KeyError(f"unexpected checkpoint keys for an ESM-2 encoder: {unexpected[:10]}"
                       f"{' ...' if len(unexpected) > 10 else ''}")
    if ignored:
        log.info("hf_esm: ignored %d key(s) the encoder does not use: %s", len(ignored), ", ".join(ignored))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_state_dict(model: Esm, prefix: str = "") -> dict[str, np.ndarray]:
    """HF `EsmModel` state dict (numpy, param dtype) of `model`, keys prefixed with `prefix`;
    stacked (scanned) layers are split into `encoder.layer.{i}.*`."""
    cfg = model.config
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = _hf_name(path)
        arr = np.asarray(jax.device_get(var.value))
        if cfg.scan_layers and path[:2] == ("encoder", "layer"):
            for i in range(cfg.num_layers):
                out[prefix + _layer_key(name, i)] = np.ascontiguousarray(arr[i].T if transpose else arr[i])
        else:
            out[prefix + name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def load(hf_dir: str | Path, **overrides) -> Esm:
    """The ESM-2 encoder stored in an HF directory (`config.json` + weights), as an `Esm` module.

    `overrides` set our config fields: `dtype="bfloat16"`, `scan_layers=True`, `remat=True`, ...
    """
    d = Path(hf_dir)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d}: no config.json")
    cfg = config_from_hf(json.loads((d / "config.json").read_text()), **overrides)
    return from_state_dict(read_state_dict(d), cfg)


def save(model: Esm, out_dir: str | Path) -> Path:
    """Write `config.json`, `model.safetensors` and the ESM `vocab.txt` to `out_dir`, a directory that
    `transformers.EsmModel.from_pretrained` and `EsmTokenizer.from_pretrained` load (the pooler and
    contact head, which we do not have, are initialised randomly by transformers)."""
    from safetensors.numpy import save_file
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    save_file(to_state_dict(model), str(d / "model.safetensors"), metadata={"format": "pt"})
    write_vocab(d / "vocab.txt")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EsmTokenizer",
                                                         "model_max_length": 1024}, indent=2) + "\n")
    return d

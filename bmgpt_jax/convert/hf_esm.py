"""Hugging Face ESM-2 <-> `bmgpt_jax.models.esm.Esm`: config, state dict, safetensors / `.bin` directories.

The key table is the module path itself: our `encoder.layer.3.attention.self.query.kernel` is HF's
`encoder.layer.3.attention.self.query.weight` transposed; embeddings and norms keep their names. With
`scan_layers=True` our `encoder.layer.attention.self.query.kernel` is `[layers, in, out]` and maps to
every `encoder.layer.{i}....weight` at once.

Import accepts `EsmModel` (no prefix) and `EsmForMaskedLM` (`esm.` prefix) checkpoints, or any prefix
you name (BioMedGPT's `prot_structure_encoder.`); old `LayerNorm.gamma/beta` names; and skips, with a
log note, what the encoder does not use: `rotary_embeddings.inv_freq` (recomputed), `position_ids`,
`contact_head.*`, `pooler.*` and `lm_head.*` (and, with a prefix, every key outside it). Reading is
lazy (whole, or per device slice with `load_sharded`); saving streams one tensor at a time.

`convert` (HF folder -> HF folder) keeps those tensors: the ones under the encoder's prefix under the
encoder's canonical names (`esm.contact_head.*` -> `contact_head.*`), the ones outside it (an
`EsmForMaskedLM`'s `lm_head.*`) under their own, so `EsmModel.from_pretrained` (or
`EsmForMaskedLM.from_pretrained`) finds in the output whatever it found in the source.

    model = load("esm2_t33_650M_UR50D/")          # HF directory -> Esm
    save(model, "out/")                           # -> EsmModel.from_pretrained("out/") works
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Mapping

from flax import nnx

from bmgpt_jax.convert import stream, tensor_map
from bmgpt_jax.convert.hf_llama import stored_dtype
from bmgpt_jax.convert.sources import open_source
from bmgpt_jax.convert.tensor_map import ModelSource
from bmgpt_jax.convert.tensor_source import DictSource, Renamed, TensorSource, View
from bmgpt_jax.data.proteins import write_vocab
from bmgpt_jax.models.esm import ROPE_THETA, Esm, EsmConfig

log = logging.getLogger(__name__)

FAMILY = "Hugging Face ESM-2 encoder"
IGNORED = re.compile(r"(^|\.)(inv_freq|position_ids)$|^(contact_head|pooler|lm_head)\.")
_AUTO_PREFIXES = ("esm.", "")
WORDS = "embeddings.word_embeddings.weight"   # (its dtype: the weights' on disk, for a config without one)


# ----------------------------------------------------------------------------------------------- config
def config_from_hf(hf: Mapping, weights: TensorSource | None = None, **overrides) -> EsmConfig:
    """Our `EsmConfig` from an HF `config.json` mapping (missing keys take HF's defaults); `overrides`
    set our own fields (`dtype`, `param_dtype`, `scan_layers`, `remat`). Unless overridden, the
    parameters are held and computed in the dtype the mapping says the weights are stored in
    (`hf_llama.stored_dtype`: `dtype`, else `torch_dtype`, else that of `weights`' word embeddings (a
    `view`ed source, when given), else float32), as transformers 5 loads them."""
    unsupported = []
    if hf.get("model_type", "esm") != "esm":
        unsupported.append(f"model_type={hf['model_type']!r} (need 'esm')")
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
        pad_token_id=_int_or(hf.get("pad_token_id"), 1), max_positions=int(hf.get("max_position_embeddings", 1026)),
        dtype=(stored := stored_dtype(hf, "ESM config", weights, WORDS)), param_dtype=stored)
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
        "is_folding_model": False, "initializer_range": 0.02, "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
    }


# ------------------------------------------------------------------------------------------ state dict
def normalize_key(key: str) -> str:
    """Old `LayerNorm.gamma`/`beta` names -> `weight`/`bias`."""
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))


def view(source: TensorSource, prefix: str | None = None, note: str = "ignored") -> View:
    """The encoder's tensors in `source`: those under `prefix` (None: `esm.` if the checkpoint has it, else
    no prefix) with the prefix removed and `gamma`/`beta` renamed; keys outside the prefix are logged
    with `note` (what becomes of them)."""
    keys = source.keys()
    if prefix is None:
        prefix = next((p for p in _AUTO_PREFIXES if any(k.startswith(p + "embeddings.") for k in keys)), "")
    outside = [k for k in keys if not k.startswith(prefix)]
    if outside and prefix in _AUTO_PREFIXES:
        log.info("hf_esm: %s %d key(s) outside the encoder's prefix %r: %s", note, len(outside), prefix,
                 ", ".join(outside[:20]))
    return View(source, prefix, normalize_key)


def layout(cfg: EsmConfig, prefix: str = "") -> tensor_map.Layout:
    """The HF `EsmModel` tensors of an encoder with `cfg` (keys prefixed with `prefix`)."""
    abstract = nnx.eval_shape(lambda: Esm(cfg, rngs=nnx.Rngs(0)))
    return tensor_map.param_layout(abstract, FAMILY, "layer" if cfg.scan_layers else None, prefix,
                                   ignored=lambda k: bool(IGNORED.search(k)))


def load_source(source: TensorSource, config: EsmConfig, mesh=None, skip: nnx.filterlib.Filter = nnx.Nothing) -> Esm:
    """An `Esm` from HF-named tensors (already selected by `view`); with `mesh`, sharded global arrays.
    `skip`: variables left abstract, not read (`tensor_map.load`)."""
    return tensor_map.load(lambda: Esm(config, rngs=nnx.Rngs(0)), source, layout(config), mesh, skip=skip)


def from_state_dict(sd: Mapping, config: EsmConfig, prefix: str | None = None) -> Esm:
    """An `Esm` with parameters from an HF-named state dict (numpy or torch arrays).

    `prefix`: `None` detects `esm.` or no prefix; a string (e.g. "prot_structure_encoder.") selects the
    keys under it and leaves all others alone. Raises `KeyError` for missing or unexpected keys and
    `ValueError` for shape mismatches, naming the key and both shapes.
    """
    return load_source(view(DictSource(sd), prefix), config)


def to_state_dict(model: Esm, prefix: str = "") -> dict:
    """HF `EsmModel` state dict (numpy, param dtype) of `model`, keys prefixed with `prefix`;
    stacked (scanned) layers are split into `encoder.layer.{i}.*`."""
    return tensor_map.state_dict(model, layout(model.config, prefix))


def config_from_dir(d: str | Path, weights: TensorSource | None = None, **overrides) -> EsmConfig:
    """Our config from an HF folder's `config.json` (`weights`: its `view`ed weights, for a config without a
    dtype); `overrides`: EsmConfig fields (dtype, scan_layers, ...)."""
    d = Path(d)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d}: no config.json")
    return config_from_hf(json.loads((d / "config.json").read_text()), weights, **overrides)


def load(hf_dir: str | Path, **overrides) -> Esm:
    """The ESM-2 encoder stored in an HF directory (`config.json` + weights), as an `Esm` module, held
    and computed in the config's dtype (`config_from_hf`).

    `overrides` set our config fields: `dtype="bfloat16"` (compute), `param_dtype` (held), `scan_layers=True`,
    `remat=True`, ...
    """
    with open_source(hf_dir) as src:
        weights = view(src)
        return load_source(weights, config_from_dir(hf_dir, weights, **overrides))


def load_sharded(path: str | os.PathLike, cfg: EsmConfig, mesh, skip: nnx.filterlib.Filter = nnx.Nothing) -> Esm:
    """The encoder with `cfg` from an HF checkpoint (folder or file), its parameters global `jax.Array`s
    laid out by `parallel.tree_shardings` on `mesh`: each process reads only its devices' slices (none
    of the variables `skip` selects: they stay abstract)."""
    with open_source(path) as src:
        return load_source(view(src), cfg, mesh, skip)


def _write_config_and_vocab(d: Path, cfg: EsmConfig) -> None:
    (d / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    write_vocab(d / "vocab.txt")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EsmTokenizer",
                                                         "model_max_length": 1024}, indent=2) + "\n")


def save(model: Esm, out_dir: str | Path, max_shard_bytes: int = stream.SHARD_BYTES) -> Path:
    """Write `config.json`, safetensors and the ESM `vocab.txt` to `out_dir` (atomically, one tensor at a
    time), a directory that `transformers.EsmModel.from_pretrained` and `EsmTokenizer.from_pretrained`
    load (the pooler and contact head, which we do not have, are initialised randomly by transformers)."""
    lay = layout(model.config)
    return stream.write(out_dir, "safetensors", stream.export_specs(lay), stream.exported(ModelSource(model), lay),
                        lambda tmp: _write_config_and_vocab(tmp, model.config), max_shard_bytes)


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype=None, check: bool = False,
            max_shard_bytes: int = stream.SHARD_BYTES) -> int:
    """HF ESM-2 folder -> HF `EsmModel` folder (safetensors, canonical names: no `esm.` prefix, no
    gamma/beta), streaming, keys and shapes checked against the config; dtype kept unless `dtype`. The
    source's tensors the encoder does not use are carried over (module docstring). `check`: re-read and
    compare bit for bit. Returns the number of tensors written."""
    cfg = config_from_dir(src)
    lay = layout(cfg)
    with open_source(src) as raw:
        source = view(raw, note="carried over")
        outside = Renamed(raw, {k: k for k in raw.keys() if not k.startswith(source.prefix)})
        first = lay.entries[0].key
        out_cfg = dataclasses.replace(cfg, param_dtype=str(stream.out_dtype(source.dtype(first), dtype))
                                      if first in source else cfg.param_dtype)
        return stream.convert(source, lay, dst, "safetensors", dtype=dtype, check=check,
                              extra_files=lambda tmp: _write_config_and_vocab(tmp, out_cfg),
                              max_shard_bytes=max_shard_bytes, keep=src, carry=True, extras=outside)

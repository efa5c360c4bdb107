"""Hugging Face Llama directory (config.json + safetensors/bin) <-> our `LlamaForCausalLM`.

Parameter names already match HF's, so the conversion is `tensor_map`'s name table: Linear weights
transpose to `kernel`, and scanned layers stack under `model.layers`. No q/k permutation is needed
because our rotary uses HF's rotate_half layout. Loading reads lazily (`sources.open_source`): whole
(`load`) or, given a mesh, each process only its devices' slices (`load_sharded`; for a training init,
`grow_vocab=True` adds the token rows the training tokenizer has beyond the checkpoint's, e.g. `[PAD]`,
each the mean of the stored rows: docs/convert.md); saving streams one tensor at a time into sharded
safetensors with an index, in a temporary folder renamed at the end. Conversions are exact: they never grow.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from bmgpt_jax.convert import outputs, stream, tensor_map
from bmgpt_jax.convert.sources import open_source
from bmgpt_jax.convert.tensor_map import ModelSource
from bmgpt_jax.convert.tensor_source import DictSource, GrownRows, TensorSource, View
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)
FAMILY = "Hugging Face Llama"
IGNORED = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = outputs.HF_LLAMA_TOKENIZER_FILES   # what an HF Llama folder carries besides weights
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")   # the tensors with one row per token
STORED_DTYPES = ("float32", "bfloat16", "float16")   # a config.json's `dtype` / `torch_dtype` we load in


def stored_dtype(hf: Mapping[str, Any], where: str, weights: TensorSource | None = None,
                 key: str = VOCAB_KEYS[0]) -> str:
    """The dtype an HF `config.json` mapping says its weights are stored in: `dtype` (transformers 5's
    name), else `torch_dtype` (the older one), else the dtype of the tensor `key` in `weights` (when given,
    and when it is one of `STORED_DTYPES`), else float32. transformers 5 then takes the first floating
    tensor of the first weight file (`lm_head.weight` of a sorted safetensors file): the same dtype unless
    the checkpoint mixes dtypes. This is what transformers 5's `from_pretrained` loads in by default (`dtype="auto"`:
    the model held and computed in it). A config name other than float32, bfloat16 or float16 (`torch.`
    prefix allowed) is a ValueError naming `where` and the key. Only the weights' header is read."""
    for name in ("dtype", "torch_dtype"):
        value = hf.get(name)
        if value is None:
            continue
        dtype = value.removeprefix("torch.") if isinstance(value, str) else value
        if dtype not in STORED_DTYPES:
            raise ValueError(f"{where}: {name}={value!r} is not a dtype the model loads in "
                             f"({', '.join(STORED_DTYPES)})")
        return dtype
    if weights is not None and key in weights and np.dtype(weights.dtype(key)).name in STORED_DTYPES:
        return np.dtype(weights.dtype(key)).name
    return "float32"


def config_from_hf(hf: Mapping[str, Any] | str | os.PathLike, weights: TensorSource | None = None,
                   **overrides) -> LlamaConfig:
    """LlamaConfig from an HF `config.json` (path, folder or dict); `overrides` set our-only fields
    such as `dtype`, `param_dtype`, `scan_layers`, `remat`. Unless overridden, the parameters are held
    and computed in the dtype the file says the weights are stored in (`stored_dtype`; for a file that
    says none, the dtype of the token embedding in `weights`, when given), as transformers 5's
    `from_pretrained` does by default; training inits override both (float32 master weights). A setting
    our model does not compute as transformers would (another activation, RoPE scaling, biases) is a
    ValueError naming the file (or "Llama config" for a dict), the key and its value. `pretraining_tp` is
    accepted: transformers 5 does not read it, and transformers 4 only split each projection into that
    many slices (the same function)."""
    where = "Llama config"
    if not isinstance(hf, Mapping):
        p = Path(hf)
        p = p / "config.json" if p.is_dir() else p
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: a Hugging Face Llama directory holds config.json and "
                                    "*.safetensors (or pytorch_model*.bin)")
        try:
            hf, where = json.loads(p.read_text()), str(p)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:   # e.g. the weights file named instead
            raise ValueError(f"{p} is not a JSON config ({type(e).__name__}): give the Hugging Face Llama folder "
                             "holding config.json, or its config.json") from None
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{where}: {hf.get('model_type')!r} config, not a Llama one (model_type must be 'llama')")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):   # transformers' ACT2FN: both are SiLU
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (the Llama MLP here is SwiGLU: 'silu' only)")
    theta = _rope_theta(hf, where)
    eos = hf.get("eos_token_id", 2)
    cfg = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id", 1), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02),
    )
    cfg["dtype"] = cfg["param_dtype"] = stored_dtype(hf, where, weights)
    if cfg["head_dim"] == cfg["hidden_size"] // cfg["num_heads"]:
        cfg["head_dim"] = None
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{where}: attention_bias={hf.get('attention_bias')!r}, mlp_bias={hf.get('mlp_bias')!r}: "
                         "Llama variants with biases are not supported")
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
    """RoPE's base, resolved as transformers 5 does (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`):
    the settings are `rope_scaling` when it is set (the legacy name wins), else `rope_parameters`; their
    type is `rope_type`, else `type`, else 'default'; the base is theirs, else the top-level `rope_theta`,
    else 10000. Any type but 'default' (linear, dynamic, llama3, yarn, ...) is a ValueError naming it."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else None
    if kind != "default":
        raise ValueError(f"{where}: {key}={rope!r} has rope_type {kind!r}: only plain RoPE ('default', as in "
                         "Llama 2) is supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ValueError(f"{where}: rope_theta={theta!r} is not a number")
    return float(theta)


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The HF `config.json` mapping for `cfg`. A `pad_token_id` outside the vocabulary (the tiny configs'
    32000 with a 1001-token demo tokenizer) is written as null, with a warning: transformers refuses it.
    Several EOS ids (a tuple, from a config.json list) are written as a list, one id as a number."""
    pad = cfg.pad_token_id
    if pad is not None and not 0 <= pad < cfg.vocab_size:
        log.warning("pad_token_id %d is outside the vocabulary of %d: written as null in config.json", pad,
                    cfg.vocab_size)
        pad = None
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id   # a list as given
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head, "intermediate_size": cfg.intermediate_size, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": pad,
        "initializer_range": cfg.initializer_range, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
    }


def abstract_model(cfg: LlamaConfig) -> LlamaForCausalLM:
    """A shape-only model (no memory)."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))


def layout(cfg: LlamaConfig, prefix: str = "") -> tensor_map.Layout:
    """The HF tensors of a model with `cfg` (keys prefixed with `prefix`, e.g. `llm.`). With tied embeddings,
    an `lm_head.weight` in the checkpoint (older transformers save it, a copy of the embedding) is
    skipped and logged like `IGNORED`, as transformers does: the output layer is the embedding."""
    tied_head = prefix + "lm_head.weight" if cfg.tie_word_embeddings else None
    return tensor_map.param_layout(abstract_model(cfg), FAMILY, "layers" if cfg.scan_layers else None, prefix,
                                   ignored=lambda k: k == tied_head or any(s in k for s in IGNORED))


def grown(source: TensorSource, cfg: LlamaConfig) -> GrownRows:
    """`source` with `embed_tokens` and `lm_head` as long as `cfg.vocab_size` when it stores fewer rows
    (the added rows read as zeros until `load_source` fills them); longer ones are left as stored."""
    return GrownRows(source, {k: cfg.vocab_size for k in VOCAB_KEYS})


def check_source(source: TensorSource, cfg: LlamaConfig, grow_vocab: bool = False) -> None:
    """Raise unless `source` holds a model with `cfg` (`grow_vocab`: or one with fewer token rows), reading
    no data (`tensor_map.check`)."""
    tensor_map.check(grown(source, cfg) if grow_vocab else source, layout(cfg))


def load_source(source: TensorSource, cfg: LlamaConfig, mesh=None, grow_vocab: bool = False,
                skip: nnx.filterlib.Filter = nnx.Nothing, lora_seed: int = 0) -> LlamaForCausalLM:
    """Our model from HF-named tensors in `source`; with `mesh`, sharded global arrays read slice by slice.

    `grow_vocab` (training inits only, `training.stages`; conversions stay exact): a checkpoint with fewer
    token rows than `cfg.vocab_size` (the tokens a training tokenizer adds, e.g. BioMedGPT's `[PAD]` on
    Llama-2's 32000) loads with the missing rows of `embed_tokens` and `lm_head` set to the mean of its
    rows, as transformers' `resize_token_embeddings` does by default less its 1e-9-scaled noise
    (`tensor_map.fill_added_rows`); the stored rows are the checkpoint's bit for bit. Every device reads
    and fills only its own slice. `skip`: variables left abstract, not read (`tensor_map.load`); `lora_seed`:
    the draw of fresh LoRA factors (`cfg.lora_rank > 0`)."""
    lay = layout(cfg)
    src = grown(source, cfg) if grow_vocab else source
    model = tensor_map.load(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), src, lay, mesh, lora_seed, skip)
    if not grow_vocab:
        return model
    for key in src.rows:
        tensor_map.fill_added_rows(model, [e for e in lay.entries if e.key == key], src.stored_rows(key))
    return model


def from_state_dict(tensors: Mapping, cfg: LlamaConfig, prefix: str = "",
                    source: str = "checkpoint") -> LlamaForCausalLM:
    """Our model from HF-named tensors in memory (the keys under `prefix`, e.g. `llm.`, with it removed)."""
    return load_source(View(DictSource(tensors, name=source), prefix), cfg)


def to_state_dict(model: LlamaForCausalLM, prefix: str = "") -> dict:
    """HF-named numpy tensors of `model` (each key prefixed with `prefix`), LoRA merged."""
    return tensor_map.state_dict(model, layout(model.config, prefix))


def load(hf_dir: str | os.PathLike, **overrides) -> LlamaForCausalLM:
    """Our causal LM from a Hugging Face Llama directory, held and computed in its config.json's dtype
    (`config_from_hf`). `overrides`: LlamaConfig fields such as `scan_layers=True`, `dtype="bfloat16"`
    (compute) and `param_dtype="bfloat16"` (held; each slice is cast as it is read)."""
    with open_source(hf_dir) as src:
        return load_source(src, config_from_hf(hf_dir, src, **overrides))


def load_sharded(path: str | os.PathLike, cfg: LlamaConfig, mesh, grow_vocab: bool = False,
                 skip: nnx.filterlib.Filter = nnx.Nothing, lora_seed: int = 0) -> LlamaForCausalLM:
    """Our causal LM with `cfg` from an HF checkpoint (folder or file), its parameters global `jax.Array`s
    laid out by `parallel.tree_shardings` on `mesh`: each process reads only its devices' slices.
    `grow_vocab`: a checkpoint with fewer token rows gets the missing ones (`load_source`); `skip`: variables
    left abstract, not read; `lora_seed`: the draw of fresh LoRA factors."""
    with open_source(path) as src:
        return load_source(src, cfg, mesh, grow_vocab, skip, lora_seed)


def write(out_dir: str | os.PathLike, cfg: LlamaConfig, reader: TensorSource, tokenizer=None,
          max_shard_bytes: int = stream.SHARD_BYTES) -> Path:
    """An HF Llama folder (config.json, sharded safetensors; given a tokenizer, `tokenizer.model` and the
    `tokenizer_config.json` that makes `AutoTokenizer` encode as ours) streamed from our variables in
    `reader` (dotted paths: a model in memory or a training checkpoint), atomically."""
    lay = layout(cfg)

    def extra(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
        if tokenizer is not None:
            (tmp / "tokenizer.model").write_bytes(tokenizer.model_proto)
            hf_tok = tokenizer.hf_config(cfg.max_position_embeddings)
            (tmp / "tokenizer_config.json").write_text(json.dumps(hf_tok, indent=2))
    return stream.write(out_dir, "safetensors", stream.export_specs(lay), stream.exported(reader, lay), extra,
                        max_shard_bytes)


def save(model: LlamaForCausalLM, out_dir: str | os.PathLike, max_shard_bytes: int = stream.SHARD_BYTES) -> None:
    """Write `config.json` + safetensors that `transformers.LlamaForCausalLM.from_pretrained` loads."""
    write(out_dir, model.config, ModelSource(model), max_shard_bytes=max_shard_bytes)


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype=None, check: bool = False,
            max_shard_bytes: int = stream.SHARD_BYTES) -> int:
    """HF Llama folder -> HF Llama folder (sharded safetensors), streaming, every key and shape checked
    against the config; dtype kept unless `dtype`; the source folder's tokenizer and generation files
    (`TOKENIZER_FILES`) copied beside. `check`: re-read and compare bit for bit. Returns the number of
    tensors written."""
    cfg = config_from_hf(src)
    lay = layout(cfg)
    with open_source(src) as source:
        written = stream.out_dtype(source.dtype(lay.entries[0].key), dtype) if lay.entries[0].key in source else None
        out_cfg = dataclasses.replace(cfg, param_dtype=str(written or cfg.param_dtype))

        def extra(tmp: Path) -> None:
            (tmp / "config.json").write_text(json.dumps(config_to_hf(out_cfg), indent=2))
            for f in (Path(src) / name for name in TOKENIZER_FILES):
                if f.is_file():                  # those the source folder holds
                    shutil.copyfile(f, tmp / f.name)
        return stream.convert(source, lay, dst, "safetensors", dtype=dtype, check=check, extra_files=extra,
                              max_shard_bytes=max_shard_bytes, keep=src)


def init(cfg: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised model (for demos, tests and training from scratch)."""
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))


def with_config(model: LlamaForCausalLM, **changes) -> LlamaForCausalLM:
    """The same weights under a changed config (e.g. `scan_layers=True`, `dtype='bfloat16'`)."""
    cfg = dataclasses.replace(model.config, **changes)
    return from_state_dict(to_state_dict(model), cfg)


__all__ = ["load", "load_sharded", "check_source", "save", "write", "convert", "config_from_hf", "config_to_hf",
           "stored_dtype", "from_state_dict", "to_state_dict", "layout", "init", "with_config"]

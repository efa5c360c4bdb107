"""Hugging Face Llama directory (config.json + safetensors/bin) <-> our `LlamaForCausalLM`.

Parameter names already match HF's, so the conversion is `torch_io`'s name table: Linear weights
transpose to `kernel`, and scanned layers stack under `model.layers`. No q/k permutation is needed
because our rotary uses HF's rotate_half layout.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from bmgpt_jax.convert.torch_io import export_params, import_params, read_state_dict, write_safetensors
from bmgpt_jax.models.layers import Linear
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM

IGNORED = ("rotary_emb.inv_freq",)


def config_from_hf(hf: Mapping[str, Any] | str | os.PathLike, **overrides) -> LlamaConfig:
    """LlamaConfig from an HF `config.json` (path, folder or dict); `overrides` set our-only fields
    such as `dtype`, `param_dtype`, `scan_layers`, `remat`."""
    if not isinstance(hf, Mapping):
        p = Path(hf)
        p = p / "config.json" if p.is_dir() else p
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: a Hugging Face Llama directory holds config.json and "
                                    "*.safetensors (or pytorch_model*.bin)")
        hf = json.loads(p.read_text())
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"rope scaling {rope!r} is not supported (only plain RoPE, as in Llama 2)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    eos = hf.get("eos_token_id", 2)
    cfg = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id", 1), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02),
    )
    if cfg["head_dim"] == cfg["hidden_size"] // cfg["num_heads"]:
        cfg["head_dim"] = None
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention_bias/mlp_bias Llama variants are not supported")
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The HF `config.json` mapping for `cfg`."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head, "intermediate_size": cfg.intermediate_size, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "initializer_range": cfg.initializer_range, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
    }


def abstract_model(cfg: LlamaConfig) -> LlamaForCausalLM:
    """A shape-only model (no memory): fill it with `from_state_dict`."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))


def from_state_dict(tensors: Mapping, cfg: LlamaConfig, prefix: str = "", source: str = "checkpoint") -> LlamaForCausalLM:
    """Our model from HF-named tensors (`prefix` is prepended to every HF key, e.g. `llm.`)."""
    model = abstract_model(cfg)
    import_params(model, tensors, stack_at="layers" if cfg.scan_layers else None,
                  rename=lambda k: prefix + k, ignore=IGNORED, source=source,
                  skip=lambda path: str(path[-1]).startswith("lora_"))
    init_lora(model)
    return model


def init_lora(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Fresh LoRA adapters (A random, B zero) on every Linear that has them, in place: a checkpoint
    holds the base weights only, so after loading the model computes exactly the base function."""
    key = jax.random.key(seed)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Linear) and module.lora_a is not None:
            key, sub = jax.random.split(key)
            a, b = module.lora_a, module.lora_b
            a.value = (jax.random.normal(sub, a.shape, jnp.float32) * a.shape[-2] ** -0.5).astype(a.dtype)
            b.value = jnp.zeros(b.shape, b.dtype)


def to_state_dict(model: LlamaForCausalLM, prefix: str = "") -> dict:
    """HF-named numpy tensors of `model` (each key prefixed with `prefix`)."""
    return export_params(model, stack_at="layers" if model.config.scan_layers else None,
                         rename=lambda k: prefix + k)


def load(hf_dir: str | os.PathLike, **overrides) -> LlamaForCausalLM:
    """Our causal LM from a Hugging Face Llama directory. `overrides`: LlamaConfig fields such as
    `scan_layers=True`, `dtype="bfloat16"`."""
    cfg = config_from_hf(hf_dir, **overrides)
    return from_state_dict(read_state_dict(hf_dir), cfg, source=str(hf_dir))


def save(model: LlamaForCausalLM, out_dir: str | os.PathLike) -> None:
    """Write `config.json` + safetensors that `transformers.LlamaForCausalLM.from_pretrained` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    write_safetensors(to_state_dict(model), out)


def init(cfg: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised model (for demos, tests and training from scratch)."""
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))


def with_config(model: LlamaForCausalLM, **changes) -> LlamaForCausalLM:
    """The same weights under a changed config (e.g. `scan_layers=True`, `dtype='bfloat16'`)."""
    cfg = dataclasses.replace(model.config, **changes)
    return from_state_dict(to_state_dict(model), cfg)


__all__ = ["load", "save", "config_from_hf", "config_to_hf", "from_state_dict", "to_state_dict", "init",
           "with_config"]

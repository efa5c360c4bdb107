"""The three training stages of BioMedGPT's recipe: which model, which loss, which parameters train.

- `lm`: continued pretraining of the bare decoder on text (every decoder parameter trains).
- `align` (the reference's stage 2): decoder and both encoders frozen, only `proj_mol`/`proj_prot` train.
- `finetune`: a chosen subset (`trainable` regexes over dotted parameter paths): adaptors, decoder,
  encoders, or LoRA adapters on the decoder's attention (`model.lm.lora_rank > 0`).

Frozen parameters are split off before differentiation (`optim.split_trainable`): no gradient, no
optimizer state. Initial weights come from the config's `init` section (an OpenBioMed checkpoint, or HF
Llama / HF ESM / GraphMVP files for the parts), else from a seeded random init.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Literal

from flax import nnx

from bmgpt_jax.models.biomedgpt import BioMedGPT, BioMedGPTConfig, lm_loss
from bmgpt_jax.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

Stage = Literal["lm", "align", "finetune"]

DEFAULT_TRAINABLE: dict[str, tuple[str, ...]] = {
    "lm": (".",),                                      # the bare decoder: everything
    "align": (r"^proj_(mol|prot)\.",),                 # adaptors only
    "finetune": (r"^proj_(mol|prot)\.", r"^llm\."),    # adaptors + decoder (LoRA: adaptors + lora_*)
}
LORA_TRAINABLE = (r"^proj_(mol|prot)\.", r"\.lora_[ab]$")


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where the initial weights come from ("" = random, seeded by `seed`).

    openbiomed: a `biomedgpt_10b.pth` (needs `lm_config` and `esm_config`, HF config.json paths);
    hf_llama / hf_esm: HF directories for the decoder / protein encoder; gin: a GraphMVP `.pth`.
    """
    openbiomed: str = ""
    lm_config: str = ""
    esm_config: str = ""
    hf_llama: str = ""
    hf_esm: str = ""
    gin: str = ""
    seed: int = 0


def trainable_patterns(stage: Stage, model_cfg: BioMedGPTConfig, patterns: tuple[str, ...]) -> tuple[str, ...]:
    """The trainable-parameter regexes: the config's, else the stage's default."""
    if patterns:
        return patterns
    if stage == "finetune" and model_cfg.lm.lora_rank > 0:
        return LORA_TRAINABLE
    return DEFAULT_TRAINABLE[stage]


def _lm_overrides(cfg: BioMedGPTConfig) -> dict:
    """Our-only decoder fields a pretrained HF Llama is loaded with."""
    lm = cfg.lm
    return dict(dtype=lm.dtype, param_dtype=lm.param_dtype, scan_layers=lm.scan_layers, remat=lm.remat,
                lora_rank=lm.lora_rank, lora_alpha=lm.lora_alpha, lora_targets=lm.lora_targets)


def _check_same(name: str, ours, loaded) -> None:
    mismatched = {f.name: (getattr(ours, f.name), getattr(loaded, f.name)) for f in dataclasses.fields(ours)
                  if f.name not in ("dtype", "param_dtype", "scan_layers", "remat") and not f.name.startswith("lora")
                  and getattr(ours, f.name) != getattr(loaded, f.name)}
    if mismatched:
        raise ValueError(f"init.{name}: the checkpoint's shape differs from the config: "
                         + ", ".join(f"{k}: config {a} vs checkpoint {b}" for k, (a, b) in mismatched.items()))


def build_model(stage: Stage, model_cfg: BioMedGPTConfig, init: InitConfig) -> tuple[nnx.Module, Callable]:
    """(model, loss_fn) for `stage`; `loss_fn(model, batch) -> (loss_sum, n_tokens)`."""
    from bmgpt_jax.convert import graphmvp_gin, hf_esm, hf_llama, openbiomed
    rngs = nnx.Rngs(init.seed)
    if stage == "lm":
        if init.hf_llama:
            model = hf_llama.load(init.hf_llama, **_lm_overrides(model_cfg))
            _check_same("hf_llama", model_cfg.lm, model.config)
        else:
            model = LlamaForCausalLM(model_cfg.lm, rngs=rngs)
        return model, lm_loss
    if init.openbiomed:
        if not (init.lm_config and init.esm_config):
            raise ValueError("init.openbiomed needs init.lm_config and init.esm_config (HF config.json paths)")
        model = openbiomed.load(init.openbiomed, init.lm_config, init.esm_config, gin_config=model_cfg.gin,
                                **_lm_overrides(model_cfg))
        for name in ("lm", "esm"):
            _check_same(f"openbiomed ({name})", getattr(model_cfg, name), getattr(model.config, name))
        return model, BioMedGPT.loss
    model = BioMedGPT(model_cfg, rngs=rngs)
    if init.hf_llama:
        model.llm = hf_llama.load(init.hf_llama, **_lm_overrides(model_cfg))
        _check_same("hf_llama", model_cfg.lm, model.llm.config)
    if init.hf_esm:
        esm = model_cfg.esm
        model.prot_structure_encoder = hf_esm.load(init.hf_esm, dtype=esm.dtype, param_dtype=esm.param_dtype,
                                                   scan_layers=esm.scan_layers, remat=esm.remat)
        _check_same("hf_esm", esm, model.prot_structure_encoder.config)
    if init.gin:
        model.mol_structure_encoder = graphmvp_gin.load(init.gin, config=model_cfg.gin)
    return model, BioMedGPT.loss

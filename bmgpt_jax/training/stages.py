"""The three training stages of BioMedGPT's recipe: which model, which loss, which parameters train.

- `lm`: continued pretraining of the bare decoder on text (every decoder parameter trains).
- `align` (the reference's stage 2): decoder and both encoders frozen, only `proj_mol`/`proj_prot` train.
- `finetune`: a chosen subset (`trainable` regexes over dotted parameter paths): adaptors, decoder,
  encoders, or LoRA adapters on the decoder's attention (`model.lm.lora_rank > 0`).

Frozen parameters are split off before differentiation (`optim.split_trainable`): no gradient, no
optimizer state. Initial weights come from the config's `init` section (an OpenBioMed checkpoint, or HF
Llama / HF ESM / GraphMVP files for the parts, each read by one `load_*` function), else from a seeded
random init created sharded inside jit (`parallel.init_sharded`): the model is never whole on one device.
The model built is the config's: a source must have its shapes (`_check_same`), except a decoder with fewer
token rows (grown by the mean row: Llama-2-7b-hf's 32000 under BioMedGPT's 32001) and the `CONFIG_WINS`
numbers (the config's, warned); `check_sources` checks all that before any data is built.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Literal

from flax import nnx
from jax.sharding import Mesh

from bmgpt_jax import parallel
from bmgpt_jax.config import ConfigError
from bmgpt_jax.models.biomedgpt import BioMedGPT, BioMedGPTConfig, lm_loss
from bmgpt_jax.models.esm import Esm
from bmgpt_jax.models.gin import GIN
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


def check_lora_trainable(model: nnx.Module, lm_cfg, patterns: tuple[str, ...], stage: Stage) -> None:
    """With `lora_rank > 0`, ConfigError when the trainable `patterns` (resolved) select no `lora_a`/`lora_b`
    (the adapters would stay zero: compute for nothing) or also select a kernel LoRA adapts (a full fine-tune
    with adapters on top, which `tiny_finetune.yaml`'s `trainable: ["."]` silently made of a LoRA run).
    `model` may be abstract (`nnx.eval_shape`)."""
    if lm_cfg.lora_rank <= 0:
        return
    from bmgpt_jax.training.optim import path_str, trainable_filter
    names = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(patterns)))]
    adapted = tuple(f".{t}.kernel" for t in lm_cfg.lora_targets)
    kernels = [n for n in names if n.endswith(adapted)]
    default = patterns == DEFAULT_TRAINABLE[stage]
    given = f"trainable={list(patterns)}" + (f" (stage {stage}'s default)" if default else "")
    if not any(n.endswith((".lora_a", ".lora_b")) for n in names):
        raise ConfigError(f"model.lm.lora_rank={lm_cfg.lora_rank} but {given} trains no lora_a/lora_b: the adapters "
                          "would stay zero. Set trainable=[] for the finetune stage's LoRA default "
                          f"{list(LORA_TRAINABLE)}, or model.lm.lora_rank=0")
    if kernels:
        raise ConfigError(f"model.lm.lora_rank={lm_cfg.lora_rank} but {given} also trains the kernels LoRA adapts "
                          f"({kernels[0]}, ...): a full fine-tune with adapters on top. Set trainable=[] for the "
                          f"finetune stage's LoRA default {list(LORA_TRAINABLE)}, or model.lm.lora_rank=0")


def _lm_overrides(cfg: BioMedGPTConfig) -> dict:
    """Our-only decoder fields a pretrained HF Llama is loaded with (the token ids are the training
    config's: its tokenizer decides them, e.g. `[PAD]` 32000 that a Llama-2 config.json leaves null)."""
    lm = cfg.lm
    return dict(bos_token_id=lm.bos_token_id, eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id,
                dtype=lm.dtype, param_dtype=lm.param_dtype, scan_layers=lm.scan_layers, remat=lm.remat,
                lora_rank=lm.lora_rank, lora_alpha=lm.lora_alpha, lora_targets=lm.lora_targets,
                attention=lm.attention, loss_chunk_size=lm.loss_chunk_size)


# What may differ between the config and an init checkpoint's config.json (docs/training.md "Initial weights"):
# how we run the model, not what it is (+ lora_*; initializer_range only draws random weights, none here)
OURS_ONLY = ("dtype", "param_dtype", "scan_layers", "remat", "initializer_range")
# numbers that change no parameter's shape: the training config's value is used, with a warning naming both
# (Llama-2-7b-hf's config.json says rms_norm_eps 1e-5, BioMedGPT-LM-7B's, the model stage 1 trains, 1e-6)
CONFIG_WINS = ("rms_norm_eps", "layer_norm_eps", "max_position_embeddings", "max_positions")
# everything else (widths, depth, heads, head_dim, vocabulary, RoPE, tying, token ids) must be the same


def _check_same(name: str, ours, loaded, grow_vocab: bool = False,
                theirs: Callable[[str], str] = lambda field: "checkpoint") -> tuple[list[str], int]:
    """(the `CONFIG_WINS` differences as "field: config a vs checkpoint b", the token rows to add).

    ValueError naming every other difference. `grow_vocab`: a checkpoint vocabulary smaller than the
    config's is not a difference but rows to add (the training tokenizer's added tokens: `[PAD]`).
    `theirs(field)`: where `loaded`'s value of `field` comes from, for the messages ("checkpoint": an HF
    folder's config.json; `init.openbiomed`'s: its `init.*_config` file, the vocabulary the `.pth`'s rows)."""
    differ = {f.name: (getattr(ours, f.name), getattr(loaded, f.name)) for f in dataclasses.fields(ours)
              if f.name not in OURS_ONLY and not f.name.startswith("lora")
              and getattr(ours, f.name) != getattr(loaded, f.name)}
    added = 0
    if grow_vocab and "vocab_size" in differ and ours.vocab_size > loaded.vocab_size:
        added = ours.vocab_size - loaded.vocab_size
        del differ["vocab_size"]
    hard = {k: v for k, v in differ.items() if k not in CONFIG_WINS}
    if hard:
        why = ""
        if "vocab_size" in hard and grow_vocab:
            why = " (a checkpoint's vocabulary may be smaller than the config's, the rows added, never larger)"
        raise ValueError(f"init.{name}: the checkpoint's shape differs from the config: "
                         + ", ".join(f"{k}: config {a} vs {theirs(k)} {b}" for k, (a, b) in hard.items()) + why)
    return [f"{k}: config {a} vs {theirs(k)} {b}" for k, (a, b) in differ.items()], added


def _warn_config_wins(name: str, path: str, soft: list[str]) -> None:
    if soft:
        log.warning("init.%s %s: %s; the config's value%s used (no parameter shape depends on it)", name, path,
                    ", ".join(soft), " is" if len(soft) == 1 else "s are")


def _hf_llama_config(path: str, cfg: BioMedGPTConfig):
    from bmgpt_jax.convert import hf_llama
    return hf_llama.config_from_hf(path, **_lm_overrides(cfg))


def _hf_esm_config(path: str, cfg: BioMedGPTConfig):
    from bmgpt_jax.convert import hf_esm
    esm = cfg.esm
    return hf_esm.config_from_dir(path, dtype=esm.dtype, param_dtype=esm.param_dtype, scan_layers=esm.scan_layers,
                                  remat=esm.remat, attention=esm.attention)


def _open_openbiomed(init: InitConfig):
    """`init.openbiomed` opened lazily (headers only until a tensor is read), once its configs are given."""
    from bmgpt_jax.convert.sources import open_source
    if not (init.lm_config and init.esm_config):
        raise ValueError("init.openbiomed needs init.lm_config and init.esm_config (HF config.json paths)")
    return open_source(init.openbiomed)


def _openbiomed_configs(init: InitConfig, cfg: BioMedGPTConfig, source, quiet: bool = False):
    """{"lm", "esm"}: the configs `init.lm_config` / `init.esm_config` describe, the LM's vocabulary the
    token rows of `source` (`init.openbiomed`, open: `openbiomed.token_rows`, logged unless `quiet`)."""
    from bmgpt_jax.convert import openbiomed
    lm_cfg, esm_cfg = openbiomed.configs(init.lm_config, init.esm_config, source, quiet, **_lm_overrides(cfg))
    esm_cfg = dataclasses.replace(esm_cfg, dtype=cfg.esm.dtype, param_dtype=cfg.esm.param_dtype,
                                  scan_layers=cfg.esm.scan_layers, remat=cfg.esm.remat, attention=cfg.esm.attention)
    return {"lm": lm_cfg, "esm": esm_cfg}


def _check_openbiomed(init: InitConfig, cfg: BioMedGPTConfig, source, quiet: bool = False) -> list:
    """`_check_same` for both parts of `init.openbiomed` (`source`, open): [(part, its `CONFIG_WINS`
    differences)]."""
    def theirs(part):
        return lambda field: "checkpoint" if (part, field) == ("lm", "vocab_size") else f"init.{part}_config"
    return [(part, _check_same(f"openbiomed ({part})", getattr(cfg, part), loaded, theirs=theirs(part))[0])
            for part, loaded in _openbiomed_configs(init, cfg, source, quiet).items()]


def check_sources(stage: Stage, cfg: BioMedGPTConfig, init: InitConfig) -> None:
    """What `build_model` would refuse in the init sources, found in seconds, before any data is built
    (`checks.check_inputs`): each config.json the stage reads exists and describes the config's model (the
    differences `_check_same` refuses, a decoder vocabulary larger than the config's), and the HF folders'
    tensors have the shapes that model needs (their headers only: `tensor_map.check`). `cfg.lm.vocab_size`
    must be resolved (not 0). Reports nothing: the loaders log the rows added and the values overridden."""
    from bmgpt_jax.convert import hf_esm, hf_llama, tensor_map
    from bmgpt_jax.convert.sources import open_source
    check_init(stage, init)
    if init.openbiomed:
        with _open_openbiomed(init) as src:
            _check_openbiomed(init, cfg, src, quiet=True)
        return
    if init.hf_llama:
        _check_same("hf_llama", cfg.lm, _hf_llama_config(init.hf_llama, cfg), grow_vocab=True)
        with open_source(init.hf_llama) as src:
            hf_llama.check_source(src, cfg.lm, grow_vocab=True)
    if init.hf_esm:
        _check_same("hf_esm", cfg.esm, _hf_esm_config(init.hf_esm, cfg))
        with open_source(init.hf_esm) as src:
            tensor_map.check(hf_esm.view(src), hf_esm.layout(cfg.esm))


# One function per pretrained source: (path, config, mesh, skip) -> the sub-module, its parameters global arrays
# in the rule shardings on `mesh`; each process reads only the slices its devices own (`load_sharded`); the
# variables `skip` selects (paths within the sub-module) are not read and stay abstract (`tensor_map.load`).

def load_hf_llama(path: str, cfg: BioMedGPTConfig, mesh: Mesh,
                  skip: nnx.filterlib.Filter = nnx.Nothing, seed: int = 0) -> LlamaForCausalLM:
    """The decoder from a Hugging Face Llama folder (`init.hf_llama`), with `cfg.lm`: a checkpoint with fewer
    token rows than `cfg.lm.vocab_size` (Llama-2-7b-hf's 32000 under BioMedGPT's 32001, `[PAD]` added) gets
    the missing rows of `embed_tokens` and `lm_head`, each the mean of its rows (`hf_llama.load_source`),
    said in one log line; a `CONFIG_WINS` value that differs is the config's, with a warning. LoRA factors
    (`lora_rank > 0`) are drawn fresh from `seed` (`init.seed`)."""
    from bmgpt_jax.convert import hf_llama
    soft, added = _check_same("hf_llama", cfg.lm, _hf_llama_config(path, cfg), grow_vocab=True)
    _warn_config_wins("hf_llama", path, soft)
    if added:
        v = cfg.lm.vocab_size
        log.info("init.hf_llama %s: %d token rows, the config %d: embed_tokens and lm_head grown by %d row%s "
                 "(ids %s), each the mean of the checkpoint's rows", path, v - added, v, added,
                 "" if added == 1 else "s", v - 1 if added == 1 else f"{v - added}..{v - 1}")
    return hf_llama.load_sharded(path, cfg.lm, mesh, grow_vocab=True, skip=skip, lora_seed=seed)


def load_hf_esm(path: str, cfg: BioMedGPTConfig, mesh: Mesh, skip: nnx.filterlib.Filter = nnx.Nothing) -> Esm:
    """The protein encoder from a Hugging Face ESM-2 folder (`init.hf_esm`), with `cfg.esm` (a differing
    `CONFIG_WINS` value is the config's, with a warning)."""
    from bmgpt_jax.convert import hf_esm
    soft, _ = _check_same("hf_esm", cfg.esm, _hf_esm_config(path, cfg))
    _warn_config_wins("hf_esm", path, soft)
    return hf_esm.load_sharded(path, cfg.esm, mesh, skip=skip)


def load_gin(path: str, cfg: BioMedGPTConfig, mesh: Mesh, skip: nnx.filterlib.Filter = nnx.Nothing) -> GIN:
    """The molecule encoder from a GraphMVP `.pth` state dict (`init.gin`), replicated."""
    from bmgpt_jax.convert import graphmvp_gin
    return graphmvp_gin.load_sharded(path, cfg.gin, mesh, skip=skip)


def load_openbiomed(init: InitConfig, cfg: BioMedGPTConfig, mesh: Mesh,
                    skip: nnx.filterlib.Filter = nnx.Nothing) -> BioMedGPT:
    """The whole BioMedGPT from OpenBioMed's `biomedgpt_10b.pth` or a model folder's safetensors
    (`init.openbiomed` + the HF config.json paths `init.lm_config` / `init.esm_config`), with `cfg.lm` and
    `cfg.esm` (a differing `CONFIG_WINS` value is the config's, with a warning). The decoder's vocabulary
    is the checkpoint's token rows, as OpenBioMed resizes BioMedGPT-LM-7B's 32000 to 32001 (logged where
    `init.lm_config` says otherwise: `openbiomed.token_rows`); the config's must be the same. LoRA factors
    are drawn fresh from `init.seed`."""
    from bmgpt_jax.convert import openbiomed
    with _open_openbiomed(init) as src:
        for part, soft in _check_openbiomed(init, cfg, src):
            _warn_config_wins(f"openbiomed ({part})", init.openbiomed, soft)
        return openbiomed.load_source(src, cfg.lm, cfg.esm, cfg.gin, mesh, skip=skip, lora_seed=init.seed)


PARTS = {"llm": ("hf_llama", load_hf_llama), "prot_structure_encoder": ("hf_esm", load_hf_esm),
         "mol_structure_encoder": ("gin", load_gin)}  # BioMedGPT attribute -> (init field, loader)


def check_init(stage: Stage, init: InitConfig) -> None:
    """ConfigError (a ValueError) naming any `init` path `stage` would not read: the `lm` stage builds the bare decoder
    (only `hf_llama`); `openbiomed` loads the whole BioMedGPT, so it excludes the per-part paths; the
    config.json paths go with `openbiomed` only."""
    given = [f for f in ("openbiomed", "lm_config", "esm_config", "hf_llama", "hf_esm", "gin") if getattr(init, f)]
    if stage == "lm":
        unused, why = [f for f in given if f != "hf_llama"], "stage 'lm' trains the bare decoder: init.hf_llama"
    elif init.openbiomed:
        unused = [f for f in given if f in ("hf_llama", "hf_esm", "gin")]
        why = "init.openbiomed loads the whole model: give it or the per-part paths, not both"
    else:
        unused, why = [f for f in given if f in ("lm_config", "esm_config")], "they describe init.openbiomed's parts"
    if unused:
        raise ConfigError(f"{', '.join(f'init.{f}' for f in unused)} would not be read ({why})")


def model_factory(stage: Stage, model_cfg: BioMedGPTConfig, seed: int = 0) -> tuple[Callable[[], nnx.Module], Callable]:
    """(make, loss_fn): `make()` builds `stage`'s randomly initialised model (the bare decoder for `lm`,
    else BioMedGPT) from `seed`; `loss_fn(model, batch) -> (loss_sum, n_tokens)`. Used under
    `nnx.eval_shape` or inside jit (`parallel.sharded_init`), never eagerly at real size."""
    if stage == "lm":
        return (lambda: LlamaForCausalLM(model_cfg.lm, rngs=nnx.Rngs(seed))), lm_loss
    return (lambda: BioMedGPT(model_cfg, rngs=nnx.Rngs(seed))), BioMedGPT.loss


def build_model(stage: Stage, model_cfg: BioMedGPTConfig, init: InitConfig, mesh: Mesh | None = None,
                skip: nnx.filterlib.Filter = nnx.Nothing) -> tuple[nnx.Module, Callable]:
    """(model, loss_fn) for `stage`, every variable already on `mesh` (default: one device) in its rule
    sharding; `loss_fn(model, batch) -> (loss_sum, n_tokens)`.

    Random parts are created by one jitted init whose outputs carry the rule shardings
    (`parallel.init_sharded`): each device makes only its own shards. Parts named in `init` are not
    created at all (they stay abstract until their loader fills them), so a pretrained 7B decoder is never
    doubled by a random one. Variables `skip` selects are neither created nor read: they stay abstract
    (sharded ShapeDtypeStructs) for a checkpoint to fill, as `--resume` does with the trainable parameters.
    """
    check_init(stage, init)
    mesh = mesh if mesh is not None else parallel.make_mesh((1, 1, 1))
    make, loss_fn = model_factory(stage, model_cfg, init.seed)
    if stage == "lm":
        if init.hf_llama:
            return load_hf_llama(init.hf_llama, model_cfg, mesh, skip, init.seed), loss_fn
        return parallel.init_sharded(make, mesh, skip), loss_fn
    if init.openbiomed:
        return load_openbiomed(init, model_cfg, mesh, skip), loss_fn
    pretrained = {name: (getattr(init, field), load) for name, (field, load) in PARTS.items() if getattr(init, field)}
    skipped = nnx.filterlib.to_predicate(skip)
    model = parallel.init_sharded(make, mesh, skip=lambda path, x: path[0] in pretrained or skipped(path, x))
    for name, (path, load) in pretrained.items():
        seed = {"seed": init.seed} if name == "llm" else {}     # fresh LoRA factors (the decoder's only)
        setattr(model, name, load(path, model_cfg, mesh, lambda sub, x, name=name: skipped((name, *sub), x), **seed))
    return model, loss_fn

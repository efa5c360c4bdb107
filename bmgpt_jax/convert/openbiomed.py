"""OpenBioMed `biomedgpt_10b.pth` (one flat state dict) <-> our `BioMedGPT`.

Layout: `llm.*` (HF Llama names, vocab 32001), `mol_structure_encoder.*` (GraphMVP GIN),
`prot_structure_encoder.*` (HF ESM names), `proj_mol.{weight,bias}`, `proj_prot.{weight,bias}`. The table
is the three families' tables nested under their prefixes plus the two adaptors; a key under no known
prefix is an error, as is a missing key or a shape mismatch. The same flat names are used in our model
folder's safetensors (`convert.folder`). Reading is lazy (`torch.load(mmap=True)` for the `.pth`), whole
or per device slice (`load_sharded`); writing streams one tensor at a time.

OpenBioMed's file holds more than our model uses (`layout(...).ignored`): the Llama's per-layer
`rotary_emb.inv_freq` (OpenBioMed's own modeling_llama registers it as a persistent buffer), the ESM's
`pooler.dense.{weight,bias}` and `contact_head.regression.{weight,bias}` (never called by BioMedGPT) and
its rotary `inv_freq` (and, from older transformers, `embeddings.position_ids`). Loading skips them;
OpenBioMed's `BioMedGPTV` loads a file strictly (`model.load_state_dict(ckpt)`), so a `.pth` we write
holds them too (`convert`, `write`): a source that has them (an OpenBioMed `.pth`, or a model folder converted
from one, which carries them over in its safetensors) gives them back as they are, bit for bit; without
them, `openbiomed_fill` computes the buffers and fills the pooler and contact head with zeros, saying so
in one log line. Tests: `tests/convert/test_openbiomed_pth.py`.

The LM's token rows: OpenBioMed builds the LLM from BioMedGPT-LM-7B's `config.json` (`vocab_size` 32000),
adds `[PAD]` to the tokenizer and calls `resize_token_embeddings(len(tokenizer))`, so the released `.pth`
holds 32001 rows. `configs(..., weights=...)` does the same: the rows of `llm.model.embed_tokens.weight`
(read from the header; `lm_head` must have as many) are the LM's `vocab_size` when they differ from the
JSON's, said in one log line; fewer rows than the JSON's is an error (`token_rows`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from flax import nnx

from bmgpt_jax.convert import graphmvp_gin, hf_esm, hf_llama, openbiomed_fill, stream, tensor_map
from bmgpt_jax.convert.sources import open_source
from bmgpt_jax.convert.tensor_map import Layout, ModelSource
from bmgpt_jax.convert.tensor_source import DictSource, TensorSource, View
from bmgpt_jax.data.text import attach_tokenizer
from bmgpt_jax.models.biomedgpt import BioMedGPT, BioMedGPTConfig
from bmgpt_jax.models.esm import EsmConfig
from bmgpt_jax.models.gin import GinConfig
from bmgpt_jax.models.llama import LlamaConfig

log = logging.getLogger(__name__)
FAMILY = "OpenBioMed BioMedGPT"
PREFIXES = ("llm.", "mol_structure_encoder.", "prot_structure_encoder.", "proj_mol.", "proj_prot.")
ESM_PREFIX, GIN_PREFIX = "prot_structure_encoder.", "mol_structure_encoder."
ESM_WORDS = ESM_PREFIX + "embeddings.word_embeddings.weight"     # (its dtype: the ESM's on disk)
LM_EMBED, LM_HEAD = "llm.model.embed_tokens.weight", "llm.lm_head.weight"   # one row per token each


def _json(cfg: Mapping | str | os.PathLike) -> dict:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    p = Path(cfg)
    return json.loads((p / "config.json" if p.is_dir() else p).read_text())


def _json_name(cfg: Mapping | str | os.PathLike) -> str:
    """What to call the config in a message: its file, or "the LM config" for a dict."""
    if isinstance(cfg, Mapping):
        return "the LM config"
    p = Path(cfg)
    return str(p / "config.json" if p.is_dir() else p)


def view(source: TensorSource) -> View:
    """`source` with the ESM part's old `gamma`/`beta` names renamed; a key under no known prefix is an error."""
    stray = sorted(k for k in source.keys() if not k.startswith(PREFIXES))
    if stray:
        raise KeyError(f"{source.name}: keys outside {list(PREFIXES)}: {stray[:10]}; not an OpenBioMed BioMedGPT "
                       "checkpoint?")
    return View(source, "", lambda k: hf_esm.normalize_key(k) if k.startswith(ESM_PREFIX) else k)


def gin_config(source: TensorSource, base: GinConfig | None = None) -> GinConfig:
    """The GIN config: `base` if given, else the default with the checkpoint's depth and width."""
    return base or graphmvp_gin.infer_config(graphmvp_gin.view(source, GIN_PREFIX))


def layout(lm_cfg: LlamaConfig, esm_cfg: EsmConfig, gin_cfg: GinConfig) -> Layout:
    """The flat OpenBioMed tensors of a BioMedGPT with these configs."""
    model = nnx.eval_shape(lambda: BioMedGPT(BioMedGPTConfig(lm=lm_cfg, gin=gin_cfg, esm=esm_cfg), rngs=nnx.Rngs(0)))
    parts = (hf_llama.layout(lm_cfg).nest("llm", "llm."),
             graphmvp_gin.layout(gin_cfg).nest("mol_structure_encoder", GIN_PREFIX),
             hf_esm.layout(esm_cfg).nest("prot_structure_encoder", ESM_PREFIX),
             *(tensor_map.param_layout(getattr(model, name), FAMILY).nest(name, name + ".")
               for name in ("proj_mol", "proj_prot")))
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return Layout(out.entries, FAMILY, out.ignored)


def load_source(source: TensorSource, lm_cfg: LlamaConfig, esm_cfg: EsmConfig, gin_cfg: GinConfig | None = None,
                mesh=None, skip: nnx.filterlib.Filter = nnx.Nothing, lora_seed: int = 0) -> BioMedGPT:
    """Our BioMedGPT from flat OpenBioMed tensors in `source`; with `mesh`, sharded global arrays.
    `skip`: variables left abstract, not read (`tensor_map.load`); `lora_seed`: the draw of fresh LoRA factors."""
    src = view(source)
    gin_cfg = gin_config(src, gin_cfg)
    cfg = BioMedGPTConfig(lm=lm_cfg, gin=gin_cfg, esm=esm_cfg)
    return tensor_map.load(lambda: BioMedGPT(cfg, rngs=nnx.Rngs(0)), src, layout(lm_cfg, esm_cfg, gin_cfg), mesh,
                           lora_seed, skip)


def load_sharded(path: str | os.PathLike, lm_cfg: LlamaConfig, esm_cfg: EsmConfig, gin_cfg: GinConfig | None,
                 mesh, skip: nnx.filterlib.Filter = nnx.Nothing) -> BioMedGPT:
    """Our BioMedGPT from `biomedgpt_10b.pth` or a model folder's safetensors, its parameters global
    `jax.Array`s laid out by `parallel.tree_shardings` on `mesh` (each process reads only its devices'
    slices; the small GIN is replicated). `gin_cfg=None`: inferred from the checkpoint. `skip`: variables
    left abstract, not read."""
    with open_source(path) as src:
        return load_source(src, lm_cfg, esm_cfg, gin_cfg, mesh, skip)


def token_rows(source: TensorSource, lm_cfg: LlamaConfig, config_name: str = "the LM config",
               quiet: bool = False) -> LlamaConfig:
    """`lm_cfg` with the checkpoint's token-row count as its `vocab_size`, as OpenBioMed's
    `resize_token_embeddings(len(tokenizer))` after adding `[PAD]` makes it (BioMedGPT-LM-7B's
    `config.json` says 32000, `biomedgpt_10b.pth` holds 32001 rows). Only the headers are read. The rows
    are `llm.model.embed_tokens.weight`'s; `llm.lm_head.weight`, where present, must have as many, and
    there must be at least `lm_cfg.vocab_size` (`config_name`'s): else a one-line ValueError naming the
    file and both numbers. A different count is logged in one line (unless `quiet`). A source without
    the embedding is left to the load's missing-key error."""
    if LM_EMBED not in source:
        return lm_cfg
    rows, where, json_rows = source.shape(LM_EMBED)[0], source.file_of(LM_EMBED), lm_cfg.vocab_size
    if LM_HEAD in source and source.shape(LM_HEAD)[0] != rows:
        raise ValueError(f"{where}: {LM_EMBED} has {rows} token rows but {LM_HEAD} has "
                         f"{source.shape(LM_HEAD)[0]} ({source.file_of(LM_HEAD)}): not one vocabulary")
    if rows < json_rows:
        raise ValueError(f"{where}: {LM_EMBED} has {rows} token rows, fewer than {config_name}'s vocab_size "
                         f"{json_rows}: not a checkpoint of this LM config")
    if rows != json_rows:
        if not quiet:
            log.info("%s: its %d token rows override %s's vocab_size %d (as OpenBioMed's "
                     "resize_token_embeddings after adding [PAD])", where, rows, config_name, json_rows)
        lm_cfg = dataclasses.replace(lm_cfg, vocab_size=rows)
    return lm_cfg


def configs(lm_config, esm_config, weights: TensorSource | str | os.PathLike | None = None, quiet: bool = False,
            **lm_overrides) -> tuple[LlamaConfig, EsmConfig]:
    """Our configs from HF `config.json` paths/folders or dicts; `lm_overrides`: LlamaConfig fields.
    `weights` (an open source, or a path opened here for its headers): the LM's `vocab_size` is its
    token-row count (`token_rows`; `quiet`: without the log line), and a config without a dtype takes
    its part's dtype on disk (`hf_llama.stored_dtype`)."""
    if weights is not None and not isinstance(weights, TensorSource):
        with open_source(weights) as src:
            return configs(lm_config, esm_config, src, quiet, **lm_overrides)
    lm_weights, esm_weights = (None, None) if weights is None else (View(weights, "llm."), View(weights, ESM_PREFIX))
    lm = hf_llama.config_from_hf(_json(lm_config), lm_weights, **lm_overrides)
    if weights is not None:
        lm = token_rows(weights, lm, _json_name(lm_config), quiet)
    return lm, hf_esm.config_from_hf(_json(esm_config), esm_weights)


def from_state_dict(sd: Mapping[str, Any], lm_config, esm_config, gin_config: GinConfig | None = None,
                    source: str = "checkpoint", **lm_overrides) -> BioMedGPT:
    """Our BioMedGPT from the flat OpenBioMed state dict. `lm_config`/`esm_config`: HF `config.json`
    paths/folders or dicts; `lm_overrides`: LlamaConfig fields such as `scan_layers`, `dtype`."""
    src = DictSource(sd, name=source)
    lm_cfg, esm_cfg = configs(lm_config, esm_config, src, **lm_overrides)
    return load_source(src, lm_cfg, esm_cfg, gin_config)


def to_state_dict(model: BioMedGPT) -> dict:
    """The flat OpenBioMed tensors (numpy) of `model`: ours only (`save` writes the filled ones too)."""
    c = model.config
    return tensor_map.state_dict(model, layout(c.lm, c.esm, c.gin))


def load(pth_path: str | os.PathLike, lm_config, esm_config, tokenizer=None,
         gin_config: GinConfig | None = None, **lm_overrides) -> BioMedGPT:
    """Our BioMedGPT from `biomedgpt_10b.pth` (or our folder's safetensors), the LM's vocabulary its token
    rows (`token_rows`). `tokenizer`: a SentencePiece `.model` path, an HF tokenizer folder or a
    `bmgpt_jax.data.text` tokenizer; attached for `chat.ask` (it must fit the rows)."""
    with open_source(pth_path) as src:
        lm_cfg, esm_cfg = configs(lm_config, esm_config, src, **lm_overrides)
        model = load_source(src, lm_cfg, esm_cfg, gin_config)
    if tokenizer is not None:
        attach_tokenizer(model, tokenizer)
    return model


def _fill(cfg: BioMedGPTConfig, lay: Layout, esm_dtype) -> openbiomed_fill.Filled:
    """The filled tensors for a `.pth` of `cfg`; zeros in `esm_dtype` (the ESM's parameters' on disk)."""
    return openbiomed_fill.tensors(cfg.lm, cfg.esm, (e.key for e in lay.entries), esm_dtype, esm_prefix=ESM_PREFIX)


def convert(raw: TensorSource, cfg: BioMedGPTConfig, dst: str | os.PathLike, *, dtype=None, check: bool = False,
            keep=()) -> int:
    """OpenBioMed's `.pth` streamed from flat tensors in `raw` (a model folder's or a `.pth`): our tensors,
    then the tensors `raw` has that our model does not use, as they are; where it has none, the filled
    ones (`openbiomed_fill`, one log line). `dtype`: cast floating tensors; `check`: re-read bit for bit.
    Returns the number of tensors."""
    src = view(raw)
    lay = layout(cfg.lm, cfg.esm, cfg.gin)
    fill = None
    if not tensor_map.unused(src, lay):
        fill = _fill(cfg, lay, src.dtype(ESM_WORDS) if ESM_WORDS in src else cfg.esm.param_dtype)
    n = stream.convert(src, lay, dst, "pth", dtype=dtype, check=check, keep=keep, carry=True, extras=fill)
    if fill is not None:
        log.warning(openbiomed_fill.note(fill, dst))
    return n


def write(reader: TensorSource, cfg: BioMedGPTConfig, dst: str | os.PathLike) -> Path:
    """The flat OpenBioMed `.pth` streamed from our variables in `reader` (dotted paths), atomically, with
    the filled tensors (`openbiomed_fill`) that make OpenBioMed's strict load accept it."""
    lay = layout(cfg.lm, cfg.esm, cfg.gin)
    specs = stream.export_specs(lay)
    fill = _fill(cfg, lay, next(d for k, _, d in specs if k == ESM_WORDS))
    out = stream.write(dst, "pth", specs + stream.specs_of(fill),
                       itertools.chain(stream.exported(reader, lay), stream.tensors_of(fill)))
    log.warning(openbiomed_fill.note(fill, dst))
    return out


def save(model: BioMedGPT, pth_path: str | os.PathLike) -> None:
    """Write the flat state dict as a torch `.pth` (streamed) that OpenBioMed's `BioMedGPTV` loads strictly:
    our tensors plus the filled buffers, pooler and contact head (module docstring)."""
    write(ModelSource(model), model.config, pth_path)

"""Our on-disk model folder: the weights, the three configs and the tokenizer, in one directory.

    model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
                        the weights under OpenBioMed's flat names (`llm.*`, `mol_structure_encoder.*`, ...);
                        converted from an OpenBioMed `.pth`, also the tensors of it our model does not use
                        (rotary buffers, the ESM's pooler and contact head), carried over for the way back
    llm_config.json     HF Llama config        esm_config.json   HF ESM config
    gin_config.json     our GinConfig          tokenizer.model   SentencePiece (or a `tokenizer/` folder)
    biomedgpt_10b.pth   OpenBioMed's file, written as well where torch is importable (optional; loads
                        strictly in OpenBioMed's `BioMedGPTV`: see `convert.openbiomed`)

The default folder needs no torch to write or read. Training writes one at the end of a run (streamed
from the final checkpoint, `convert.run_export`); chat and evaluate read it (`from_pretrained`, sharded
over a mesh when one is given); `convert_weights.py openbiomed` / `to_openbiomed` convert from and to
OpenBioMed's `.pth`. Every write goes to a temporary folder renamed at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from bmgpt_jax.convert import graphmvp_gin, hf_esm, hf_llama, openbiomed, outputs, stream
from bmgpt_jax.convert.safetensors_io import SAFE_INDEX
from bmgpt_jax.convert.sources import open_source
from bmgpt_jax.convert.tensor_map import ModelSource
from bmgpt_jax.convert.tensor_source import TensorSource
from bmgpt_jax.data.text import Tokenizer, as_tokenizer, attach_tokenizer, check_fits, tokenizer_of
from bmgpt_jax.models.biomedgpt import BioMedGPTConfig
from bmgpt_jax.models.esm import EsmConfig
from bmgpt_jax.models.gin import GinConfig
from bmgpt_jax.models.llama import LlamaConfig

FILES = outputs.FOLDER_FILES


def torch_available() -> bool:
    """Whether torch can be imported here (the optional `.pth` is written only then)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _write_configs(d: Path, cfg: BioMedGPTConfig, tokenizer: Tokenizer) -> None:
    (d / FILES["lm"]).write_text(json.dumps(hf_llama.config_to_hf(cfg.lm), indent=1))
    (d / FILES["esm"]).write_text(json.dumps(hf_esm.config_to_hf(cfg.esm), indent=1))
    (d / FILES["gin"]).write_text(json.dumps(dataclasses.asdict(cfg.gin), indent=1))
    (d / FILES["tokenizer"]).write_bytes(tokenizer.model_proto)


def write(out_dir: str | os.PathLike, cfg: BioMedGPTConfig, tokenizer, reader: TensorSource,
          pth: bool | None = None, max_shard_bytes: int = stream.SHARD_BYTES) -> Path:
    """A model folder streamed from our variables in `reader` (dotted paths: a model in memory or a
    training checkpoint), one tensor at a time. `pth`: also write `biomedgpt_10b.pth` (streamed from the
    new safetensors); None: when torch is importable."""
    lay = openbiomed.layout(cfg.lm, cfg.esm, cfg.gin)
    tok = as_tokenizer(tokenizer)
    pth = torch_available() if pth is None else pth

    def extra(tmp: Path) -> None:
        _write_configs(tmp, cfg, tok)
        if pth:
            with open_source(tmp) as written:
                openbiomed.convert(written, cfg, tmp / FILES["pth"])
    return stream.write(out_dir, "safetensors", stream.export_specs(lay), stream.exported(reader, lay), extra,
                        max_shard_bytes)


def save_pretrained(model, tokenizer, out_dir, pth: bool | None = None) -> Path:
    """Write `model` as a model folder (see the module docstring); `tokenizer=None`: the attached one."""
    tok = tokenizer_of(model) if tokenizer is None else as_tokenizer(tokenizer)
    return write(out_dir, model.config, tok, ModelSource(model), pth)


def _tokenizer_file(d: Path) -> Path | None:
    return next((p for p in (d / FILES["tokenizer"], d / "tokenizer") if p.exists()), None)


def gin_settings(path, weights=None) -> GinConfig:
    """A GinConfig JSON (a folder's `gin_config.json`). The depth and width it omits (`num_layers`,
    `emb_dim`) come from the GIN tensors of `weights` (a model folder or OpenBioMed `.pth`; default: the
    folder holding `path`, if it holds weights), as `openbiomed.gin_config` infers them; the other fields
    it omits are GinConfig's defaults. A key GinConfig lacks or a value of the wrong type is a ValueError
    naming the file and the key."""
    from bmgpt_jax import config as config_lib
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of GinConfig fields, got {type(data).__name__}")
    try:
        cfg = config_lib.from_dict(GinConfig, data)
    except config_lib.ConfigError as e:
        raise ValueError(f"{path}: {e}") from None
    omitted = sorted({"num_layers", "emb_dim"} - data.keys())
    if weights is None and any((path.parent / n).exists() for n in (FILES["weights"], SAFE_INDEX, FILES["pth"])):
        weights = path.parent
    if omitted and weights is not None:
        with open_source(weights) as raw:
            inferred = openbiomed.gin_config(openbiomed.view(raw))
        cfg = dataclasses.replace(cfg, **{k: getattr(inferred, k) for k in omitted})
    return cfg


def _require(d: Path) -> None:
    """FileNotFoundError naming what the model folder `d` lacks of its weights, LM/ESM configs, tokenizer."""
    has_weights = any((d / name).exists() for name in (FILES["weights"], SAFE_INDEX, FILES["pth"]))
    missing = ([] if has_weights else [d / FILES["weights"]]) + \
        [d / FILES[k] for k in ("lm", "esm") if not (d / FILES[k]).exists()] + \
        ([] if _tokenizer_file(d) else [d / FILES["tokenizer"]])
    if missing:
        raise FileNotFoundError(f"checkpoint folder {d} lacks {[str(m) for m in missing]}")


def configs(ckpt_dir, weights: TensorSource | None = None, esm_overrides=None,
            **lm_overrides) -> tuple[LlamaConfig, EsmConfig, GinConfig | None]:
    """The folder's configs (`lm_overrides`: LlamaConfig fields such as `dtype`; `esm_overrides`: a dict
    of EsmConfig fields); the GIN's is None when `gin_config.json` is absent (its depth and width are then
    read off the weights). The LM and ESM are held and computed in the dtype their config files record
    (`hf_llama.stored_dtype`) unless overridden. The LM's vocabulary is the weights' token rows
    (`openbiomed.token_rows`: an OpenBioMed release with BioMedGPT-LM-7B's config.json copied in says
    32000 where its `.pth` holds 32001); `weights`: the folder's, already open."""
    d = Path(ckpt_dir)
    _require(d)
    lm, esm = openbiomed.configs(d / FILES["lm"], d / FILES["esm"], d if weights is None else weights,
                                 **lm_overrides)
    esm = dataclasses.replace(esm, **(esm_overrides or {}))
    gin = gin_settings(d / FILES["gin"]) if (d / FILES["gin"]).exists() else None
    return lm, esm, gin


def from_pretrained(ckpt_dir, mesh=None, esm_overrides=None, **lm_overrides):
    """BioMedGPT with its tokenizer from a model folder, the LM and the ESM held and computed in the dtype
    their config files record (a bfloat16 folder stays bfloat16, as transformers 5 loads by default);
    `lm_overrides`: LlamaConfig fields (`dtype` compute, `param_dtype` held...), `esm_overrides` a dict of
    EsmConfig ones. With `mesh`, the parameters are global arrays laid out by the rule shardings, each
    process reading only its devices' slices (cast to the parameter dtype as they are read)."""
    d = Path(ckpt_dir)
    _require(d)
    with open_source(d) as src:
        model = openbiomed.load_source(src, *configs(d, src, esm_overrides, **lm_overrides), mesh)
    return attach_tokenizer(model, _tokenizer_file(d))


def from_openbiomed(pth_path, dst, lm_config, esm_config, tokenizer, dtype=None, check: bool = False,
                    max_shard_bytes: int = stream.SHARD_BYTES, gin_config=None) -> int:
    """OpenBioMed `biomedgpt_10b.pth` -> a model folder, streaming (dtype kept unless `dtype`; `check`:
    re-read bit for bit), the tensors our model does not use carried over into its safetensors under
    their own names, for `to_openbiomed` to give back. Returns the number of tensors. The GIN's depth
    and width come from the weights; what the `.pth` does not hold (the atom cap `max_atoms` /
    `over_cap`, dropout) from `gin_config`, a GinConfig JSON such as a model folder's `gin_config.json`
    (default: GinConfig's defaults). The LM's vocabulary is the `.pth`'s token rows, which the
    folder's `llm_config.json` says (`openbiomed.token_rows`); the tokenizer must fit them."""
    tok = as_tokenizer(tokenizer)
    settings = gin_settings(gin_config) if gin_config else GinConfig()
    with open_source(pth_path) as raw:
        lm, esm = openbiomed.configs(lm_config, esm_config, raw)     # vocab_size: the .pth's token rows
        check_fits(tok, lm.vocab_size, f"{pth_path}'s LM")
        src = openbiomed.view(raw)
        gin = graphmvp_gin.infer_config(graphmvp_gin.view(src, openbiomed.GIN_PREFIX), settings)
        cfg = BioMedGPTConfig(lm=lm, esm=esm, gin=gin)
        lay = openbiomed.layout(cfg.lm, cfg.esm, cfg.gin)
        first = stream.out_dtype(src.dtype(lay.entries[0].key), dtype) if lay.entries[0].key in src else lm.param_dtype
        out = dataclasses.replace(cfg, lm=dataclasses.replace(lm, param_dtype=str(first)),
                                  esm=dataclasses.replace(esm, param_dtype=str(first)))
        return stream.convert(src, lay, dst, "safetensors", dtype=dtype, check=check,
                              extra_files=lambda tmp: _write_configs(tmp, out, tok), max_shard_bytes=max_shard_bytes,
                              keep=pth_path, carry=True)


def to_openbiomed(ckpt_dir, dst, dtype=None, check: bool = False) -> int:
    """A model folder -> OpenBioMed's flat `.pth`, streaming (dtype kept unless `dtype`; `check`:
    re-read bit for bit), which OpenBioMed's `BioMedGPTV` loads strictly: the tensors the folder carries
    over from an OpenBioMed `.pth` go back as they are; a folder without them (from HF sources, from
    training) gets the computed buffers and a zero pooler and contact head, named in one log line
    (`convert.openbiomed`). Returns the number of tensors."""
    _require(Path(ckpt_dir))
    with open_source(ckpt_dir) as raw:
        lm, esm, gin = configs(ckpt_dir, raw)
        cfg = BioMedGPTConfig(lm=lm, esm=esm, gin=openbiomed.gin_config(openbiomed.view(raw), gin))
        return openbiomed.convert(raw, cfg, dst, dtype=dtype, check=check, keep=ckpt_dir)

"""A training run's orbax checkpoint -> the exported model, streamed by one process, never gathered.

A run's checkpoint folder (`checkpoint.dir`, default `{out_dir}/checkpoints`) holds one folder per
saved step with the `trainable` parameters and the optimizer state (`{step}/state`), the data position
and the run's config (`{step}/meta`). The frozen part of the model (every parameter and batch
statistic that does not train: the decoder and encoders in `align`, all but LoRA in a LoRA
fine-tune) does not change during training; the export at the end of a run saves it once, sharded
(each process writes its own shards), as the orbax item `frozen/` beside the steps (`save_frozen`).
Random-init runs have no other copy of it, and a pretrained init may have been cast or resized since.

The final step's `trainable` and `frozen/` together are the whole model, and the source of truth for
the export: `export` reads them array by array (`orbax_io.OrbaxSource`; a stacked array a block of
layers at a time) in one process and writes the model folder (`convert.folder`) or, for the `lm`
stage, a Hugging Face Llama folder, one tensor at a time, with LoRA folded into its kernels.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from bmgpt_jax import config as config_lib
from bmgpt_jax.convert import folder, hf_llama, openbiomed, stream
from bmgpt_jax.convert.orbax_io import OrbaxSource
from bmgpt_jax.convert.sources import open_source
from bmgpt_jax.convert.tensor_source import TensorSource, Union, View
from bmgpt_jax.models.biomedgpt import BioMedGPTConfig

FROZEN = "frozen"


def save_frozen(frozen_state, ckpt_dir: str | os.PathLike) -> bool:
    """Save the parameters and batch statistics of `frozen_state` (an `nnx.State` of global arrays) as
    the orbax item `{ckpt_dir}/frozen`. Collective: every process calls it and writes its own shards.
    Returns False (and writes nothing) when nothing is frozen."""
    import orbax.checkpoint as ocp
    from flax import nnx
    state = frozen_state.filter((nnx.Param, nnx.BatchStat))
    if not nnx.to_flat_state(state):
        return False
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(ckpt_dir).absolute() / FROZEN, state, force=True)
        ckptr.wait_until_finished()
    return True


def steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """The finished checkpoint steps in `ckpt_dir` (folders named by a number holding `state/_METADATA`)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such checkpoint folder")
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "state" / "_METADATA").exists())


def run_config(ckpt_dir: str | os.PathLike, step: int) -> dict:
    """The training config saved with `step` (a `TrainConfig` as a dict)."""
    meta = Path(ckpt_dir) / str(step) / "meta" / "metadata"
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: no run metadata (is {ckpt_dir} a bmgpt_jax training checkpoint?)")
    return json.loads(meta.read_text())["config"]


def reader(ckpt_dir: str | os.PathLike, step: int) -> TensorSource:
    """Our variables (dotted paths) of `step`: its `trainable` part, plus the `frozen/` item when present."""
    d = Path(ckpt_dir).absolute()
    parts: list[TensorSource] = [View(OrbaxSource(d / str(step) / "state"), "trainable.")]
    if (d / FROZEN / "_METADATA").exists():
        parts.append(OrbaxSource(d / FROZEN))
    return Union(parts, name=str(d / str(step)))


def export(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None, *,
           stage: str | None = None, model_cfg: BioMedGPTConfig | None = None, tokenizer=None,
           pth: bool | None = None, dtype: str | None = None, check: bool = False,
           max_shard_bytes: int = stream.SHARD_BYTES) -> int:
    """Write the model of checkpoint `step` (None: the latest) to `out_dir`: a model folder, or an HF
    Llama folder for the `lm` stage. `stage`, `model_cfg` and `tokenizer` default to the run's own (its
    saved config). `pth`: also write OpenBioMed's `.pth` (None: when torch is importable; True for an
    `lm` run, which has no `.pth` form, is a ValueError). `dtype`: the
    parameters' dtype on disk (default: the run's `param_dtype`). `check`: re-read the weights and
    compare with the checkpoint bit for bit. Returns the number of tensors written."""
    from bmgpt_jax.data.text import load_tokenizer
    stream.check_destination(out_dir, "dir", keep=ckpt_dir)     # before anything is read
    all_steps = steps(ckpt_dir)
    if not all_steps:
        inner = Path(ckpt_dir) / "checkpoints"
        hint = f" (a run folder? its checkpoints are in {inner})" if inner.is_dir() and steps(inner) else ""
        raise FileNotFoundError(f"{ckpt_dir}: no finished checkpoint step{hint}")
    step = all_steps[-1] if step is None else step
    if step not in all_steps:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint for step {step} (have {all_steps})")
    if stage is None or model_cfg is None or tokenizer is None:
        run = run_config(ckpt_dir, step)
        stage = stage or run["stage"]
        model_cfg = model_cfg or config_lib.from_dict(BioMedGPTConfig, run["model"])
        tokenizer = tokenizer or load_tokenizer(run["data"]["tokenizer"])
    if stage == "lm" and pth:
        raise ValueError(f"{ckpt_dir}: an lm-stage run exports a Hugging Face Llama folder, which has no OpenBioMed "
                         ".pth form (leave out --pth)")
    if dtype is not None:
        model_cfg = dataclasses.replace(model_cfg, **{k: dataclasses.replace(getattr(model_cfg, k), param_dtype=dtype)
                                                      for k in ("lm", "esm", "gin")})
    with reader(ckpt_dir, step) as variables:
        try:
            if stage == "lm":
                lay = hf_llama.layout(model_cfg.lm)
                hf_llama.write(out_dir, model_cfg.lm, variables, tokenizer, max_shard_bytes)
            else:
                lay = openbiomed.layout(model_cfg.lm, model_cfg.esm, model_cfg.gin)
                folder.write(out_dir, model_cfg, tokenizer, variables, pth, max_shard_bytes)
        except KeyError as e:
            if (Path(ckpt_dir) / FROZEN).exists():
                raise
            raise FileNotFoundError(f"{ckpt_dir}: step {step} holds only the trainable parameters and the frozen "
                                    f"part was never saved ({Path(ckpt_dir) / FROZEN} is written by the export at "
                                    f"the end of training): {e}") from None
        if check:
            with open_source(out_dir) as written:
                stream.verify(written, stream.exported(variables, lay))
    return len(lay.entries)

"""Open any checkpoint file or folder as one lazy `TensorSource`.

Accepted: a `.safetensors` file; a folder with `model.safetensors`, or with shards named by
`model.safetensors.index.json` (every shard the index names must exist, and hold the keys it is named
for), or with other `*.safetensors` files; a torch `.pth`/`.bin`/`.pt` file; a folder with shards named
by `pytorch_model.bin.index.json`, or with `pytorch_model.bin` (taken by name: a Hugging Face Trainer's
`checkpoint-N` holds `training_args.bin`, `optimizer.pt`, `rng_state.pth` beside it), or with one torch
file; our model folder (its safetensors, else its `biomedgpt_10b.pth`). Torch is imported only for torch
files. A training run's orbax checkpoint holds our own layout, not a state dict: it is read by
`convert.run_export`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bmgpt_jax.convert.safetensors_io import SAFE_INDEX, SAFE_NAME, SafetensorsFile
from bmgpt_jax.convert.tensor_source import TensorSource, Union

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_NAME = "pytorch_model.bin"
TORCH_SUFFIXES = (".pth", ".bin", ".pt")


def _torch_file(path: Path) -> TensorSource:
    from bmgpt_jax.convert.torch_io import TorchFile
    return TorchFile(path)


def _open_file(path: Path) -> TensorSource:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return _torch_file(path)
    if path.name.endswith(".index.json"):
        return _open_index(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    return _torch_file(path) if magic[:2] == b"PK" else SafetensorsFile(path)


def _open_index(index_file: Path) -> TensorSource:
    """The shards an HF index file names, as one source; a missing shard or a key that is not in the
    shard the index names is an error naming both."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_file}: not a Hugging Face index file ({e!r})") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_file.parent / s).exists()]
    if missing:
        raise FileNotFoundError(f"{index_file} names shard(s) that are missing: "
                                f"{[str(index_file.parent / s) for s in missing]}")
    sources = [_open_file(index_file.parent / s) for s in shards]
    union = Union(sources, name=str(index_file))
    for key, shard in weight_map.items():
        if key not in union or Path(union.file_of(key)).name != Path(shard).name:
            raise KeyError(f"{index_file}: tensor {key!r} is named for {index_file.parent / shard}, which does not "
                           "hold it")
    stray = [k for k in union.keys() if k not in weight_map]
    if stray:
        raise KeyError(f"{index_file}: shards hold tensors the index does not name: {stray[:5]}")
    return union


def open_source(path: str | os.PathLike) -> TensorSource:
    """A lazy `TensorSource` over the checkpoint at `path` (see the module docstring)."""
    p = Path(path)
    if not p.is_dir():
        return _open_file(p)
    if (p / SAFE_INDEX).exists():
        return _open_index(p / SAFE_INDEX)
    if (p / SAFE_NAME).exists():
        return SafetensorsFile(p / SAFE_NAME)
    files = sorted(p.glob("*.safetensors"))
    if files:
        return SafetensorsFile(files[0]) if len(files) == 1 else Union([SafetensorsFile(f) for f in files], str(p))
    if (p / BIN_INDEX).exists():
        return _open_index(p / BIN_INDEX)
    if (p / BIN_NAME).is_file():
        return _torch_file(p / BIN_NAME)
    torch_files = sorted(f.name for f in p.iterdir() if f.suffix in TORCH_SUFFIXES and f.is_file())
    if len(torch_files) == 1:
        return _torch_file(p / torch_files[0])
    if (p / "_CHECKPOINT_METADATA").exists() or (p / "_METADATA").exists():
        raise ValueError(f"{p} is an orbax training checkpoint (our own layout): convert it with "
                         "`convert_weights.py orbax` or read it with bmgpt_jax.convert.run_export")
    if torch_files:
        raise ValueError(f"{p}: {len(torch_files)} torch files and none is {BIN_NAME}: {torch_files[:10]}; "
                         "name that file, or rename it to pytorch_model.bin")
    found = sorted(f.name for f in p.iterdir())[:10]
    raise FileNotFoundError(f"{p}: no model.safetensors (single or sharded with {SAFE_INDEX}), other *.safetensors, "
                            f"{BIN_NAME} (or {BIN_INDEX}) or single .pth/.bin/.pt found; it holds {found}")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint, in memory (for small models and tests; converters stream instead)."""
    with open_source(path) as src:
        return {k: src.read(k) for k in src.keys()}

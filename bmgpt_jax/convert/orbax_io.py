"""A training run's orbax checkpoint read array by array (and slice by slice), with no JAX devices involved.

An orbax `StandardSave` item (e.g. `{checkpoint.dir}/300/state`) stores every array of the tree as a
zarr array in a TensorStore key-value store (OCDBT by default), named by its tree path joined with
dots: `trainable.llm.model.embed_tokens.weight.value`. `OrbaxSource` lists those names from the item's
`_METADATA` file (keys drop the trailing `.value` of an NNX Variable), opens each array with TensorStore
only when asked, and reads just the requested slice, with a bounded TensorStore cache. It is what the
export at the end of training and `convert_weights.py orbax` stream from: one process, one array (or a
block of layers of a stacked array) at a time, without restoring the tree or gathering shards.
"""
from __future__ import annotations

import json
import os

import numpy as np

from bmgpt_jax.convert.tensor_source import Index, TensorSource, normalize_index

ARRAY_TYPES = ("jax.Array", "np.ndarray")


class OrbaxSource(TensorSource):
    """The arrays of one orbax PyTree item folder (the folder holding `_METADATA`), keyed by dotted path."""

    def __init__(self, item_dir: str | os.PathLike):
        import orbax.checkpoint as ocp
        from etils import epath
        self.dir = epath.Path(item_dir)
        self.name = str(self.dir)
        meta_file = self.dir / "_METADATA"
        if not meta_file.exists():
            raise FileNotFoundError(f"{self.dir}: not an orbax checkpoint item (no _METADATA file)")
        try:
            meta = json.loads(meta_file.read_text())
            tree = meta["tree_metadata"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_file}: corrupt orbax metadata ({e!r})") from None
        self._use_ocdbt = bool(meta.get("use_ocdbt", True))
        self._use_zarr3 = bool(meta.get("use_zarr3", False))
        self._names: dict[str, str] = {}
        for entry in tree.values():
            value = entry.get("value_metadata", {})
            if value.get("value_type") not in ARRAY_TYPES or value.get("skip_deserialize"):
                continue
            parts = [str(k["key"]) for k in entry["key_metadata"]]
            stored = ".".join(parts)
            self._names[".".join(parts[:-1]) if parts[-1] == "value" else stored] = stored
        # orbax's context (B-tree nodes cached up to 100 MB, chunk data not cached), two chunks decoded at a time.
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt, data_copy_concurrency_limit=2)
        self._arrays: dict[str, object] = {}
        self._ocp = ocp

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def _open(self, key: str):
        if key not in self._arrays:
            import tensorstore as ts
            info = self._ocp.type_handlers.ParamInfo(name=self._names[key], parent_dir=self.dir,
                                                    use_zarr3=self._use_zarr3, ts_context=self._context)
            spec = self._ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
            try:
                self._arrays[key] = ts.open(spec, context=self._context).result()
            except ValueError as e:
                raise ValueError(f"{self.dir}: cannot open array {key!r}: "
                                 f"{str(e).split('[tensorstore_spec')[0]}") from None
        return self._arrays[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._open(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._open(key).dtype.numpy_dtype)

    def read(self, key: str, index: Index = None) -> np.ndarray:
        arr = self._open(key)
        idx = normalize_index(index, self.shape(key), f"{self.dir}:{key}")
        try:
            return np.asarray(arr[idx].read().result())
        except ValueError as e:
            raise ValueError(f"{self.dir}: cannot read array {key!r} (truncated or corrupt checkpoint?): "
                             f"{str(e).split('[tensorstore_spec')[0]}") from None

    def close(self) -> None:
        self._arrays = {}

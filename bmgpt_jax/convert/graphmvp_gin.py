"""GraphMVP / OpenBioMed GIN state dicts (`.pth`) <-> our `GIN`.

The PyTorch keys (`x_embedding1.weight`, `gnns.{i}.mlp.{0,2}.{weight,bias}`,
`gnns.{i}.edge_embedding{1,2}.weight`, `batch_norms.{i}.{weight,bias,running_mean,running_var,
num_batches_tracked}`) map one to one onto our attribute paths (`gnns[i].mlp_0.kernel`, ...); Linear
weights are transposed, everything else is copied as is (`num_batches_tracked` is int64 in the file,
int32 in our BatchNorm), so import then export is bit-exact. A checkpoint of a bigger model
(BioMedGPT: `mol_structure_encoder.` ...) is read under `prefix`. Any missing or extra key, or a shape
mismatch, raises naming the file, the key and both shapes. The GIN is small (1.8M parameters for
GraphMVP's 5x300): `load_sharded` replicates it on the mesh.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from bmgpt_jax.convert import stream, tensor_map
from bmgpt_jax.convert.sources import open_source
from bmgpt_jax.convert.tensor_map import Entry, Layout, ModelSource
from bmgpt_jax.convert.tensor_source import DictSource, TensorSource, View
from bmgpt_jax.models.gin import GIN, GinConfig

Path = tuple[Any, ...]
FAMILY = "GraphMVP GIN"


def key_table(config: GinConfig) -> list[tuple[str, Path, bool]]:
    """`(torch key, path in our model, transpose?)` for every tensor of a GIN with `config`, in the
    order of the reference's `state_dict()`."""
    rows = [("x_embedding1.weight", ("x_embedding1", "weight"), False),
            ("x_embedding2.weight", ("x_embedding2", "weight"), False)]
    for i in range(config.num_layers):
        for m in (0, 2):
            rows.append((f"gnns.{i}.mlp.{m}.weight", ("gnns", i, f"mlp_{m}", "kernel"), True))
            rows.append((f"gnns.{i}.mlp.{m}.bias", ("gnns", i, f"mlp_{m}", "bias"), False))
        for e in (1, 2):
            rows.append((f"gnns.{i}.edge_embedding{e}.weight", ("gnns", i, f"edge_embedding{e}", "weight"), False))
    for i in range(config.num_layers):
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            rows.append((f"batch_norms.{i}.{name}", ("batch_norms", i, name), False))
    return rows


def layout(config: GinConfig, prefix: str = "") -> Layout:
    """The PyTorch tensors of a GIN with `config`, in `key_table` order (keys prefixed with `prefix`)."""
    abstract = nnx.eval_shape(lambda: GIN(config, rngs=nnx.Rngs(0)))
    variables = dict(nnx.to_flat_state(nnx.state(abstract)))
    entries = []
    for key, path, transpose in key_table(config):
        var = variables[path]
        shape = tuple(var.shape)
        entries.append(Entry(key=prefix + key, path=path, layer=None, transpose=transpose,
                             shape=tuple(reversed(shape)) if transpose else shape, dtype=np.dtype(var.dtype),
                             save_dtype=np.dtype(np.int64) if key.endswith("num_batches_tracked") else None))
    return Layout(tuple(entries), FAMILY)


def _source(path_or_state_dict: str | os.PathLike | Mapping[str, Any] | TensorSource) -> TensorSource:
    if isinstance(path_or_state_dict, TensorSource):
        return path_or_state_dict
    if isinstance(path_or_state_dict, Mapping):
        return DictSource(path_or_state_dict)
    return open_source(path_or_state_dict)


def view(source: TensorSource, prefix: str = "") -> View:
    """The GIN's tensors in `source`: those under `prefix`, with it removed (none is an error)."""
    v = View(source, prefix)
    if not v.keys():
        raise KeyError(f"{source.name}: no key starts with prefix {prefix!r} (keys: {sorted(source.keys())[:8]} ...)")
    return v


def infer_config(source: TensorSource | Mapping[str, Any], base: GinConfig = GinConfig()) -> GinConfig:
    """`base` with `num_layers` and `emb_dim` read off a (prefix-stripped) GIN checkpoint's keys and shapes."""
    source = _source(source)
    if "x_embedding1.weight" not in source:
        raise KeyError(f"{source.name}: x_embedding1.weight not in the checkpoint (keys: {sorted(source.keys())[:8]} "
                       "...); is a prefix missing, or is it not a GIN?")
    layers = {int(m.group(1)) for k in source.keys() if (m := re.match(r"gnns\.(\d+)\.", k))}
    emb_dim = int(source.shape("x_embedding1.weight")[1])
    return dataclasses.replace(base, num_layers=max(layers) + 1 if layers else 0, emb_dim=emb_dim)


def load(path_or_state_dict: str | os.PathLike | Mapping[str, Any], prefix: str = "",
         config: GinConfig | None = None, mesh=None, skip: nnx.filterlib.Filter = nnx.Nothing) -> GIN:
    """A GIN holding the weights of a `.pth` file or state dict (torch tensors or arrays).

    Only keys starting with `prefix` are read (and the prefix stripped); all of them must be GIN
    tensors and every GIN tensor must be present. `config` defaults to `GinConfig()` with the depth
    and width of the checkpoint. With `mesh`, the variables are replicated global arrays. `skip`:
    variables left abstract, not read (`tensor_map.load`).
    """
    source = _source(path_or_state_dict)
    try:
        sub = view(source, prefix)
        config = config or infer_config(sub)
        return tensor_map.load(lambda: GIN(config, rngs=nnx.Rngs(0)), sub, layout(config), mesh, skip=skip)
    finally:
        if source is not path_or_state_dict:
            source.close()


def load_sharded(path: str | os.PathLike, cfg: GinConfig | None, mesh, prefix: str = "",
                 skip: nnx.filterlib.Filter = nnx.Nothing) -> GIN:
    """The GIN with `cfg` (None: inferred) from a checkpoint file, replicated on `mesh` (the variables
    `skip` selects left abstract)."""
    return load(path, prefix=prefix, config=cfg, mesh=mesh, skip=skip)


def to_state_dict(model: GIN, prefix: str = "") -> dict[str, np.ndarray]:
    """Our GIN -> `{torch key: numpy array}` in the reference layout (`num_batches_tracked` int64)."""
    return tensor_map.state_dict(model, layout(model.config, prefix))


def save(model: GIN, path: str | os.PathLike, prefix: str = "") -> None:
    """Write the reference state dict as a torch `.pth` file (streamed, atomically)."""
    lay = layout(model.config, prefix)
    stream.write(path, "pth", stream.export_specs(lay), stream.exported(ModelSource(model), lay))


def convert(src: str | os.PathLike, dst: str | os.PathLike, prefix: str = "", dtype=None, check: bool = False) -> int:
    """GIN `.pth` (keys under `prefix`) -> GIN `.pth` with the same keys, streaming; the config is read off
    the checkpoint, dtype kept unless `dtype`; `check`: re-read and compare bit for bit."""
    with open_source(src) as raw:
        sub = view(raw, prefix)
        return stream.convert(sub, layout(infer_config(sub)), dst, "pth", dtype=dtype, check=check,
                              rename=lambda k: prefix + k, keep=src)

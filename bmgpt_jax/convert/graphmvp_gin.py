"""GraphMVP / OpenBioMed GIN state dicts (`.pth`) <-> our `GIN`.

The PyTorch keys (`x_embedding1.weight`, `gnns.{i}.mlp.{0,2}.{weight,bias}`,
`gnns.{i}.edge_embedding{1,2}.weight`, `batch_norms.{i}.{weight,bias,running_mean,running_var,
num_batches_tracked}`) map one to one onto our attribute paths (`gnns[i].mlp_0.kernel`, ...); Linear
weights are transposed, everything else is copied as is, so import then export is bit-exact. A
checkpoint of a bigger model (BioMedGPT: `mol_structure_encoder.` ...) is read under `prefix`. Any
missing or extra key, or a shape mismatch, raises naming the key and both shapes.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmgpt_jax.convert.torch_io import read_state_dict, to_numpy
from bmgpt_jax.models.gin import GIN, GinConfig

Path = tuple[Any, ...]


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


def _read(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    if isinstance(path_or_state_dict, Mapping):
        return {k: to_numpy(v) for k, v in path_or_state_dict.items()}
    return read_state_dict(path_or_state_dict)


def infer_config(state_dict: Mapping[str, Any], base: GinConfig = GinConfig()) -> GinConfig:
    """`base` with `num_layers` and `emb_dim` read off a (prefix-stripped) GIN state dict."""
    if "x_embedding1.weight" not in state_dict:
        raise KeyError(f"x_embedding1.weight not in the state dict (keys: {sorted(state_dict)[:8]} ...); "
                       "is a prefix missing?")
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"gnns\.(\d+)\.", k))}
    emb_dim = int(np.shape(state_dict["x_embedding1.weight"])[1])
    return dataclasses.replace(base, num_layers=max(layers) + 1 if layers else 0, emb_dim=emb_dim)


def _node(model: GIN, path: Path) -> nnx.Variable:
    obj = model
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def load(path_or_state_dict: str | os.PathLike | Mapping[str, Any], prefix: str = "",
         config: GinConfig | None = None) -> GIN:
    """A GIN holding the weights of a `.pth` file or state dict (torch tensors or arrays).

    Only keys starting with `prefix` are read (and the prefix stripped); all of them must be GIN
    tensors and every GIN tensor must be present. `config` defaults to `GinConfig()` with the depth
    and width of the checkpoint.
    """
    full = _read(path_or_state_dict)
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if not sd:
        raise KeyError(f"no key starts with prefix {prefix!r} (keys: {sorted(full)[:8]} ...)")
    config = config or infer_config(sd)
    model = GIN(config, rngs=nnx.Rngs(0))
    table = key_table(config)
    expected = {k for k, _, _ in table}
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise KeyError(f"GIN state dict (prefix {prefix!r}) does not match a {config.num_layers}-layer GIN: "
                       f"missing {[prefix + k for k in missing]}, unexpected {[prefix + k for k in extra]}")
    for key, path, transpose in table:
        var = _node(model, path)
        value = sd[key].T if transpose else sd[key]
        want = tuple(var[...].shape)
        if tuple(value.shape) != want:
            shown = f"{tuple(sd[key].shape)} (ours {want}{', transposed' if transpose else ''})"
            raise ValueError(f"{prefix + key}: checkpoint shape {shown} does not fit")
        var[...] = jnp.asarray(value, dtype=var[...].dtype)
    return model


def to_state_dict(model: GIN, prefix: str = "") -> dict[str, np.ndarray]:
    """Our GIN -> `{torch key: numpy array}` in the reference layout (`num_batches_tracked` int64)."""
    out = {}
    for key, path, transpose in key_table(model.config):
        value = np.array(_node(model, path)[...])   # a writable copy
        if key.endswith("num_batches_tracked"):
            value = value.astype(np.int64)
        out[prefix + key] = np.ascontiguousarray(value.T) if transpose else value
    return out


def save(model: GIN, path: str | os.PathLike, prefix: str = "") -> None:
    """Write `to_state_dict(model)` as a torch `.pth` file loadable by the reference model."""
    import torch
    torch.save({k: torch.from_numpy(v) for k, v in to_state_dict(model, prefix).items()}, os.fspath(path))

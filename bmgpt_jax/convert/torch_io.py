"""Reading/writing PyTorch-style state dicts and mapping them onto NNX parameters by name.

Our parameter paths follow the PyTorch names, so the mapping is mechanical: join the path with dots,
call the Linear leaf `kernel` `weight` (transposed), and for scanned (stacked) layers insert the layer
index after the stacking attribute. Everything is checked: a missing, extra or mis-shaped tensor
raises naming the key and both shapes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def to_numpy(t) -> np.ndarray:
    """A torch tensor (any dtype, bfloat16 included) or array -> numpy (bfloat16 kept via ml_dtypes)."""
    if hasattr(t, "detach"):
        import torch
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(jnp.bfloat16)
        return t.numpy()
    return np.asarray(t)


def to_torch(a: np.ndarray):
    """numpy (bfloat16 included) -> a contiguous torch tensor."""
    import torch
    a = np.array(a, order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors from a safetensors file, a `.bin`/`.pt`/`.pth` torch file, or a Hugging Face folder
    (single or sharded safetensors, else `pytorch_model*.bin`)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"{p}: no model.safetensors (single or sharded) or pytorch_model*.bin found")
        out: dict[str, np.ndarray] = {}
        for f in files:
            out.update(read_state_dict(f))
        return out
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            return dict(load_file(str(p)))
        except (TypeError, ValueError):  # bfloat16 needs torch's loader
            from safetensors.torch import load_file as load_torch
            return {k: to_numpy(v) for k, v in load_torch(str(p)).items()}
    import torch
    sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    return {k: to_numpy(v) for k, v in sd.items()}


def write_safetensors(tensors: Mapping[str, np.ndarray], out_dir: str | os.PathLike,
                      max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `tensors` as HF safetensors: one `model.safetensors`, or shards plus an index json."""
    from safetensors.numpy import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, v in tensors.items():
        v = np.array(v, order="C")
        if size and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SAFE_NAME), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))}, "weight_map": weight_map}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2))


def torch_name(path: tuple, stack_at: str | None = None, layer: int | None = None) -> str:
    """Our path tuple -> PyTorch key. `stack_at` names the attribute holding scanned layers, whose
    index `layer` is inserted after it. `kernel` becomes `weight`."""
    parts = [str(p) for p in path]
    if stack_at is not None and layer is not None:
        i = parts.index(stack_at)
        parts.insert(i + 1, str(layer))
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def _is_stacked(path: tuple, stack_at: str | None) -> bool:
    return stack_at is not None and stack_at in path and not any(isinstance(p, int) for p in path)


def merged_params(model: nnx.Module) -> list[tuple[tuple, np.ndarray]]:
    """`(path, array)` for every `nnx.Param`, with LoRA updates folded into their Linear kernels (the
    `lora_a`/`lora_b` leaves dropped), i.e. the weights a plain PyTorch model holds."""
    from bmgpt_jax.models.layers import Linear
    flat = {path: var[...] for path, var in nnx.state(model, nnx.Param).flat_state()}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear) and module.lora_a is not None:
            flat[tuple(path) + ("kernel",)] = module.merged_kernel()
            del flat[tuple(path) + ("lora_a",)], flat[tuple(path) + ("lora_b",)]
    return [(p, np.asarray(jax.device_get(v))) for p, v in flat.items()]


def export_params(model: nnx.Module, stack_at: str | None = None,
                  rename: Callable[[str], str] = lambda k: k) -> dict[str, np.ndarray]:
    """Every `nnx.Param` of `model` as a PyTorch-named numpy array (Linear kernels transposed, LoRA merged)."""
    out: dict[str, np.ndarray] = {}
    for path, arr in merged_params(model):
        kernel = path[-1] == "kernel"
        if _is_stacked(path, stack_at):
            for i in range(arr.shape[0]):
                out[rename(torch_name(path, stack_at, i))] = arr[i].T if kernel else arr[i]
        else:
            out[rename(torch_name(path))] = arr.T if kernel else arr
    return out


def import_params(model: nnx.Module, tensors: Mapping[str, np.ndarray], stack_at: str | None = None,
                  rename: Callable[[str], str] = lambda k: k, ignore: Iterable[str] = (),
                  source: str = "checkpoint", skip: Callable[[tuple], bool] = lambda path: False) -> None:
    """Fill every `nnx.Param` of `model` (abstract or concrete) from PyTorch-named `tensors`, in place.

    `rename` maps our torch-style name to the key used in `tensors`; keys matching a substring in
    `ignore` may be left unused. Raises KeyError on missing/unused keys, ValueError on shape mismatch.
    """
    state = nnx.state(model, nnx.Param)
    used: set[str] = set()
    flat = []
    for path, var in state.flat_state():
        if skip(path):
            continue
        kernel = path[-1] == "kernel"
        stacked = _is_stacked(path, stack_at)
        want = tuple(var.shape)
        names = ([rename(torch_name(path, stack_at, i)) for i in range(want[0])] if stacked
                 else [rename(torch_name(path))])
        layer_shape = want[1:] if stacked else want
        torch_shape = tuple(reversed(layer_shape)) if kernel else layer_shape
        arrays = []
        for name in names:
            if name not in tensors:
                raise KeyError(f"{source}: missing tensor {name!r} (for parameter {'/'.join(map(str, path))})")
            a = np.asarray(tensors[name])
            if a.shape != torch_shape:
                raise ValueError(f"{source}: tensor {name!r} has shape {a.shape} but the model expects "
                                 f"{torch_shape} (parameter {'/'.join(map(str, path))})")
            arrays.append(a.T if kernel else a)
            used.add(name)
        value = np.stack(arrays) if stacked else arrays[0]
        flat.append((path, var.replace(jnp.asarray(value, dtype=var.dtype))))
    unused = [k for k in tensors if k not in used and not any(s in k for s in ignore)]
    if unused:
        raise KeyError(f"{source}: unexpected tensors not used by the model: {sorted(unused)[:10]}"
                       f"{' ...' if len(unused) > 10 else ''}")
    nnx.update(model, nnx.State.from_flat_path(flat))

"""PyTorch `.pth` / `.bin` state dicts read lazily and written one tensor at a time (torch needed here only).

`TorchFile` opens a file with `torch.load(mmap=True, weights_only=True)`: nothing is read until a tensor
is asked for, and `read` copies just the requested slice out of the memory map, then tells the kernel
to drop the pages it touched (`madvise(MADV_DONTNEED)`), so the process's resident memory stays at about
one tensor however large the file (a checkpoint in the legacy non-zip format cannot be mapped and is
read whole, with a warning). A training checkpoint's dict is unwrapped: the state dict under
`state_dict`, `model_state_dict`, `model` or `module` (whichever one holds only tensors; its other
entries, e.g. the optimizer's, are named in the log), and a `module.` prefix on every key (a
`DistributedDataParallel` model's) is removed, with a log line each.

`TorchWriter` writes the zip format `torch.save` writes, streaming: the pickle of the whole dict
(tensors as references to storages, built from shapes and dtypes alone) goes first, then each tensor's
bytes as its own record as it arrives, through torch's own zip writer. The result loads with
`torch.load(..., weights_only=True)`; OpenBioMed's `BioMedGPTV.load_state_dict` takes our BioMedGPT
`.pth` strictly (what it holds besides our model's tensors: `convert.openbiomed`'s docstring).
"""
from __future__ import annotations

import collections
import ctypes
import io
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from bmgpt_jax.convert.tensor_source import Index, TensorSource, normalize_index, to_numpy

log = logging.getLogger(__name__)
__all__ = ["TorchFile", "TorchWriter", "to_numpy", "to_torch"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4
_CHUNK = 64 * 2**20
WRAPPERS = ("state_dict", "model_state_dict", "model", "module")   # where trainers put the state dict
DDP_PREFIX = "module."


def to_torch(a: np.ndarray):
    """numpy (bfloat16 included) -> a contiguous torch tensor."""
    import ml_dtypes
    import torch
    a = np.array(a, order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _release(tensor) -> None:
    """Drop the memory-mapped pages under `tensor` (a view: the span from its first to its last element)
    from this process; they are re-read from the file if touched again."""
    if not tensor.numel():
        return
    span = (sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride())) + 1) * tensor.element_size()
    ptr = tensor.data_ptr()
    start = ptr // _PAGE * _PAGE
    end = -(-(ptr + span) // _PAGE) * _PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTNEED))
    except (OSError, AttributeError):   # no madvise on this platform: pages stay until the kernel reclaims them
        pass


def _tensors_only(d) -> bool:
    import torch
    return isinstance(d, Mapping) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _unwrap(sd: Mapping, path: Path) -> Mapping:
    """The state dict in a loaded torch file: `sd` itself when it holds only tensors, else the one
    `WRAPPERS` entry that does (several: an error naming them); then without a `module.` prefix every
    key has. What is unwrapped or stripped is logged, with the entries left aside."""
    if not _tensors_only(sd):
        inner = [k for k in WRAPPERS if _tensors_only(sd.get(k))]
        if len(inner) > 1:
            raise ValueError(f"{path}: several state dicts ({inner}): cannot tell which holds the weights")
        if inner:
            rest = [str(k) for k in sd if k != inner[0]]
            log.info("%s: read the state dict under %r%s", path, inner[0],
                     f"; left aside {len(rest)} other entries: {', '.join(rest[:10])}" if rest else "")
            sd = sd[inner[0]]
    if sd and all(isinstance(k, str) and k.startswith(DDP_PREFIX) for k in sd):
        log.info("%s: removed the %r prefix every key has (a DistributedDataParallel model's)", path, DDP_PREFIX)
        sd = {k[len(DDP_PREFIX):]: v for k, v in sd.items()}
    return sd


class TorchFile(TensorSource):
    """A torch `.pth`/`.bin`/`.pt` state dict as a lazy `TensorSource`."""

    def __init__(self, path: str | os.PathLike):
        import torch
        self.path = Path(path)
        self.name = str(self.path)
        self._mapped = True
        try:
            sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise ValueError(f"{self.path}: cannot read as a PyTorch checkpoint: {e}") from None
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as e2:
                raise ValueError(f"{self.path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): "
                                 f"{str(e2).splitlines()[0]}") from None
            log.warning("%s: legacy (non-zip) torch format, read whole into memory; re-save it with torch>=1.6 "
                        "to stream it", self.path)
            self._mapped = False
        except (pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
            raise ValueError(f"{self.path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): "
                             f"{str(e).splitlines()[0]}") from None
        if not isinstance(sd, Mapping):
            raise ValueError(f"{self.path}: holds a {type(sd).__name__}, not a state dict of tensors")
        sd = _unwrap(sd, self.path)
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{self.path}: entries that are not tensors: {bad[:5]}")
        self._tensors = dict(sd)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> np.dtype:
        import torch
        t = self._tensors[key]
        return to_numpy(torch.empty(0, dtype=t.dtype)).dtype

    def read(self, key: str, index: Index = None) -> np.ndarray:
        """The slice, copied out of the memory map 64 MiB of rows at a time, each block's pages released
        as soon as it is copied (so the copy is the only full-size buffer)."""
        t = self._tensors[key]
        idx = normalize_index(index, tuple(t.shape), f"{self.path}:{key}")
        part = t[idx] if all(s.step > 0 for s in idx) else t          # torch slices have no negative steps
        if part.ndim == 0 or part.numel() * part.element_size() <= _CHUNK:
            out = np.array(to_numpy(part))
            if self._mapped:
                _release(part)
        else:
            out = np.empty(tuple(part.shape), self.dtype(key))
            step = max(1, _CHUNK // (part[0].numel() * part.element_size()))
            for lo in range(0, part.shape[0], step):
                out[lo:lo + step] = to_numpy(part[lo:lo + step])
                if self._mapped:
                    _release(part[lo:lo + step])
        return np.array(out[idx]) if part is t and idx else out

    def close(self) -> None:
        self._tensors = {}


def _storage_type(dtype: np.dtype):
    """The legacy storage class torch pickles for `dtype` (e.g. `torch.BFloat16Storage`)."""
    import torch
    from torch.storage import _dtype_to_storage_type_map
    return getattr(torch, _dtype_to_storage_type_map()[to_torch(np.zeros(0, dtype)).dtype])


class _Storage:
    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as `torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())`."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        import torch
        stride = tuple(int(np.prod(self.shape[i + 1:], dtype=np.int64)) for i in range(len(self.shape)))
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _storage_type(obj.dtype), obj.key, "cpu", obj.numel)
        return None


class TorchWriter:
    """Streaming writer of a flat `{key: tensor}` `.pth` file (the format of `torch.save`).

        w = TorchWriter(path, [(key, shape, dtype), ...])
        for key, array in tensors:   # any order, each key once
            w.write(key, array)
        w.close()                    # raises if a planned key was never written
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[tuple[str, tuple, np.dtype]]):
        import torch
        from torch.serialization import _open_zipfile_writer
        self.path = Path(path)
        self._plan: dict[str, tuple[str, tuple, np.dtype]] = {}
        obj = collections.OrderedDict()
        for i, (key, shape, dtype) in enumerate(specs):
            shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
            if key in obj:
                raise ValueError(f"{self.path}: tensor {key!r} planned twice")
            obj[key] = _Tensor(_Storage(str(i), dtype, int(np.prod(shape, dtype=np.int64))), shape)
            self._plan[key] = (str(i), shape, dtype)
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        self._opener = _open_zipfile_writer(str(self.path))
        self._zip = self._opener.__enter__()
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        alignment = str(torch.serialization._get_storage_alignment())
        self._zip.write_record(".storage_alignment", alignment, len(alignment))
        self._zip.write_record("byteorder", "little", len("little"))
        self._written: set[str] = set()

    def write(self, key: str, array: np.ndarray) -> None:
        """Append `array` (exactly the planned shape and dtype) as the record of `key`."""
        if key not in self._plan:
            raise KeyError(f"{self.path}: tensor {key!r} was not planned")
        if key in self._written:
            raise KeyError(f"{self.path}: tensor {key!r} written twice")
        record, shape, dtype = self._plan[key]
        array = np.asarray(array, order="C")
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"{self.path}: tensor {key!r} is {array.dtype}{list(array.shape)} but was planned "
                             f"as {dtype}{list(shape)}")
        raw = array.reshape(-1).view(np.uint8)
        data = b""
        if raw.size:  # a storage over the array's own memory (no copy); raw pointers are deprecated in torch
            import torch
            with warnings.catch_warnings():  # a read-only array is fine: the writer only reads it
                warnings.simplefilter("ignore", UserWarning)
                data = torch.from_numpy(raw).untyped_storage()
        self._zip.write_record(f"data/{record}", data, raw.size)
        self._written.add(key)

    def close(self) -> None:
        """Finish the zip; raise if a planned tensor was never written."""
        missing = [k for k in self._plan if k not in self._written]
        self._opener.__exit__(None, None, None)
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} planned tensors were never written, e.g. {missing[:5]}")

"""Named tensors read lazily: the one interface every checkpoint reader offers, and its combinators.

A `TensorSource` lists its keys with their shapes and dtypes without reading any data, and
`read(key, index)` returns only the requested slice as a numpy array (bfloat16 via ml_dtypes, no torch).
`index` is a tuple of slices in the tensor's own layout (what `jax.make_array_from_callback` hands a
callback); `None` reads the whole tensor. So a converter or a sharded loader holds one tensor (or one
device's slice of it) at a time, whatever the size of the checkpoint.

Implementations: `safetensors_io.SafetensorsFile`, `torch_io.TorchFile`, `orbax_io.OrbaxSource`, and
here `DictSource` (tensors already in memory), `Renamed` (some keys under new names), `View` (the keys
under a prefix, renamed), `Union` (several sources as one, e.g. the shards named by an index file) and
`GrownRows` (tensors given more leading rows than stored, read as zeros: a vocabulary grown by added tokens).
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Index = tuple[slice, ...] | None


def to_numpy(t) -> np.ndarray:
    """A torch tensor (any dtype, bfloat16 included) or array-like -> numpy (bfloat16 via ml_dtypes)."""
    if hasattr(t, "detach"):
        import ml_dtypes
        import torch
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)


class TensorSource(abc.ABC):
    """Base class: `keys`, `shape`, `dtype`, `read` and `file_of` (the file to name in an error)."""

    name: str = "checkpoint"

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Every tensor name, without reading data."""

    @abc.abstractmethod
    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, without reading data."""

    @abc.abstractmethod
    def dtype(self, key: str) -> np.dtype:
        """The tensor's numpy dtype, without reading data."""

    @abc.abstractmethod
    def read(self, key: str, index: Index = None) -> np.ndarray:
        """The slice `index` of the tensor (all of it for None), as a numpy array that owns its memory."""

    def file_of(self, key: str) -> str:
        """The file (or folder) that holds `key`, for error messages."""
        return self.name

    def close(self) -> None:
        """Release open files (a no-op for in-memory sources)."""

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shape(key), dtype=np.int64)) * np.dtype(self.dtype(key)).itemsize

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def normalize_index(index: Index, shape: tuple[int, ...], where: str) -> tuple[slice, ...]:
    """`index` as one `slice(start, stop, step)` per dimension with concrete bounds."""
    if index is None:
        index = ()
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise IndexError(f"{where}: index {index} has more dimensions than the shape {shape}")
    out = []
    for dim, s in zip(shape, tuple(index) + (slice(None),) * (len(shape) - len(index))):
        if not isinstance(s, slice):
            raise TypeError(f"{where}: only slices are supported in an index, got {s!r}")
        out.append(slice(*s.indices(dim)))
    return tuple(out)


class DictSource(TensorSource):
    """Tensors already in memory (numpy arrays or torch tensors), e.g. a `state_dict()`."""

    def __init__(self, tensors: Mapping[str, Any], name: str = "state dict"):
        self._tensors = {k: to_numpy(v) for k, v in tensors.items()}
        self.name = name

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return self._tensors[key].dtype

    def read(self, key: str, index: Index = None) -> np.ndarray:
        a = self._tensors[key]
        return np.array(a if index is None else a[normalize_index(index, a.shape, key)])


class Renamed(TensorSource):
    """The tensors of `source` named in `names` (new name -> key in `source`), under their new names."""

    def __init__(self, source: TensorSource, names: Mapping[str, str]):
        self.source, self._back = source, dict(names)
        self.name = source.name

    def keys(self) -> list[str]:
        return list(self._back)

    def __contains__(self, key: str) -> bool:
        return key in self._back

    def original(self, key: str) -> str:
        """The key in the underlying source."""
        return self._back[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(self._back[key])

    def dtype(self, key: str) -> np.dtype:
        return self.source.dtype(self._back[key])

    def read(self, key: str, index: Index = None) -> np.ndarray:
        return self.source.read(self._back[key], index)

    def file_of(self, key: str) -> str:
        return self.source.file_of(self._back.get(key, key))

    def close(self) -> None:
        self.source.close()


class View(Renamed):
    """The keys of `source` that start with `prefix`, with the prefix removed and `rename` applied.

    Two source keys that rename to the same key are an error (e.g. both `LayerNorm.gamma` and
    `LayerNorm.weight`): the checkpoint would be ambiguous.
    """

    def __init__(self, source: TensorSource, prefix: str = "", rename: Callable[[str], str] = lambda k: k):
        back: dict[str, str] = {}
        for k in source.keys():
            if k.startswith(prefix):
                new = rename(k[len(prefix):])
                if new in back:
                    raise KeyError(f"{source.file_of(k)}: both {back[new]!r} and {k!r} stand for {new!r}")
                back[new] = k
        super().__init__(source, back)
        self.prefix = prefix


class Union(TensorSource):
    """Several sources as one; `owner` maps each key to the source that holds it (a key held by two
    sources is an error naming both files)."""

    def __init__(self, sources: Iterable[TensorSource], name: str):
        self.sources = list(sources)
        self.name = name
        self._owner: dict[str, TensorSource] = {}
        for s in self.sources:
            for k in s.keys():
                if k in self._owner:
                    raise KeyError(f"{name}: tensor {k!r} is in both {self._owner[k].file_of(k)} and {s.file_of(k)}")
                self._owner[k] = s

    def keys(self) -> list[str]:
        return list(self._owner)

    def __contains__(self, key: str) -> bool:
        return key in self._owner

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._owner[key].dtype(key)

    def read(self, key: str, index: Index = None) -> np.ndarray:
        return self._owner[key].read(key, index)

    def file_of(self, key: str) -> str:
        return self._owner[key].file_of(key) if key in self._owner else self.name

    def close(self) -> None:
        for s in self.sources:
            s.close()


class GrownRows(TensorSource):
    """`source` with the tensors named in `rows` (key -> new length of the first dimension) longer than
    stored: the rows past the stored ones read as zeros, of the stored dtype. A read touches the stored
    tensor only for the rows it asks for that are stored, so sharded loading still reads each device's
    slice alone. A key the source lacks or stores with as many rows or more is left as stored (the
    layout check then names its shape)."""

    def __init__(self, source: TensorSource, rows: Mapping[str, int]):
        self.source, self.name = source, source.name
        self.rows = {k: int(n) for k, n in rows.items() if k in source and source.shape(k)[0] < n}

    def keys(self) -> list[str]:
        return self.source.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.source

    def shape(self, key: str) -> tuple[int, ...]:
        shape = tuple(self.source.shape(key))
        return (self.rows[key],) + shape[1:] if key in self.rows else shape

    def dtype(self, key: str) -> np.dtype:
        return self.source.dtype(key)

    def stored_rows(self, key: str) -> int:
        """The rows `key` has in the underlying source."""
        return int(self.source.shape(key)[0])

    def read(self, key: str, index: Index = None) -> np.ndarray:
        if key not in self.rows:
            return self.source.read(key, index)
        idx = normalize_index(index, self.shape(key), key)
        first, stored = idx[0], self.stored_rows(key)
        if first.step < 1:
            raise IndexError(f"{key}: a grown tensor is read with increasing rows, not {first}")
        want = len(range(first.start, first.stop, first.step))
        inside = slice(first.start, min(first.stop, stored), first.step)
        have = len(range(inside.start, inside.stop, inside.step)) if first.start < stored else 0
        rest = tuple(len(range(s.start, s.stop, s.step)) for s in idx[1:])
        out = np.zeros((want,) + rest, self.dtype(key))
        if have:
            out[:have] = self.source.read(key, (inside,) + idx[1:])
        return out

    def file_of(self, key: str) -> str:
        return self.source.file_of(key)

    def close(self) -> None:
        self.source.close()

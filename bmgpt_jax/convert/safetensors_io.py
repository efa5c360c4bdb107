"""The safetensors format read and written one tensor (or one slice) at a time, bfloat16 without torch.

A file is `[u64 little-endian header length N][N bytes of JSON header][data]`; the header maps each name
to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets into the data, row-major, no gaps).
`SafetensorsFile` parses the header once and serves `read(key, index)` with positioned reads of only
the rows of the first dimension the slice touches (`os.preadv`: no memory map, so the process's
resident memory is the slice it asked for, not the pages it touched). `SafetensorsWriter` plans the
shards and every tensor's offset up front from `(key, shape, dtype)` specs, writes each header first,
then each tensor at its offset as it arrives, in any order: one tensor in memory at a time. Sharded
output follows Hugging Face (`model-00001-of-00003.safetensors` + `model.safetensors.index.json`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from bmgpt_jax.convert.tensor_source import Index, TensorSource, normalize_index

SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"      # (shard i of n, from 1)
SHARD_RE = re.compile(r"model-\d{5,}-of-\d{5,}\.safetensors")
MAX_HEADER = 100 * 2**20

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
          "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def dtype_code(dtype) -> str:
    """numpy dtype -> safetensors dtype code (`F32`, `BF16`, ...)."""
    try:
        return CODES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no safetensors code (known: {sorted(CODES.values())})")


class SafetensorsFile(TensorSource):
    """One `.safetensors` file as a lazy `TensorSource`. A truncated file, a corrupt header or an
    unknown dtype raises ValueError naming the file (and the tensor) at open time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(self.path)
        size = self.path.stat().st_size
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._entries, self.metadata, self._data_start = self._parse(size)
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int):
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise ValueError(f"{self.path}: not a safetensors file ({size} bytes, shorter than the 8-byte header "
                             "length)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise ValueError(f"{self.path}: not a safetensors file or truncated (header length {n} in a file of "
                             f"{size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        data_start, data_size = 8 + n, size - 8 - n
        entries = {}
        for key, info in header.items():
            try:
                dtype = np.dtype(DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{self.path}: corrupt header entry for tensor {key!r}: {info!r} ({e!r})") from None
            want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != want or begin < 0:
                raise ValueError(f"{self.path}: tensor {key!r} {info['dtype']}{list(shape)} needs {want} bytes but "
                                 f"its data offsets are [{begin}, {end})")
            if end > data_size:
                raise ValueError(f"{self.path}: truncated: tensor {key!r} ends at byte {data_start + end} but the "
                                 f"file has {size} bytes")
            entries[key] = (dtype, shape, begin)
        return entries, metadata, data_start

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def read(self, key: str, index: Index = None) -> np.ndarray:
        dtype, shape, begin = self._entries[key]
        idx = normalize_index(index, shape, f"{self.path}:{key}")
        if not shape:
            return self._pread(begin, dtype.itemsize).view(dtype).reshape(())
        rows_wanted = range(idx[0].start, idx[0].stop, idx[0].step)
        lo = min(rows_wanted[0], rows_wanted[-1]) if rows_wanted else 0
        hi = max(rows_wanted[0], rows_wanted[-1]) + 1 if rows_wanted else 0
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        rows = self._pread(begin + lo * row, (hi - lo) * row).view(dtype).reshape((hi - lo,) + shape[1:])
        if idx[0].step != 1:
            rows = rows[np.arange(len(rows_wanted)) * idx[0].step + (rows_wanted[0] - lo if rows_wanted else 0)]
        out = rows[(slice(None),) + idx[1:]]
        return np.ascontiguousarray(out) if out.size < rows.size else out

    def _pread(self, offset: int, count: int) -> np.ndarray:
        buf = np.empty(count, np.uint8)
        view, done = memoryview(buf), 0
        while done < count:
            got = os.preadv(self._fd, [view[done:]], self._data_start + offset + done)
            if got <= 0:
                raise ValueError(f"{self.path}: truncated: read {done} of {count} bytes at offset {offset}")
            done += got
        return buf

    def file_of(self, key: str) -> str:
        return self.name

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            self.close()


class SafetensorsWriter:
    """Streaming writer of Hugging Face safetensors into an (empty or temporary) folder.

        w = SafetensorsWriter(out_dir, [(key, shape, dtype), ...], max_shard_bytes=5 * 2**30)
        for key, array in tensors:  # any order, each key once
            w.write(key, array)
        w.close()                   # checks every key was written; writes the index when sharded

    One shard is `model.safetensors`; more are `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json` (`{"metadata": {"total_size"}, "weight_map"}`), as transformers expects.
    """

    def __init__(self, out_dir: str | os.PathLike, specs: Iterable[tuple[str, tuple, np.dtype]],
                 max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, tuple, np.dtype, int]]] = [[]]
        size = 0
        for key, shape, dtype in specs:
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, tuple(int(d) for d in shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.files = [SAFE_NAME] if n == 1 else [SHARD_NAME.format(i + 1, n) for i in range(n)]
        self._plan: dict[str, tuple[int, int, tuple, np.dtype]] = {}   # key -> (fd, offset, shape, dtype)
        self._fds: list[int] = []
        self.total_size = 0
        for name, shard in zip(self.files, shards):
            header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
            offset = 0
            for key, shape, dtype, nbytes in shard:
                if key in self._plan or key in header:
                    raise ValueError(f"{self.out}: tensor {key!r} planned twice")
                header[key] = {"dtype": dtype_code(dtype), "shape": list(shape),
                               "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(self.out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            _pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, 8 + len(raw) + offset)
            for key, shape, dtype, _ in shard:
                self._plan[key] = (fd, 8 + len(raw) + header[key]["data_offsets"][0], shape, dtype)
            self.total_size += offset
        self.weight_map = {key: name for name, shard in zip(self.files, shards) for key, *_ in shard}
        self._written: set[str] = set()

    def write(self, key: str, array: np.ndarray) -> None:
        """Write `array` (exactly the planned shape and dtype) at its place."""
        if key not in self._plan:
            raise KeyError(f"{self.out}: tensor {key!r} was not planned")
        if key in self._written:
            raise KeyError(f"{self.out}: tensor {key!r} written twice")
        fd, offset, shape, dtype = self._plan[key]
        array = np.asarray(array)
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"{self.out}: tensor {key!r} is {array.dtype}{list(array.shape)} but was planned as "
                             f"{dtype}{list(shape)}")
        if array.size:
            _pwrite(fd, np.ascontiguousarray(array).reshape(-1).view(np.uint8), offset)
        self._written.add(key)

    def close(self) -> list[str]:
        """Close the files; raise if a planned tensor was never written. Returns the file names."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        missing = [k for k in self._plan if k not in self._written]
        if missing:
            raise ValueError(f"{self.out}: {len(missing)} planned tensors were never written, e.g. {missing[:5]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.out / SAFE_INDEX).write_text(json.dumps(index, indent=2))
        return self.files + ([SAFE_INDEX] if len(self.files) > 1 else [])


def _pwrite(fd: int, data, offset: int) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_tensors(tensors: Mapping[str, np.ndarray], out_dir: str | os.PathLike,
                  max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write in-memory `tensors` as HF safetensors into `out_dir` (a convenience over `SafetensorsWriter`)."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    w = SafetensorsWriter(out_dir, [(k, a.shape, a.dtype) for k, a in arrays.items()], max_shard_bytes)
    for k, a in arrays.items():
        w.write(k, a)
    return w.close()

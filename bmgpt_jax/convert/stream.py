"""Streaming conversion: tensors from a lazy source (or from our variables) to a writer, one at a time,
into a temporary folder or file renamed at the end, and the bit-exact streaming check of the result.

Formats: `"safetensors"` (a folder: HF sharded safetensors with an index past `max_shard_bytes`) and
`"pth"` (one torch file, torch needed). A failed or interrupted run leaves only a hidden
`.NAME.tmp-PID` beside the target (removed on a Python error), never something at the target path
that looks like a valid checkpoint; an existing target is replaced only once the new one is complete,
and only if replacing it deletes nothing but an earlier output of ours (`check_destination`, before any
tensor is read): never the source or a folder holding it, never a folder holding anything else.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import jax.numpy as jnp
import numpy as np

from bmgpt_jax.convert.outputs import ours
from bmgpt_jax.convert.safetensors_io import SafetensorsWriter
from bmgpt_jax.convert.sources import open_source
from bmgpt_jax.convert.tensor_map import Layout, check as check_layout, iter_tensors, unused
from bmgpt_jax.convert.tensor_source import Renamed, TensorSource

Format = Literal["safetensors", "pth"]
Specs = list[tuple[str, tuple, np.dtype]]
SHARD_BYTES = 5 * 2**30
Keep = str | os.PathLike | Iterable[str | os.PathLike]    # the paths a write must not replace (its source)


def _tmp_name(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def _paths(keep: Keep) -> list[Path]:
    return [Path(keep)] if isinstance(keep, (str, os.PathLike)) else [Path(p) for p in keep]


def check_destination(final: str | os.PathLike, kind: Literal["dir", "file"], keep: Keep = ()) -> None:
    """Refuse (ValueError naming `final` and what would go) a destination whose replacement would delete
    what is not ours to delete: a path in `keep` (the source a conversion reads) or a folder holding it;
    for a folder, an existing one holding a subfolder or a file no writer of ours produces (`ours`), or
    a file; for a file, an existing folder. Called before any tensor is read, and again before the rename."""
    final = Path(final)
    target = final.resolve()
    for k in _paths(keep):
        src = k.resolve()
        if src == target or (kind == "dir" and target in src.parents):
            raise ValueError(f"refusing to write {final}: it {'is' if src == target else 'holds'} the source {k}, "
                             "which replacing it would delete; write somewhere else")
    if kind == "file":
        if final.is_dir():
            raise ValueError(f"refusing to write the file {final}: it is an existing folder; name a file in it "
                             "or elsewhere")
        return
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise ValueError(f"refusing to replace {final} with a folder: it is a "
                         f"{'symbolic link' if final.is_symlink() else 'file'}; name a new or empty folder")
    if final.is_dir():
        foreign = sorted(p.name + "/" if p.is_dir() else p.name for p in final.iterdir()
                         if p.is_dir() or not ours(p.name))
        if foreign:
            raise ValueError(f"refusing to replace {final}: it holds {len(foreign)} entr"
                             f"{'y' if len(foreign) == 1 else 'ies'} that no bmgpt_jax writer produces "
                             f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}), which replacing "
                             "the folder would delete; name a new or empty folder, or move them out")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, keep: Keep = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final`, on error it is
    removed. `final` is checked first (`check_destination`: not the source in `keep`, nothing but an
    earlier output of ours to replace), so a refused run writes nothing."""
    final = Path(final)
    check_destination(final, "dir", keep)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    try:
        yield tmp
        check_destination(final, "dir", keep)      # (nothing of someone else's was put there meanwhile)
        if final.exists():
            final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            if old.exists():
                old.rename(final)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, keep: Keep = ()) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it replaces `final`, on error (the rename's
    included) it is removed. `final` is checked first: not an existing folder, not the source in `keep`."""
    final = Path(final)
    check_destination(final, "file", keep)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cast(a: np.ndarray, dtype) -> np.ndarray:
    """`a` in `dtype` if it is floating and `dtype` is given (integer tensors, e.g. counters, keep theirs)."""
    return a.astype(dtype) if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating) else a


def out_dtype(source_dtype, dtype) -> np.dtype:
    floating = dtype is not None and jnp.issubdtype(source_dtype, jnp.floating)
    return np.dtype(dtype) if floating else np.dtype(source_dtype)


def write_into(target: Path, fmt: Format, specs: Specs, tensors: Iterable[tuple[str, np.ndarray]],
               max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write `tensors` (each key of `specs` once, any order) into the folder (safetensors) or file (pth)
    `target`, not atomically: for use inside `atomic_dir`/`atomic_file`."""
    if fmt == "safetensors":
        writer = SafetensorsWriter(target, specs, max_shard_bytes)
    else:
        from bmgpt_jax.convert.torch_io import TorchWriter
        writer = TorchWriter(target, specs)
    for key, a in tensors:
        writer.write(key, a)
        del a                   # before the next tensor is read: one in memory at a time
    writer.close()


def write(dst: str | os.PathLike, fmt: Format, specs: Specs, tensors: Iterable[tuple[str, np.ndarray]],
          extra_files: Callable[[Path], None] | None = None, max_shard_bytes: int = SHARD_BYTES,
          keep: Keep = ()) -> Path:
    """`write_into` a temporary folder/file renamed to `dst` at the end; `extra_files(folder)` adds
    configs etc. to a safetensors folder once the weights are complete. `keep`: the source's path(s),
    which `dst` must neither be nor hold (`check_destination`)."""
    if fmt == "safetensors":
        with atomic_dir(dst, keep) as tmp:
            write_into(tmp, fmt, specs, tensors, max_shard_bytes)
            if extra_files is not None:
                extra_files(tmp)
    else:
        with atomic_file(dst, keep) as tmp:
            write_into(tmp, fmt, specs, tensors)
    return Path(dst)


def source_files(source: TensorSource) -> set[str]:
    """The files `source` reads its tensors from (those that exist: a `DictSource`'s name is no file)."""
    return {f for f in {source.file_of(k) for k in source.keys()} if Path(f).exists()}


def specs_of(source: TensorSource, dtype=None) -> Specs:
    """`(key, shape, dtype)` of every tensor of `source` as `tensors_of` yields them."""
    return [(k, tuple(source.shape(k)), out_dtype(source.dtype(k), dtype)) for k in source.keys()]


def tensors_of(source: TensorSource, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """`(key, tensor)` of every tensor of `source`, one at a time, floating ones cast to `dtype` if given."""
    for k in source.keys():
        yield k, cast(source.read(k), dtype)


def convert(source: TensorSource, layout: Layout, dst: str | os.PathLike, fmt: Format, *, dtype=None,
            check: bool = False, rename: Callable[[str], str] = lambda k: k,
            extra_files: Callable[[Path], None] | None = None, max_shard_bytes: int = SHARD_BYTES,
            keep: Keep = (), carry: bool = False, extras: TensorSource | None = None) -> int:
    """Copy `layout`'s tensors from `source` (checked first: keys, shapes, dtype kinds) to `dst` under
    `rename(key)`, one at a time, dtype kept unless `dtype` (floating tensors only). `carry`: also copy
    the tensors of `source` the layout does not use (its `ignored` ones), under their own names, after
    the layout's; `extras`: more tensors written last, under their keys. `dst` may neither be nor hold
    the source's files nor `keep` (the source path as given). `check`: re-read `dst` and compare with
    what was written bit for bit, streaming. Returns the number of tensors."""
    keep = _paths(keep) + sorted(Path(f) for f in source_files(source))
    check_destination(dst, "dir" if fmt == "safetensors" else "file", keep)
    check_layout(source, layout, "carried over" if carry else "ignored")
    parts = [Renamed(source, {rename(e.key): e.key for e in layout.entries})]
    parts += [Renamed(source, {k: k for k in unused(source, layout)})] if carry else []
    parts += [extras] if extras is not None else []
    specs = [spec for part in parts for spec in specs_of(part, dtype)]

    def tensors():
        for part in parts:
            yield from tensors_of(part, dtype)
    write(dst, fmt, specs, tensors(), extra_files, max_shard_bytes, keep)
    if check:
        with open_source(dst) as out:
            verify(out, tensors())
    return len(specs)


def export_specs(layout: Layout) -> Specs:
    """`(key, shape, dtype)` of `layout`'s tensors as exported from our variables."""
    return [(e.key, e.shape, np.dtype(e.save_dtype or e.dtype)) for e in layout.entries]


def exported(reader: TensorSource, layout: Layout, max_block_bytes: int = 2**29) -> Iterator[tuple[str, np.ndarray]]:
    """`(key, tensor)` of `layout` from our variables in `reader` (dotted paths), one at a time."""
    for e, a in iter_tensors(reader, layout, max_block_bytes):
        yield e.key, a
        del a


def same_bytes(a: np.ndarray, b: np.ndarray, chunk: int = 2**24) -> bool:
    """Bit-for-bit equality of two arrays of one dtype and shape, compared 16 MiB at a time (no full-size
    boolean temporary)."""
    a = np.asarray(a, order="C").reshape(-1).view(np.uint8)
    b = np.asarray(b, order="C").reshape(-1).view(np.uint8)
    return a.size == b.size and all(np.array_equal(a[i:i + chunk], b[i:i + chunk]) for i in range(0, a.size, chunk))


def verify(written: TensorSource, expected: Iterable[tuple[str, np.ndarray]]) -> int:
    """Compare, one tensor at a time, `written` with `(key, array)` pairs, bit for bit (dtype included);
    raise ValueError naming the first differing tensors. Returns how many were compared."""
    bad, seen = [], set()
    for key, want in expected:
        seen.add(key)
        if key not in written:
            bad.append(f"{key} (missing)")
            continue
        got = written.read(key)
        if got.dtype != want.dtype or got.shape != want.shape or not same_bytes(got, want):
            bad.append(f"{key} ({got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)})")
        del got, want           # before the next pair is read: two tensors in memory at a time
    extra = [k for k in written.keys() if k not in seen]
    if bad or extra:
        raise ValueError(f"{written.name}: {len(bad)} tensors differ from the source (e.g. {bad[:5]})"
                         + (f"; unexpected tensors {extra[:5]}" if extra else ""))
    return len(seen)

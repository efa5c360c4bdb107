"""Our variables <-> checkpoint tensors: the name table (`Layout`), its checks, loading (whole or sharded
slice by slice) and streaming export.

Our parameter paths follow the PyTorch names, so a family's table is mechanical: join the path with
dots, call a Linear's `kernel` `weight` (stored transposed: ours is `[in, out]`, PyTorch's `[out, in]`),
and for a scanned model (parameters stacked on a leading `layers` axis) insert the layer index after the
stacking attribute. One `Entry` per checkpoint tensor records all of that.

- `check(source, layout)`: every tensor present, none unexpected, shapes and dtype kinds right, before
  any data is read; errors name the file, the key and both shapes.
- `load(ctor, source, layout, mesh)`: the model `ctor` builds, filled from `source`. With a mesh each
  variable is a global `jax.Array` laid out by `parallel.tree_shardings`, made by
  `jax.make_array_from_callback` whose callback reads only the device's slice (a kernel slice is read
  transposed; a stacked variable reads only the layers in the slice): a process reads what its devices
  own, and holds at most one variable's local slices on the host at a time. LoRA factors (never in a
  checkpoint) start as A random, B zero; RNG state comes from the constructor, all created sharded.
- `fill_added_rows(model, entries, stored)`: rows a grown source (`tensor_source.GrownRows`) read as zeros
  set to the mean of the stored rows, on the devices, in the variables' shardings.
- `iter_tensors(reader, layout)`: checkpoint tensors one at a time from our variables (a model in
  memory via `ModelSource`, or a training checkpoint), LoRA folded into its kernel, stacked variables
  read a block of layers at a time.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmgpt_jax import parallel
from bmgpt_jax.convert.tensor_source import Index, TensorSource, normalize_index
from bmgpt_jax.models.layers import Linear

log = logging.getLogger(__name__)
Path_ = tuple


def _never(key: str) -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor and where it lives in our model."""

    key: str                              # checkpoint name, e.g. "model.layers.3.mlp.up_proj.weight"
    path: Path_                           # our variable, e.g. ("model", "layers", "mlp", "up_proj", "kernel")
    layer: int | None                     # index on the stacked `layers` axis (scanned models), else None
    transpose: bool                       # Linear kernel: ours `[in, out]` = the checkpoint's `[out, in]`.T
    shape: tuple[int, ...]                # the checkpoint's shape
    dtype: np.dtype                       # our variable's dtype
    save_dtype: np.dtype | None = None    # written on export instead of `dtype` (GIN's int64 counters)
    lora_scale: float | None = None       # the kernel has LoRA factors, merged on export

    @property
    def where(self) -> str:
        return ".".join(map(str, self.path)) + (f"[{self.layer}]" if self.layer is not None else "")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The checkpoint tensors of a model (`family` names it in errors); `ignored(key)`: source tensors
    the model does not use and that may be present (e.g. `rotary_emb.inv_freq`), counted and logged."""

    entries: tuple[Entry, ...]
    family: str
    ignored: Callable[[str], bool] = _never

    def nest(self, attr: str, key_prefix: str) -> "Layout":
        """This layout as the sub-model `attr` of a bigger model whose checkpoint prefixes its keys."""
        inner = self.ignored
        entries = tuple(dataclasses.replace(e, key=key_prefix + e.key, path=(attr,) + e.path) for e in self.entries)
        return Layout(entries, self.family, lambda k: k.startswith(key_prefix) and inner(k[len(key_prefix):]))

    def __add__(self, other: "Layout") -> "Layout":
        a, b = self.ignored, other.ignored
        return Layout(self.entries + other.entries, self.family, lambda k: a(k) or b(k))

    def by_path(self) -> dict[Path_, list[Entry]]:
        """Entries grouped by our variable (layers in order), in first-appearance order."""
        out: dict[Path_, list[Entry]] = {}
        for e in self.entries:
            out.setdefault(e.path, []).append(e)
        return {p: sorted(es, key=lambda e: -1 if e.layer is None else e.layer) for p, es in out.items()}


def torch_name(path: Path_, stack_at: str | None = None, layer: int | None = None) -> str:
    """Our path -> PyTorch key: `layer` inserted after `stack_at` (scanned layers), `kernel` -> `weight`."""
    parts = [str(p) for p in path]
    if stack_at is not None and layer is not None:
        parts.insert(parts.index(stack_at) + 1, str(layer))
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def lora_scales(model: nnx.Module) -> dict[Path_, float]:
    """kernel path -> LoRA scale, for every Linear of `model` (abstract or concrete) that has adapters."""
    return {tuple(p) + ("kernel",): m.lora_scale for p, m in nnx.iter_graph(model)
            if isinstance(m, Linear) and m.lora_a is not None}


def param_layout(model: nnx.Module, family: str, stack_at: str | None = None, prefix: str = "",
                 ignored: Callable[[str], bool] = _never) -> Layout:
    """The layout of every `nnx.Param` of `model` except LoRA factors, under PyTorch names with `prefix`,
    sorted like a PyTorch state dict (numbers in order). `stack_at`: the attribute holding scanned layers."""
    scales = lora_scales(model)
    entries = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if str(path[-1]).startswith("lora_"):
            continue
        transpose = path[-1] == "kernel"
        shape, dtype = tuple(var.shape), np.dtype(var.dtype)
        stacked = stack_at is not None and stack_at in path and not any(isinstance(p, int) for p in path)
        one = shape[1:] if stacked else shape
        common = dict(path=tuple(path), transpose=transpose, shape=tuple(reversed(one)) if transpose else one,
                      dtype=dtype, lora_scale=scales.get(tuple(path)))
        for layer in (range(shape[0]) if stacked else [None]):
            entries.append(Entry(key=prefix + torch_name(path, stack_at, layer), layer=layer, **common))
    return Layout(tuple(sorted(entries, key=lambda e: _natural(e.key))), family, ignored)


# ------------------------------------------------------------------------------------------------ checks
def _kind(dtype) -> str:
    if jnp.issubdtype(dtype, jnp.floating):
        return "floating"
    if jnp.issubdtype(dtype, jnp.integer):
        return "integer"
    return np.dtype(dtype).name


def unused(source: TensorSource, layout: Layout) -> list[str]:
    """The keys of `source` that are no tensor of `layout` (once `check` passed: the ignored ones it holds)."""
    ours = {e.key for e in layout.entries}
    return [k for k in source.keys() if k not in ours]


def check(source: TensorSource, layout: Layout, note: str = "ignored") -> list[str]:
    """Raise unless `source` holds exactly `layout`'s tensors with their shapes and dtype kinds (float vs
    integer); reads no data. Returns the ignored keys present (see `Layout.ignored`), logged with `note`
    (what becomes of them: "ignored", or "carried over" by a conversion that keeps them)."""
    expected = {e.key: e for e in layout.entries}
    have = source.keys()
    missing = [k for k in expected if k not in source]
    if missing and len(missing) == len(expected):
        raise KeyError(f"{source.name}: holds none of the {len(expected)} tensors of a {layout.family} "
                       f"(e.g. {missing[0]!r}); it holds {sorted(have)[:5]}: a checkpoint of another model?")
    if missing:
        e = expected[missing[0]]
        more = f"; {len(missing)} missing in all: {missing[:10]}" if len(missing) > 1 else ""
        raise KeyError(f"{source.name}: missing tensor {e.key!r} (shape {e.shape}, parameter {e.where}){more}")
    for e in layout.entries:
        got, where = tuple(source.shape(e.key)), source.file_of(e.key)
        if got != e.shape:
            ours = f", ours {tuple(reversed(e.shape))} transposed" if e.transpose else ""
            raise ValueError(f"{where}: tensor {e.key!r} has shape {got} but the model expects {e.shape} "
                             f"(parameter {e.where}{ours})")
        if _kind(source.dtype(e.key)) != _kind(e.dtype):
            raise ValueError(f"{where}: tensor {e.key!r} has dtype {np.dtype(source.dtype(e.key)).name} but the "
                             f"model expects {e.dtype.name} (parameter {e.where}, shape {e.shape})")
    extra = unused(source, layout)
    unexpected = [k for k in extra if not layout.ignored(k)]
    if unexpected:
        shown = [f"{k} {tuple(source.shape(k))}" for k in unexpected[:10]]
        raise KeyError(f"{source.name}: unexpected tensors not used by the {layout.family}: {shown}"
                       f"{f' and {len(unexpected) - 10} more' if len(unexpected) > 10 else ''}")
    if extra:
        log.info("%s: %s %d tensor(s) the %s does not use: %s", source.name, note, len(extra), layout.family,
                 ", ".join(extra[:20]))
    return extra


# ------------------------------------------------------------------------------------------------ import
def _reader(source: TensorSource, entries: list[Entry], shape: tuple, dtype) -> Callable[[Index], np.ndarray]:
    """index (in our layout) -> that slice of our variable, read from `source`."""
    stacked = entries[0].layer is not None

    def one(e: Entry, idx: tuple) -> np.ndarray:
        a = source.read(e.key, tuple(reversed(idx))).T if e.transpose else source.read(e.key, idx)
        return np.asarray(a.astype(dtype, copy=False), order="C")

    def read(index: Index) -> np.ndarray:
        idx = normalize_index(index, shape, entries[0].where)
        if not stacked:
            return one(entries[0], idx)
        return np.stack([one(entries[i], idx[1:]) for i in range(idx[0].start, idx[0].stop, idx[0].step)])
    return read


def _global_array(read: Callable[[Index], np.ndarray], shape: tuple, sharding) -> jax.Array:
    """A global array from per-device slices; a slice several local devices share is read once."""
    cache: dict[tuple, np.ndarray] = {}

    def callback(index):
        key = tuple((s.start, s.stop, s.step) for s in normalize_index(index, shape, "callback"))
        if key not in cache:
            cache[key] = read(index)
        return cache[key]
    return jax.make_array_from_callback(shape, sharding, callback)


def _lora_init(model: nnx.Module, seed: int) -> dict[Path_, Callable]:
    """lora_a / lora_b path -> `f(sharding) -> array`: A ~ N(0, 1/in) from per-Linear keys split off `seed`
    in graph order, B zero (so the loaded model computes the base function). Sharded or not, the values
    are the same (threefry is partitionable)."""
    key = jax.random.key(seed)
    out = {}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear) and module.lora_a is not None:
            key, sub = jax.random.split(key)
            a, b = module.lora_a, module.lora_b

            def make_a(sharding, sub=sub, shape=tuple(a.shape), dtype=a.dtype):
                def normal(k):
                    return (jax.random.normal(k, shape, jnp.float32) * shape[-2] ** -0.5).astype(dtype)
                return jax.jit(normal, out_shardings=sharding)(sub)

            def make_b(sharding, shape=tuple(b.shape), dtype=b.dtype):
                return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
            out[tuple(path) + ("lora_a",)], out[tuple(path) + ("lora_b",)] = make_a, make_b
    return out


def load(ctor: Callable[[], nnx.Module], source: TensorSource, layout: Layout, mesh=None,
         lora_seed: int = 0, skip: nnx.filterlib.Filter = nnx.Nothing) -> nnx.Module:
    """The module `ctor()` builds (never built for real: `nnx.eval_shape`), its variables read from
    `source` per `layout` (checked first), LoRA factors fresh, RNG state as `ctor` makes it. With `mesh`,
    global arrays with the rule shardings, each process reading only its devices' slices. Variables
    `skip` selects are neither read nor created: they stay abstract (ShapeDtypeStructs with their target
    sharding, as `parallel.init_sharded` leaves them) for the caller to fill, e.g. from a checkpoint."""
    check(source, layout)
    skipped = nnx.filterlib.to_predicate(skip)
    abstract = nnx.eval_shape(ctor)
    graphdef, state = nnx.split(abstract)
    shardings = dict(nnx.to_flat_state(parallel.tree_shardings(state, mesh))) if mesh is not None else {}
    by_path, lora = layout.by_path(), _lora_init(abstract, lora_seed)
    rng = {}
    if nnx.to_flat_state(nnx.state(abstract, nnx.RngState)):
        rng_shardings = parallel.tree_shardings(nnx.state(abstract, nnx.RngState), mesh) if mesh is not None else None
        rng = dict(nnx.to_flat_state(jax.jit(lambda: nnx.state(ctor(), nnx.RngState), out_shardings=rng_shardings)()))
    flat = []
    for path, var in nnx.to_flat_state(state):
        sharding = shardings[path].get_value() if path in shardings else None
        if skipped(path, var):
            value = jax.ShapeDtypeStruct(tuple(var.shape), var.dtype, sharding=sharding)
        elif path in by_path:
            read = _reader(source, by_path[path], tuple(var.shape), np.dtype(var.dtype))
            value = _global_array(read, tuple(var.shape), sharding) if sharding is not None else jnp.asarray(read(None))
        elif path in lora:
            value = lora[path](sharding)
        elif path in rng:
            value = rng[path].get_value()
        else:
            raise KeyError(f"{layout.family}: variable {'.'.join(map(str, path))} is neither in the checkpoint "
                           "layout nor a LoRA factor nor RNG state")
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _mean_of_first_rows(x: jax.Array, n: int, axis: int) -> jax.Array:
    """The float32 mean of `x`'s first `n` entries along `axis` (kept as a length-1 axis), on the devices
    where `x` lies: the sum of all less the sum of the few after `n`, each its own jitted program, because
    XLA:CPU materialises the float32 copy of a masked, sliced or shared operand where it reduces a plain
    one in place (measured: 500 MiB against 7 MiB for a 32001 x 4096 table on 8 devices)."""
    def total(a):
        return jnp.sum(a, axis=axis, keepdims=True, dtype=jnp.float32)
    tail = jax.jit(lambda a: total(jax.lax.slice_in_dim(a, n, a.shape[axis], axis=axis)))(x)
    return jax.jit(lambda a, t: (total(a) - t) / n)(x, tail)


def _set_rows_from(x: jax.Array, row: jax.Array, n: int, axis: int) -> jax.Array:
    """`x` with its entries from `n` on along `axis` set to `row` (cast to x's dtype)."""
    shape = x.shape[:axis] + (x.shape[axis] - n,) + x.shape[axis + 1:]
    return jax.lax.dynamic_update_slice_in_dim(x, jnp.broadcast_to(row.astype(x.dtype), shape), n, axis)


def fill_added_rows(model: nnx.Module, entries: list[Entry], stored: int) -> None:
    """In place: the checkpoint rows `stored` and beyond (axis 0 in the checkpoint's layout, so the last
    axis of a transposed kernel) of each entry's variable set to the mean of the rows before, in float32,
    cast to the variable's dtype: what transformers' `resize_token_embeddings` centres its added rows on
    (docs/convert.md). On the variable as it lies, in two jitted steps: the mean (each device sums its
    slice, one row crosses devices), then the rows written into the donated array (its sharding kept,
    no copy). Nothing is gathered. A variable `load` left abstract (its `skip`) is passed over."""
    for e in entries:
        if e.layer is not None:
            raise ValueError(f"{e.key}: rows are added to a whole tensor, not a stacked layer's")
        owner = model
        for p in e.path[:-1]:
            owner = owner[p] if isinstance(p, int) else getattr(owner, p)
        var = getattr(owner, e.path[-1])
        x = var.get_value()
        if isinstance(x, jax.ShapeDtypeStruct):
            continue
        axis = x.ndim - 1 if e.transpose else 0
        mean = _mean_of_first_rows(x, stored, axis)
        put = jax.jit(lambda a, m, axis=axis: _set_rows_from(a, m, stored, axis), out_shardings=x.sharding,
                      donate_argnums=0)
        var.set_value(put(x, mean))
        del x


# ------------------------------------------------------------------------------------------------ export
class ModelSource(TensorSource):
    """The parameters and batch statistics of a model in memory, keyed by dotted path (our layout).
    Reading a slice fetches only that slice from the devices (all of them must be addressable)."""

    def __init__(self, model: nnx.Module, name: str = "model"):
        self._vars = {".".join(map(str, p)): v for p, v in
                      nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}
        self.name = name

    def keys(self) -> list[str]:
        return list(self._vars)

    def __contains__(self, key: str) -> bool:
        return key in self._vars

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._vars[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._vars[key].dtype)

    def read(self, key: str, index: Index = None) -> np.ndarray:
        value = self._vars[key].get_value()
        idx = normalize_index(index, tuple(value.shape), key)
        return np.array(jax.device_get(value[idx] if idx else value))


def _array(reader: TensorSource, path: Path_, want: tuple[int, ...] | None = None) -> str:
    """The dotted name of our variable `path` in `reader`, checked present (and of shape `want`)."""
    name = ".".join(map(str, path))
    if name not in reader:
        raise KeyError(f"{reader.name}: no array {name!r} (it holds e.g. {reader.keys()[:5]})")
    if want is not None and tuple(reader.shape(name)) != want:
        raise ValueError(f"{reader.file_of(name)}: array {name!r} has shape {tuple(reader.shape(name))} but the "
                         f"model expects {want}")
    return name


def _merged(reader: TensorSource, path: Path_, block: slice | None, scale: float | None) -> np.ndarray:
    """Our variable at `path` (the layers in `block` when stacked), with LoRA folded in when `scale`:
    `kernel + lora_a @ lora_b * scale`, in float32, cast back (as `Linear.merged_kernel`)."""
    index = None if block is None else (block,)
    kernel = reader.read(_array(reader, path), index)
    if scale is None:
        return kernel
    a, b = (reader.read(_array(reader, path[:-1] + (f,)), index) for f in ("lora_a", "lora_b"))
    delta = np.matmul(a.astype(np.float32), b.astype(np.float32)) * np.float32(scale)
    return (kernel.astype(np.float32) + delta).astype(kernel.dtype)


def iter_tensors(reader: TensorSource, layout: Layout, max_block_bytes: int = 2**29
                 ) -> Iterator[tuple[Entry, np.ndarray]]:
    """`(entry, tensor)` for every entry of `layout`, one at a time, in the checkpoint's layout and dtype
    (`save_dtype` or ours), read from `reader` (our variables by dotted path, shapes checked). A stacked
    variable is read `max_block_bytes` of layers at a time (at least one layer)."""
    def finish(e: Entry, a: np.ndarray) -> np.ndarray:
        a = a.T if e.transpose else a
        return np.asarray(a.astype(e.save_dtype or e.dtype, copy=False), order="C")

    for path, entries in layout.by_path().items():
        first, scale = entries[0], entries[0].lora_scale
        ours = tuple(reversed(first.shape)) if first.transpose else first.shape
        if first.layer is None:
            _array(reader, path, ours)
            yield first, finish(first, _merged(reader, path, None, scale))
            continue
        n = len(entries)
        name = _array(reader, path, (n,) + ours)
        step = max(1, max_block_bytes // max(1, reader.nbytes(name) // n))
        for lo in range(0, n, step):
            block = _merged(reader, path, slice(lo, min(n, lo + step)), scale)
            for e, a in zip(entries[lo:lo + step], block):
                yield e, finish(e, a)


def state_dict(model: nnx.Module, layout: Layout) -> dict[str, np.ndarray]:
    """The checkpoint tensors of a model in memory (small models and tests; exports stream instead)."""
    return {e.key: a for e, a in iter_tensors(ModelSource(model), layout)}

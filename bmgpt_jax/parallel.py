"""Device mesh and the logical-axis rule table (MaxText's habit).

Parameters and main activations carry *logical* axis names (`embed`, `mlp`, `heads`, `batch`, ...).
`RULES` maps each logical name to mesh axes (`data`, `fsdp`, `tensor`); everything that shards goes
through `logical_to_spec`, so changing a parallelism strategy is a one-line edit of the table. Decoding
places its activations by `DECODE_RULES` (the same table with two entries changed: the weights stay
put and the few rows of activations move), parameters always by `RULES`.

Every placement of an array lives here and is used by the model (`constrain`, inside a program traced
`within` its mesh), the data pipeline (`batch_shardings`), model building (`init_sharded`: random init
inside jit, each device creating only its own shards), checkpointing (`abstract_state`) and the train
step (`tree_shardings`, `shard`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("seq", None),
    ("layers", None),
    ("nodes", None),
    ("act_embed", None),
    ("norm", None),
    ("gin_vocab", None),   # GIN embedding rows (atom/bond types): tiny, replicated
    ("gin_hidden", None),  # GIN feature dims (300/600): 1.8M params in all, replicated
)
# Generation traces within these (`within(mesh, DECODE_RULES)`): a decode step's activations are a few rows,
# its weights gigabytes, so the weights stay in their shards and the activations move. The residual stream
# is split by its embed dim over fsdp like the weights' rows (each device multiplies its slice and the
# partial sums are reduced) and its batch only over data. Under RULES the TPU compile of an fsdp decode
# all-gathered every layer's weights on every step (tests/training/test_plan.py). Attention still takes its
# rows over data x fsdp (`attention.per_shard`), so each device holds only its rows of the KV cache.
DECODE_RULES = tuple((name, {"batch": "data", "act_embed": "fsdp"}.get(name, axes)) for name, axes in RULES)


def logical_to_spec(axes: Sequence[str | None] | None, rules=RULES) -> P:
    """PartitionSpec for logical `axes`; a mesh axis already used by an earlier dimension is dropped."""
    if axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        mesh_axes = table[name]
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*out)


def axis_names(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry: `'fsdp'` -> `('fsdp',)`, `('data', 'fsdp')` as is, None -> ()."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def fitted_spec(shape: Sequence[int], axes: Sequence[str | None] | None, mesh: Mesh, rules=RULES,
                refit: bool = False) -> P:
    """`logical_to_spec(axes)` for an array of `shape` on `mesh`, dropping any mesh axis a dimension does
    not divide: e.g. the 32001-row vocabulary does not divide a 4-way tensor axis. Dropped, the axis
    replicates the array (activations: a decode batch of 1 stays whole); with `refit` (parameters) it
    moves to the last other dimension it divides, so no weight is whole on every device: the vocabulary
    `[32001, 4096]` on fsdp x tensor is split `[32001, 4096 / (fsdp x tensor)]`."""
    spec = logical_to_spec(axes, rules)
    kept_axes, dropped = [], []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        kept, size = [], 1
        for name in axis_names(entry):
            if dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
            elif mesh.shape[name] > 1:
                dropped.append(name)
        kept_axes.append(kept)
    for name in dropped if refit else ():
        for i in reversed(range(len(shape))):
            size = math.prod(mesh.shape[a] for a in kept_axes[i]) * mesh.shape[name]
            if shape[i] % size == 0:
                kept_axes[i].append(name)
                break
    out = [kept[0] if len(kept) == 1 else (tuple(kept) or None) for kept in kept_axes]
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names inside a mesh context (`within`), each dimension split
    only by the mesh axes that divide it (`fitted_spec`: a decode batch of 1 stays whole); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fitted_spec(x.shape, axes, mesh, _ACTIVATION_RULES.get()))


def constrain_to_weight(x: jax.Array, axes: Sequence[str | None], weight: nnx.Variable, dim: int) -> jax.Array:
    """Decoding only (traced `within(mesh, DECODE_RULES)`): `x [..., in]` constrained by `axes` and then
    split on its last dim as the weight's contracting dim `dim` is laid out (its parameter spec, `refit`),
    less the axes `x`'s other dims use: the product then sums partial results over those axes instead of
    gathering the weight. For the LM head when the tensor axis does not divide the vocabulary: the head's
    rows split over fsdp x tensor, while the residual stream is split over fsdp only; the first constraint
    keeps the head's layout from propagating back into the layers. Elsewhere `constrain(x, axes)`."""
    x = constrain(x, axes)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or _ACTIVATION_RULES.get() is not DECODE_RULES:
        return x
    spec = tuple(fitted_spec(x.shape, axes, mesh, DECODE_RULES))[: x.ndim - 1]
    spec += (None,) * (x.ndim - 1 - len(spec))
    used = {a for entry in spec for a in axis_names(entry)}
    weight_spec = fitted_spec(weight.shape, weight.get_metadata().get("out_sharding"), mesh, refit=True)
    weight_spec = tuple(weight_spec) + (None,) * len(weight.shape)
    split = tuple(a for a in axis_names(weight_spec[dim]) if a not in used)
    return jax.lax.with_sharding_constraint(x, P(*spec, split[0] if len(split) == 1 else (split or None)))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of the first leaf of `tree` (arrays or `ShapeDtypeStruct`s) laid out by a `NamedSharding`
    over more than one device, else None: the mesh a jitted function given `tree` should trace `within`."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


_ACTIVATION_RULES: contextvars.ContextVar = contextvars.ContextVar("activation_rules", default=RULES)


@contextlib.contextmanager
def within(mesh: Mesh | None, activation_rules=RULES):
    """Context manager: trace under `mesh`'s abstract mesh, so attention's `shard_map` and the model's
    `constrain`s (by `activation_rules`) see it; without it they do nothing and the partitioner guesses.
    Nothing for None."""
    if mesh is None:
        yield
        return
    token = _ACTIVATION_RULES.set(activation_rules)
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            yield
    finally:
        _ACTIVATION_RULES.reset(token)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A `data x fsdp x tensor` mesh with Auto axis types; one entry may be -1 (the rest of the devices).

    Devices are laid out by `jax.make_mesh` (topology-aware: rings and tori on TPU, process order on
    GPU). The data pipeline needs every process's devices to hold one contiguous block of the batch rows
    (`process_blocks`); where the topology's order interleaves processes along the batch axes (a 16-chip
    ring over a v5e 4x4's four hosts), the devices are laid out instead with the processes as the outer
    blocks of the batch axes and each process's own devices in topology order
    (`mesh_utils.create_hybrid_device_mesh`, processes as granules), and that is checked again.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: every entry must be >= 1, except at most one -1 (the rest of "
                         "the devices)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    need = math.prod(shape)
    if need < len(devices) and len(devices) % need == 0 and jax.process_count() == 1:
        devices = devices[:need]  # a smaller mesh on one host (e.g. 1x1x1 for a reference run)
    if need != len(devices):
        hint = (f"; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={need} (set before JAX starts) "
                f"simulates {need} devices" if devices[0].platform == "cpu" and need > len(devices) else "")
        raise ValueError(f"mesh shape {tuple(shape)} needs {need} devices, which does not divide the "
                         f"{len(devices)} devices found{hint}")
    auto = (AxisType.Auto,) * len(MESH_AXES)
    mesh = jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)
    try:
        process_blocks(mesh)
        return mesh
    except ValueError as interleaved:
        grid = _process_major(shape, devices)
        if grid is None:
            raise interleaved from None
    mesh = Mesh(grid, MESH_AXES, axis_types=auto)
    process_blocks(mesh)
    return mesh


def _process_major(shape: Sequence[int], devices) -> np.ndarray | None:
    """A device grid of `shape` whose batch axes (data, then fsdp) are cut into one contiguous block per
    process: the processes split the data axis, or, when they outnumber it, every data row and then the
    fsdp axis; None when `shape` cannot be cut so (or a process's devices cannot fill their block)."""
    from jax.experimental import mesh_utils
    data, fsdp, tensor = shape
    procs = len({d.process_index for d in devices})
    by_data = math.gcd(data, procs)
    by_fsdp = procs // by_data
    if fsdp % by_fsdp or (by_fsdp > 1 and by_data != data):
        return None
    try:
        return mesh_utils.create_hybrid_device_mesh((data // by_data, fsdp // by_fsdp, tensor), (by_data, by_fsdp, 1),
                                                    devices, process_is_granule=True, allow_split_physical_axes=True)
    except (ValueError, AssertionError):
        return None


@functools.lru_cache(maxsize=32)
def process_blocks(mesh: Mesh, process_of: Callable[[Any], int] | None = None) -> dict[int, int]:
    """`{process: b}`: the devices of each process hold block `b` of the global batch rows, the processes'
    blocks being equal, contiguous and disjoint, so each process feeds its own rows (`data.pipeline`
    offsets its node and slot indices by its block). `process_of(device)` defaults to
    `device.process_index`.

    Raises ValueError saying which process holds which rows when that does not hold: the `data x fsdp`
    axes must cut the devices into whole per-process groups, and the tensor axis must stay inside a host.
    """
    process_of = process_of or (lambda d: d.process_index)
    axes = logical_to_spec(("batch",))[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    procs = sorted({process_of(d) for d in mesh.devices.flat})
    rows = math.lcm(math.prod(mesh.shape[a] for a in axes), len(procs))
    per = rows // len(procs)
    held: dict[int, set[int]] = {p: set() for p in procs}
    for device, (index,) in NamedSharding(mesh, P(axes)).devices_indices_map((rows,)).items():
        held[process_of(device)].update(range(*index.indices(rows)))
    blocks = {}
    for p in procs:
        r = sorted(held[p])
        if len(r) != per or r[-1] - r[0] != per - 1 or r[0] % per:
            shown = ", ".join(f"process {q}: rows {sorted(held[q])}" for q in procs[:4])
            raise ValueError(f"mesh {dict(mesh.shape)} does not give each of the {len(procs)} processes its own "
                             f"contiguous block of {per} of the {rows} batch rows ({shown}); the data pipeline "
                             "feeds every process its own rows, so the data x fsdp axes must split the devices "
                             "into whole per-process groups and the tensor axis must stay within a process")
        blocks[p] = r[0] // per
    return blocks


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a state tree: nnx Variables by their logical `out_sharding`, other leaves replicated.

    Works for parameters, for optax states (whose moments keep the Param nodes and their metadata) and for
    abstract trees from `jax.eval_shape`.
    """
    def one(x):
        if isinstance(x, nnx.Variable):
            return x.replace(NamedSharding(mesh, fitted_spec(x.shape, x.get_metadata().get("out_sharding"), mesh,
                                                              refit=True)))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def sharded_init(make: Callable[[], nnx.Module], mesh: Mesh, skip: nnx.filterlib.Filter = nnx.Nothing
                 ) -> tuple[nnx.GraphDef, Any, nnx.State]:
    """`(graphdef, init, rest)` for the module `make()` builds, nothing allocated yet.

    `init` is a jitted function of no arguments returning the state of every variable `skip` does not
    select, with `tree_shardings` as its `out_shardings`: XLA partitions the random number generation
    (`jax_threefry_partitionable`, JAX's default), so each device computes only its own shards -- no
    parameter is ever whole on a device or on the host, and with several processes each creates only its
    addressable shards (every process calls `init`, as with any jitted function). `rest` is the abstract
    state (sharded ShapeDtypeStructs, `abstract_state`) of the skipped variables, e.g. the parts a
    checkpoint will fill. `make` is traced twice (`nnx.eval_shape`, then inside jit) and must be
    deterministic (seeded `nnx.Rngs`); the values do not depend on `skip` or on the mesh.
    `init.lower().compile()` gives the initialisation's memory per device (training/plan.py).
    """
    graphdef, built, rest = nnx.split(nnx.eval_shape(make), nnx.Not(skip), ...)

    def create() -> nnx.State:
        return nnx.split(make(), nnx.Not(skip), ...)[1]
    return graphdef, jax.jit(create, out_shardings=tree_shardings(built, mesh)), abstract_state(rest, mesh)


def init_sharded(make: Callable[[], nnx.Module], mesh: Mesh, skip: nnx.filterlib.Filter = nnx.Nothing) -> nnx.Module:
    """The module `make()` builds, its variables created directly in their rule shardings on `mesh`
    (`sharded_init`); variables `skip` selects stay abstract (ShapeDtypeStructs with their target
    sharding) for the caller to replace, e.g. with pretrained sub-modules."""
    graphdef, init, rest = sharded_init(make, mesh, skip)
    return nnx.merge(graphdef, init(), rest)


def shard(tree: Any, mesh: Mesh) -> Any:
    """`tree` placed on `mesh` with `tree_shardings` (a copy; use on freshly built or restored state).

    With several processes every process must hold the same full values (same seed or checkpoint);
    each then builds only its addressable shards (`jax.make_array_from_callback`). A leaf already laid
    out as the rules say (e.g. loaded sharded, `folder.from_pretrained(mesh=...)`) is kept as it is.
    """
    shardings = tree_shardings(tree, mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def place(x, sharding):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x   # no host round trip (which a global array spanning other processes cannot make)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # RNG streams: place the raw key data
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(place(jax.random.key_data(x), sharding), impl=impl)
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(place, tree, shardings)


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, *, axes: Mapping[str, tuple] | None = None,
                    microbatched: bool = False) -> dict:
    """NamedShardings for a flat batch dict (arrays or ShapeDtypeStructs).

    Each key's logical axes come from `axes` (e.g. `{"mol_atoms": (None, None)}` to replicate a graph
    budget), by default `("batch", None, ...)`. With `microbatched` a leading unsharded micro-batch axis is
    prepended. Raises ValueError when a sharded dimension does not divide over its mesh axes.
    """
    axes = dict(axes or {})
    out = {}
    for key, x in batch.items():
        lead = 1 if microbatched else 0
        logical = tuple(axes.get(key, ("batch",) + (None,) * (x.ndim - lead - 1)))
        spec = logical_to_spec(((None,) * lead) + logical)
        for dim, mesh_axes in enumerate(spec):
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
            size = math.prod(mesh.shape[a] for a in names)
            if x.shape[dim] % size:
                raise ValueError(f"batch[{key!r}] dimension {dim} has size {x.shape[dim]}, not divisible by "
                                 f"mesh axes {names} of total size {size} (mesh {dict(mesh.shape)})")
        out[key] = NamedSharding(mesh, spec)
    return out


def abstract_state(tree: Any, mesh: Mesh) -> Any:
    """`tree` (concrete or from `jax.eval_shape`) as ShapeDtypeStructs carrying `mesh`'s rule shardings."""
    shardings = tree_shardings(tree, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of `tree`'s sharded leaves (jax.Arrays or ShapeDtypeStructs with a
    `sharding`): each leaf's shard shape (`sharding.shard_shape`) times its item size, summed. The rule
    shardings split dimensions evenly (`fitted_spec`), so every device of the mesh holds the same."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

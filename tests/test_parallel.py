"""Meshes: built by `jax.make_mesh` with Auto axes, refused with a hint when the devices do not fit, and
checked for the data pipeline's per-process row blocks (processes simulated by mapping devices)."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from bmgpt_jax import parallel


def test_meshes_come_from_jax_make_mesh_with_auto_axes():
    for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2), (-1, 2, 1)]:
        mesh = parallel.make_mesh(shape)
        want = jax.make_mesh(tuple(mesh.devices.shape), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
        assert mesh.axis_names == parallel.MESH_AXES and mesh.axis_types == (AxisType.Auto,) * 3
        assert np.array_equal(np.vectorize(lambda d: d.id)(mesh.devices), np.vectorize(lambda d: d.id)(want.devices))
    assert parallel.make_mesh((1, 1, 1)).devices.size == 1           # a smaller mesh on one process


def test_a_mesh_that_does_not_fit_the_devices_says_how_to_simulate_them():
    with pytest.raises(ValueError, match=r"mesh shape \(4, 4, 1\) needs 16 devices, which does not divide the 8 "
                                         r"devices found; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=16"):
        parallel.make_mesh((4, 4, 1))
    with pytest.raises(ValueError, match="needs 3 devices"):
        parallel.make_mesh((3, 1, 1))
    for bad in [(0, 1, 1), (-1, 0, 1), (-2, 1, 1), (-1, -1, 1)]:
        with pytest.raises(ValueError, match=r"every entry must be >= 1, except at most one -1"):
            parallel.make_mesh(bad)


def test_an_axis_a_weight_dimension_does_not_divide_moves_to_another_dimension():
    """`fitted_spec`: the 32001-token vocabulary does not divide a 4-way tensor axis. An activation keeps
    the axis off (replicated over it); a parameter (`refit`, `tree_shardings`) moves it to the last other
    dimension it divides, after that dimension's own axes, so no weight is whole on every device."""
    from jax.sharding import PartitionSpec as P
    mesh = parallel.make_mesh((1, 2, 4))
    table, head = (32001, 4096), (4096, 32001)
    assert parallel.fitted_spec(table, ("vocab", "embed"), mesh) == P(None, "fsdp")
    assert parallel.fitted_spec(table, ("vocab", "embed"), mesh, refit=True) == P(None, ("fsdp", "tensor"))
    assert parallel.fitted_spec(head, ("embed", "vocab"), mesh, refit=True) == P(("fsdp", "tensor"))
    assert parallel.fitted_spec((32000, 4096), ("vocab", "embed"), mesh, refit=True) == P("tensor", "fsdp")
    assert parallel.fitted_spec((3, 5), ("vocab", "embed"), mesh, refit=True) == P()   # nothing divides: whole
    assert parallel.fitted_spec((4096, 11008), ("embed", "mlp"), mesh, refit=True) == P("fsdp", "tensor")
    state = {"w": nnx.Param(jnp.zeros(table), out_sharding=("vocab", "embed"), eager_sharding=False)}
    assert parallel.tree_shardings(state, mesh)["w"].get_value().spec == P(None, ("fsdp", "tensor"))


def by_id(split):
    """A stand-in for `device.process_index`: devices 0-3 are one process, 4-7 the other (or `split`)."""
    return lambda d: split(d.id)


def test_each_process_must_hold_one_contiguous_block_of_batch_rows():
    first_half = by_id(lambda i: i // 4)
    assert parallel.process_blocks(parallel.make_mesh((8, 1, 1)), first_half) == {0: 0, 1: 1}
    assert parallel.process_blocks(parallel.make_mesh((2, 2, 2)), first_half) == {0: 0, 1: 1}
    assert parallel.process_blocks(parallel.make_mesh((8, 1, 1)), by_id(lambda i: 1 - i // 4)) == {0: 1, 1: 0}
    assert parallel.process_blocks(parallel.make_mesh((8, 1, 1))) == {0: 0}
    with pytest.raises(ValueError, match=r"does not give each of the 2 processes its own contiguous block of 4 of "
                                         r"the 8 batch rows \(process 0: rows \[0, 2, 4, 6\], process 1: rows "
                                         r"\[1, 3, 5, 7\]\)"):
        parallel.process_blocks(parallel.make_mesh((8, 1, 1)), by_id(lambda i: i % 2))   # interleaved
    with pytest.raises(ValueError, match=r"process 0: rows \[0, 1\], process 1: rows \[0, 1\].*tensor axis must "
                                         "stay within a process"):
        parallel.process_blocks(parallel.make_mesh((1, 1, 8)), first_half)                # tensor spans both


class _OnProcess:
    """A CPU device that says it belongs to process `id % 2` (two simulated hosts whose devices
    alternate in device order, as a TPU ring's do)."""

    def __init__(self, device):
        self.device, self.id, self.platform, self.device_kind = device, device.id, device.platform, device.device_kind
        self.process_index = device.id % 2


def test_interleaved_hosts_are_laid_out_process_major_on_cpu():
    """`make_mesh`'s fallback when the device order interleaves processes: the grid is cut into one
    contiguous block per process along the batch axes, which `process_blocks` then accepts (the TPU
    topology version below needs libtpu)."""
    from jax.sharding import Mesh
    devices = [_OnProcess(d) for d in jax.devices()]
    for shape in [(1, 8, 1), (2, 4, 1), (2, 2, 2)]:
        grid = parallel._process_major(shape, devices)
        assert [d.process_index for d in grid.flat] == [0] * 4 + [1] * 4, shape
        mesh = Mesh(np.vectorize(lambda d: d.device)(grid), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
        assert parallel.process_blocks(mesh, lambda d: d.id % 2) == {0: 0, 1: 1}, shape
        plain = jax.make_mesh(shape, parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
        with pytest.raises(ValueError, match="does not give each of the 2 processes its own contiguous block"):
            parallel.process_blocks(plain, lambda d: d.id % 2)           # what the fallback is for
    assert parallel._process_major((1, 1, 8), devices) is None           # a tensor axis across hosts: no cut


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_a_topology_order_that_interleaves_hosts_is_laid_out_process_major():
    """v5e 4x4 (4 hosts): jax.make_mesh's 16-chip ring visits hosts 0,0,1,1,1,1,0,2,... -- the pipeline's
    per-process row blocks would interleave; make_mesh keeps each host's chips together instead."""
    from bmgpt_jax.training import targets
    devices = targets.tpu_devices("v5e:4x4")
    ring = jax.make_mesh((1, 16, 1), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    with pytest.raises(ValueError, match="does not give each of the 4 processes its own contiguous block"):
        parallel.process_blocks(ring)
    mesh = parallel.make_mesh((1, 16, 1), devices)
    assert [d.process_index for d in mesh.devices.flat] == [p for p in range(4) for _ in range(4)]
    assert parallel.process_blocks(mesh) == {p: p for p in range(4)}
    for shape in [(2, 8, 1), (4, 2, 2), (1, 8, 2)]:
        assert sorted(parallel.process_blocks(parallel.make_mesh(shape, devices)).values()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="tensor axis must stay within a process"):
        parallel.make_mesh((1, 1, 16), devices)

"""The devices a plan compiles for, none of them attached: a TPU slice, GPU nodes, or virtual CPU devices.

  TPU   `v5e:4x4`, `v4:2x2x4`, ... : libtpu's compile-only devices (`jax.experimental.topologies`), the
        TPU compiler's buffer assignment (`pip install -e .[tpu-plan]`).
  GPU   `h100:8`, `h100:2x8`, `a100:8`, `h200:4x8` (GPUs per node, or nodes x GPUs per node): jax's CUDA
        plugin compiles for a described GPU without one (XLA:GPU's deviceless compile from a
        `GpuTargetConfigProto`; `pip install -e .[gpu]`). The cuDNN attention, Triton/cuBLAS GEMM fusions
        and the collectives are those an attached GPU of that model would get; nothing is autotuned.
  CPU   N virtual host devices: the CPU compiler's figures, a rough guide only.

Each target has a memory limit per device: a TPU chip's HBM; on GPU the share JAX's allocator takes
(`XLA_PYTHON_CLIENT_MEM_FRACTION`, 0.75 unless set) of the card's memory.
"""
from __future__ import annotations

import importlib.util
import math
import os

import jax
from jax.experimental import topologies

# TPU generation -> (chip config, HBM GiB per chip, accelerator-type prefix, cores per chip in that name)
TPU_CHIPS = {"v4": ("megacore", 32, "v4", 2), "v5p": ("megacore", 95, "v5p", 2), "v5": ("megacore", 95, "v5p", 2),
             "v5e": ("default", 16, "v5litepod", 1), "v6e": ("default", 32, "v6e", 1)}

# GPU model -> (name, compute capability, SMs, FP32 units per SM, shared memory per SM / per block opt-in,
# L2 bytes, memory bytes/s, clock GHz, memory bytes): the device description the CUDA runtime reports
# (XLA's target specs, xla/backends/gpu/target_config/specs)
GPU_CHIPS = {
    "a100": ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 167936, 166912, 41943040, 2039040000000, 1.41, 85100068864),
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 233472, 232448, 52428800, 3352320000000, 1.98, 84942979072),
    "h200": ("NVIDIA H200 141GB HBM3e", (9, 0), 132, 128, 233472, 232448, 52428800, 4800000000000, 1.98, 151397597184),
}
GPU_MEM_FRACTION = 0.75   # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION: the share of a GPU its allocator takes


def devices_for(topology: str) -> tuple[list, float, str]:
    """(compile-only devices, memory GiB a device may use, a description) of a TPU or GPU `topology`."""
    gen = topology.partition(":")[0]
    if gen in GPU_CHIPS:
        fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", str(GPU_MEM_FRACTION))
        try:
            limit = GPU_CHIPS[gen][-1] / 2 ** 30 * float(fraction)
        except ValueError:
            raise SystemExit(f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction!r} is not a number") from None
        return gpu_devices(topology), round(limit, 1), "figures from the GPU compiler (XLA:GPU, jax's CUDA plugin)"
    return tpu_devices(topology), TPU_CHIPS[gen][1], "figures from the TPU compiler (libtpu)"


def _shape(topology: str, known: dict) -> tuple[str, list[int]]:
    """`GEN:AxB[xC]` -> (GEN, [A, B, C]) for a GEN among `known`'s keys; SystemExit naming anything else."""
    gen, _, dims = topology.partition(":")
    try:
        shape = [int(d) for d in dims.split("x")]
    except ValueError:
        shape = []
    if gen not in known or not shape or min(shape) < 1:
        raise SystemExit(f"unknown topology {topology!r}: expected GEN:AxB[xC] with GEN in "
                         f"{sorted(TPU_CHIPS) + sorted(GPU_CHIPS)} (GPU: GPUS or NODESxGPUS)")
    return gen, shape


def tpu_devices(topology: str) -> list:
    """Compile-only devices of a TPU slice, e.g. `v5e:4x4` -> 16 devices, without any TPU attached.

    v4/v5p chips run as one megacore device each; 3-D slices of side >= 4 are tori (wrap-around links).
    TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES are set (if unset) so libtpu does not probe for hosts, and
    ALLOW_MULTIPLE_LIBTPU_LOAD so that several compile-only planners on one host do not fight over libtpu's
    lockfile (there is no TPU to share).
    """
    gen, shape = _shape(topology, TPU_CHIPS)
    if importlib.util.find_spec("libtpu") is None:
        raise SystemExit(f"--topology {topology} needs libtpu (pip install -e '.[tpu-plan]'); "
                         "or use --devices N for the CPU compiler's figures")
    chip_config, _, accel, per_chip = TPU_CHIPS[gen]
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{accel}-{math.prod(shape) * per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    full = shape + [1] * (3 - len(shape))
    wrap = tuple(len(shape) == 3 and d >= 4 for d in full)
    hosts = tuple(min(d, b) for d, b in zip(full, (2, 2, 1)))   # 2x2 chips a host; a 1x1 slice is one chip
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip_config,
                                            chips_per_host_bounds=hosts, num_slices=1, wrap=wrap).devices
    except jax.errors.JaxRuntimeError as e:   # e.g. v5e:2x3, not made of whole hosts
        raise SystemExit(f"--topology {topology}: libtpu refuses it: {str(e).splitlines()[0]}") from None


def gpu_target_config(gen: str) -> str:
    """The `GpuTargetConfigProto` text of GPU model `gen` (a key of GPU_CHIPS): what XLA:GPU compiles for."""
    name, (major, minor), sms, fpus, smem, optin, l2, bandwidth, clock, memory = GPU_CHIPS[gen]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem} threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: {clock} device_memory_size: {memory}
  shared_memory_per_block_optin: {optin} cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
runtime_version {{ major: 12 minor: 8 }}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
device_description_str: "{name}"
"""


def gpu_devices(topology: str) -> list:
    """Compile-only devices of GPU nodes, e.g. `h100:8` (one node of 8) or `h100:2x8` (2 nodes: 16 devices,
    process indices 0 and 1), without any GPU attached. Needs jax's CUDA plugin (the `[gpu]` extra); with
    JAX's runtime on the CPU (`host_backend_only`) the plugin loads without looking for a GPU."""
    gen, shape = _shape(topology, GPU_CHIPS)
    if len(shape) > 2:
        raise SystemExit(f"--topology {topology}: a GPU target is GPUS or NODESxGPUS")
    if not cuda_plugin():
        raise SystemExit(f"--topology {topology} needs jax's CUDA plugin (pip install -e '.[gpu]'); "
                         "or use --devices N for the CPU compiler's figures")
    nodes, per_node = shape if len(shape) == 2 else (1, shape[0])
    try:
        return topologies.get_topology_desc("bmgpt", "cuda", target_config=gpu_target_config(gen),
                                            topology=f"1x{nodes}x{per_node}").devices
    except NotImplementedError:   # JAX logged why the plugin did not load
        raise SystemExit(f"--topology {topology}: jax's CUDA plugin is installed but did not load "
                         "(JAX's 'Jax plugin configuration error' above says why)") from None


def cuda_plugin() -> bool:
    """Whether jax's CUDA plugin (`jax[cuda12]`) is installed."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:   # no jax_plugins package at all
        return False


def host_backend_only() -> None:
    """Keep JAX's runtime on the host CPU (plans never run on an accelerator; with libtpu or the CUDA
    plugin installed, JAX would otherwise probe for a TPU or GPU). A no-op once a backend is up, e.g.
    inside pytest."""
    if not jax._src.xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def cpu_devices(n: int) -> list:
    """`n` virtual CPU devices. Sets `jax_num_cpu_devices` when the backend is not up yet (the CLI's case);
    otherwise the running process must already have >= n (e.g. XLA_FLAGS=--xla_force_host_platform_device_count)."""
    if not jax._src.xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise SystemExit(f"--devices {n}: this process has only {len(devices)} CPU devices; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts")
    return devices[:n]

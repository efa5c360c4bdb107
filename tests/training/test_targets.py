"""`bmgpt_jax.training.targets`: the compile-only devices `python -m bmgpt_jax.plan --topology` compiles for.
A bad topology is one line naming it. With jax's CUDA plugin installed (`pip install -e .[gpu]`; no GPU
needed) XLA:GPU compiles the 10B finetune step at its real widths for 8 H100s, with cuDNN attention in
the decoder and ESM-2 (`attention: auto` in bfloat16), and the greedy decode chat runs."""
import importlib.util

import jax
import pytest

from bmgpt_jax.training import plan, targets

DEVICES = jax.devices()  # the 8-device CPU backend (conftest) up before plan touches jax config
CUDA = targets.cuda_plugin()
needs_cuda = pytest.mark.skipif(not CUDA, reason="jax's CUDA plugin not installed (pip install -e .[gpu])")
GiB = 1024 ** 3
REAL_WIDTH = ["-o", "model.lm.num_layers=1", "-o", "model.esm.num_layers=1"]


@pytest.mark.parametrize("topology, message", [
    ("x100:8", "unknown topology 'x100:8': expected GEN:AxB"), ("h100:", "unknown topology 'h100:'"),
    ("v5e:4xa", "unknown topology 'v5e:4xa'"), ("h100:0", "unknown topology 'h100:0'"),
    ("h100:2x2x2", "h100:2x2x2: a GPU target is GPUS or NODESxGPUS")])
def test_a_bad_topology_is_named(topology, message):
    with pytest.raises(SystemExit, match=message):
        targets.devices_for(topology)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e .[tpu-plan])")
def test_tpu_slices_of_one_chip_and_of_part_hosts():
    """A one-chip slice is a host of its own; a slice libtpu cannot make of whole hosts is one line."""
    assert len(targets.devices_for("v5e:1x1")[0]) == 1 and len(targets.devices_for("v5e:2x4")[0]) == 8
    with pytest.raises(SystemExit, match=r"--topology v5e:2x3: libtpu refuses it: .*not divisible"):
        targets.devices_for("v5e:2x3")


def test_a_bad_gpu_memory_fraction_is_named(monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "most")
    with pytest.raises(SystemExit, match="XLA_PYTHON_CLIENT_MEM_FRACTION='most' is not a number"):
        targets.devices_for("h100:8")


@pytest.mark.skipif(CUDA, reason="jax's CUDA plugin is installed")
def test_a_gpu_target_without_the_cuda_plugin_says_what_to_install():
    with pytest.raises(SystemExit, match=r"h100:8 needs jax's CUDA plugin \(pip install -e '\.\[gpu\]'\)"):
        targets.devices_for("h100:8")


@needs_cuda
def test_gpu_nodes_are_compile_only_devices_of_that_model(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    devices, limit, compiler = targets.devices_for("h100:2x8")
    assert len(devices) == 16 and {d.process_index for d in devices} == {0, 1}
    assert {(d.platform, d.device_kind) for d in devices} == {("gpu", "NVIDIA H100 80GB HBM3")}
    assert limit == round(84942979072 / GiB * 0.75, 1) and "XLA:GPU" in compiler
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    a100, limit, _ = targets.devices_for("a100:4")
    assert len(a100) == 4 and a100[0].device_kind == "NVIDIA A100-SXM4-80GB"
    assert limit == round(85100068864 / GiB * 0.9, 1)


@needs_cuda
def test_the_10b_finetune_step_compiles_for_8_h100s_with_cudnn_attention(capsys):
    """Real widths, one decoder and one ESM layer, bfloat16, batch 16 x 2048 tokens x 4 micro-batches
    sharded over fsdp 8: XLA:GPU compiles the step (the cuDNN fused attention custom calls in it) and the
    table sizes it against JAX's share of an H100."""
    (p,) = plan.main(["--topology", "h100:8", "--stage", "finetune", *REAL_WIDTH])
    out = capsys.readouterr().out
    assert "h100:8: 8 x NVIDIA H100 80GB HBM3 (1 hosts) -- figures from the GPU compiler" in out
    assert p.attention == "cudnn/cudnn" and not p.step.error
    assert 0 < p.peak < 59.3 * GiB and "yes (59.3)" in out
    assert p.state_per_device == pytest.approx((p.param_bytes + p.opt_state_bytes) / 8, rel=0.01)
    assert p.step.collectives, "fsdp over 8 GPUs gathers the weights"


@needs_cuda
def test_greedy_decode_compiles_for_8_h100s():
    (p,) = plan.main(["--topology", "h100:8", "--generate", "--mesh", "1,8,1", *REAL_WIDTH, "--new", "16"])
    assert not p.program.error and 0 < p.program.peak < 59.3 * GiB
    assert p.params_per_device == pytest.approx(2 * p.params / 8, rel=0.01)

"""Multi-process JAX on one machine: two processes (127.0.0.1, gloo CPU collectives) x 2 CPU devices each.

Each worker joins with `bmgpt_jax.distributed.initialize`, builds a data=2 x fsdp=2 mesh over the 4 global
devices, checks a cross-process psum, then runs 3 sharded train steps of the tiny Llama while feeding only
its half of every batch (`jax.make_array_from_process_local_data`). The losses must equal those of this
(single) process stepping on the full batches. Also: the env/no-op rules and the launchers' dry runs.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bmgpt_jax import distributed

REPO = Path(__file__).resolve().parent.parent
B, T, STEPS = 8, 16, 3

WORKER = r"""
import json, os, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from bmgpt_jax import distributed
from tests.test_distributed import run_steps, batches
assert distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jax.sharding import NamedSharding, PartitionSpec as P
from bmgpt_jax import parallel
p = jax.process_index()
mesh = parallel.make_mesh((2, 2, 1))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P(("data", "fsdp"))), np.full((2,), p + 1.0), (4,))
psum = jax.shard_map(lambda a: jax.lax.psum(a.sum(), ("data", "fsdp")), mesh=mesh,
                     in_specs=P(("data", "fsdp")), out_specs=P())(x)
losses = run_steps(mesh, lambda b: {k: v[p * (len(v) // 2):(p + 1) * (len(v) // 2)] for k, v in b.items()})
print("RESULT " + json.dumps({"process_count": jax.process_count(), "devices": jax.device_count(),
                              "local": jax.local_device_count(), "psum": float(psum), "losses": losses}), flush=True)
"""


def batches():
    """STEPS text batches `[B, T]` (numpy, the same in every process): one random batch with some right
    padding and a 4-token prompt without loss, repeated so that the loss falls."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 32000, (B, T), dtype=np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1::2, T // 2:] = 0
    return [{"input_ids": ids, "attention_mask": mask, "loss_mask": mask * (np.arange(T) >= 4)}] * STEPS


def run_steps(mesh, local_part) -> list[float]:
    """STEPS AdamW steps of the tiny Llama on `mesh`; this process feeds `local_part(full_batch)` of each batch."""
    import jax
    from flax import nnx

    from bmgpt_jax import config, parallel
    from bmgpt_jax.training import optim, step
    from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM
    from bmgpt_jax.models.biomedgpt import lm_loss
    cfg = config.load(LlamaConfig, "llama_tiny")
    graphdef, trainable, frozen = optim.split_trainable(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    tx = optim.make_optimizer(optim.OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10))
    trainable, frozen = parallel.shard(trainable, mesh), parallel.shard(frozen, mesh)
    opt_state = step.init_opt_state(tx, trainable, mesh)
    full = batches()
    bsh = parallel.batch_shardings(full[0], mesh)
    fn = step.jit_train_step(step.make_train_step(lm_loss, tx), graphdef, trainable, frozen, opt_state, bsh, mesh)
    losses = []
    for b in full:
        arrays = {k: jax.make_array_from_process_local_data(bsh[k], v, b[k].shape) for k, v in local_part(b).items()}
        trainable, opt_state, metrics = fn(trainable, frozen, opt_state, arrays)
        losses.append(float(metrics["loss"]))
    return losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    import jax

    from bmgpt_jax import parallel
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, coordinator, str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    results = []
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"worker {i} failed:\n{out[-3000:]}"
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))
    reference = run_steps(parallel.make_mesh((1, 1, 1), jax.devices()[:1]), lambda b: b)
    for r in results:
        assert (r["process_count"], r["devices"], r["local"]) == (2, 4, 2)
        assert r["psum"] == 6.0  # 2 devices x 1.0 (process 0) + 2 x 2.0 (process 1)
        np.testing.assert_allclose(r["losses"], reference, rtol=0, atol=1e-5)
    assert reference[-1] < reference[0]


def test_single_process_is_a_noop(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                 "SLURM_PROCID", "BMGPT_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.initialize() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(ValueError, match="process_id 5"):
        distributed.initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        distributed.initialize()


def _dry(script: str, *args: str, env: dict | None = None) -> list[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    out = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", *args], env=full_env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_tpu_pod_dry_run():
    lines = _dry("tpu_pod.sh", "--tpu", "my-pod", "--zone", "us-east5-b", "--project", "proj", "--sync",
                 "--", "--config", "configs/align_10b.yaml", "train.steps=10")
    assert lines[0].startswith("gcloud compute tpus tpu-vm scp --recurse")
    assert "my-pod:~/bmgpt_jax" in lines[0] and "--worker=all" in lines[0]
    assert lines[-1].startswith("gcloud compute tpus tpu-vm ssh my-pod --zone=us-east5-b --project=proj --worker=all")
    assert "BMGPT_DISTRIBUTED=auto python -m bmgpt_jax.train --config configs/align_10b.yaml train.steps=10" in lines[-1]


def test_gpu_multinode_dry_run():
    lines = _dry("gpu_multinode.sh", "--hosts", "node0,node1", "--gpus-per-node", "2", "--per-gpu",
                 "--port", "4321", "--", "--config", "configs/finetune_10b.yaml")
    assert len(lines) == 4  # 2 nodes x 2 GPUs, one process each
    for rank, line in enumerate(lines):
        host = f"node{rank // 2}"
        assert line.startswith(f"ssh {host} ")
        for part in ("JAX_COORDINATOR_ADDRESS=node0:4321", "JAX_NUM_PROCESSES=4", f"JAX_PROCESS_ID={rank}",
                     f"CUDA_VISIBLE_DEVICES={rank % 2}", "python -m bmgpt_jax.train --config configs/finetune_10b.yaml"):
            assert part in line, (part, line)
    lines = _dry("gpu_multinode.sh", "--slurm", "--nodes", "4", "--", "--config", "c.yaml")
    assert lines == ["srun --nodes=4 --ntasks-per-node=1 bash -c 'export JAX_COORDINATOR_ADDRESS=$(scontrol show "
                     "hostnames \"$SLURM_JOB_NODELIST\" | head -n1):12355; exec python -m bmgpt_jax.train --config c.yaml'"]

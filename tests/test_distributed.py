"""Multi-process JAX on one machine: two processes (127.0.0.1, gloo CPU collectives) x 2 CPU devices each.

Each worker joins with `bmgpt_jax.distributed.initialize`, builds a data=2 x fsdp=2 mesh over the 4 global
devices, checks a cross-process psum, then runs 3 sharded train steps of the tiny Llama while feeding only
its half of every batch (`jax.make_array_from_process_local_data`). The losses must equal those of this
(single) process stepping on the full batches. The same set-up runs BioMedGPT's molecule tokens with the
GIN's BatchNorm in training mode over the two processes' padded graphs, against one process holding all
molecules in one padded graph. Also: the env/no-op rules and the launchers' dry runs.
"""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bmgpt_jax import distributed
from tests.children import TEST_XLA_OPT

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


GIN_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from bmgpt_jax import distributed, parallel
assert distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from bmgpt_jax.data.pipeline import global_batch
from tests.test_distributed import MOLECULES, molecule_batch, train_mode_tokens
p = jax.process_index()
mesh = parallel.make_mesh((2, 2, 1))
tokens, stats = train_mode_tokens(global_batch(molecule_batch(MOLECULES[p]), mesh), mesh)
print("RESULT " + json.dumps({"tokens": tokens.tolist(), "stats": stats}), flush=True)
"""
MOLECULES = (["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1"], ["CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "CCCC"])


def molecule_batch(smiles, nodes=64):
    """A batch (docs/batch_format.md) whose first row holds the molecules `smiles`, graphs padded to `nodes`."""
    from bmgpt_jax.data import examples, molecules
    mols, start = [], 0
    for s in smiles:
        atoms, edge_index, bonds = molecules.featurize(s)
        mols.append((atoms, edge_index, bonds, start + np.arange(len(atoms), dtype=np.int32)))
        start += len(atoms)
    row = examples.Encoded(np.ones(start, np.int32), np.zeros(start, np.int32), mols, [])
    return examples.collate([row], 64, examples.Budget(2, nodes, 2 * nodes, 8, 2), 8)


def train_mode_tokens(batch, mesh):
    """BioMedGPT's molecule tokens `[N, D]` of `batch` with the GIN's BatchNorm in training mode, and every
    BatchNorm's updated running statistics (a tiny random model, the same in every process)."""
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    from bmgpt_jax import config, parallel
    from bmgpt_jax.models.biomedgpt import BioMedGPT, BioMedGPTConfig
    from bmgpt_jax.models.esm import EsmConfig
    from bmgpt_jax.models.gin import GinConfig
    from bmgpt_jax.models.llama import LlamaConfig
    cfg = BioMedGPTConfig(lm=config.load(LlamaConfig, "llama_tiny", ["vocab_size=64", "num_layers=1"]),
                          gin=config.load(GinConfig, "gin_tiny"),
                          esm=config.load(EsmConfig, "esm2_tiny", ["num_layers=1"]))
    model = BioMedGPT(cfg, rngs=nnx.Rngs(0))
    model.mol_structure_encoder.train()
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch):
        m = nnx.merge(graphdef, state)
        return m.mol_tokens(batch), nnx.state(m.mol_structure_encoder, nnx.BatchStat)

    tokens, stats = run(parallel.shard(state, mesh), batch)
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
    return gather(tokens), {".".join(map(str, k)): gather(v.value).tolist() for k, v in nnx.to_flat_state(stats)}


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


def _run_workers(script: str, timeout: int = 240) -> list[dict]:
    """Run `script` as 2 processes (argv: coordinator, process id); the JSON each prints after RESULT.
    Output goes to files, not pipes: a worker blocked on a full pipe would stall the other's shutdown."""
    import tempfile
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=TEST_XLA_OPT)
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(Path(tmp) / f"worker{i}.log", "w+") for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", script, coordinator, str(i)], cwd=REPO, env=env,
                                  stdout=logs[i], stderr=subprocess.STDOUT, text=True) for i in range(2)]
        try:
            for p in procs:
                p.wait(timeout=timeout)
        finally:
            for p in procs:
                p.kill()
        outs = []
        for log in logs:
            log.seek(0)
            outs.append(log.read())
            log.close()
    results = []
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"worker {i} failed:\n{out[-3000:]}"
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return results


def test_two_processes_match_one_process(tmp_path):
    import jax

    from bmgpt_jax import parallel
    results = _run_workers(WORKER)
    reference = run_steps(parallel.make_mesh((1, 1, 1), jax.devices()[:1]), lambda b: b)
    for r in results:
        assert (r["process_count"], r["devices"], r["local"]) == (2, 4, 2)
        assert r["psum"] == 6.0  # 2 devices x 1.0 (process 0) + 2 x 2.0 (process 1)
        np.testing.assert_allclose(r["losses"], reference, rtol=0, atol=1e-5)
    assert reference[-1] < reference[0]


def test_two_processes_train_mode_batchnorm_matches_one_process():
    """Each process's graph carries its own padding graph; BatchNorm must still normalise over the real
    nodes of both (the batch's `mol_node_mask`), as one process holding every molecule does."""
    import jax

    from bmgpt_jax import parallel
    outs = _run_workers(GIN_WORKER, timeout=420)
    n = [int(molecule_batch(m)["mol_node_mask"].sum()) for m in MOLECULES]
    both = molecule_batch(MOLECULES[0] + MOLECULES[1], nodes=128)
    ref_tokens, ref_stats = train_mode_tokens(both, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
    for out in outs:
        tokens = np.asarray(out["tokens"])
        np.testing.assert_allclose(np.concatenate([tokens[:n[0]], tokens[64:64 + n[1]]]), ref_tokens[:sum(n)],
                                   rtol=1e-5, atol=1e-5)
        assert out["stats"].keys() == ref_stats.keys()
        for key, value in ref_stats.items():
            np.testing.assert_allclose(out["stats"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)


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


@pytest.mark.parametrize("env, error", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:23456"}, "coordinator .* is set but not the number of processes"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:23456", "JAX_PROCESS_ID": "1"}, "is set but not the number"),
    ({"JAX_PROCESS_ID": "1"}, r"a process_id \(JAX_PROCESS_ID\) is set but not the number of processes"),
    ({"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "1"}, r"process_id 1 .* is outside \[0, num_processes=1\)"),
    ({"JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, "num_processes .* is 0: it must be >= 1"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "node0"}, "'node0' .* is not host:port"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "me@node0:1"}, "is not host:port"),
])
def test_a_partial_multi_process_environment_is_refused(monkeypatch, env, error):
    """Settings that cannot describe one job stop the start-up: they used to leave each host in a
    single-process run of its own (or fail inside JAX with an IndexError)."""
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                 "SLURM_PROCID", "BMGPT_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=error):
        distributed.initialize()


def _dry(script: str, *args: str, env: dict | None = None) -> list[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    out = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", *args], env=full_env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def _refused(script: str, *args: str, env: dict | None = None) -> str:
    """A launcher refusing its arguments: exit 2, nothing printed to run, one line on stderr (returned)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    out = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", *args], env=full_env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1, (out.stdout, out.stderr)
    return out.stderr.strip()


SHARED_WORKER = r"""
import json, sys
import jax
from bmgpt_jax import distributed
assert distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
result = {}
for name, folder in (("shared", SHARED), ("own", OWN[jax.process_index()]), ("unwritable", UNWRITABLE)):
    try:
        distributed.check_shared_folder(folder, "checkpoint.dir")
        result[name] = "ok"
    except ValueError as e:
        result[name] = str(e)
print("RESULT " + json.dumps(result), flush=True)
"""


def test_a_checkpoint_folder_every_process_sees(tmp_path):
    """`check_shared_folder` (training's start with several processes): one folder both processes see
    passes and is left as it was; a folder of each process's own (as a relative path on hosts with
    different working directories, or a local disk per node) stops both, naming the blind process; one
    process 0 cannot write stops both too (no process is left waiting at the barrier)."""
    own = [tmp_path / "host0" / "ckpt", tmp_path / "host1" / "ckpt"]
    (tmp_path / "a_file").write_text("")
    unwritable = tmp_path / "a_file" / "ckpt"
    script = (f"SHARED = {str(tmp_path / 'shared')!r}\nOWN = {[str(o) for o in own]!r}\n"
              f"UNWRITABLE = {str(unwritable)!r}\n" + SHARED_WORKER)
    for i, result in enumerate(_run_workers(script)):
        assert result["shared"] == "ok"
        assert result["unwritable"] == f"checkpoint.dir {unwritable}: process 0 cannot write there"
        assert result["own"].startswith(f"checkpoint.dir {own[i]} is not one folder every process sees "
                                        "(process(es) [1] do not see what process 0 wrote there)"), result["own"]
    assert list((tmp_path / "shared").iterdir()) == [] and list(own[0].iterdir()) == [] and not own[1].exists()
    assert distributed.check_shared_folder(tmp_path / "anything", "x") is None   # one process: nothing to do
    assert not (tmp_path / "anything").exists()


def test_tpu_pod_dry_run():
    lines = _dry("tpu_pod.sh", "--tpu", "my-pod", "--zone", "us-east5-b", "--project", "proj", "--sync",
                 "--", "--config", "configs/align_10b.yaml", "train.steps=10")
    assert lines[0] == f"bash {REPO}/launch/pack.sh /tmp/bmgpt_jax_sync.tar.gz"
    assert lines[1] == ("gcloud compute tpus tpu-vm scp /tmp/bmgpt_jax_sync.tar.gz my-pod:/tmp/bmgpt_jax_sync.tar.gz "
                        "--zone=us-east5-b --project=proj --worker=all")
    assert "'--command=mkdir -p ~/bmgpt_jax && tar -xzf /tmp/bmgpt_jax_sync.tar.gz -C ~/bmgpt_jax" in lines[2]
    assert lines[-1].startswith("gcloud compute tpus tpu-vm ssh my-pod --zone=us-east5-b --project=proj --worker=all")
    assert "BMGPT_DISTRIBUTED=auto python -m bmgpt_jax.train --config configs/align_10b.yaml train.steps=10" in lines[-1]


def test_tpu_pod_quotes_the_folder_and_python_on_the_workers(tmp_path):
    """--dir and --python are one word each in the workers' commands (a space split them), a leading ~/
    still the worker's home: each printed --command run here (HOME a stand-in) reaches the stand-in python."""
    home = tmp_path / "home"
    (home / "my dir").mkdir(parents=True)
    python = tmp_path / "my env" / "python"
    python.parent.mkdir()
    python.write_text('#!/bin/sh\necho "$PWD"; printf "<%s>" "$@"\n')
    python.chmod(0o755)
    lines = _dry("tpu_pod.sh", "--tpu", "t", "--zone", "z", "--dir", "~/my dir", "--python", str(python), "--sync",
                 "--setup", "--", "--config", "a b.yaml")
    commands = [word.removeprefix("--command=") for line in lines for word in shlex.split(line)
                if word.startswith("--command=")]
    assert commands[0].startswith("mkdir -p ~/'my dir' && tar -xzf /tmp/bmgpt_jax_sync.tar.gz -C ~/'my dir' && ")
    ran = [subprocess.run(["bash", "-c", command], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=30) for command in commands[1:]]
    assert [(r.returncode, r.stdout) for r in ran] == [
        (0, f"{home}/my dir\n<-m><pip><install><-e><.[tpu]>"),
        (0, f"{home}/my dir\n<-m><bmgpt_jax.train><--config><a b.yaml>")], [r.stderr for r in ran]


def test_pack_carries_what_git_carries(tmp_path):
    """`launch/pack.sh` (what `tpu_pod.sh --sync` sends): tracked files and untracked ones git does not
    ignore, never the ignored (.venv/, runs/) nor a tracked file deleted in the work tree; outside git,
    everything but .git/, .venv/, runs/, caches."""
    import tarfile

    def tree(root: Path, git: bool) -> Path:
        (root / "launch").mkdir(parents=True)
        shutil.copy(REPO / "launch" / "pack.sh", root / "launch" / "pack.sh")
        for name in ("pkg/a.py", "pkg/gone.py", "new.py", ".venv/lib/big.so", "runs/x/ckpt", "pkg/__pycache__/a.pyc"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(name)
        (root / ".gitignore").write_text(".venv/\n/runs/\n__pycache__/\n")
        if git:
            subprocess.run(["git", "init", "-q"], cwd=root, check=True)
            subprocess.run(["git", "add", ".gitignore", "launch", "pkg"], cwd=root, check=True)
            (root / "pkg" / "gone.py").unlink()
        return root

    def packed(root: Path) -> list[str]:
        out = tmp_path / f"{root.name}.tar.gz"
        run = subprocess.run(["bash", str(root / "launch" / "pack.sh"), str(out)], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr
        with tarfile.open(out) as t:
            return sorted(n.removeprefix("./") for n in t.getnames() if t.getmember(n).isfile())

    assert packed(tree(tmp_path / "git", True)) == [".gitignore", "launch/pack.sh", "new.py", "pkg/a.py"]
    assert packed(tree(tmp_path / "plain", False)) == [".gitignore", "launch/pack.sh", "new.py", "pkg/a.py",
                                                       "pkg/gone.py"]
    usage = subprocess.run(["bash", str(REPO / "launch" / "pack.sh")], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "launch/pack.sh OUT.tar.gz" in usage.stdout


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


def test_launchers_refuse_an_option_without_its_value():
    """An option's value missing (at the end, or the next option taken for it) is named, not a bash error."""
    for script, args, message in [
            ("tpu_pod.sh", ["--tpu", "--sync", "--zone", "z"], "--tpu needs a value, not --sync"),
            ("tpu_pod.sh", ["--tpu", "t", "--zone"], "--zone needs a value"),
            ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--dir", ""], "--dir needs a value"),
            ("gpu_multinode.sh", ["--hosts"], "--hosts needs a value"),
            ("gpu_multinode.sh", ["--hosts", "a", "--port", "--", "x"], "--port needs a value, not --")]:
        assert _refused(script, *args) == f"{script}: {message}"


def test_gpu_multinode_refuses_bad_numbers_and_empty_hosts():
    """Counts and the port are positive whole numbers (0 GPUs launched nothing and exited 0, `abc` stopped
    bash); a host list with an empty entry (it ran `ssh ''`) or a space is refused."""
    for args, message in [
            (["--hosts", "a", "--gpus-per-node", "0", "--per-gpu"],
             "--gpus-per-node takes a positive whole number, not 0"),
            (["--hosts", "a", "--gpus-per-node", "abc"], "--gpus-per-node takes a positive whole number, not abc"),
            (["--hosts", "a", "--port", "abc"], "--port takes a positive whole number, not abc"),
            (["--hosts", "a", "--port", "70000"], "--port 70000 is not a port (1-65535)"),
            (["--slurm", "--nodes", "-1"], "--nodes takes a positive whole number, not -1"),
            (["--hosts", "node0,,node1"], "--hosts node0,,node1 has an empty entry"),
            (["--hosts", "node0,"], "--hosts node0, has an empty entry"),
            (["--hosts", "node0, node1"], "--hosts 'node0, node1' has a space: give h0,h1,... as one word")]:
        assert _refused("gpu_multinode.sh", *args) == f"gpu_multinode.sh: {message}"


def test_gpu_multinode_hosts_and_slurm_exclude_each_other():
    """--hosts under --slurm was silently ignored, and so was --nodes with --hosts: both are refused. Inside
    a SLURM job the job's node count still serves --slurm and does not trouble --hosts."""
    assert _refused("gpu_multinode.sh", "--slurm", "--nodes", "2", "--hosts", "a,b") == (
        "gpu_multinode.sh: --hosts and --slurm exclude each other (under --slurm, srun runs on the job's nodes)")
    assert _refused("gpu_multinode.sh", "--hosts", "a,b", "--nodes", "2") == (
        "gpu_multinode.sh: --nodes goes with --slurm (with --hosts, each host is a node)")
    job = {"SLURM_JOB_NUM_NODES": "3"}
    assert _dry("gpu_multinode.sh", "--slurm", env=job)[0].startswith("srun --nodes=3 ")
    assert len(_dry("gpu_multinode.sh", "--hosts", "a,b", env=job)) == 2


def test_gpu_multinode_coordinator_is_the_first_host_as_the_others_reach_it(tmp_path):
    """ssh's user@ is no part of the coordinator's address; a first host that is this machine (localhost)
    while another host is remote becomes `hostname -f` (a stand-in here), as localhost would have sent the
    remote processes to themselves; no name for this machine but localhost is refused."""
    def hostname(name: str) -> dict:  # an environment whose `hostname -f` says name
        (tmp_path / "hostname").write_text(f"#!/bin/sh\necho {name}\n")
        (tmp_path / "hostname").chmod(0o755)
        return {"PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def coordinators(hosts: str) -> list[str]:
        lines = _dry("gpu_multinode.sh", "--hosts", hosts, "--port", "4321", env=hostname("head.example"))
        return [re.search(r"JAX_COORDINATOR_ADDRESS=(\S+)", line)[1] for line in lines]

    assert coordinators("alice@node0,alice@node1") == ["node0:4321"] * 2
    assert coordinators("localhost,node1") == ["head.example:4321"] * 2
    assert coordinators("alice@localhost,node1") == ["head.example:4321"] * 2
    assert coordinators("localhost,127.0.0.1") == ["localhost:4321"] * 2   # every process here
    assert coordinators("node0,localhost") == ["node0:4321"] * 2
    refused = _refused("gpu_multinode.sh", "--hosts", "localhost,node1", env=hostname("localhost.localdomain"))
    assert refused == ("gpu_multinode.sh: the first host (localhost) is the coordinator node1 connects to, and "
                       "hostname -f gives this machine no other name: put first a host named as the others reach it")


def test_gpu_multinode_quotes_the_folder_and_python_on_the_nodes(tmp_path):
    """As tpu_pod.sh: --dir (quoted, but ~/my dir was taken literally) and --python (a space split it) are
    one word each, a leading ~/ the node's home; the printed command run here reaches the stand-in python."""
    home = tmp_path / "home"
    (home / "my dir").mkdir(parents=True)
    python = tmp_path / "my env" / "python"
    python.parent.mkdir()
    python.write_text('#!/bin/sh\necho "$PWD"; printf "<%s>" "$@"\n')
    python.chmod(0o755)
    [line] = _dry("gpu_multinode.sh", "--hosts", "localhost", "--dir", "~/my dir", "--python", str(python), "--",
                  "--config", "a b.yaml")
    assert shlex.split(line)[:2] == ["bash", "-c"]
    ran = subprocess.run(["bash", "-c", shlex.split(line)[2]], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, timeout=30)
    assert ran.stdout == f"{home}/my dir\n<-m><bmgpt_jax.train><--config><a b.yaml>", ran.stderr
    [line] = _dry("gpu_multinode.sh", "--slurm", "--nodes", "1", "--python", str(python))
    assert f"exec {shlex.quote(str(python))} -m bmgpt_jax.train" in shlex.split(line)[-1]


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_multinode.sh"])
def test_launcher_help_is_the_header_and_names_every_flag(script):
    path = REPO / "launch" / script
    run = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "set -euo" not in run.stdout and "#!" not in run.stdout
    flags = set(re.findall(r"^\s+(--[a-z-]+)(?:\|[^)]*)?\)", path.read_text(), re.M)) - {"--help"}
    assert len(flags) >= 6 and all(flag in run.stdout for flag in flags), sorted(f for f in flags if f not in run.stdout)

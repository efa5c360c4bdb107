"""Multi-process JAX on one machine: two processes (127.0.0.1, gloo CPU collectives) x 2 CPU devices each.

Each worker joins with `bmgpt_jax.distributed.initialize`, builds a data=2 x fsdp=2 mesh over the 4 global
devices, checks a cross-process psum, then runs 3 sharded train steps of the tiny Llama while feeding only
its half of every batch (`jax.make_array_from_process_local_data`). The losses must equal those of this
(single) process stepping on the full batches. The same set-up runs BioMedGPT's molecule tokens with the
GIN's BatchNorm in training mode over the two processes' padded graphs, against one process holding all
molecules in one padded graph. Also: the environment rules and the shared-folder check (the launchers:
test_launch.py).
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


BUILD_WORKER = r"""
import sys
import jax
from bmgpt_jax import distributed
assert distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jax.experimental import multihost_utils
from bmgpt_jax.data.builders import make_builder, read_split
p = jax.process_index()
try:
    records = read_split(make_builder("chebi20", RAW[p], OUT[p]), "test")
except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
multihost_utils.process_allgather(len(records))   # the next collective (evaluate's, the checkpointer's)
print(f"RESULT {len(records)}", flush=True)
"""


@pytest.mark.parametrize("failing", [0, 1])
def test_a_build_failing_on_one_process_stops_every_process(tmp_path, failing):
    """A dataset build that fails on one process (here: its raw folder lacks the files) is raised on every
    process, naming that process, and they all exit: the others used to build their own copy and then wait,
    for ever, for the failed one in the next collective (builders.prepare)."""
    from tests.children import communicate
    good = tmp_path / "raw"
    (good / "molecules").mkdir(parents=True)
    for split in ("validation", "test"):
        (good / "molecules" / f"chebi20_{split}.txt").write_text("CID\tSMILES\tdescription\n3\tCCO\tEthanol.\n")
    raw = [str(tmp_path / "empty") if i == failing else str(good) for i in range(2)]
    (tmp_path / "empty").mkdir()
    out = [str(tmp_path / f"out{i}") for i in range(2)]   # host-local data_dirs: each builds its own copy
    script = f"RAW = {raw!r}\nOUT = {out!r}\n" + BUILD_WORKER
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=TEST_XLA_OPT)
    procs = [subprocess.Popen([sys.executable, "-c", script, coordinator, str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = communicate(procs, timeout=120)   # a hang: TimeoutExpired
    lacks = f"chebi20: {tmp_path / 'empty'} lacks molecules/chebi20_"
    for i, (p, text) in enumerate(zip(procs, outs)):
        assert p.returncode == 2, f"process {i}:\n{text[-3000:]}"
        assert "RESULT" not in text
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        if i == failing:
            assert errors[-1].startswith(f"error: {lacks}"), text[-3000:]
        else:
            assert errors[-1].startswith(f"error: building chebi20 failed on process {failing}: {lacks}"), \
                text[-3000:]


def _run_commands(tmp_path, commands: list[list[str]], timeout: int = 120) -> list[tuple[int, str]]:
    """Each process's command line (`python -m ...`) started as one process of a two-process job (the
    `JAX_*` variables `distributed.initialize` reads); their (exit status, output) once all have exited."""
    from tests.children import communicate
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=TEST_XLA_OPT,
               JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(len(commands)))
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=tmp_path, env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, cmd in enumerate(commands)]
    outs = communicate(procs, timeout=timeout)   # a process left waiting for the failed one: TimeoutExpired
    return [(p.returncode, text) for p, text in zip(procs, outs)]


def test_bad_input_on_one_process_stops_every_process_with_its_message(tmp_path):
    """A config file that only one host lacks (train) or an --out-dir that only one host cannot create
    (evaluate): that process says why, and the others stop at once with the same line, naming it, instead
    of timing out in their next collective with a JAX traceback that points nowhere."""
    (tmp_path / "a_file").write_text("")
    train = ["-m", "bmgpt_jax.train", "steps=1", "progress=false", f"out_dir={tmp_path / 'run'}"]
    results = _run_commands(tmp_path, [train + ["--config", "tiny"], train + ["--config", "missing.yaml"]])
    for i, (code, text) in enumerate(results):
        assert code == 2, f"process {i}:\n{text[-3000:]}"
        last = [line for line in text.splitlines() if line.startswith("train: ")][-1]
        why = "config file 'missing.yaml' not found" if i else "loading the config failed on process 1: "
        assert why in last, text[-3000:]
    evaluate = ["-m", "bmgpt_jax.evaluate", "--checkpoint", str(tmp_path / "no_model"), "--source", "demo:test"]
    bad = str(tmp_path / "a_file" / "eval")
    results = _run_commands(tmp_path, [evaluate + ["--out-dir", str(tmp_path / "eval")], evaluate + ["--out-dir", bad]])
    for i, (code, text) in enumerate(results):
        assert code == 2, f"process {i}:\n{text[-3000:]}"
        last = [line for line in text.splitlines() if line.startswith("error: ")][-1]
        assert (f"--out-dir {bad}" in last) and (i == 1 or "evaluate's checks failed on process 1: " in last), text



def test_processes_started_with_other_settings_stop_naming_them(tmp_path):
    """One host given other settings (a `steps` override, `--resume` on one host only) would part from the
    others at its first different collective: a hang on TPU/GPU, a gloo abort here, or (with `--resume` into a
    folder that holds checkpoints) one process stopped and the other waiting for ever. Every process stops at
    start-up naming the keys; host-local paths (`data.tokenizer`, `data.raw_dirs`, ...) may differ."""
    train = ["-m", "bmgpt_jax.train", "progress=false", f"out_dir={tmp_path / 'run'}", "data.demo_molecules=20"]
    results = _run_commands(tmp_path, [train + ["steps=4"], ["-m", "bmgpt_jax.train", "--resume"] + train[2:] +
                                       ["steps=6", "data.workers=1"]])
    for i, (code, text) in enumerate(results):
        assert code == 2, f"process {i}:\n{text[-3000:]}"
        last = [line for line in text.splitlines() if line.startswith("train: ")][-1]
        assert last.endswith("the settings differ from process 0's: --resume: False -> True; optim.total_steps: "
                             "4 -> 6; optim.warmup_steps: 2 -> 3; steps: 4 -> 6"), text[-3000:]
        assert i or "checking that every process runs the same settings failed on process 1" in last


def test_a_host_local_path_set_on_one_host_only_is_a_difference(tmp_path, monkeypatch):
    """Per-host paths may differ between two paths, not between a path and "" (one host loading pretrained
    weights while another starts from random ones would train a mix, silently). Process 0's settings are
    simulated (the broadcast), and the failure raised as `raise_on_every_process` raises it on this host."""
    import dataclasses

    import jax

    from bmgpt_jax.training import checks
    from tests.training.runs import cfg_for

    cfg = cfg_for(tmp_path)
    theirs = {}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(checks, "broadcast_json", lambda mine: {**mine, "init": {**mine["init"], **theirs}})
    monkeypatch.setattr(checks, "raise_on_every_process", lambda e, what: e and (_ for _ in ()).throw(e))
    theirs["hf_llama"] = "/elsewhere/llama"      # process 0 reads a copy elsewhere; here: "" (random)
    with pytest.raises(ValueError, match=r"settings differ from process 0's: init.hf_llama: '/elsewhere/llama' -> ''$"):
        checks.check_same_settings(cfg, False)
    cfg = dataclasses.replace(cfg, init=dataclasses.replace(cfg.init, hf_llama="/here/llama"))
    checks.check_same_settings(cfg, False)   # two paths: each host its own copy

"""The training job: stages, meshes, multi-process, kill/resume, SIGTERM, errors, the embedded default."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import chat, parallel
from bmgpt_jax.training import loop as train
from bmgpt_jax.config import ConfigError
from bmgpt_jax.data.pipeline import BatchIterator, offset_for_process, repad

# one bucket, demo data only, small budgets: one compile per mesh
SMALL = ["data.sources=[demo]", "data.seq_buckets=[160]", "data.demo_molecules=200", "progress=false",
         "optim.warmup_steps=2", "optim.total_steps=40", "export=false"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cfg_for(tmp_path, *extra, name="run"):
    """The tiny config of the stage named in `extra` (default finetune), made small."""
    stage = next((e.split("=")[1] for e in extra if e.startswith("stage=")), "finetune")
    return train.load_config(f"tiny_{stage}", SMALL + [f"out_dir={tmp_path / name}", *extra])


def params(model, filt=nnx.Param):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.state(model, filt).flat_state()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """5 steps of the align stage on the default 8x1x1 mesh."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = cfg_for(tmp, "stage=align", "steps=5", "mesh=[8,1,1]")
    return cfg, train.run(cfg)


def test_align_trains_only_the_adaptors(reference, tmp_path):
    cfg, out = reference
    from bmgpt_jax.training.stages import build_model
    initial = params(build_model("align", out["model"].config, cfg.init)[0])  # vocab resolved
    final = params(out["model"])
    changed = sorted(k for k in final if not np.array_equal(final[k], initial[k]))
    assert changed and all(k.startswith(("proj_mol.", "proj_prot.")) for k in changed), changed
    assert {"proj_mol.kernel", "proj_prot.kernel"} <= set(changed)
    assert out["losses"][5] < out["losses"][1]


@pytest.mark.parametrize("mesh", [(1, 1, 1), (1, 8, 1), (2, 2, 2)], ids=lambda m: "x".join(map(str, m)))
def test_same_losses_and_params_on_every_mesh(reference, tmp_path, mesh):
    cfg, ref = reference
    out = train.run(cfg_for(tmp_path, "stage=align", "steps=5", f"mesh=[{','.join(map(str, mesh))}]"))
    for step, loss in ref["losses"].items():
        assert abs(out["losses"][step] - loss) < 1e-5, (step, out["losses"][step], loss)
    a, b = params(ref["model"]), params(out["model"])
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=k)
    for path, var in nnx.state(out["model"], nnx.Param).flat_state():
        want = parallel.fitted_spec(var.shape, var.get_metadata()["out_sharding"], var[...].sharding.mesh)
        assert var[...].sharding.spec == want, (path, var[...].sharding.spec, want)


def _losses(out_dir):
    """step -> loss from metrics.jsonl (the last record of a step wins: a resumed run re-logs)."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}


def _spawn(args, env_extra=None):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "bmgpt_jax.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc, ckpt_dir, min_step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if any(s >= min_step for s in steps):
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint appeared")


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    args = ["--config", "tiny_finetune"] + SMALL + ["steps=24", "checkpoint.every=4"]
    full = train.run(cfg_for(tmp_path, *args[2 + len(SMALL):], name="full"))
    killed_dir = tmp_path / "killed"
    proc = _spawn(args + [f"out_dir={killed_dir}"])
    _wait_for_checkpoint(proc, killed_dir / "checkpoints", 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = train.run(cfg_for(tmp_path, *args[2 + len(SMALL):], name="killed"), resume=True)
    assert min(resumed["losses"]) > 8 and max(resumed["losses"]) == 24  # it really resumed, then finished
    a, b = params(full["model"], nnx.Param), params(resumed["model"], nnx.Param)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _losses(killed_dir) == full["losses"]


def test_sigterm_saves_and_exits(tmp_path):
    out_dir = tmp_path / "term"
    proc = _spawn(SMALL + ["steps=100000", "checkpoint.every=1000", f"out_dir={out_dir}"])
    deadline = time.time() + 240
    while not (out_dir / "metrics.jsonl").exists() or len(_losses(out_dir)) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    steps = [int(d) for d in os.listdir(out_dir / "checkpoints") if d.isdigit()]
    assert steps and max(steps) == max(_losses(out_dir)) and max(steps) < 1000
    assert "SIGTERM" in output


def test_restore_onto_another_mesh(tmp_path):
    args = ["steps=6", "checkpoint.every=3", "stage=align"]
    full = train.run(cfg_for(tmp_path, *args, "mesh=[8,1,1]", name="a"))
    train.run(cfg_for(tmp_path, "steps=3", *args[1:], "mesh=[8,1,1]", "optim.total_steps=40", name="b"))
    resumed = train.run(cfg_for(tmp_path, *args, "mesh=[2,2,2]", name="b"), resume=True)
    assert sorted(resumed["losses"]) == [4, 5, 6]
    for s in (4, 5, 6):
        assert abs(resumed["losses"][s] - full["losses"][s]) < 1e-5


class MergedShards:
    """What two processes feed, concatenated in process order, as one process's stream (the reference)."""

    def __init__(self, cfg):
        self.its = [BatchIterator(cfg.data, p, 2) for p in range(2)]
        self.tokenizer = self.its[0].tokenizer

    def __next__(self):
        parts = [next(it) for it in self.its]
        T = max(p["input_ids"].shape[1] for p in parts)
        L = max(p["prot_ids"].shape[1] for p in parts)
        parts = [offset_for_process(repad(p, T, L), i) for i, p in enumerate(parts)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def state(self):
        return self.its[0].state()

    def restore(self, state):
        for it in self.its:
            it.restore(state)


def test_two_processes_match_one(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--config", "tiny_align"] + SMALL + ["steps=4", "mesh=[2,1,1]"]
    procs = [_spawn(args + [f"out_dir={tmp_path / 'mp'}"],
                    {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_NUM_PROCESSES": "2",
                     "JAX_PROCESS_ID": str(p), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"})
             for p in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    cfg = cfg_for(tmp_path, "steps=4", "stage=align", "mesh=[1,1,1]", name="single")
    single = train.run(cfg, batches=MergedShards(cfg))
    multi = _losses(tmp_path / "mp")
    assert sorted(multi) == [1, 2, 3, 4]
    for s, loss in single["losses"].items():
        assert abs(multi[s] - loss) < 1e-5, (s, multi[s], loss)


def test_errors_come_before_any_compute(tmp_path, capsys):
    assert train.main(["optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'stpes'; did you mean 'steps'"):
        train.load_config("tiny", ["stpes=3"])
    with pytest.raises(ValueError, match="needs 3 devices, which does not divide the 8 devices"):
        train.run(cfg_for(tmp_path, "mesh=[3,1,1]"))
    with pytest.raises(ValueError, match=r"data.batch_size 6 does not divide over the mesh's data axes \(data 4"):
        train.run(cfg_for(tmp_path, "mesh=[4,2,1]", "data.batch_size=6"))
    train.run(cfg_for(tmp_path, "steps=2", "stage=align", name="shape"))
    with pytest.raises(ValueError, match=r"proj_mol.*checkpoint \(16, 64\) vs model \(16, 96\)"):
        train.run(cfg_for(tmp_path, "steps=4", "stage=align", "model.lm.hidden_size=96", name="shape"), resume=True)


def test_embedded_default_learns_and_loads_in_chat(tmp_path):
    proc = _spawn(["steps=60", f"out_dir={tmp_path / 'default'}", "progress=false"])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    losses = _losses(tmp_path / "default")
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (58, 59, 60)])
    assert last < 0.6 * first, (first, last)
    from bmgpt_jax.chat import from_pretrained
    model = from_pretrained(tmp_path / "default" / "final")
    answer = chat.ask(model, "What is the molecular formula of this molecule?", smiles="CCO", max_new_tokens=8)
    assert isinstance(answer, str)
    assert jax.device_count() == 8


def test_frozen_scanned_rematerialised_encoders_train(tmp_path):
    """The 10B configs scan and remat ESM and the decoder; frozen, they must still trace in the step."""
    out = train.run(cfg_for(tmp_path, "stage=align", "steps=2", "model.esm.scan_layers=true",
                            "model.esm.remat=true", "model.lm.remat=full", "mesh=[2,2,2]"))
    assert all(np.isfinite(v) for v in out["losses"].values())


def test_gradient_accumulation_runs_sharded(tmp_path):
    """grad_accum stacks pipeline batches (each repadded to the longest) into one micro-batched step."""
    out = train.run(cfg_for(tmp_path, "stage=align", "steps=2", "optim.grad_accum=2", "mesh=[4,2,1]",
                            "data.seq_buckets=[96,160]"))
    assert sorted(out["losses"]) == [1, 2] and all(np.isfinite(v) for v in out["losses"].values())


def test_nonfinite_loss_stops_naming_the_step_or_skips(tmp_path):
    from bmgpt_jax.training.monitor import NonFiniteLossError
    blowup = ["stage=align", "steps=4", "optim.lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=0"]
    with pytest.raises(NonFiniteLossError, match=r"step [2-4]\b"):
        train.run(cfg_for(tmp_path, *blowup, name="stop"))
    out = train.run(cfg_for(tmp_path, *blowup, "nonfinite=skip", name="skip"))
    assert out["last_step"] == 4 and not np.isfinite(out["losses"][4])
    bad = [s for s, v in out["losses"].items() if not np.isfinite(v)]
    upto = train.run(cfg_for(tmp_path, *blowup, "nonfinite=skip", f"steps={min(bad) - 1}", name="upto"))
    a, b = params(upto["model"]), params(out["model"])  # the skipped steps changed nothing
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)

"""The training job: stages, meshes, resume past a torn checkpoint, dropped-example accounting, exports
other tools load, the embedded default (bad input and failures: test_train_errors.py; recovery from signals:
test_recovery.py)."""
import re

import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import chat, parallel
from bmgpt_jax.training import loop as train
from bmgpt_jax.config import ConfigError
from bmgpt_jax.data.pipeline import BatchIterator
from bmgpt_jax.data.text import load_tokenizer

from tests.children import communicate
from tests.training.runs import SMALL, _losses, _rows, _spawn, cfg_for, params


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


def test_bfloat16_compute_trains_sharded_close_to_float32(tmp_path):
    """`compute_dtype=bfloat16` finetuning on a 2x2x2 mesh (every sub-model in bfloat16: on CPU the
    custom-VJP bfloat16 products and embedding lookup of `layers`, sharded) follows float32's losses."""
    args = ["steps=6", "mesh=[2,2,2]"]
    f32 = train.run(cfg_for(tmp_path, *args, name="f32"))["losses"]
    bf16 = train.run(cfg_for(tmp_path, *args, "compute_dtype=bfloat16", name="bf16"))["losses"]
    assert sorted(bf16) == sorted(f32) == list(range(1, 7))
    assert max(abs(bf16[s] - f32[s]) for s in f32) < 0.02 and bf16[6] < bf16[1] - 0.5, (f32, bf16)


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
        want = parallel.fitted_spec(var.shape, var.get_metadata()["out_sharding"], var[...].sharding.mesh, refit=True)
        assert var[...].sharding.spec == want, (path, var[...].sharding.spec, want)


def test_embedded_default_learns_and_loads_in_chat(tmp_path):
    proc = _spawn(["steps=60", f"out_dir={tmp_path / 'default'}", "progress=false"])
    output, = communicate([proc], timeout=600)
    assert proc.returncode == 0, output[-3000:]
    losses = _losses(tmp_path / "default")
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (58, 59, 60)])
    assert last < 0.6 * first, (first, last)
    from bmgpt_jax.chat import from_pretrained
    model = from_pretrained(tmp_path / "default" / "final")
    answer = chat.ask(model, "What is the molecular formula of this molecule?", smiles="CCO", max_new_tokens=8)
    assert isinstance(answer, str)
    final, ckpts = tmp_path / "default" / "final", tmp_path / "default" / "checkpoints"
    assert f"model:        {final}  (python -m bmgpt_jax.chat --checkpoint {final}" in output
    assert f"checkpoints:  {ckpts}  (steps 60; --resume continues the last)" in output
    assert f"TensorBoard:  tensorboard --logdir {tmp_path / 'default' / 'tensorboard'}" in output
    assert f"metrics:      {tmp_path / 'default' / 'metrics.jsonl'}" in output
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


def test_gradient_accumulation_stacks_consecutive_pipeline_batches(tmp_path):
    """What the loop feeds the step with `grad_accum` 2 (`loop._batches`, no training): micro-batch j of
    each step is the j-th of two consecutive pipeline batches (read from a second iterator over the same
    data), widened to the longer one's T by padding on the right and its molecule slots b*T0+t moved to
    b*T+t, and each step names the data position of its first batch."""
    cfg = cfg_for(tmp_path, "stage=align", "optim.grad_accum=2", "data.seq_buckets=[96,160]")
    gin = cfg.model.gin
    it, ref = (BatchIterator(cfg.data, max_atoms=gin.max_atoms, over_cap=gin.over_cap) for _ in range(2))
    cfg = train.resolve_tokenizer(cfg, it.tokenizer)
    stream = train._batches(it, cfg)
    widths = set()
    for step in range(2):
        where, got = next(stream)
        assert where.endswith(f"epoch 0, window 0, batch {2 * step}"), where
        pair = [next(ref), next(ref)]
        assert not np.array_equal(pair[0]["mol_atoms"], pair[1]["mol_atoms"])    # two different batches
        T = max(b["input_ids"].shape[1] for b in pair)
        assert got["input_ids"].shape == (2, *pair[0]["input_ids"].shape[:1], T)
        for j, b in enumerate(pair):
            T0 = b["input_ids"].shape[1]
            widths.add(T0)
            for key in ("input_ids", "attention_mask", "loss_mask"):
                np.testing.assert_array_equal(got[key][j, :, :T0], b[key], err_msg=key)
                assert not got[key][j, :, T0:].any(), key
            for key in ("mol_atoms", "mol_bonds", "mol_senders", "mol_receivers", "mol_n_node"):
                np.testing.assert_array_equal(got[key][j], b[key], err_msg=key)
            s = b["mol_slot"]
            np.testing.assert_array_equal(got["mol_slot"][j], np.where(s >= 0, s // T0 * T + s % T0, -1))
    assert widths == {96, 160}                                  # one step widened a 96 batch to 160


def test_config_resolution_schedule_precision_and_special_ids():
    assert train.load_config("tiny", ["steps=120"]).optim.total_steps == 120            # follows steps
    assert train.load_config("tiny", ["steps=120", "optim.total_steps=500"]).optim.total_steps == 500
    assert train.load_config("biomedgpt_10b_align", ["steps=7000", "optim.warmup_steps=10"]).optim.total_steps == 7000
    short = train.load_config("tiny", ["steps=10"]).optim                              # a quick trial runs:
    assert (short.total_steps, short.warmup_steps) == (10, 5)                           # warmup cut to half
    assert train.load_config("tiny", ["steps=10", "optim.total_steps=20"]).optim.warmup_steps == 15
    bf16 = train.load_config("tiny", ["compute_dtype=bfloat16"]).model
    assert (bf16.lm.dtype, bf16.esm.dtype, bf16.gin.dtype) == ("bfloat16",) * 3
    assert bf16.lm.param_dtype == "float32"
    big = train.load_config("biomedgpt_10b_finetune").model
    assert (big.lm.dtype, big.esm.dtype, big.gin.dtype) == ("bfloat16",) * 3
    with pytest.raises(ConfigError, match="model.lm.dtype=bfloat16 conflicts with compute_dtype=float32"):
        train.load_config("tiny", ["model.lm.dtype=bfloat16"])
    tok = load_tokenizer(None)
    lm = train.resolve_tokenizer(train.load_config("tiny_lm"), tok).model.lm
    assert (lm.vocab_size, lm.bos_token_id, lm.eos_token_id, lm.pad_token_id) == (tok.vocab_size, 1, 2, tok.pad_id)
    assert tok.pad_id == tok.vocab_size - 1 < 1000                                      # the demo vocabulary
    with pytest.raises(ValueError, match=f"model.lm.vocab_size 900 is smaller than the tokenizer's {tok.vocab_size}"):
        train.resolve_tokenizer(train.load_config("tiny_lm", ["model.lm.vocab_size=900"]), tok)


@pytest.mark.parametrize("stage", ["lm", "finetune"])
def test_what_each_stage_exports_loads_with_our_logits(tmp_path, torch, stage, caplog):
    """The `lm` stage's export loads in transformers, the multimodal one in our loader; both give the trained
    model's logits within 1e-4 on a pipeline batch. (Also: `resume` with nothing to resume says so.)"""
    cfg = cfg_for(tmp_path, f"stage={stage}", "steps=2", "export=true")
    with caplog.at_level("WARNING"):
        out = train.run(cfg, resume=True)
    assert "nothing to resume; starting at step 1" in caplog.text and sorted(out["losses"]) == [1, 2]
    gin = cfg.model.gin
    batch = next(BatchIterator(cfg.data, max_atoms=gin.max_atoms, over_cap=gin.over_cap))
    real = batch["attention_mask"] == 1
    final = tmp_path / "run" / "final"
    if stage == "lm":
        from transformers import LlamaForCausalLM
        hf = LlamaForCausalLM.from_pretrained(final).eval()
        tok = load_tokenizer(None)
        assert (hf.config.vocab_size, hf.config.pad_token_id) == (tok.vocab_size, tok.pad_id)
        with torch.no_grad():
            theirs = hf(torch.tensor(batch["input_ids"], dtype=torch.long),
                        attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
        ours = np.asarray(out["model"](batch["input_ids"], batch["attention_mask"]))
    else:
        from bmgpt_jax.convert.folder import from_pretrained
        forward = nnx.jit(lambda model, batch: model(batch))
        theirs = np.asarray(forward(from_pretrained(final), batch))
        ours = np.asarray(forward(out["model"], batch))
    assert np.abs(theirs[real] - ours[real]).max() < 1e-4


def test_resume_skips_a_torn_checkpoint_and_counts_dropped_examples_on(tmp_path, caplog, capsys):
    """A run that drops examples over its node budget, stopped after step 6 with step 6's checkpoint torn:
    --resume falls back to step 4, says why, and ends with the uninterrupted run's losses, dropped-example
    counts and a metrics.jsonl holding each step once; resumed again at the last step, it trains nothing and
    says so."""
    extra = ["stage=align", "steps=8", "checkpoint.every=2", "checkpoint.keep=4", "data.node_budget=128",
             "data.max_dropped=1", "data.window_batches=3"]   # steps 4 and 8 mid-window
    full = train.run(cfg_for(tmp_path, *extra, name="full"))
    assert full["data"]["over_node_budget"] > 0 and full["data"]["examples"] >= 64
    rows = _rows(tmp_path / "full")
    assert rows[-1]["dropped_over_node_budget"] == full["data"]["over_node_budget"]
    assert rows[-1]["examples"] == full["data"]["examples"]
    train.run(cfg_for(tmp_path, *extra, "steps=6", name="part"))
    ckpts = tmp_path / "part" / "checkpoints"
    (ckpts / "6" / "meta" / "metadata").write_text('{"config": {"st')
    with caplog.at_level("INFO"):
        resumed = train.run(cfg_for(tmp_path, *extra, name="part"), resume=True)
    assert "checkpoint step 6 is unreadable (JSONDecodeError" in caplog.text and "resumed from step 4" in caplog.text
    assert "differ from the checkpoint's" not in caplog.text                # only `steps` changed
    assert (ckpts / "6.unreadable").is_dir() and (ckpts / "8").is_dir()
    assert sorted(resumed["losses"]) == [5, 6, 7, 8]
    assert all(resumed["losses"][s] == full["losses"][s] for s in (5, 6, 7, 8))
    assert resumed["data"] == full["data"]
    assert _losses(tmp_path / "part") == full["losses"]
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = train.run(cfg_for(tmp_path, *extra, "optim.lr=0.5", "eval.max_batches=2", name="part"),
                          resume=True)   # at the last step; `eval` may change without a word
    assert again["losses"] == {} and again["last_step"] == 8 and again["data"] == full["data"]   # the run's totals
    out = capsys.readouterr().out
    assert "the checkpoint is at step 8, steps=8: nothing to train" in out
    assert f"data: {full['data']['examples']:,} examples read" in out
    assert re.search(r"--resume: the run goes on with settings that differ from the checkpoint's: optim.lr: "
                     r"[0-9.e-]+ -> 0.5$", caplog.text, re.M)


def test_too_many_dropped_examples_are_saved_first_and_resume_with_a_higher_limit(tmp_path, monkeypatch):
    """Past data.max_dropped mid-run the step is saved before the run stops (not the last `checkpoint.every`
    step), so a resume with a raised limit goes on from it."""
    from bmgpt_jax.training import checkpoint, dropped
    monkeypatch.setattr(dropped, "CHECK_AFTER", 20)    # judged once the second window (32 examples) is read
    extra = ["stage=align", "steps=4", "checkpoint.every=100", "data.node_budget=64", "data.window_batches=2"]
    with pytest.raises(dropped.TooManyDropped, match=r"\(step 3 is saved: --resume goes on from there\)"):
        train.run(cfg_for(tmp_path, *extra, "data.max_dropped=0.01"))
    assert checkpoint.saved_steps(tmp_path / "run" / "checkpoints") == [3] and len(_rows(tmp_path / "run")) == 3
    assert sorted(train.run(cfg_for(tmp_path, *extra, "data.max_dropped=1"), resume=True)["losses"]) == [4]


def test_the_data_running_out_is_saved_exported_and_said(tmp_path, capsys):
    """data.num_epochs=1 of 50 records is 7 batches (windows of 2, 2, 2, 1), with grad_accum 2 three steps:
    the run saves and exports step 3 and says that the data ran out, and that the 7th batch was read (and
    counted) but not trained. Resumed with another epoch it says where it resumed (a bare line on stderr: the
    command line's log set-up) and trains on from the 7th batch to the second epoch's end."""
    out_dir = tmp_path / "epoch"
    argv = ["--config", "tiny_align"] + SMALL + ["data.demo_molecules=5", "data.num_epochs=1", "optim.grad_accum=2",
                                                 "data.window_batches=2", "steps=100", "checkpoint.every=100",
                                                 "export=true", f"out_dir={out_dir}"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert ("the data ran out after data.num_epochs=1 epoch(s) at step 3 of steps=100; checkpoint 3 is saved; its "
            "last 1 batch(es), fewer than optim.grad_accum=2, were read but not trained (raise data.num_epochs and "
            "--resume to train on)") in out.splitlines()
    assert "data: 50 examples read" in out
    assert f"model:        {out_dir / 'final'}  (python -m bmgpt_jax.chat" in out and (out_dir / "final").is_dir()
    assert "steps 1..3: loss" in out and sorted(_losses(out_dir)) == [1, 2, 3]
    assert train.main(argv + ["data.num_epochs=2", "--resume"]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert f"resumed from step 3 ({out_dir / 'checkpoints'})" in err, err
    assert not [line for line in err if line.startswith(("INFO:", "WARNING:"))], err
    assert "at step 7 of steps=100; checkpoint 7 is saved (raise" in captured.out
    assert "data: 100 examples read" in captured.out
    assert sorted(_losses(out_dir)) == list(range(1, 8))


def test_a_stop_signal_just_after_a_step_s_save_is_saved_at_the_next(tmp_path, monkeypatch):
    """The loop reads the (collective) stop flag once a step and saves with it: a SIGTERM landing right
    after a step's save check is honoured at the next step, which is saved before the run exits."""
    from bmgpt_jax.training import checkpoint
    save = checkpoint.Checkpointer.save

    def save_then_signal(self, step, *args, **kwargs):
        started = save(self, step, *args, **kwargs)
        if step == 3:
            self.stop_signal = "SIGTERM"
        return started
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_signal)
    cfg = cfg_for(tmp_path, "steps=10", "checkpoint.every=100")
    out = train.run(cfg)
    assert out["stopped"] == "SIGTERM" and out["last_step"] == 4
    assert checkpoint.saved_steps(cfg.checkpoint.dir) == [4]

"""The held-out loss during training (`eval:`, `training.validate`): the token-weighted mean answer loss of
the final parameters over the held-out batches, the same on any batching and mesh, and bad settings
named."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import parallel
from bmgpt_jax.config import ConfigError
from bmgpt_jax.data.pipeline import BatchIterator
from bmgpt_jax.models.biomedgpt import BioMedGPT
from bmgpt_jax.training import loop as train
from bmgpt_jax.training.stages import build_model
from bmgpt_jax.training.validate import EvalConfig, HeldOut, due

from tests.training.runs import _rows, cfg_for

EVAL = ["eval.every=2", "eval.sources=[demo:test]", "eval.max_batches=5"]


def test_the_logged_held_out_loss_is_the_final_models_token_weighted_mean(tmp_path):
    """3 steps, a pass after steps 2 and 3 (the last): the step-3 row equals the returned model's loss summed
    over the first 5 held-out batches (the pipeline read independently, the model's own loss) divided by
    their answer tokens; training's own rows are untouched."""
    cfg = cfg_for(tmp_path, "steps=3", *EVAL)
    out = train.run(cfg)
    rows = _rows(cfg.out_dir)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3] and all(r["eval_batches"] == 5 for r in evals)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    held = BatchIterator(dataclasses.replace(cfg.data, sources=("demo:test",), shuffle=False, num_epochs=1),
                         max_atoms=cfg.model.gin.max_atoms)
    total = tokens = 0.0
    loss = nnx.jit(BioMedGPT.loss)   # one program for the 5 same-shape batches
    for _, batch in zip(range(5), held):
        loss_sum, n = loss(out["model"], {k: jax.numpy.asarray(v) for k, v in batch.items()})
        total, tokens = total + float(loss_sum), tokens + float(n)
    held.close()
    assert evals[1]["eval_tokens"] == tokens > 0
    assert evals[1]["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] + 0.5   # a sane figure, not a sum


@pytest.mark.parametrize("stage", ["finetune", "lm"])
def test_the_held_out_loss_does_not_depend_on_batching_or_mesh(tmp_path, stage):
    """The same parameters, the whole held-out set: batches of 4 on one device against batches of 8 over
    data 2 x fsdp 2 (other padding, other rows per batch, the model sharded) give the same loss over the
    same answer tokens."""
    cfg = cfg_for(tmp_path, f"stage={stage}", "data.demo_molecules=60", *EVAL)
    cfg = train.resolve_tokenizer(cfg, BatchIterator(cfg.data).tokenizer)
    keys = train.TEXT_KEYS if stage == "lm" else None
    esm = None if stage == "lm" else cfg.model.esm.vocab_size
    results = []
    for batch_size, shape in ((4, (1, 1, 1)), (8, (2, 2, 1))):
        mesh = parallel.make_mesh(shape)
        model, loss_fn = build_model(stage, cfg.model, cfg.init, mesh)
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
        held = HeldOut(EvalConfig(every=1, sources=("demo:test",)), dataclasses.replace(cfg.data, batch_size=batch_size),
                       loss_fn, mesh, keys=keys, lm_vocab=cfg.model.lm.vocab_size, esm_vocab=esm,
                       max_atoms=cfg.model.gin.max_atoms)
        rows = sum(int(b["attention_mask"].any(-1).sum()) for b in held.batches)
        assert held.describe().startswith(f"held-out set: {len(held.batches)} batches ({rows} rows) from {held.read} "
                                          "examples read, ")
        results.append(held.loss(graphdef, trainable, frozen))
    (a, n_a), (b, n_b) = results
    assert n_a == n_b > 0 and np.isfinite(a)
    assert b == pytest.approx(a, rel=1e-5)


def test_bad_eval_settings_are_named(tmp_path):
    with pytest.raises((ConfigError, ValueError), match=r"eval.every > 0 needs eval.sources"):
        cfg_for(tmp_path, "eval.every=5", "eval.sources=[]")
    with pytest.raises((ConfigError, ValueError), match=r"every=-1: must be >= 0"):
        cfg_for(tmp_path, "eval.every=-1")
    with pytest.raises((ConfigError, ValueError), match=r"did you mean 'every'"):
        cfg_for(tmp_path, "eval.evry=5")
    with pytest.raises(KeyError, match="eval.sources: unknown source 'nosuch'"):   # read before the model is built
        train.run(cfg_for(tmp_path, "eval.every=5", "eval.sources=[nosuch:test]"))
    with pytest.raises(ValueError, match=r"eval.sources \['demo:test'\]: no held-out example has an answer token "
                                         r"left \(\d+ batches \(0 rows\) from \d+ examples read, \d+ dropped \(\d+ too_long"):
        train.run(cfg_for(tmp_path, "eval.every=5", "eval.sources=[demo:test]", "data.seq_buckets=[40]",
                          "data.max_dropped=1", name="all_dropped"))


def test_processes_holding_different_held_out_data_stop_before_any_pass(tmp_path, monkeypatch):
    """Hosts whose copies of the held-out data differ would run passes of different lengths, i.e. mismatched
    collectives (a hang, or a partial figure then an abort): the pipeline's check stops every process when
    the set is read, named as eval.sources. Two processes are simulated: the other holds one record more (or
    the same records)."""
    from jax.experimental import multihost_utils
    cfg = cfg_for(tmp_path)
    other = {"extra": 1}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.stack([x, np.asarray(x) + np.eye(1, len(x), dtype=np.int64)[0] * other["extra"]]))

    def held():
        return HeldOut(EvalConfig(every=1, sources=("demo:test",), max_batches=3), cfg.data, None, None, keys=None,
                       lm_vocab=1 << 20, esm_vocab=cfg.model.esm.vocab_size, max_atoms=cfg.model.gin.max_atoms)
    with pytest.raises(ValueError, match=r"eval.sources: \['demo:test'\]: the processes read different data "
                                         r"\(\[(\d+), (\d+)\] records per process"):
        held()
    other["extra"] = 0
    assert len(held().batches) == 3


def test_due_every_n_steps_and_at_the_last():
    ev = EvalConfig(every=4, sources=("demo:test",))
    assert [s for s in range(1, 11) if due(ev, s, 10)] == [4, 8, 10]
    assert not any(due(EvalConfig(), s, 10) for s in range(1, 11))

"""The training loop behind `python -m bmgpt_jax.train [--config FILE] [--resume] [key=value ...]`: LM
pretraining, alignment, fine-tuning.

One jitted, sharded step serves all stages (`training.stages`). Per step: this process's batch from
the deterministic pipeline -> global arrays on the `data x fsdp x tensor` mesh -> the donated, sharded
train step -> metrics (progress bar, JSONL, TensorBoard; examples the pipeline dropped, per reason) ->
an async orbax checkpoint every N steps that holds the trainable parameters, the optimizer state and the
data-iterator position, so `--resume` continues exactly where a killed run stopped (from the newest
checkpoint that reads back whole). SIGTERM and a first Ctrl-C save before exiting; a second Ctrl-C
aborts. At the end the whole model is exported for `python -m bmgpt_jax.chat` (or as a Hugging Face
Llama directory for the `lm` stage) and the last lines say where everything went.

With no arguments it trains the tiny BioMedGPT (configs/tiny.yaml) on the demo data in a few minutes on
two CPU cores. Multi-host: start the same command on every host (see launch/); each reads only its shard.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmgpt_jax import config as config_lib
from bmgpt_jax import logs, parallel
from bmgpt_jax.data.examples import check_ids
from bmgpt_jax.data.pipeline import BatchIterator, DataConfig, global_batch, stack_batches
from bmgpt_jax.data.workers import WorkerDied
from bmgpt_jax.distributed import initialize, raise_on_every_process, run_on_first_process
from bmgpt_jax.models.biomedgpt import BioMedGPTConfig
from bmgpt_jax.parallel import abstract_state, batch_shardings
from bmgpt_jax.training import messages
from bmgpt_jax.training.checks import check_inputs, check_layout, check_run_folders, check_same_settings
from bmgpt_jax.training.checkpoint import CheckpointConfig, Checkpointer, CheckpointMismatch, saved_steps
from bmgpt_jax.training.dropped import DropTally
from bmgpt_jax.training.monitor import (Monitor, NonFiniteLossError, check_loss, matmul_params,
                                       measure_matmul_flops, train_flops_per_token)
from bmgpt_jax.training.optim import (OptimConfig, check_patterns_match, count_params, make_optimizer, make_schedule,
                                      split_trainable, trainable_filter)
from bmgpt_jax.training.stages import (InitConfig, Stage, build_model, check_init, check_lora_trainable,
                                       model_factory, trainable_patterns)
from bmgpt_jax.training.step import init_opt_state, jit_train_step, make_train_step
from bmgpt_jax.training.validate import EvalConfig, HeldOut, due

log = logging.getLogger("bmgpt_jax.train")
TEXT_KEYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids")   # segment_ids: packed rows only
RESUME_FREE = ("steps", "progress", "export", "eval")   # settings (sections) a resumed run may change freely


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. `trainable`: regexes over dotted parameter paths (empty = the stage's default);
    `mesh`: (data, fsdp, tensor), one entry may be -1; `checkpoint.dir` "" = `{out_dir}/checkpoints`;
    `optim.total_steps` 0 = `steps`. `compute_dtype` is the one precision switch: every sub-model
    (`model.lm/esm/gin.dtype`) computes in it while the master weights stay in their `param_dtype`.
    `nonfinite`: what a step with a NaN/inf loss or gradient does (`stop`: the run stops, naming the step
    and the newest checkpoint; `skip`: its update is not applied), and with `skip` the run stops after
    `max_nonfinite_in_a_row` such steps in a row (the model is then not recovering), that step saved.
    `eval`: a held-out loss every `eval.every` steps (`training.validate`)."""

    stage: Stage = "finetune"
    steps: int = 200
    trainable: tuple[str, ...] = ()
    model: BioMedGPTConfig = dataclasses.field(default_factory=BioMedGPTConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: tuple[int, int, int] = (-1, 1, 1)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_in_a_row: int = 10
    out_dir: str = "runs/tiny"
    progress: bool = True
    export: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise config_lib.ConfigError(f"steps={self.steps}: a run takes at least 1 step")
        if self.max_nonfinite_in_a_row < 1:
            raise config_lib.ConfigError(f"max_nonfinite_in_a_row={self.max_nonfinite_in_a_row} must be >= 1")
        check_init(self.stage, self.init)


def load_config(path: str | None = "tiny", overrides=()) -> TrainConfig:
    """The YAML config (a path or a name in configs/) with `key=value` overrides, validated and resolved:
    the checkpoint folder, the schedule's length (`optim.total_steps` 0 follows `steps`, and then a warmup
    longer than half the run is cut to half, so a quick `steps=5` trial runs) and the sub-models' compute
    dtype (from `compute_dtype`)."""
    cfg = config_lib.load(TrainConfig, path, overrides)
    replace = dataclasses.replace
    if not cfg.checkpoint.dir:
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, dir=str(Path(cfg.out_dir) / "checkpoints")))
    if not cfg.optim.total_steps:
        warmup = min(cfg.optim.warmup_steps, cfg.steps // 2)
        cfg = replace(cfg, optim=replace(cfg.optim, total_steps=cfg.steps, warmup_steps=warmup))
    subs = {}
    for name in ("lm", "esm", "gin"):
        sub = getattr(cfg.model, name)
        if sub.dtype not in ("float32", cfg.compute_dtype):
            raise config_lib.ConfigError(f"model.{name}.dtype={sub.dtype} conflicts with compute_dtype="
                                         f"{cfg.compute_dtype}: set compute_dtype alone, it sets every sub-model's")
        subs[name] = replace(sub, dtype=cfg.compute_dtype)
    return replace(cfg, model=replace(cfg.model, **subs))


def resolve_tokenizer(cfg: TrainConfig, tok) -> TrainConfig:
    """The decoder's vocabulary and special ids from the tokenizer: `model.lm.vocab_size: 0` means "the
    tokenizer's" (otherwise it must hold the tokenizer's ids), and bos/eos/pad always follow the
    tokenizer, so what the run exports carries the ids its tokenizer produces."""
    lm = cfg.model.lm
    if lm.vocab_size and lm.vocab_size < tok.vocab_size:
        raise ValueError(f"model.lm.vocab_size {lm.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    for key, value in special.items():
        if getattr(lm, key) not in (None, value):
            log.info("model.lm.%s %s -> %s (the tokenizer's)", key, getattr(lm, key), value)
    lm = dataclasses.replace(lm, vocab_size=lm.vocab_size or tok.vocab_size, **special)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lm=lm))


def _batches(it, cfg: TrainConfig) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """`(where, batch)`: host batches, `grad_accum` of them stacked into one micro-batched batch (text keys
    only for `lm`), each with the data position it came from and its ids checked against the model's
    vocabularies (an id outside a table would give NaNs inside the jitted step). Where the data ends
    (`data.num_epochs`) it returns how many batches of an unfinished group it read (0 with `grad_accum` 1)."""
    k = cfg.optim.grad_accum
    esm_vocab = None if cfg.stage == "lm" else cfg.model.esm.vocab_size
    while True:
        state = it.state()
        where = "the batch at data position " + ", ".join(f"{n} {state[n]}" for n in ("epoch", "window", "batch"))
        group = []
        try:
            for _ in range(k):
                group.append(next(it))
        except StopIteration:   # the data's end (`data.num_epochs`): the batches of an unfinished group
            return len(group)
        batch = group[0] if k == 1 else stack_batches(group)
        batch = {key: batch[key] for key in TEXT_KEYS if key in batch} if cfg.stage == "lm" else batch
        check_ids(batch, cfg.model.lm.vocab_size, esm_vocab, where=where)
        yield where, batch


def run(cfg: TrainConfig, *, resume: bool = False, batches=None) -> dict:
    """Train per `cfg`; returns `{"losses": {step: loss}, "last_step": n, "model": the trained module,
    "stopped": "SIGTERM"/"SIGINT"/None, "data": {"examples": read, reason: dropped, ...}, "skipped": steps
    of non-finite loss, "empty": steps without an answer token (no loss recorded, no update)}`.

    `batches`: an iterator with `.tokenizer`, `.state()` and `.restore()` (default: this process's
    `BatchIterator(cfg.data)` with the GIN's atom cap), for tests that feed a known stream.
    Refused before any compute: a fresh run into a checkpoint folder that holds an earlier run's steps
    (`resume` continues it), missing input paths, a URL as a run folder and, with several processes, a
    checkpoint folder that not every process sees, and a `trainable` pattern that selects no parameter.
    """
    failed = None
    try:                # each process checks its own view; a failure on any one stops all of them, named
        mesh = parallel.make_mesh(cfg.mesh)
        check_layout(cfg, mesh)
        check_inputs(cfg)
    except (ValueError, KeyError, FileNotFoundError) as e:
        failed = e
    raise_on_every_process(failed, "checking the run's settings and inputs")
    check_same_settings(cfg, resume)   # before the processes can part
    check_run_folders(cfg)
    if cfg.trainable or cfg.model.lm.lora_rank > 0:   # on the abstract model, before anything is built
        abstract = nnx.eval_shape(model_factory(cfg.stage, cfg.model)[0])
        if cfg.trainable:   # the stage defaults may name parts a config leaves out (LoRA)
            check_patterns_match(abstract, cfg.trainable)
        check_lora_trainable(abstract, cfg.model.lm, trainable_patterns(cfg.stage, cfg.model, cfg.trainable),
                             cfg.stage)
    earlier = saved_steps(cfg.checkpoint.dir)
    if earlier and not resume:
        raise ValueError(f"{cfg.checkpoint.dir} holds checkpoints of an earlier run (steps {earlier}): pass --resume "
                         "to continue it, or set out_dir (or checkpoint.dir) to a new folder")
    if resume and not earlier:
        log.warning("--resume: no checkpoint in %s, nothing to resume; starting at step 1", cfg.checkpoint.dir)
    gin, dtype = cfg.model.gin, jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None   # the compute dtype
    it = batches if batches is not None else BatchIterator(cfg.data, max_atoms=gin.max_atoms, over_cap=gin.over_cap)
    cfg = resolve_tokenizer(cfg, it.tokenizer)
    held = None if not cfg.eval.every else HeldOut(   # read before the model is built: a bad source fails fast
        cfg.eval, cfg.data, model_factory(cfg.stage, cfg.model)[1], mesh, keys=TEXT_KEYS if cfg.stage == "lm" else None,
        lm_vocab=cfg.model.lm.vocab_size, esm_vocab=None if cfg.stage == "lm" else cfg.model.esm.vocab_size,
        compute_dtype=dtype, max_atoms=gin.max_atoms, over_cap=gin.over_cap)
    patterns = trainable_patterns(cfg.stage, cfg.model, cfg.trainable)
    restoring, is_trainable = resume and bool(earlier), trainable_filter(patterns)
    # created sharded, never whole; on resume the trainable parameters and their optimizer state, which the
    # checkpoint holds, stay abstract (not created, not read from `init`) until the restore fills them
    model, loss_fn = build_model(cfg.stage, cfg.model, cfg.init, mesh, skip=is_trainable if restoring else nnx.Nothing)
    graphdef, trainable, frozen = split_trainable(model, is_trainable)
    n_total, n_train = count_params(nnx.state(model, nnx.Param)), count_params(trainable)
    matmul = matmul_params(model)
    del model
    tx = make_optimizer(cfg.optim)
    opt_state = jax.eval_shape(tx.init, trainable) if restoring else init_opt_state(tx, trainable, mesh)

    ckpt = Checkpointer(cfg.checkpoint)
    start, meta, monitor, data_state = 0, {}, None, None
    try:
        if restoring:
            target = abstract_state({"trainable": trainable, "opt_state": opt_state}, mesh)
            try:
                state, data_state, meta, unreadable = ckpt.restore_intact(target)
            except CheckpointMismatch as e:
                raise ValueError(messages.mismatch_message(cfg, ckpt, e)) from None
            for bad, why in unreadable:
                log.warning("checkpoint step %d is unreadable (%s); set aside as %s/%d.unreadable",
                            bad, why, ckpt.directory, bad)
            trainable, opt_state = state["trainable"], state["opt_state"]
            it.restore(data_state)
            start = int(meta["step"])
            log.info("resumed from step %d (%s)", start, ckpt.directory)
            changed = [d for d in config_lib.differences(meta.get("config", {}), config_lib.to_dict(cfg))
                       if d.split(":")[0].split(".")[0] not in RESUME_FREE]   # "eval.every: 10 -> 5": eval
            if changed:   # e.g. a raised `steps` with optim.total_steps 0 stretches the learning-rate schedule
                log.warning("--resume: the run goes on with settings that differ from the checkpoint's: %s",
                            "; ".join(changed))
        ckpt.install_signal_handlers()
        tally = DropTally(it, cfg.data.max_dropped, meta.get("data_counts"), meta.get("data_totals"),
                          saved_position=data_state)
        stream = _batches(it, cfg)
        try:
            where, host = next(stream)
        except StopIteration as end:   # the data ran out before this run's first step (a resumed finished run)
            where, host, left = None, None, end.value
        step_fn = make_train_step(loss_fn, tx, grad_accum=cfg.optim.grad_accum,
                                  compute_dtype=dtype, schedule=make_schedule(cfg.optim))
        lead = cfg.optim.grad_accum > 1
        if host is not None:
            shapes = {k: jax.ShapeDtypeStruct(v.shape[:lead] + (v.shape[lead] * jax.process_count(),)
                                              + v.shape[lead + 1:], v.dtype) for k, v in host.items()}
            step = jit_train_step(step_fn, graphdef, trainable, frozen, opt_state,
                                  batch_shardings(shapes, mesh, microbatched=lead), mesh)
        lm = cfg.model.lm
        seq_len = host["input_ids"].shape[-1] if host is not None else cfg.data.seq_buckets[-1]
        monitor = Monitor(cfg.out_dir, total_steps=cfg.steps, start_step=start, progress=cfg.progress,
                          flops_per_token=train_flops_per_token(matmul, n_trainable=n_train, n_layers=lm.num_layers,
                                                                seq_len=seq_len, d_model=lm.hidden_size),
                          peak_flops=measure_matmul_flops(dtype=jnp.dtype(cfg.compute_dtype)))
        monitor.skipped = int(meta.get("nonfinite_skipped", 0))     # the run's, over all its resumes
        monitor.empty = int(meta.get("empty_steps", 0))
        in_a_row = int(meta.get("nonfinite_in_a_row", 0))
        monitor.write(f"stage {cfg.stage}: {n_total:,} parameters, {n_train:,} trainable ({', '.join(patterns)}); "
                      f"mesh {dict(mesh.shape)}; {jax.process_count()} process(es); "
                      + (f"the checkpoint at step {start} is at the data's end: nothing to train" if host is None
                         else f"steps {start + 1}..{cfg.steps}" if start < cfg.steps else
                         f"the checkpoint is at step {start}, steps={cfg.steps}: nothing to train (raise steps= to "
                         "continue)"))
        if held is not None:
            monitor.write(held.describe())

        def evaluate(n: int) -> None:   # the held-out loss after step n, logged
            monitor.log_eval(n, *held.loss(graphdef, trainable, frozen), batches=len(held.batches))

        def save(n: int, force: bool) -> bool:
            """Checkpoint step `n` (every `checkpoint.every` steps, or `force`d): the state and the data
            position and counts as of the last `tally.update`."""
            return ckpt.save(n, {"trainable": trainable, "opt_state": opt_state}, data_state=data_state,
                             force=force, metadata={"config": config_lib.to_dict(cfg), **tally.checkpoint_counts(),
                                                    "nonfinite_skipped": monitor.skipped, "empty_steps": monitor.empty,
                                                    "nonfinite_in_a_row": in_a_row})

        losses: dict[int, float] = {}
        i, stopped, ran_out = start, None, host is None
        epochs = int(data_state["epoch"]) if data_state else 0     # passes over the data done before this run
        for i in range(start + 1, (cfg.steps if host is not None else start) + 1):
            if i > start + 1:
                try:
                    where, host = next(stream)
                except StopIteration as end:       # data.num_epochs are done: step i - 1 was the last
                    i, ran_out, left = i - 1, True, end.value
                    break
            tokens = int(host["attention_mask"].sum()) * jax.process_count()
            trainable, opt_state, metrics = step(trainable, frozen, opt_state, global_batch(host, mesh))
            metrics = jax.device_get(metrics)
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if cfg.nonfinite == "stop" and not metrics["finite"]:
                # the step left the state as it was (`make_train_step`): step i - 1's, saved with its data
                # position (this batch not yet counted), so --resume after a fix replays this batch
                if i - 1 > 0:
                    save(i - 1, force=True)
                newest = max(ckpt.all_steps(), default=None)
                check_loss(i, loss, cfg.nonfinite, grad_norm, batch=where,
                           note=f"step {newest} is saved, the state before it: --resume goes on from there"
                           if newest == i - 1 else f"the newest checkpoint is step {newest}" if newest
                           else "no checkpoint saved yet")
            if metrics["n_tokens"] > 0:          # a batch of dropped examples only: no loss, no update
                losses[i] = loss
            in_a_row = 0 if metrics["finite"] else in_a_row + 1
            data_state = it.state()
            if data_state["epoch"] > epochs:    # packed, an epoch's step count is known only once it is done
                epochs = int(data_state["epoch"])
                monitor.write(f"data: {epochs} epoch(s) done at step {i}")
            tally.update(data_state)
            monitor.log(i, metrics, tokens=tokens, data=tally.metrics())
            stop = ckpt.stop_requested()        # read once: a signal after it waits for the next step
            too_many, streak = tally.exceeded(), in_a_row >= cfg.max_nonfinite_in_a_row
            save(i, force=i == cfg.steps or stop or too_many or streak)   # before any error below: no work lost
            tally.check(saved_step=i)
            if streak:
                raise NonFiniteLossError(
                    f"nonfinite=skip: {in_a_row} steps in a row (steps {i - in_a_row + 1}..{i}) had a non-finite loss "
                    f"or gradient, max_nonfinite_in_a_row={cfg.max_nonfinite_in_a_row}; stopping. Step {i} is saved "
                    f"(its parameters are those of step {i - in_a_row}, the updates since were skipped). Lower "
                    "optim.lr or inspect those batches; or raise max_nonfinite_in_a_row and --resume")
            if held is not None and not stop and due(cfg.eval, i, cfg.steps):
                evaluate(i)
            if stop:
                stopped = ckpt.stop_signal or "a signal to another process"
                monitor.write(f"{stopped}: checkpoint saved at step {i}; exiting")
                break
        if ran_out:   # the batches of an unfinished group may have opened a window: count it in
            tally.update(data_state if data_state is not None else it.state())
            if i > start:
                save(i, force=True)
                if held is not None and not due(cfg.eval, i, cfg.steps):   # the data's end: its last step
                    evaluate(i)
            monitor.write(messages.ran_out_message(cfg, i, left))
        if i == cfg.steps or ran_out:
            tally.check(final=True, saved_step=i)
        monitor.write(tally.summary())
    finally:
        ckpt.close()
        if monitor is not None:
            monitor.close()
        if hasattr(it, "close"):
            it.close()  # the encoding worker processes
    if cfg.export and (i == cfg.steps or ran_out) and i > 0:
        _export(frozen, it.tokenizer, cfg, i)
    model = nnx.merge(graphdef, trainable, frozen)
    return {"losses": losses, "last_step": i, "model": model, "stopped": stopped, "data": dict(tally.totals),
            "ran_out": ran_out, "skipped": monitor.skipped, "empty": monitor.empty}


def _export(frozen: nnx.State, tokenizer, cfg: TrainConfig, step: int) -> None:
    """The trained model under `{out_dir}/final`, streamed from the final checkpoint (the source of truth)
    by process 0, one tensor at a time, nothing gathered: every process first saves its shards of the
    frozen parameters beside the steps, then process 0 writes (`convert.run_export`; safetensors,
    configs and tokenizer, plus OpenBioMed's `.pth` where torch is importable). The others wait for it on
    the distributed key-value store (`distributed.run_on_first_process`: minutes at 7B, longer than a CPU
    collective waits), and process 0's failure stops them too."""
    from jax.experimental import multihost_utils

    from bmgpt_jax.convert import run_export
    run_export.save_frozen(frozen, cfg.checkpoint.dir)
    multihost_utils.sync_global_devices("bmgpt_jax export: checkpoint complete")

    def write() -> None:
        out = Path(cfg.out_dir) / "final"
        n = run_export.export(cfg.checkpoint.dir, out, step, stage=cfg.stage, model_cfg=cfg.model, tokenizer=tokenizer)
        log.info("exported the trained model (%d tensors) to %s", n, out)
    run_on_first_process(write, "exporting the trained model")


@logs.cli
def main(argv: list[str] | None = None) -> int:
    """The command line; every error it can explain is one line on stderr and a non-zero exit status. The
    run's notes ("resumed from step N", warnings) are bare lines on stderr (`bmgpt_jax.logs`)."""
    ap = argparse.ArgumentParser(prog="python -m bmgpt_jax.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny", help="YAML file or a name in configs/ (default: tiny)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=50 optim.lr=1e-3")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    try:
        initialize()
        cfg, failed = None, None
        try:
            cfg = load_config(args.config, args.overrides)
        except (ValueError, KeyError, FileNotFoundError) as e:
            failed = e
        raise_on_every_process(failed, "loading the config")   # a bad config on one host stops every host
        result = run(cfg, resume=args.resume)
    except KeyboardInterrupt:
        print("train: aborted by a second Ctrl-C; the last saved checkpoint is kept (--resume continues from it)",
              file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, NonFiniteLossError) as e:
        log.debug("traceback", exc_info=True)
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"train: {type(e).__name__}: {message}", file=sys.stderr)
        return 2
    except WorkerDied as e:             # an encoding process killed alone (out of memory?): no traceback
        log.debug("traceback", exc_info=True)
        print(f"train: {e}", file=sys.stderr)
        return 1
    for line in messages.summary(result):
        print(line)
    if jax.process_index() == 0:
        print("\n".join(messages.where_things_went(cfg, result, argv)))
    return 0

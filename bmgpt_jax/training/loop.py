"""The training loop behind `python -m bmgpt_jax.train [--config FILE] [--resume] [key=value ...]`: LM
pretraining, alignment, fine-tuning.

One jitted, sharded step serves all stages (`training.stages`). Per step: this process's batch from
the deterministic pipeline -> global arrays on the `data x fsdp x tensor` mesh -> the donated, sharded
train step -> metrics (progress bar, JSONL, TensorBoard) -> an async orbax checkpoint every N steps
that holds the trainable parameters, the optimizer state and the data-iterator position, so `--resume`
continues exactly where a killed run stopped. SIGTERM saves before exiting. At the end the whole model
is exported for `python -m bmgpt_jax.chat` (or as a Hugging Face Llama directory for the `lm` stage).

With no arguments it trains the tiny BioMedGPT (configs/tiny.yaml) on the demo data in a few minutes on
two CPU cores. Multi-host: start the same command on every host (see launch/); each reads only its shard.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmgpt_jax import config as config_lib
from bmgpt_jax import parallel
from bmgpt_jax.data.pipeline import BatchIterator, DataConfig, global_batch, stack_batches
from bmgpt_jax.models.biomedgpt import BioMedGPTConfig
from bmgpt_jax.parallel import abstract_state, batch_shardings
from bmgpt_jax.training.checkpoint import CheckpointConfig, Checkpointer
from bmgpt_jax.training.monitor import Monitor, check_loss, measure_matmul_flops, train_flops_per_token
from bmgpt_jax.training.optim import (OptimConfig, count_params, make_optimizer, make_schedule, split_trainable,
                                      trainable_filter)
from bmgpt_jax.training.stages import InitConfig, Stage, build_model, trainable_patterns
from bmgpt_jax.training.step import init_opt_state, jit_train_step, make_train_step

log = logging.getLogger("bmgpt_jax.train")
TEXT_KEYS = ("input_ids", "attention_mask", "loss_mask")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. `trainable`: regexes over dotted parameter paths (empty = the stage's default);
    `mesh`: (data, fsdp, tensor), one entry may be -1; `checkpoint.dir` "" = `{out_dir}/checkpoints`."""

    stage: Stage = "finetune"
    steps: int = 200
    trainable: tuple[str, ...] = ()
    model: BioMedGPTConfig = dataclasses.field(default_factory=BioMedGPTConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    mesh: tuple[int, int, int] = (-1, 1, 1)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    nonfinite: Literal["stop", "skip"] = "stop"
    out_dir: str = "runs/tiny"
    progress: bool = True
    export: bool = True


def load_config(path: str | None = "tiny", overrides=()) -> TrainConfig:
    """The YAML config (a path or a name in configs/) with `key=value` overrides, validated."""
    cfg = config_lib.load(TrainConfig, path, overrides)
    if not cfg.checkpoint.dir:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint,
                                                                      dir=str(Path(cfg.out_dir) / "checkpoints")))
    return cfg


def check_layout(cfg: TrainConfig, mesh) -> None:
    """Errors that must come before any compute: batch vs data axes, micro-batching vs processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = cfg.data.batch_size // jax.process_count()
    if cfg.data.batch_size % jax.process_count() or cfg.data.batch_size % shards:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} does not divide over the mesh's data axes "
                         f"(data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} = {shards}) and "
                         f"{jax.process_count()} process(es)")
    for name in ("node_budget", "edge_budget", "protein_budget"):
        budget = getattr(cfg.data, name)
        if budget and (budget * jax.process_count()) % shards:
            raise ValueError(f"data.{name} {budget} per process does not divide over {shards} data shards")
    if rows < 1:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is smaller than the process count")


def _resolve_vocab(cfg: TrainConfig, vocab: int) -> TrainConfig:
    """`model.lm.vocab_size: 0` means "the tokenizer's"; otherwise they must agree."""
    lm = cfg.model.lm
    if lm.vocab_size == 0:
        lm = dataclasses.replace(lm, vocab_size=vocab)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lm=lm))
    if lm.vocab_size < vocab:
        raise ValueError(f"model.lm.vocab_size {lm.vocab_size} is smaller than the tokenizer's {vocab}")
    return cfg


def _batches(it, cfg: TrainConfig) -> Iterator[dict[str, np.ndarray]]:
    """Host batches, `grad_accum` of them stacked into one micro-batched batch; text keys only for `lm`."""
    k = cfg.optim.grad_accum
    while True:
        group = [next(it) for _ in range(k)]
        batch = group[0] if k == 1 else stack_batches(group)
        yield {key: batch[key] for key in TEXT_KEYS} if cfg.stage == "lm" else batch


def _matmul_params(model: nnx.Module) -> int:
    """Parameters that take part in matmuls (embedding tables are gathers)."""
    return sum(int(np.prod(v.shape)) for p, v in nnx.state(model, nnx.Param).flat_state()
               if p[-1] != "weight" or len(v.shape) < 2)


def run(cfg: TrainConfig, *, resume: bool = False, batches=None) -> dict:
    """Train per `cfg`; returns `{"losses": {step: loss}, "last_step": n, "model": the trained module}`.

    `batches`: an iterator with `.tokenizer`, `.state()` and `.restore()` (default: this process's
    `BatchIterator(cfg.data)`), for tests that feed a known stream.
    """
    mesh = parallel.make_mesh(cfg.mesh)
    check_layout(cfg, mesh)
    it = batches if batches is not None else BatchIterator(cfg.data)
    cfg = _resolve_vocab(cfg, it.tokenizer.vocab_size)
    model, loss_fn = build_model(cfg.stage, cfg.model, cfg.init, mesh)  # created sharded, never whole
    patterns = trainable_patterns(cfg.stage, cfg.model, cfg.trainable)
    graphdef, trainable, frozen = split_trainable(model, trainable_filter(patterns))
    n_total, n_train = count_params(nnx.state(model, nnx.Param)), count_params(trainable)
    matmul = _matmul_params(model)
    del model
    tx = make_optimizer(cfg.optim)
    opt_state = init_opt_state(tx, trainable, mesh)

    ckpt = Checkpointer(cfg.checkpoint)
    ckpt.install_sigterm_handler()
    start = 0
    if resume and ckpt.latest_step() is not None:
        state, data_state, meta = ckpt.restore(abstract_state({"trainable": trainable, "opt_state": opt_state}, mesh))
        trainable, opt_state = state["trainable"], state["opt_state"]
        it.restore(data_state)
        start = int(meta["step"])
        log.info("resumed from step %d (%s)", start, ckpt.directory)

    stream = _batches(it, cfg)
    host = next(stream)
    step_fn = make_train_step(loss_fn, tx, grad_accum=cfg.optim.grad_accum,
                              compute_dtype=jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None,
                              skip_nonfinite=cfg.nonfinite == "skip", schedule=make_schedule(cfg.optim))
    lead = cfg.optim.grad_accum > 1
    shapes = {k: jax.ShapeDtypeStruct(v.shape[:lead] + (v.shape[lead] * jax.process_count(),) + v.shape[lead + 1:],
                                      v.dtype) for k, v in host.items()}
    step = jit_train_step(step_fn, graphdef, trainable, frozen, opt_state,
                          batch_shardings(shapes, mesh, microbatched=lead), mesh)
    seq = host["input_ids"].shape[-1]
    lm = cfg.model.lm
    monitor = Monitor(cfg.out_dir, total_steps=cfg.steps, start_step=start, progress=cfg.progress,
                      flops_per_token=train_flops_per_token(matmul, n_trainable=n_train, n_layers=lm.num_layers,
                                                            seq_len=seq, d_model=lm.hidden_size),
                      peak_flops=measure_matmul_flops())
    monitor.write(f"stage {cfg.stage}: {n_total:,} parameters, {n_train:,} trainable ({', '.join(patterns)}); "
                  f"mesh {dict(mesh.shape)}; {jax.process_count()} process(es); steps {start + 1}..{cfg.steps}")
    losses: dict[int, float] = {}
    i = start
    try:
        for i in range(start + 1, cfg.steps + 1):
            if i > start + 1:
                host = next(stream)
            tokens = int(host["attention_mask"].sum()) * jax.process_count()
            trainable, opt_state, metrics = step(trainable, frozen, opt_state, global_batch(host, mesh))
            metrics = jax.device_get(metrics)
            check_loss(i, float(metrics["loss"]), cfg.nonfinite, float(metrics["grad_norm"]))
            losses[i] = float(metrics["loss"])
            monitor.log(i, metrics, tokens=tokens)
            ckpt.save(i, {"trainable": trainable, "opt_state": opt_state}, data_state=it.state(),
                      metadata={"config": config_lib.to_dict(cfg)}, force=i == cfg.steps)
            if ckpt.stop_requested():
                monitor.write(f"SIGTERM: checkpoint saved at step {i}; exiting")
                break
    finally:
        ckpt.close()
        monitor.close()
        if hasattr(it, "close"):
            it.close()  # the encoding worker processes
    model = nnx.merge(graphdef, trainable, frozen)
    if cfg.export and i == cfg.steps:
        _export(model, it.tokenizer, cfg)
    return {"losses": losses, "last_step": i, "model": model}


def _export(model: nnx.Module, tokenizer, cfg: TrainConfig) -> None:
    """The trained model in a loadable form under `{out_dir}/final` (process 0 writes)."""
    out = Path(cfg.out_dir) / "final"
    if jax.process_count() > 1:  # every process takes part in gathering the sharded arrays
        from jax.experimental import multihost_utils
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), state)
        model = nnx.merge(graphdef, state)
    if jax.process_index() != 0:
        return
    if cfg.stage == "lm":
        from bmgpt_jax.convert import hf_llama
        hf_llama.save(model, out)
        (out / "tokenizer.model").write_bytes(tokenizer.model_proto)
    else:
        from bmgpt_jax.convert.folder import save_pretrained
        save_pretrained(model, tokenizer, out)
    log.info("exported the trained model to %s", out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bmgpt_jax.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny", help="YAML file or a name in configs/ (default: tiny)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=50 optim.lr=1e-3")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bmgpt_jax.distributed import initialize
    initialize()
    try:
        cfg = load_config(args.config, args.overrides)
    except (config_lib.ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    result = run(cfg, resume=args.resume)
    losses = result["losses"]
    if losses:
        first, last = losses[min(losses)], losses[max(losses)]
        print(f"steps {min(losses)}..{max(losses)}: loss {first:.4f} -> {last:.4f}"
              + (f" ({last / first:.0%} of the first)" if math.isfinite(first) and first else ""))
    return 0

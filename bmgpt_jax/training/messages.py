"""What a training run tells its user in words: the end-of-run lines (where everything went, the loss,
the skipped steps), the line of a run whose data ran out, and the one-line refusal of a `--resume`
whose checkpoint holds other arrays than the run trains (naming the settings behind them). `cfg` is
the run's `training.loop.TrainConfig` (not imported: the loop imports this module)."""
from __future__ import annotations

import math
import shlex
from pathlib import Path

from bmgpt_jax import config as config_lib
from bmgpt_jax.training.checkpoint import Checkpointer, CheckpointMismatch, saved_steps


def ran_out_message(cfg, step: int, left: int) -> str:
    """The line of a run whose data ended (`data.num_epochs`) before `steps`."""
    k = cfg.optim.grad_accum
    unused = (f"; its last {left} batch(es), fewer than optim.grad_accum={k}, were read but not trained"
              if left else "")
    where = (f"at step {step} of steps={cfg.steps}; checkpoint {step} is saved" if step else
             f"before step 1 (steps={cfg.steps}): nothing trained")
    return (f"the data ran out after data.num_epochs={cfg.data.num_epochs} epoch(s) {where}{unused} (raise "
            "data.num_epochs and --resume to train on)")


# model settings that leave the arrays of a checkpoint as they are (the others, `stage` and `trainable`
# decide which trainable parameters, of which shapes, it holds with their optimizer state)
NOT_SHAPING = ("dtype", "remat", "attention", "loss_chunk_size", "lora_alpha", "max_atoms", "over_cap",
               "bos_token_id", "eos_token_id", "pad_token_id")


def _decides_arrays(key: str) -> bool:
    return key in ("stage", "trainable") or key.startswith("model.") and not key.endswith(NOT_SHAPING)


def mismatch_message(cfg, ckpt: Checkpointer, error: CheckpointMismatch) -> str:
    """One line for a checkpoint whose arrays are not this run's: the settings behind them that differ
    from the checkpoint's (the stage, `trainable`, the model's shapes and LoRA, clipping on or off), and one
    mismatched key; the checkpoint's own detailed error when no such setting differs."""
    try:
        saved = ckpt.read_meta(error.step).get("config", {})
    except Exception:  # noqa: BLE001 -- no readable config: the key-by-key error is all there is
        return str(error)
    now = config_lib.to_dict(cfg)
    changed = [d for d in config_lib.differences(saved, now) if _decides_arrays(d.split(":")[0])]
    clip = [saved.get("optim", {}).get("clip_norm"), now["optim"]["clip_norm"]]
    if None not in clip and (clip[0] > 0) != (clip[1] > 0):      # clipping on/off adds or removes its state
        changed.append(f"optim.clip_norm: {clip[0]!r} -> {clip[1]!r}")
    if not changed:
        return str(error)
    example = next((p for p in error.problems if p.startswith("'trainable.")), error.problems[0])
    return (f"--resume: checkpoint {ckpt.directory / str(error.step)} holds other arrays than this run trains "
            f"({len(error.problems)} mismatched keys, e.g. {example}): it was saved with other settings "
            f"that decide them: {'; '.join(changed)}. Resume with the checkpoint's values, or start a new run "
            "(another out_dir)")


def where_things_went(cfg, result: dict, argv: list[str]) -> list[str]:
    """The end-of-run lines: the exported model, the checkpoints, the metrics, the TensorBoard logs (and,
    for a run stopped by a signal, the command that continues it)."""
    out, ckpts = Path(cfg.out_dir), Path(cfg.checkpoint.dir)
    final = out / "final"
    lines = []
    if result["stopped"]:
        lines.append(f"stopped by {result['stopped']} at step {result['last_step']} of {cfg.steps}; continue with: "
                     f"python -m bmgpt_jax.train {shlex.join([a for a in argv if a != '--resume'] + ['--resume'])}")
    elif cfg.export and final.is_dir():
        use = (f"transformers.LlamaForCausalLM.from_pretrained('{final}')" if cfg.stage == "lm"
               else f"python -m bmgpt_jax.chat --checkpoint {final} --question ...")
        lines.append(f"model:        {final}  ({use})")
    steps = saved_steps(ckpts)
    lines.append(f"checkpoints:  {ckpts}  (steps {', '.join(map(str, steps)) or 'none'}; --resume continues the last)")
    lines.append(f"metrics:      {out / 'metrics.jsonl'}")
    lines.append(f"TensorBoard:  tensorboard --logdir {out / 'tensorboard'}")
    return lines


def summary(result: dict) -> list[str]:
    """The end-of-run lines on the loss: first and last of this run's steps (the ratio only where both are
    finite), the steps of the whole run skipped for a non-finite loss (`nonfinite=skip`) and those whose batch
    held no answer token (nothing to learn from: no update)."""
    losses, lines = result["losses"], []
    if losses:
        first, last = losses[min(losses)], losses[max(losses)]
        finite = math.isfinite(first) and math.isfinite(last) and first
        lines.append(f"steps {min(losses)}..{max(losses)}: loss {first:.4f} -> {last:.4f}"
                     + (f" ({last / first:.0%} of the first)" if finite else ""))
    if result.get("skipped"):
        lines.append(f"nonfinite=skip: {result['skipped']} step(s) of the run had a non-finite loss or gradient "
                     "and were skipped (their updates not applied; metrics.jsonl: finite 0)")
    if result.get("empty"):
        lines.append(f"{result['empty']} step(s) of the run had no answer token in their batch (every example "
                     "dropped: the data counts above say why) and changed nothing (metrics.jsonl: applied 0)")
    return lines

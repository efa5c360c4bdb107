"""Checkpoints (orbax): async saves every N steps and at the end, keep the last K, resume onto any mesh.

One checkpoint step directory holds three items written together:
  state  the array tree (typically `{"trainable": ..., "opt_state": ...}`, plus `frozen` when it is not
         re-creatable from pretrained weights), saved sharded: every process writes its own shards;
  data   the data-iterator state as JSON (process-independent: the global position, not a host's);
  meta   run metadata as JSON: `{"step": ..., "config": ..., ...}`.

Saves are asynchronous: `save` returns once arrays are copied off the devices (so the next step may
donate them) and the files are written in the background; `close()` waits for them. `restore` takes an
*abstract* target (`parallel.abstract_state(tree, mesh)`: shapes, dtypes and the new mesh's shardings), so a
checkpoint written on an 8x1x1 mesh restores onto 2x2x2 or onto one device. Before reading any array,
the target is checked against the checkpoint's metadata, and a mismatch (another model shape) raises
ValueError naming every differing key with both shapes.

`restore_intact` is what `--resume` uses: the newest checkpoint that reads back whole. A step whose files
are torn or corrupt (a full disk, a kill during the write, a broken copy) is moved aside to
`{step}.unreadable` with the reason, and the next older one is tried.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointMismatch(ValueError):
    """A checkpoint whose arrays (keys or shapes) are not the target's: `step`, and `problems`, one line per
    mismatched key."""

    def __init__(self, message: str, step: int, problems: list[str]):
        super().__init__(message)
        self.step, self.problems = step, problems


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint:` section of a training config. `every` counts optimizer steps."""

    dir: str = ""                     # "" = `{out_dir}/checkpoints` of the training run
    every: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError(f"checkpoint.every ({self.every}) and checkpoint.keep ({self.keep}) must be >= 1")


class Checkpointer:
    """Wrapper around `ocp.CheckpointManager` for one run directory.

    Train-loop use:
        ckpt = Checkpointer(CheckpointConfig(dir=..., every=100, keep=3)); ckpt.install_signal_handlers()
        if resume and ckpt.all_steps():
            state, data_state, meta, unreadable = ckpt.restore_intact(parallel.abstract_state(state, mesh))
        for step in range(start + 1, total + 1):
            ... one train step ...
            stop = ckpt.stop_requested()   # SIGTERM / Ctrl-C (a collective): read once, save, leave cleanly
            ckpt.save(step, state, data_state=it.state(), metadata={"config": cfg_dict},
                      force=step == total or stop)
            if stop:
                break
        ckpt.close()
    """

    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        if not cfg.dir:
            raise ValueError("checkpoint.dir is empty (the training job fills it in as {out_dir}/checkpoints)")
        self.directory = Path(cfg.dir).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.stop_signal: str | None = None    # "SIGTERM" / "SIGINT" once one arrived
        self._previous_handlers: dict[int, Any] = {}

    # -- signals ---------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM (a preempted VM, `scancel`) and the first SIGINT (Ctrl-C) only set a flag: the loop
        saves at the next step boundary (a signal handler must not run JAX code mid-step) and exits.
        A SIGINT while a stop is pending raises KeyboardInterrupt at once. `close()` restores the
        previous handlers."""
        def handler(signum, frame):
            if signum == signal.SIGINT and self.stop_signal:
                raise KeyboardInterrupt
            self.stop_signal = self.stop_signal or signal.Signals(signum).name
            if signum == signal.SIGINT:
                print("Ctrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again aborts at once)",
                      file=sys.stderr, flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, handler)

    def stop_requested(self) -> bool:
        """Whether SIGTERM or SIGINT arrived, agreed across processes (an all-gather) so all save the same
        step."""
        flag = self.stop_signal is not None
        if jax.process_count() > 1:
            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    # -- save ------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, *, data_state: dict | None = None, metadata: dict | None = None,
             force: bool = False) -> bool:
        """Start an async save of `state` at `step` if `step % every == 0` or if `force` (the last step, or
        a stop the caller read from `stop_requested()` once, so that a signal arriving between two reads
        cannot end a run without its save); returns whether a save started. A step already on disk is not
        rewritten."""
        if not (force or step % self.cfg.every == 0):
            return False
        if step in self.manager.all_steps():
            return False
        meta = {**(metadata or {}), "step": int(step)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(dict(data_state or {})),
                                  meta=ocp.args.JsonSave(meta))
        return bool(self.manager.save(step, args=args, force=True))

    # -- restore ---------------------------------------------------------------------------------
    def _resolve(self, step: int | None) -> int:
        self.manager.reload()
        steps = self.manager.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            return max(steps)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {sorted(steps)})")
        return step

    def check_compatible(self, target: Any, step: int | None = None) -> None:
        """Raise CheckpointMismatch (a ValueError) if `target`'s keys or shapes differ from the checkpoint's;
        reads metadata only."""
        step = self._resolve(step)
        saved = ocp.tree.to_flat_dict(self.manager.item_metadata(step)["state"].tree, sep=".")
        saved = {k: tuple(v.shape) for k, v in saved.items() if v is not None}
        want = {k: tuple(np.shape(v)) for k, v in ocp.tree.to_flat_dict(target, sep=".").items()}
        problems = [f"{k!r}: checkpoint {saved[k]} vs model {want[k]}"
                    for k in sorted(saved.keys() & want.keys()) if saved[k] != want[k]]
        problems += [f"{k!r}: missing from the checkpoint (model {want[k]})" for k in sorted(want.keys() - saved.keys())]
        problems += [f"{k!r}: not in the model (checkpoint {saved[k]})" for k in sorted(saved.keys() - want.keys())]
        if problems:
            shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise CheckpointMismatch(f"checkpoint {self.directory / str(step)} does not fit the model "
                                     f"({len(problems)} mismatched keys):\n  {shown}", step, problems)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """`(state, data_state, metadata)` from `step` (None = latest), laid out as `target` says.

        `target`: the state tree as ShapeDtypeStructs with shardings (`abstract_state`) or as arrays whose
        shardings are reused. Checked with `check_compatible` before any array is read.
        """
        step = self._resolve(step)
        self.check_compatible(target, step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.data or {}), dict(restored.meta or {})

    def read_meta(self, step: int) -> dict:
        """The run metadata (`meta`) saved with `step`, read alone (no array)."""
        restored = self.manager.restore(self._resolve(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta or {})

    def restore_intact(self, target: Any) -> tuple[Any, dict, dict, list[tuple[int, str]]]:
        """`restore` of the newest checkpoint that reads back whole, plus `[(step, reason)]` for the newer
        ones that did not, each moved aside to `{step}.unreadable` (so the resumed run can write that step
        again). A checkpoint that reads but does not fit the model is not corruption: its ValueError
        propagates (CheckpointMismatch). FileNotFoundError when there is no checkpoint, ValueError when none is
        readable."""
        unreadable: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.item_metadata(step)["state"]
                if meta is None:
                    raise ValueError("no state metadata")
            except Exception as e:  # noqa: BLE001 -- any failure to read the metadata: a torn checkpoint
                unreadable.append((step, _reason(e)))
                continue
            self.check_compatible(target, step)
            try:
                state, data_state, metadata = self.restore(target, step)
                if int(metadata.get("step", -1)) != step:
                    raise ValueError(f"its metadata names step {metadata.get('step')}")
            except Exception as e:  # noqa: BLE001 -- a torn array file, bad JSON, ...
                unreadable.append((step, _reason(e)))
                continue
            self._set_aside([s for s, _ in unreadable])
            return state, data_state, metadata, unreadable
        self._set_aside([s for s, _ in unreadable])
        if not unreadable:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        raise ValueError(f"no readable checkpoint in {self.directory} (each set aside as <step>.unreadable, so "
                         "a new run there starts at step 1): "
                         + "; ".join(f"step {s}: {why}" for s, why in unreadable))

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unreadable step folders to `{step}.unreadable` (process 0; every process waits)."""
        if steps and jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{step}.unreadable"
                n = 1
                while target.exists():
                    target, n = self.directory / f"{step}.unreadable{n}", n + 1
                (self.directory / str(step)).rename(target)
        if steps and jax.process_count() > 1:
            multihost_utils.sync_global_devices("bmgpt_jax checkpoint set-aside")
        self.manager.reload()

    # -- shutdown --------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every pending async save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, release the manager and restore the previous signal handlers."""
        self.manager.wait_until_finished()
        self.manager.close()
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers = {}

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(error: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def saved_steps(directory: str | Path) -> list[int]:
    """The step folders under `directory` (without starting orbax), sorted; [] when it does not exist."""
    d = Path(directory)
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []

"""Multi-process start-up: `initialize()` at the top of every entry point, before any JAX computation.

A TPU pod slice or a multi-node GPU job runs the *same* program once per host (or per GPU); the processes
find each other through a coordinator (process 0's `host:port`) and then see one global device list, so
a mesh spans every process and `jax.make_array_from_process_local_data` lets each process feed only its
own rows of the batch. With a single process `initialize()` does nothing, so the same entry point serves a
laptop, one GPU box and a pod.

Where the settings come from, first found wins:
  1. the arguments;
  2. `JAX_COORDINATOR_ADDRESS` (host:port), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (launch/gpu_multinode.sh
     over ssh sets these);
  3. SLURM's `SLURM_NTASKS`, `SLURM_PROCID` (launch/gpu_multinode.sh --slurm exports the coordinator, the
     job's first node; without it JAX finds that node itself but then shows each process one GPU only);
  4. `BMGPT_DISTRIBUTED=auto` (launch/tpu_pod.sh sets it): everything from the Cloud TPU metadata.
On CPU, cross-process collectives use gloo. Settings that cannot describe one job stop the start-up with
the variable to fix (a coordinator or process id without a process count, a count below 1, an id
outside the count, a coordinator not `host:port`): left alone, each host would run a job of its own.

Once up: `broadcast_json` hands process 0's small host-side facts to every process (what it read from a
folder only it reads), `check_shared_folder` stops a job whose checkpoint folder is not one folder
that every host sees, `per_process` and `check_same_sequence` let every process check that all read the
same data, and `raise_on_every_process` turns a failure
on one host into the same error on every host (instead of the others waiting for it, for ever, in their
next collective). Long work that only process 0 does (a dataset build) goes through `run_on_first_process`:
the others wait on the distributed runtime's key-value store, for up to `$BMGPT_WAIT_HOURS` hours, not in a
collective.
"""
from __future__ import annotations

import builtins
import json
import os
import signal
import threading
import zlib
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the multi-process job, if there is one; True when JAX's distributed system is (now) up.

    coordinator: `host:port` of process 0 (it listens there; the others connect). num_processes: the
    number of processes (hosts, or GPUs when one process per GPU). process_id: this process, in
    [0, num_processes). Unset values are read from the environment (see the module docstring); with one
    process and no `BMGPT_DISTRIBUTED=auto` this is a no-op returning False. Must run before anything
    touches a JAX backend; calling it again after success is harmless.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES", "SLURM_NTASKS")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID", "SLURM_PROCID")
    auto = os.environ.get("BMGPT_DISTRIBUTED", "").lower() == "auto"
    _check_settings(coordinator, num_processes, process_id, auto)
    if not auto and (num_processes or 1) == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = None not in (coordinator, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               cluster_detection_method="deactivate" if explicit else None)
    # JAX's preemption notifier has just taken SIGTERM with a handler that only logs it: a job stopped while
    # it starts (minutes at 10B) would go on to train to the end. SIGTERM terminates again, as with one
    # process, until the training loop installs its own (save at the next step boundary, then exit).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return True


def _check_settings(coordinator: str | None, num_processes: int | None, process_id: int | None,
                    auto: bool) -> None:
    """ValueError for settings that cannot describe one job, before the single-process shortcut: a
    partly set environment would otherwise leave every host training a whole job of its own."""
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes (JAX_NUM_PROCESSES / SLURM_NTASKS) is {num_processes}: it must be >= 1")
    if num_processes is None and not auto and (coordinator or process_id is not None):
        given = "coordinator (JAX_COORDINATOR_ADDRESS)" if coordinator else "process_id (JAX_PROCESS_ID)"
        raise ValueError(f"a {given} is set but not the number of processes: set JAX_NUM_PROCESSES too (or "
                         "BMGPT_DISTRIBUTED=auto on a TPU pod), or unset it for a single-process run")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} (JAX_PROCESS_ID / SLURM_PROCID) is outside "
                         f"[0, num_processes={num_processes})")
    if coordinator:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or "@" in host:
            raise ValueError(f"coordinator {coordinator!r} (JAX_COORDINATOR_ADDRESS) is not host:port, e.g. "
                             "node0:12355")


def broadcast_json(obj):
    """Process 0's JSON-able `obj` on every process (one process: `obj` itself); the others pass anything."""
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buf = data if data.size == size else np.zeros(size, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes())


MESSAGE_BYTES = 4096   # of a failure's message (UTF-8) that `raise_on_every_process` hands the others


def raise_on_every_process(error: Exception | None, what: str) -> None:
    """With several processes: each passes its outcome of the same step (`error`, None when it succeeded);
    the first failing process's error is raised on every process, so none goes on to a collective that a
    failed process will never reach (a hang). The failing process re-raises `error` itself; the others raise
    an exception of its type (its nearest builtin base; RuntimeError where that cannot be made from one
    message) whose one line says `what` failed on which process, and why. Every process must call it, at
    the same point; it is a barrier, an XLA collective: for a quick step only (gloo, on CPU, gives up after
    30 s; `run_on_first_process` waits longer). One process: `error` raised, if any."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils
    text = _describe(error).encode()[:MESSAGE_BYTES] if error is not None else b""
    buf = np.zeros(MESSAGE_BYTES + 1, np.uint8)     # [0]: failed; then the type's name and the message
    buf[0] = error is not None
    buf[1:1 + len(text)] = np.frombuffer(text, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), -1)
    failed = [int(i) for i in np.flatnonzero(every[:, 0])]
    if not failed:
        return
    if error is not None:
        raise error
    first = failed[0]
    others = f" (and on process(es) {failed[1:]})" if len(failed) > 1 else ""
    raise _rebuild(every[first, 1:].tobytes().rstrip(b"\0").decode("utf-8", "replace"),
                   f"{what} failed on process {first}{others}")


WAIT_HOURS = 6.0   # how long `run_on_first_process` waits for process 0 by default ($BMGPT_WAIT_HOURS)
_first_process_calls: dict[str, int] = {}   # per `what`: how many `run_on_first_process` calls so far


def per_process(values) -> np.ndarray:
    """`[processes, len(values)]` int32 (JAX's integers): every JAX process's `values` (counts, checksums of
    what it read), so that all can check they agree before a collective that would otherwise hang. One
    allgather (every process must call it at the same point); with one process, its own values alone."""
    if jax.process_count() == 1:
        return np.asarray([values], np.int32)
    from jax.experimental import multihost_utils
    mine = np.asarray(values, np.int32)
    return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(mine))


def check_same_sequence(items: Sequence, what: str, where: str) -> None:
    """Stop, on every process alike, unless all JAX processes hold the same `items` (their count and a checksum
    of the first, middle and last): hosts whose copies of a data set differ (a half-copied folder, a stale
    build) would read overlapping shares and emit different numbers of batches, i.e. mismatched collectives
    (a hang). `what` names the data, `where` the settings that point at its files."""
    n = len(items)
    mark = zlib.crc32(repr([items[i] for i in (0, n // 2, n - 1)] if n else []).encode()) >> 1   # in int32
    every = per_process([n, mark])
    if (every != every[0]).any():
        raise ValueError(f"{what}: the processes read different data ({every[:, 0].tolist()} records per process, "
                         f"checksums {every[:, 1].tolist()}): every host must see the same files {where}")


def wait_hours() -> float:
    """`$BMGPT_WAIT_HOURS` (a positive number), else `WAIT_HOURS`: the longest that the other processes
    wait for process 0's work in `run_on_first_process` (a 10 GB text corpus builds in about 15 minutes)."""
    value = os.environ.get("BMGPT_WAIT_HOURS")
    if value in (None, ""):
        return WAIT_HOURS
    try:
        hours = float(value)
    except ValueError:
        hours = 0.0
    if not 0 < hours < 24 * 24:   # the store takes milliseconds as a 32-bit int: at most 24.8 days
        raise ValueError(f"environment variable BMGPT_WAIT_HOURS={value!r} is not a number of hours in (0, 576)")
    return hours


def run_on_first_process(fn: Callable[[], None], what: str) -> None:
    """With several processes: process 0 calls `fn()` while the others wait for it, for as long as it takes
    (up to `wait_hours()`); process 0's failure is raised on every process (the others: its type, one line
    saying `what` failed on process 0, and why; a TimeoutError once the wait is over). Every process must
    call it, at the same point, with the same `what`. One process: `fn()`.

    The others wait on the distributed runtime's key-value store (process 0 sets a key with its outcome),
    not in an XLA collective: gloo's (CPU) gives up after 30 s and the coordination service then aborts
    every process, and an accelerator collective left waiting for minutes is no safer. Each call has a key
    of its own (`what` and how many calls with it came before), so several in one run cannot mix."""
    if jax.process_count() == 1:
        fn()
        return
    from jax._src.distributed import global_state
    hours = wait_hours()       # read on every process: a bad value is refused on process 0 too, before its work
    n = _first_process_calls[what] = _first_process_calls.get(what, 0) + 1
    key = f"bmgpt_jax/run_on_first_process/{what}/{n}"
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as e:
            global_state.client.key_value_set(key, "failed\n" + _describe(e))
            raise
        global_state.client.key_value_set(key, "ok")
        return
    try:
        outcome = global_state.client.blocking_key_value_get(key, timeout_in_ms=int(hours * 3_600_000))
    except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" not in str(e):
            raise
        raise TimeoutError(f"{what}: process 0 has not finished after {hours:g} hour(s) (BMGPT_WAIT_HOURS "
                           "sets how long the other processes wait)") from None
    if outcome != "ok":
        raise _rebuild(outcome.partition("\n")[2], f"{what} failed on process 0")


def _describe(error: Exception) -> str:
    """`error` as its nearest builtin type's name, a newline and its message, for another process."""
    kind = next(c.__name__ for c in type(error).__mro__ if getattr(builtins, c.__name__, None) is c)
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return f"{kind}\n{message}"


def _rebuild(described: str, where: str) -> Exception:
    """The exception to raise for another process's `_describe`d error: its type (RuntimeError where that
    cannot be made from one message), its one line `{where}: {message}`."""
    kind, _, message = described.partition("\n")
    line = f"{where}: {message}"
    cls = getattr(builtins, kind, RuntimeError)
    try:
        return cls(line) if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError(line)
    except TypeError:           # a builtin that takes more than a message (UnicodeDecodeError)
        return RuntimeError(f"{kind}: {line}")


def check_shared_folder(path: str | os.PathLike, what: str) -> None:
    """With several processes, ValueError unless `path` is one folder that every process sees.

    Every host writes its own shards of each checkpoint into the checkpoint folder, and process 0 then
    finalises the step there: a host-local folder (a relative path on hosts whose working directories
    differ, a local disk on each node) would leave no host with a whole checkpoint, found out only at the
    first save or the first restore. Process 0 writes a marker file named by a random token it broadcasts;
    every process must read it back. One process: nothing to check.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    name = ".shared-check-" + broadcast_json(os.urandom(8).hex() if jax.process_index() == 0 else None)
    marker = Path(path) / name
    if jax.process_index() == 0:
        try:   # a failure here must still reach the barrier below, or the others would wait there
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(name)
        except OSError:
            pass
    multihost_utils.sync_global_devices(f"bmgpt_jax shared folder {what}")
    try:
        seen = marker.read_text() == name
    except OSError:
        seen = False
    every = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
    multihost_utils.sync_global_devices(f"bmgpt_jax shared folder {what} read")
    if jax.process_index() == 0 and every[0]:
        marker.unlink()
    if not every[0]:
        raise ValueError(f"{what} {path}: process 0 cannot write there")
    if not every.all():
        blind = [int(i) for i in np.flatnonzero(every == 0)]
        raise ValueError(f"{what} {path} is not one folder every process sees (process(es) {blind} do not see "
                         f"what process 0 wrote there): each host writes its part of every checkpoint into it, "
                         f"so give a disk every host mounts (NFS, a gcsfuse-mounted bucket) at the same path")

"""Encoding worker processes for the data pipeline (`pipeline.BatchIterator`, `data.workers > 0`).

`Workers(n, tokenizer, options)` starts `n` spawned processes, each with its own jobs and results pipe;
`submit` hands them a window's records round-robin and `result` gathers the encoded examples back in
order. The workers ignore SIGINT and SIGTERM (a Ctrl-C or a scheduler's SIGTERM reaches the whole process
group: the main process decides, saves, then `close()` kills them with bounded waits), and a worker that
dies anyway (the OOM killer, a signal to its pid) is a `WorkerDied` naming it, never a wait without end.
Not a `multiprocessing.Pool`: its `terminate()` waits without a time limit on workers that ignore SIGTERM.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.util
import queue
import signal
import threading
import traceback
from multiprocessing import resource_tracker

from .examples import EncodeOptions, encode_example
from .text import Tokenizer

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class WorkerDied(RuntimeError):
    """An encoding worker process died (killed alone: the OOM killer, a signal to its pid) or failed."""


def _worker_main(jobs, results, tok: Tokenizer, opt: EncodeOptions) -> None:
    """An encoding process: `(job_id, records)` in, `(job_id, encoded)` out, in order. SIGINT and SIGTERM
    are ignored (they were blocked since before the process started, so one sent to the group while it
    starts is dropped too): the main process decides when to stop. A thread keeps reading the jobs, so the
    main process's send never waits on this process's send of a result. It exits when the jobs pipe
    closes (the main process is gone, even SIGKILLed) or its results can no longer be sent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    todo: queue.Queue = queue.Queue()

    def receive() -> None:
        try:
            while True:
                todo.put(jobs.recv())
        except (EOFError, OSError):
            todo.put(None)

    threading.Thread(target=receive, daemon=True).start()
    try:
        while (job := todo.get()) is not None:
            job_id, records = job
            try:
                reply = [encode_example(tok, r, opt) for r in records]
            except Exception:  # noqa: BLE001 -- handed to the main process, which raises it as WorkerDied
                reply = WorkerDied(f"data: an encoding worker failed:\n{traceback.format_exc()}")
            results.send((job_id, reply))
    except OSError:               # the main process is gone
        pass


def _stop_workers(procs: list, conns: list) -> None:
    """Kill (SIGKILL: they ignore SIGTERM) and reap the workers; bounded waits only, dead ones included."""
    for p in procs:
        p.kill()
    for p in procs:
        p.join(timeout=5)
    for c in conns:
        c.close()


class Workers:
    """`n` spawned encoding processes, each with its own jobs and results pipe. `submit(records)` splits
    the records round-robin over them and returns a job id; `result(job_id)` returns the encoded records
    in their order. Jobs are collected in the order they were submitted; a job never collected (a
    `restore` dropped it) is skipped when a later one is. A dead worker raises `WorkerDied` naming it."""

    def __init__(self, n: int, tok: Tokenizer, opt: EncodeOptions):
        ctx = multiprocessing.get_context("spawn")      # the parent runs a threaded JAX runtime
        self.procs, self.jobs, self.results, self.next_id = [], [], [], 0
        conns: list = []                                # every pipe end this process holds
        self._stop = multiprocessing.util.Finalize(self, _stop_workers, args=(self.procs, conns),
                                                   exitpriority=10)   # at exit: before multiprocessing joins them
        main = threading.current_thread() is threading.main_thread()
        resource_tracker.ensure_running()               # first: its launch unblocks SIGINT/SIGTERM after it
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if main else None
        try:                        # the children start with SIGINT/SIGTERM blocked; here they wait, not lost
            for i in range(n):
                jobs_r, jobs_w = ctx.Pipe(duplex=False)
                results_r, results_w = ctx.Pipe(duplex=False)
                self.jobs.append(jobs_w)
                self.results.append(results_r)
                conns += [jobs_r, jobs_w, results_r, results_w]
                p = ctx.Process(target=_worker_main, args=(jobs_r, results_w, tok, opt), daemon=True,
                                name=f"bmgpt_jax-encode-{i}")
                p.start()
                self.procs.append(p)
                jobs_r.close()
                results_w.close()
        except BaseException:
            self.close()
            raise
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _died(self, i: int, during: str) -> WorkerDied:
        p = self.procs[i]
        p.join(timeout=1)
        code = p.exitcode
        how = ("still running" if code is None else f"killed by {signal.Signals(-code).name}" if code < 0
               else f"exit code {code}")
        return WorkerDied(f"data: encoding worker {i} (pid {p.pid}, data.workers={len(self.procs)}) died ({how}) "
                          f"{during}: killed alone (out of memory?); lower data.workers, or 0 to encode in the main "
                          "process. A training run keeps its last checkpoint: --resume continues from it")

    def submit(self, records: list) -> int:
        job_id, self.next_id = self.next_id, self.next_id + 1
        for i, conn in enumerate(self.jobs):
            try:
                conn.send((job_id, records[i::len(self.jobs)]))
            except OSError:
                raise self._died(i, "before it was sent a window") from None
        return job_id

    def result(self, job_id: int, n: int, what: str) -> list:
        parts = []
        for i, conn in enumerate(self.results):
            while True:
                try:
                    got, part = conn.recv()
                except (EOFError, OSError):
                    raise self._died(i, f"while encoding {what}") from None
                if got > job_id:
                    raise RuntimeError(f"data: job {job_id} collected after job {got}")
                if got == job_id:
                    break
            if isinstance(part, WorkerDied):
                raise part
            parts.append(part)
        k = len(parts)
        return [parts[i % k][i // k] for i in range(n)]                 # undo the round-robin split

    def close(self) -> None:
        self._stop()

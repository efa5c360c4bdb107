"""The pipeline's encoding workers (`data.workers`): the same batches as encoding inline; stop signals to the
process group leave them encoding; a worker that dies is an error naming it, not a wait without end."""
import dataclasses

import pytest

from bmgpt_jax.data.pipeline import BatchIterator
from tests.data.test_pipeline import _equal, _take


def test_workers_give_the_same_batches(cfg):
    inline = _take(BatchIterator(cfg), 5)
    it = BatchIterator(dataclasses.replace(cfg, workers=2))
    try:
        assert _equal(_take(it, 5), inline)
    finally:
        it.close()


def test_workers_ignore_stop_signals_and_a_dead_one_is_an_error(cfg):
    """SIGINT/SIGTERM to the workers (a Ctrl-C or scancel reaches the whole process group) leave them
    encoding: the main process decides. A worker killed alone is a WorkerDied naming it at the next
    window, not a wait without end, and close() returns at once with the workers gone."""
    import os
    import signal
    import time

    from bmgpt_jax.data.workers import WorkerDied, Workers
    inline = _take(BatchIterator(cfg), 7)
    it = BatchIterator(dataclasses.replace(cfg, workers=2))
    try:
        first = _take(it, 1)
        procs = list(it._pool.procs)
        for p, sig in zip(procs, (signal.SIGINT, signal.SIGTERM)):
            os.kill(p.pid, sig)
        assert _equal(first + _take(it, 4), inline[:5])             # windows 0 and 1 (3 batches each)
        assert all(p.is_alive() for p in procs)
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].join(10)
        start = time.monotonic()
        with pytest.raises(WorkerDied, match=r"worker 1 \(pid \d+, data.workers=2\) died \(killed by SIGKILL\)"):
            _take(it, 3)
        assert time.monotonic() - start < 10 and it._pool is None and not any(p.is_alive() for p in procs)
    finally:
        start = time.monotonic()
        it.close()
        assert time.monotonic() - start < 10
    workers = Workers(1, it.tokenizer, it.options)                 # dies holding a job: the wait ends too
    try:
        os.kill(workers.procs[0].pid, signal.SIGSTOP)
        job = workers.submit([it.records[i] for i in range(4)])
        os.kill(workers.procs[0].pid, signal.SIGKILL)
        with pytest.raises(WorkerDied, match=r"worker 0 .* died \(killed by SIGKILL\) while encoding window 9"):
            workers.result(job, 4, "window 9")
    finally:
        workers.close()

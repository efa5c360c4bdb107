"""Waiting on the child processes a test starts: every child's output drained at once, none left behind.

Two JAX processes of one job wait for each other in collectives, so reading one child's pipe to the end
before the other's can deadlock: the unread child blocks on a full pipe while the read one waits for it
in a barrier. And a child still running after its test failed keeps a core busy for the rest of the
suite. `communicate` reads all pipes concurrently and kills whatever is still running when it returns.
"""
import subprocess
import threading
import time


def communicate(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each child's whole stdout (started with `stdout=PIPE, text=True`), once all have exited.

    Raises `subprocess.TimeoutExpired` (naming the first child still running) when they have not all
    exited within `timeout` seconds; every child is killed before this returns or raises."""
    outputs = [""] * len(procs)

    def drain(i: int) -> None:
        outputs[i] = procs[i].stdout.read()

    readers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(len(procs))]
    deadline = time.monotonic() + timeout
    try:
        for r in readers:
            r.start()
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        for r in readers:
            r.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r in readers:
        r.join(timeout=10)          # EOF once the child is gone (unless a grandchild holds the pipe)
    return outputs

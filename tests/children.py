"""Waiting on the child processes a test starts: every child's output drained at once, none left behind.

Two JAX processes of one job wait for each other in collectives, so reading one child's pipe to the end
before the other's can deadlock: the unread child blocks on a full pipe while the read one waits for it
in a barrier. And a child still running after its test failed keeps a core busy for the rest of the
suite. `communicate` reads all pipes concurrently and kills whatever is still running when it returns.
"""
import subprocess
import threading
import time

# XLA:CPU's LLVM optimisation level in the tests and the JAX children they start. The suite compiles
# hundreds of small programs and runs most of them once or twice: at level 0 its tests took 15% less time
# in all, the compile-bound files 25-40% less (docs/benchmarks.md). The level acts on LLVM's code
# generation only: the optimised HLO, hence the buffer assignment and the compiled memory figures the tests
# assert, is the same (checked on a jitted gradient). The code LLVM emits runs slower, which one child
# feels more than it saves: the real-width init (`xla_flags(8, fast_compile=False)`, XLA's default level,
# as in the benches and real runs).
TEST_XLA_OPT = "--xla_backend_optimization_level=0"


def xla_flags(devices: int, fast_compile: bool = True) -> str:
    """`XLA_FLAGS` for a test process with `devices` virtual CPU devices (`fast_compile`: TEST_XLA_OPT)."""
    return f"--xla_force_host_platform_device_count={devices}" + (f" {TEST_XLA_OPT}" if fast_compile else "")


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

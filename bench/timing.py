"""Shared timing helper for the benchmarks."""
import time

import numpy as np


def median_time(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after one untimed warm-up (compilation) call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))

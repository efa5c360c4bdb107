"""A compiled program's memory per device, as the planners report it (`plan`, `decode_plan`)."""
from __future__ import annotations

import dataclasses
import time

import jax

GiB = 1024 ** 3
RESERVE_GIB = 1.0  # HBM the TPU runtime keeps (v5e: 15.75 of 16 GiB usable) plus fragmentation headroom


@dataclasses.dataclass
class Phase:
    """One compiled program's memory per device (bytes, from XLA's `memory_analysis()`) and compile time.
    `error`: the compiler's out-of-memory message when it refused the program (the TPU compiler does when
    the program cannot fit the chip's HBM); `memory` is then empty."""
    memory: dict[str, int]
    compile_s: float
    error: str = ""

    @classmethod
    def compile(cls, jitted, *args, **kwargs) -> "Phase":
        t0 = time.perf_counter()
        try:
            ma = jitted.lower(*args, **kwargs).compile().memory_analysis()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return cls({}, time.perf_counter() - t0, str(e).splitlines()[0])
        keys = ("argument", "output", "alias", "temp", "generated_code")
        return cls({k: int(getattr(ma, f"{k}_size_in_bytes")) for k in keys}, time.perf_counter() - t0)

    @property
    def peak(self) -> int | None:
        """Live bytes at the high-water mark: arguments + outputs - donated aliases + temporaries + code."""
        m = self.memory
        return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"] if m else None


def fits(peak: int | None, hbm_gib: float) -> str:
    """The verdict: "yes" with at least `RESERVE_GIB` to spare (the runtime keeps some HBM for itself),
    "tight" within it, "NO" beyond the chip's HBM or when the compiler refused the program."""
    if peak is None or peak > hbm_gib * GiB:
        return "NO"
    return "yes" if peak <= (hbm_gib - RESERVE_GIB) * GiB else "tight"

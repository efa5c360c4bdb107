"""A compiled program's memory per device, as the planners report it (`plan`, `decode_plan`)."""
from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
from jax.experimental.layout import Format

GiB = 1024 ** 3
RESERVE_GIB = 1.0  # HBM the TPU runtime keeps (v5e: 15.75 of 16 GiB usable) plus fragmentation headroom


@dataclasses.dataclass
class Phase:
    """One compiled program's memory per device (bytes, from XLA's `memory_analysis()`) and compile time.
    `error`: the compiler's out-of-memory message when it refused the program (the TPU compiler does when
    the program cannot fit the chip's HBM); `memory` is then empty. `collectives`: see `collectives`."""
    memory: dict[str, int]
    compile_s: float
    error: str = ""
    collectives: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    input_layouts: list = dataclasses.field(default_factory=list)

    @classmethod
    def compile(cls, jitted, *args, **kwargs) -> "Phase":
        """`jitted.lower(*args, **kwargs).compile()`, measured. `input_layouts`: each flat argument's
        `major_to_minor` in the compiled program (what a jit given `Layout.AUTO` formats chose)."""
        t0 = time.perf_counter()
        try:
            compiled = jitted.lower(*args, **kwargs).compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return cls({}, time.perf_counter() - t0, str(e).splitlines()[0])
        ma = compiled.memory_analysis()
        keys = ("argument", "output", "alias", "temp", "generated_code")
        formats = jax.tree.leaves(compiled.input_formats, is_leaf=lambda f: isinstance(f, Format))
        return cls({k: int(getattr(ma, f"{k}_size_in_bytes")) for k in keys}, time.perf_counter() - t0,
                   collectives=collectives(compiled.as_text()),
                   input_layouts=[getattr(f.layout, "major_to_minor", None) for f in formats])

    @property
    def peak(self) -> int | None:
        """Live bytes at the high-water mark: arguments + outputs - donated aliases + temporaries + code."""
        m = self.memory
        return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"] if m else None


KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"= (?:(\w+)\[([\d,]*)\]\S*|\(.*?\)\S*) (" + "|".join(KINDS) + r")(?:-start)?\(")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


def collectives(hlo: str) -> dict[str, list[int]]:
    """`{kind: [result bytes of each op]}` for the cross-device operations in a compiled program's HLO
    text (KINDS), each op once however often a loop runs it (an async start whose result is a tuple counts
    0 bytes): what tells "each device works on its own shard" apart from "the partitioner moves weights",
    which the memory figures alone do not."""
    out: dict[str, list[int]] = {}
    for dtype, dims, kind in _OP.findall(hlo):
        size = _BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d) if dtype else 0
        out.setdefault(kind, []).append(size)
    return out


def fits(peak: int | None, hbm_gib: float) -> str:
    """The verdict: "yes" with at least `RESERVE_GIB` to spare (the runtime keeps some HBM for itself),
    "tight" within it, "NO" beyond the chip's HBM or when the compiler refused the program."""
    if peak is None or peak > hbm_gib * GiB:
        return "NO"
    return "yes" if peak <= (hbm_gib - RESERVE_GIB) * GiB else "tight"

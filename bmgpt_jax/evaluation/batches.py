"""Evaluation batches on the training mesh: static shapes every process agrees on, rows sharded over
the mesh's batch axes (`data`, `fsdp`).

Every process holds the same plan (which records go into global batch k, see `plan_batches`), takes its
own block of `rows` rows of each (`local_part`), collates them at a shape rounded up to a few buckets
(`T` on a 64, 96, 128, 192, ... ladder, the ESM width to a multiple of 64, graph sizes on
`molecules.choose_bucket`'s ladder) so repeated shapes reuse their compilation, and the processes agree
on the largest of their shapes before the rows become one global array (`pipeline.global_batch`, as
training feeds its step).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from bmgpt_jax.data import examples, molecules

LENGTHS = tuple(sorted(b << k for k in range(16) for b in (64, 96)))   # 64, 96, 128, 192, 256, 384, ...


def round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def bucket(n: int) -> int:
    """The smallest of `LENGTHS` that holds `n` (at most 1.5x `n` beyond 64: few shapes, little padding)."""
    return next(b for b in LENGTHS if b >= n)


def batch_shards(mesh) -> int:
    """How many ways the batch axes (`data` x `fsdp`) split a batch dimension."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def rows_per_process(batch_size: int, mesh) -> int:
    """This process's rows of a global batch of (about) `batch_size` rows: rounded up so the global batch
    divides over the batch axes and the processes."""
    P = jax.process_count()
    shards = batch_shards(mesh)
    step = shards // math.gcd(shards, P)                # P * rows must divide by the shard count
    return round_up(-(-batch_size // P), step)


def plan_batches(lengths: Sequence[int], rows: int) -> list[list[int]]:
    """Indices into `lengths`, sorted by length (less padding, fewer distinct shapes) and cut into global
    batches of `rows * process_count` items; the same on every process."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    size = rows * jax.process_count()
    return [order[i:i + size] for i in range(0, len(order), size)]


def local_part(batch: Sequence[int], rows: int) -> list[int]:
    """This process's block of a global batch (process p: items `p*rows ... (p+1)*rows - 1`)."""
    p = jax.process_index()
    return list(batch[p * rows:(p + 1) * rows])


def _agree(sizes: Sequence[int]) -> np.ndarray:
    """The element-wise maximum of `sizes` over all processes."""
    sizes = np.asarray(sizes, np.int32)
    if jax.process_count() == 1:
        return sizes
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(sizes)).reshape(-1, len(sizes)).max(0)


def collate_local(encoded: Sequence[examples.Encoded], rows: int, mesh, filler: examples.Encoded,
                  max_len: int) -> dict[str, np.ndarray]:
    """This process's `rows`-row batch (docs/batch_format.md) of `encoded`; spare rows repeat `filler`
    (a real prompt, so padding rows compute finite values) and are told apart by the caller. `T` is the
    longest's `bucket` (capped at `max_len`, the context left, never below the longest), the ESM width the
    longest protein rounded up to 64, graph budgets come from `molecules.choose_bucket`, the protein count
    is rounded up to 4; all sizes are the maxima over the processes, rounded so the global arrays divide
    over the batch axes."""
    if len(encoded) > rows:
        raise ValueError(f"{len(encoded)} examples do not fit a batch of {rows} rows")
    encoded = list(encoded) + [filler] * (rows - len(encoded))
    n, e, g, p = (sum(x) for x in zip(*(ex.budget for ex in encoded)))
    nodes, edges, graphs = molecules.choose_bucket(n, e, g)
    longest = max(ex.length for ex in encoded)
    T = max(longest, min(bucket(longest), max_len))
    prot_len = round_up(max([len(ids) for ex in encoded for ids, _ in ex.prots] or [1]), 64)
    T, prot_len, nodes, edges, graphs, proteins = _agree([T, prot_len, nodes, edges, graphs,
                                                          round_up(p, 4) if p else 0])
    shards = batch_shards(mesh)
    step = shards // math.gcd(shards, jax.process_count())
    nodes, edges, graphs, proteins = (round_up(int(x), step) if x else 0 for x in (nodes, edges, graphs, proteins))
    budget = examples.Budget(batch=rows, nodes=nodes, edges=edges, graphs=graphs, proteins=proteins)
    return examples.collate(encoded, int(T), budget, int(prot_len))


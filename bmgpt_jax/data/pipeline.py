"""Deterministic, resumable, per-host batches with static shapes (docs/batch_format.md, docs/data.md).

    cfg = DataConfig(sources=("demo",), batch_size=8)
    it = BatchIterator(cfg)                  # this process's part of the data
    batch = next(it)                         # dict of numpy arrays, one of len(cfg.seq_buckets) shapes
    state = it.state()                       # small JSON-able dict, the same on every process
    it2 = BatchIterator(cfg); it2.restore(state)   # next(it2) == the batch next(it) returns now
    arrays = global_batch(batch, mesh)       # jax.Arrays sharded over the mesh's batch axes

Order: each epoch is a permutation of all records (concatenated sources) drawn from `(seed, epoch)`.
It is cut into *windows* of `num_processes * window_batches * local_batch` records; process p encodes
positions p, p+P, p+2P ... of a window (only its records are read) and fills `k` batches with them
(`filling`), each padded to the smallest bucket that holds its longest row, in a seeded random order.
Unpacked, `k` comes from counts alone; packed (`data.pack`: several examples a row, `segment_ids`), it is
the most any process needs (one allgather a window), the others emitting empty batches, which the train
step counts and does not apply. The state is `(epoch, window, batch)` -- global, not per host -- and a
restore re-encodes one window (on another process count, mid-window, it moves to the next: `restore`).
Encoding runs in `workers` spawned processes, one window ahead of the consumer. They ignore SIGINT and
SIGTERM (a Ctrl-C or a scheduler's SIGTERM reaches the whole process group: the main process decides, saves,
then `close()` kills them); one that dies anyway is a `WorkerDied` error, never a wait without end.

Nothing is dropped silently: `counts()` gives the examples read and those left out per reason
(`examples.DROP_REASONS`: bad records, too long, over the atom cap, over a graph/protein budget); the
training job sums them over processes, reports them and stops past `max_dropped`.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from collections import Counter
from typing import Literal, Sequence

import jax
import numpy as np

from ..config import RangeError, check_range
from ..distributed import check_same_sequence
from ..parallel import batch_shardings, process_blocks
from .builders import BUILDERS, SAMPLE_SETS, default_split, make_builder, read_split, shared_data_dir
from .demo import demo_records
from .examples import Budget, EncodeOptions, Encoded, collate, encode_example, repad
from .filling import fill_batches, pack_rows, usable
from .records import Record
from .text import DEFAULT_SYSTEM, load_tokenizer
from .workers import WorkerDied, Workers

AUTO_SAMPLES = ("chebi20:validation", "chembl_qa", "swissprot")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data:` section of a training config.

    sources: dataset names (`demo`, or a key of builders.BUILDERS), each optionally `name:split`; `demo` is
      `demo:train` (`demo:test` is held out); `auto` = demo plus the molecule/protein sample sets when
      ../shared/data exists.
    raw_dirs: source name -> folder of its raw files (sample sets default to the shared data folder).
    data_dir: where tfds writes built datasets ("" = the user cache). tokenizer: SentencePiece model
      path ("" = the demo tokenizer). batch_size: global rows per step (split evenly over processes).
    seq_buckets: the static sequence lengths T (text tokens + entity slots), ascending.
    node/edge/graph/protein_budget: per-host graph and protein padding sizes (padding graph included).
    The atom cap is the GIN's (`model.gin.max_atoms`, `over_cap`), handed to `BatchIterator`.
    multi_entity: `keep` or `single` (PubChemQA/UniProtQA records with several entities are skipped).
    num_epochs: 0 repeats forever. workers: encoding processes (0 = in this process).
    max_dropped: the largest share of the examples read that the pipeline may drop (bad records, too
      long, over a budget) before a training run stops with an error naming the setting to change.
    pack: several examples end to end in each row of the last bucket (`segment_ids`: positions restart,
      attention stays inside each), so the stage-1 corpus's documents fill rows instead of padding them.
    """
    sources: tuple[str, ...] = ("auto",)
    raw_dirs: dict[str, str] = dataclasses.field(default_factory=dict)
    data_dir: str = ""
    tokenizer: str = ""
    system_prompt: str = DEFAULT_SYSTEM
    batch_size: int = 8
    seq_buckets: tuple[int, ...] = (256, 512, 1024, 1536)
    window_batches: int = 16
    node_budget: int = 2048
    edge_budget: int = 4608
    graph_budget: int = 16
    protein_budget: int = 8
    max_protein_len: int = 1024
    multi_entity: Literal["keep", "single"] = "keep"
    demo_molecules: int = 0
    seed: int = 0
    shuffle: bool = True
    num_epochs: int = 0
    workers: int = 0
    max_dropped: float = 0.05
    pack: bool = False

    def __post_init__(self):
        if not self.sources:
            raise ValueError("data.sources is empty")
        if list(self.seq_buckets) != sorted(set(self.seq_buckets)) or not self.seq_buckets:
            raise ValueError(f"data.seq_buckets {self.seq_buckets} must be distinct and ascending")
        if self.seq_buckets[0] < 1:
            raise RangeError(type(self), "seq_buckets", list(self.seq_buckets), "every length must be >= 1")
        check_range(self, ("batch_size", "window_batches", "max_protein_len"), 1)
        check_range(self, ("demo_molecules", "seed", "num_epochs", "workers"), 0)
        if self.node_budget < 1 or self.graph_budget < 1 or min(self.edge_budget, self.protein_budget) < 0:
            raise ValueError("data: node_budget and graph_budget must be >= 1 (the padding graph), "
                             "edge_budget and protein_budget >= 0")
        if not 0 <= self.max_dropped <= 1:
            raise ValueError(f"data.max_dropped {self.max_dropped} must be a share in [0, 1]")


def _source_records(spec: str, cfg: DataConfig) -> list[Sequence[Record]]:
    name, _, split = spec.partition(":")
    if name == "demo":
        return [demo_records(cfg.demo_molecules or None, split or "train")]
    if name == "auto":
        samples = AUTO_SAMPLES if shared_data_dir() is not None else ()
        return [r for s in ("demo",) + samples for r in _source_records(s, cfg)]
    if name not in BUILDERS:
        raise KeyError(f"data.sources: unknown source {name!r}; known: demo, auto, {', '.join(sorted(BUILDERS))}")
    builder = make_builder(name, cfg.raw_dirs.get(name), cfg.data_dir or None, cfg.multi_entity)
    if split and split not in builder.FILES:
        raise KeyError(f"data.sources: {name} has no split {split!r}; splits: {', '.join(builder.FILES)}")
    try:
        return [read_split(builder, split or default_split(name))]
    except FileNotFoundError:
        if builder.raw_dir is not None:
            raise
        shared = ", and no shared sample folder: $BMGPT_SHARED_DATA or ../shared/data" if name in SAMPLE_SETS else ""
        raise FileNotFoundError(f"{name}: no input folder given (data.raw_dirs.{name} is not set{shared}); building "
                                f"it needs a folder holding {', '.join(builder.expected_files())}") from None


class Records(Sequence[Record]):
    """The configured sources concatenated into one index space."""

    def __init__(self, cfg: DataConfig):
        self.parts = [p for spec in cfg.sources for p in _source_records(spec, cfg)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        if self.offsets[-1] == 0:
            raise ValueError(f"data.sources {cfg.sources} hold no records")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> Record:
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][int(i - self.offsets[k])]


class BatchIterator:
    """Infinite (or `num_epochs`) iterator of this process's batches; see the module docstring.

    `max_atoms` / `over_cap`: the GIN's atom cap (`GinConfig`; None, the default: every atom a token), so
    training encodes molecules exactly as evaluation and chat do. `agree(k)`: packed, the batch count all
    processes emit for a window where this one needs `k` (default: the largest over the JAX processes, one
    allgather); processes simulated in one JAX process must pass it."""

    def __init__(self, cfg: DataConfig, process_index: int | None = None, process_count: int | None = None,
                 records: Sequence[Record] | None = None, *, max_atoms: int | None = None,
                 over_cap: Literal["subsample", "error"] = "subsample", agree=None):
        self._pool = None                    # first: close() must work even when the sources fail to load
        self.cfg = cfg
        self.p = jax.process_index() if process_index is None else process_index
        self.P = jax.process_count() if process_count is None else process_count
        if cfg.pack and agree is None and self.P != jax.process_count():
            raise ValueError(f"data.pack with {self.P} simulated processes in {jax.process_count()} JAX process(es) "
                             "needs `agree`: how they agree on a window's batch count")
        self._agree_fn = agree
        if cfg.batch_size % self.P:
            raise ValueError(f"data.batch_size {cfg.batch_size} is not divisible by {self.P} processes")
        self.budget = Budget(cfg.batch_size // self.P, cfg.node_budget, cfg.edge_budget, cfg.graph_budget,
                             cfg.protein_budget)
        self.records = Records(cfg) if records is None else records
        if self.P == jax.process_count() > 1:   # each takes its share of one global order
            check_same_sequence(self.records, f"data.sources: {list(cfg.sources)}", "(data.raw_dirs, data.data_dir)")
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.options = EncodeOptions(cfg.system_prompt, cfg.seq_buckets[-1], max_atoms, over_cap,
                                     cfg.max_protein_len)
        self.window_size = cfg.window_batches * self.budget.batch        # records per process per window
        self.windows_per_epoch = math.ceil(len(self.records) / (self.P * self.window_size))
        self.dropped: Counter[str] = Counter()                           # reason -> examples (this process)
        self.read = 0                                                    # examples encoded (this process)
        self.cut: Counter[str] = Counter()                  # plain text cut to the last bucket: examples, tokens
        self._before: tuple[tuple[int, int], int, Counter, Counter] | None = None  # counts before this window
        self._pos = (0, 0, 0)
        self._jobs: dict[tuple[int, int], object] = {}                 # (epoch, window) -> encoding
        self._batches: tuple[tuple[int, int], list[dict]] | None = None  # the current window's batches
        self._perm: tuple[int, np.ndarray] | None = None

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Where the next batch comes from (`epoch`, `window`, `batch`) and what defines that position: the
        seed, the record count, the global batch size, the window length, shuffling, packing and the
        process count."""
        e, w, b = self._pos
        return {"epoch": e, "window": w, "batch": b, "seed": self.cfg.seed, "num_records": len(self.records),
                "batch_size": self.cfg.batch_size, "window_batches": self.cfg.window_batches,
                "shuffle": self.cfg.shuffle, "pack": self.cfg.pack, "processes": self.P}

    def restore(self, state: dict) -> None:
        """Continue from `state()`. The seed, record count, batch size, window length, shuffling and packing
        must be those it was saved with (they fix which records a position means); a state of an older
        version lacks the last four and is taken as is.

        A window holds the same records whatever the process count, but the batches inside it do not
        (each process sorts its own share by length). So a state saved by another number of processes
        continues exactly at a window boundary; in the middle of a window it continues at the next one,
        and the rest of that window is skipped this epoch, with a warning giving its size."""
        mine = self.state()
        for key in ("seed", "num_records", "batch_size", "window_batches", "shuffle", "pack"):
            if key in state and state[key] != mine[key]:
                fix = "did data.sources change?" if key == "num_records" else f"resume with data.{key}={state[key]}"
                raise ValueError(f"data state was saved with {key}={state[key]}, this pipeline has {mine[key]}: {fix}")
        e, w, b = int(state["epoch"]), int(state["window"]), int(state["batch"])
        saved = int(state.get("processes", self.P))
        if b and saved != self.P:
            span = self.P * self.window_size
            n = min(span, len(self.records) - w * span)
            total = "" if self.cfg.pack else f" of {math.ceil(math.ceil(n / saved) / (self.cfg.batch_size // saved))}"
            log.warning("data: the state was saved by %d process(es) at batch %d%s of window %d (epoch %d), and "
                        "this run has %d: its batches are not those, so the run continues at the next window and "
                        "skips the rest of that window (%d examples in all) this epoch",
                        saved, b, total, w, e, self.P, n)
            e, w, b = (e, w + 1, 0) if w + 1 < self.windows_per_epoch else (e + 1, 0, 0)
        self._pos = (e, w, b)
        self._jobs.clear()
        self._batches = None

    def counts(self, state: dict | None = None) -> dict[str, int]:
        """`{"examples": read, reason: dropped, ..., "truncated": plain-text examples cut to the last
        bucket, "truncated_tokens": the tokens cut away}` (zero counts left out) for this process: the
        windows packed so far, or (with an earlier `state()`) only those before the window that state points
        into -- the part a run restored from that state does not encode again."""
        read, dropped, cut = self.read, self.dropped, self.cut
        if state is not None and self._before and self._before[0] == (state["epoch"], state["window"]):
            read, dropped, cut = self._before[1:]
        return {"examples": read, **{k: n for k, n in sorted((dropped + cut).items()) if n}}

    # -- order ------------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.records)
            order = (np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.cfg.shuffle
                     else np.arange(n))
            self._perm = (epoch, order)
        return self._perm[1]

    def window_indices(self, epoch: int, window: int, process: int | None = None) -> np.ndarray:
        """Record indices that `process` (default: this one) encodes for `window` of `epoch`."""
        span = self.P * self.window_size
        part = self._permutation(epoch)[window * span:(window + 1) * span]
        return part[self.p if process is None else process::self.P]

    def _num_batches(self, window: int) -> int:
        """Batches every process emits for `window`: from record counts only, so all processes agree."""
        span = self.P * self.window_size
        n = min(span, len(self.records) - window * span)
        return math.ceil(math.ceil(n / self.P) / self.budget.batch)

    # -- encoding ---------------------------------------------------------------------------------
    def _submit(self, epoch: int, window: int):
        key = (epoch, window)
        if key not in self._jobs and (not self.cfg.num_epochs or epoch < self.cfg.num_epochs):
            recs = [self.records[int(i)] for i in self.window_indices(epoch, window)]
            if self.cfg.workers:
                if self._pool is None:
                    self._pool = Workers(self.cfg.workers, self.tokenizer, self.options)
                self._jobs[key] = (self._call(self._pool.submit, recs), len(recs))
            else:
                self._jobs[key] = [encode_example(self.tokenizer, r, self.options) for r in recs]
        return key

    def _encoded(self, key) -> list[Encoded | str]:
        job = self._jobs.pop(key)
        if isinstance(job, tuple):
            job = self._call(self._pool.result, *job, f"window {key[1]} of epoch {key[0]}")
        return job

    def _call(self, method, *args):
        """A call to the workers; when one died, the others are stopped too (no half pool) and it raises."""
        try:
            return method(*args)
        except WorkerDied:
            self.close()
            raise

    def _agree(self, k: int) -> int:
        """The batch count every process emits for a packed window: the largest of theirs."""
        if self._agree_fn is not None or self.P == 1:
            return int(self._agree_fn(k)) if self._agree_fn else k
        from jax.experimental import multihost_utils
        return int(np.max(multihost_utils.process_allgather(np.int32(k))))

    def _window(self, epoch: int, window: int) -> list[dict]:
        """The window's batches in a seeded order. Unpacked, every process emits `_num_batches` (from counts);
        packed, as many as the process that needs the most (`_agree`); the others pad with empty batches."""
        key = self._submit(epoch, window)
        nxt = (window + 1, epoch) if window + 1 < self.windows_per_epoch else (0, epoch + 1)
        self._submit(nxt[1], nxt[0])                                       # prefetch the next window
        encoded = self._encoded(key)
        self._before = (key, self.read, Counter(self.dropped), Counter(self.cut))
        good, dropped, cut = usable(encoded, self.budget)
        self.read += len(encoded)
        self.dropped.update(dropped)
        self.cut.update(cut)
        if self.cfg.pack:
            batches = pack_rows(good, self.budget, self.cfg.seq_buckets[-1])
            k = max(self._agree(len(batches)), 1)     # a window whose examples were all dropped: one empty batch
        else:
            k = self._num_batches(window)
            batches, dropped = fill_batches(good, self.budget, k)
            self.dropped.update(dropped)
        batches += [[] for _ in range(k - len(batches))]
        order = np.random.default_rng([self.cfg.seed, epoch, window, 1]).permutation(k)
        return [self._collate(batches[i]) for i in order]

    def _collate(self, rows: list) -> dict:
        pack = self.cfg.pack
        longest = max((sum(e.length for e in r) if pack else r.length for r in rows), default=1)
        T = self.cfg.seq_buckets[bisect.bisect_left(self.cfg.seq_buckets, longest)]
        return collate(rows, T, self.budget, min(self.cfg.max_protein_len, T), packed=pack)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        e, w, b = self._pos
        if self.cfg.num_epochs and e >= self.cfg.num_epochs:
            raise StopIteration
        if self._batches is None or self._batches[0] != (e, w):
            self._batches = ((e, w), self._window(e, w))
        batches = self._batches[1]
        batch = batches[b]
        self._pos = (e, w, b + 1) if b + 1 < len(batches) else (
            (e, w + 1, 0) if w + 1 < self.windows_per_epoch else (e + 1, 0, 0))
        return batch

    def close(self) -> None:
        """Stop the encoding workers (killed, then reaped with bounded waits: it returns even when one died)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __del__(self):
        self.close()


def stack_batches(batches: Sequence[dict[str, np.ndarray]], T: int = 0, L: int = 0) -> dict[str, np.ndarray]:
    """`k` batches -> one batch with a leading micro-batch axis `[k, ...]` (for `grad_accum = k`), each
    widened (`repad`) to `T` positions and `L` ESM tokens (default: the longest among them); every
    micro-batch keeps its own graphs and slots."""
    T = T or max(b["input_ids"].shape[1] for b in batches)
    L = L or max((b["prot_ids"].shape[1] for b in batches if "prot_ids" in b), default=0)
    wide = [repad(b, T, L) for b in batches]
    return {k: np.stack([b[k] for b in wide]) for k in wide[0]}


def offset_for_process(batch: dict[str, np.ndarray], p: int) -> dict[str, np.ndarray]:
    """The batch (optionally `[k, ...]` micro-batched) of the process holding block `p` of the global rows,
    with graph and slot indices made global: node n -> n + p*N, slot s -> s + p*B*T (-1 stays -1), for the
    processes' batches concatenated in block order. (`mol_node_mask` needs no change: it travels with its
    nodes, so every process's padding stays marked.)"""
    B, T = batch["input_ids"].shape[-2:]
    out = dict(batch)
    if "mol_atoms" in batch:                 # a text-only batch (the `lm` stage) has no graph or slots
        N = batch["mol_atoms"].shape[-2]
        out["mol_senders"] = batch["mol_senders"] + p * N
        out["mol_receivers"] = batch["mol_receivers"] + p * N
    for key in ("mol_slot", "prot_slot"):
        if key in batch:
            out[key] = np.where(batch[key] >= 0, batch[key] + p * B * T, -1).astype(np.int32)
    return out


def global_batch(batch: dict[str, np.ndarray], mesh, axes=None) -> dict[str, jax.Array]:
    """This process's batch -> global jax Arrays, every row dimension sharded over the batch axes.

    A batch from `stack_batches` (`input_ids` `[k, B, T]`) keeps its leading micro-batch axis unsharded.
    With several processes, the hosts first agree on the longest bucket (`repad`), then indices are
    offset (`offset_for_process`) by the block of rows this process's devices hold
    (`parallel.process_blocks`, which refuses a mesh where a process has no contiguous block of its own),
    so the global arrays are the processes' batches concatenated in block order. `axes` overrides
    per-key logical axes as in `parallel.batch_shardings` (every sharded dimension must divide).
    """
    from jax.experimental import multihost_utils

    P = jax.process_count()
    lead = batch["input_ids"].ndim - 2
    if P > 1:
        shape = np.array([batch["input_ids"].shape[-1], batch["prot_ids"].shape[-1] if "prot_ids" in batch else 0],
                         np.int32)
        T, L = np.asarray(multihost_utils.process_allgather(shape)).reshape(P, 2).max(0)
        if lead:
            micro = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
            batch = stack_batches(micro, int(T), int(L))
        else:
            batch = repad(batch, int(T), int(L))
        batch = offset_for_process(batch, process_blocks(mesh)[jax.process_index()])
    global_shapes = {k: v.shape[:lead] + (v.shape[lead] * P,) + v.shape[lead + 1:] for k, v in batch.items()}
    abstract = {k: jax.ShapeDtypeStruct(s, batch[k].dtype) for k, s in global_shapes.items()}
    shardings = batch_shardings(abstract, mesh, axes=axes, microbatched=bool(lead))
    return {k: jax.make_array_from_process_local_data(shardings[k], v, global_shapes[k]) for k, v in batch.items()}

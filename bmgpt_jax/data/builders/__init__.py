"""tfds builders for every dataset, by the short name the pipeline's `DataConfig.sources` uses.

    builder = make_builder("chebi20", raw_dir="../shared/data")      # or raw_dir=None: the sample folder
    builder.download_and_prepare()                                  # array_record under data_dir
    records = read_split(builder, "test")                           # Sequence[Record], random access
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from ..records import Record, cache_dir
from .base import KEEP_MULTI, RecordBuilder, check_record
from .corpus import TextCorpus
from .openbiomed import PubChemQA, UniProtQA
from .samples import (ChEBI20, ChemblDrugQA, MedMCQA, MedQAUSMLE, MolInstructionsBiotext, PubMedQA,
                      SwissProtFunction)

log = logging.getLogger(__name__)

BUILDERS: dict[str, type[RecordBuilder]] = {cls.name: cls for cls in (
    PubChemQA, UniProtQA, TextCorpus, ChEBI20, ChemblDrugQA, SwissProtFunction, PubMedQA, MedMCQA, MedQAUSMLE,
    MolInstructionsBiotext)}
# Sets whose files live in the shared sample folder (their default raw_dir).
SAMPLE_SETS = ("chebi20", "chembl_qa", "swissprot", "pubmedqa", "medmcqa", "medqa", "biotext")


def default_split(name: str) -> str:
    """The split a source named without one reads (`medmcqa` is `medmcqa:validation`): its builder's first."""
    return next(iter(BUILDERS[name].FILES))


def shared_data_dir() -> Path | None:
    """`$BMGPT_SHARED_DATA`, or ../shared/data beside the repository; None when neither exists."""
    env = os.environ.get("BMGPT_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "data"
    return path if path.is_dir() else None


def make_builder(name: str, raw_dir: str | Path | None = None, data_dir: str | Path | None = None,
                 multi_entity: str = KEEP_MULTI) -> RecordBuilder:
    """Builder `name` (a key of `BUILDERS`) reading `raw_dir` and writing under `data_dir` (default: cache).

    `multi_entity` ("keep" | "single") picks the PubChemQA/UniProtQA config; other builders have none.
    """
    if name not in BUILDERS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(BUILDERS))}")
    cls = BUILDERS[name]
    if raw_dir is None and name in SAMPLE_SETS:
        raw_dir = shared_data_dir()
    kwargs = {"config": multi_entity} if cls.BUILDER_CONFIGS else {}
    return cls(raw_dir=raw_dir, data_dir=str(data_dir or cache_dir("tfds")), **kwargs)


class RecordSource(Sequence[Record]):
    """Random access to one built split as `Record`s (a thin view over `builder.as_data_source`).

    `bad_records`: what the build left out of the split, `{reason: {"count": n, "examples": [...]}}` (its
    `metadata.json`, so a cached build has it too), for a reader that counts them (evaluation's `skipped`)."""

    def __init__(self, builder: RecordBuilder, split: str):
        self.source = builder.as_data_source(split=split)
        self.bad_records: dict[str, dict] = dict(builder.info.metadata.get("bad_records", {}).get(split) or {})

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Record:
        return Record.from_example(self.source[int(i)])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def read_split(builder: RecordBuilder, split: str) -> RecordSource:
    """The records of `split`, building the dataset first if `data_dir` does not hold it yet (`prepare`).
    A split the build holds no record of is a ValueError saying why (`RecordBuilder.check_split`)."""
    prepare(builder)
    builder.check_split(split)
    return RecordSource(builder, split)


def prepare(builder: RecordBuilder) -> None:
    """`builder.download_and_prepare()`, safe when several processes build the same dataset at once.

    tfds builds into a temporary folder and renames it into place at the end; a second build of the same
    folder then fails on that rename (FileExistsError). So: with several JAX processes (the hosts of one
    job), process 0 builds first and the others wait for it, however long the build takes (up to
    `$BMGPT_WAIT_HOURS`, `distributed.run_on_first_process`: not in a collective, which gloo gives up on
    after 30 s), before their own call, which finds the dataset built in a `data_dir` they share, or builds
    their own copy in a host-local one. A failure on any process (process 0's build, or another's own) is
    raised on every process, naming the process (then `distributed.raise_on_every_process`), not left as a
    hang in the next collective. Independent jobs that race on one cache folder: the loser's
    FileExistsError means the winner finished, so it reads that build.
    """
    def build() -> None:
        # tfds prints "Downloading and preparing ..." (nothing is downloaded) on stdout, where chat and
        # evaluate print their results, and before any one-line error: a debug log line instead, and one
        # line of ours on stderr once a build has succeeded
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                try:
                    builder.download_and_prepare()
                except FileExistsError:   # another job renamed the same build into place first
                    builder.download_and_prepare()
        finally:
            log.debug("%s: %s", builder.name, printed.getvalue().strip())
        if "downloaded and prepared" in printed.getvalue():
            print(f"{builder.name}: built into {builder.data_dir}", file=sys.stderr)
        # a builder made before another process built the folder holds no splits, and tfds's "reusing
        # the dataset" does not read them back: refresh them from the folder
        builder.info.read_from_directory(builder.data_dir)
        builder.check_raw_files()

    import jax

    from ...distributed import raise_on_every_process, run_on_first_process
    run_on_first_process(build, f"building {builder.name}")
    if jax.process_count() == 1:
        return
    failed = None
    if jax.process_index() != 0:
        try:
            build()
        except Exception as e:  # noqa: BLE001 -- raised on every process below: none may wait for this one
            failed = e
    raise_on_every_process(failed, f"building {builder.name}")

__all__ = ["BUILDERS", "SAMPLE_SETS", "RecordBuilder", "RecordSource", "check_record", "default_split",
           "make_builder", "prepare", "read_split", "shared_data_dir"]

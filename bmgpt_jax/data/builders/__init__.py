"""tfds builders for every dataset, by the short name the pipeline's `DataConfig.sources` uses.

    builder = make_builder("chebi20", raw_dir="../shared/data")      # or raw_dir=None: the sample folder
    builder.download_and_prepare()                                  # array_record under data_dir
    records = read_split(builder, "test")                           # Sequence[Record], random access
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..records import Record, cache_dir
from .base import KEEP_MULTI, RecordBuilder, check_record
from .corpus import TextCorpus
from .openbiomed import PubChemQA, UniProtQA
from .samples import (ChEBI20, ChemblDrugQA, MedMCQA, MedQAUSMLE, MolInstructionsBiotext, PubMedQA,
                      SwissProtFunction)

BUILDERS: dict[str, type[RecordBuilder]] = {cls.name: cls for cls in (
    PubChemQA, UniProtQA, TextCorpus, ChEBI20, ChemblDrugQA, SwissProtFunction, PubMedQA, MedMCQA, MedQAUSMLE,
    MolInstructionsBiotext)}
# Sets whose files live in the shared sample folder (their default raw_dir).
SAMPLE_SETS = ("chebi20", "chembl_qa", "swissprot", "pubmedqa", "medmcqa", "medqa", "biotext")


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
    """Random access to one built split as `Record`s (a thin view over `builder.as_data_source`)."""

    def __init__(self, builder: RecordBuilder, split: str):
        self.source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Record:
        return Record.from_example(self.source[int(i)])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def read_split(builder: RecordBuilder, split: str) -> RecordSource:
    """The records of `split`, building the dataset first if `data_dir` does not hold it yet."""
    builder.download_and_prepare()
    return RecordSource(builder, split)


__all__ = ["BUILDERS", "SAMPLE_SETS", "RecordBuilder", "RecordSource", "check_record", "make_builder", "read_split",
           "shared_data_dir"]

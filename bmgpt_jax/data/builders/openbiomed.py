"""PubChemQA and UniProtQA in OpenBioMed's released layout, read from a folder the user downloaded.

    pubchemqa/  train.json valid.json test.json      [{"smiles": [...], "question": ..., "answer": ...}, ...]
    uniprotqa/  train.json valid.json test.json      [{"protein_accession": [...], "question", "answer"}, ...]
                sequences.json                       {accession: amino-acid sequence}

Builder configs decide what happens to records with more than one entity: `keep` (default; multi-entity
prompts) or `single` (skipped and counted as "multiple entities").
"""
from __future__ import annotations

import functools
from typing import Iterator

import tensorflow_datasets as tfds

from ..records import BadRecords, Record
from .base import KEEP_MULTI, SINGLE_ONLY, RecordBuilder, all_str, read_json

# the splits and file names OpenBioMed's MQA / PQA datasets read (`{split}.json` for train, valid, test)
SPLIT_FILES = {"train": ("train.json",), "valid": ("valid.json",), "test": ("test.json",)}


class _OpenBioMedQA(RecordBuilder, skip_registration=True):
    """QA about entities listed under `ENTITY_KEY` in each record of `{split}.json`."""

    ENTITY_KEY = ""
    KIND = ""
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=KEEP_MULTI, description="records with several entities are kept"),
        tfds.core.BuilderConfig(name=SINGLE_ONLY, description="records with several entities are skipped"),
    ]

    def _entity_value(self, ref: str, bad: BadRecords, key: str) -> str | None:
        """The entity string for reference `ref` (a string; None after counting it in `bad`)."""
        return ref

    def _records(self, split: str, bad: BadRecords) -> Iterator[tuple[str, Record]]:
        for path in self.files(split):
            for i, row in enumerate(read_json(path, list, "a JSON list of records")):
                key = f"{path.stem}:{i}"
                refs = row.get(self.ENTITY_KEY) if isinstance(row, dict) else None
                refs = [refs] if isinstance(refs, str) else refs
                if not (isinstance(refs, list) and refs and all_str(*refs, row.get("question"), row.get("answer"))):
                    bad.add("malformed record", f"{key}: {str(row)[:200]}")     # e.g. a null among the SMILES
                    continue
                values = [self._entity_value(r, bad, key) for r in refs]
                if None in values:                                              # counted by _entity_value
                    continue
                yield key, Record(tuple((self.KIND, v) for v in values), row["question"], row["answer"],
                                  id=",".join(map(str, refs)))


class PubChemQA(_OpenBioMedQA, skip_registration=True):
    """PubChemQA (OpenBioMed): questions about molecules given as SMILES, PubChem-description answers."""

    name = "pubchemqa"

    FILES = SPLIT_FILES
    ENTITY_KEY = "smiles"
    KIND = "molecule"


class UniProtQA(_OpenBioMedQA, skip_registration=True):
    """UniProtQA (OpenBioMed): questions about proteins given as UniProt accessions (`sequences.json`)."""

    name = "uniprotqa"

    FILES = SPLIT_FILES
    EXTRA_FILES = ("sequences.json",)
    ENTITY_KEY = "protein_accession"
    KIND = "protein"

    @functools.cached_property
    def sequences(self) -> dict[str, str]:
        """The accession -> sequence map (`sequences.json`), read once per build."""
        return read_json(self.raw_dir / "sequences.json", dict, "a JSON object {accession: sequence}")

    def _entity_value(self, ref: str, bad: BadRecords, key: str) -> str | None:
        seq = self.sequences.get(ref)
        if ref not in self.sequences:
            bad.add("unknown accession", f"{key}: {ref}")
        elif not isinstance(seq, str):                                  # a null or a number in sequences.json
            bad.add("malformed sequence", f"{key}: {ref}: {str(seq)[:100]}")
        return seq if isinstance(seq, str) else None

"""The real sample sets in ../shared/data (see its README), each converted into `Record`s.

Molecules and proteins: ChEBI-20 (as "describe this molecule", the kind of answer PubChemQA has), the
ChEMBL drug QA (drugchat), Swiss-Prot FUNCTION text (as "what is the function of this protein", the kind
UniProtQA has). Text only: PubMedQA, MedMCQA, MedQA-USMLE (multiple choice; `label` holds the gold
letter or yes/no/maybe) and the Mol-Instructions biomolecular text instructions. `raw_dir` is the
shared data folder itself (the files keep their paths below it).
"""
from __future__ import annotations

import csv
import json
import re
from typing import Iterator

import tensorflow_datasets as tfds

from ..records import BadRecords, Record
from .base import RecordBuilder, all_str, decode, raw_lines, read_json, read_jsonl

DESCRIBE_MOLECULE = "Please describe this molecule."
PROTEIN_FUNCTION = "What is the function of this protein?"
LETTERS = "ABCD"


def _tsv_rows(path, columns: int, bad: BadRecords, quoting: int = csv.QUOTE_NONE) -> Iterator[tuple[int, list[str]]]:
    """`(line number, fields)` of a tab-separated file with a header; rows with the wrong width go to `bad`,
    a line that is not UTF-8 is the file's ValueError naming the line and byte. `quoting`: QUOTE_NONE
    reads quote marks as text (MolT5's ChEBI-20 files, read so by MolT5); QUOTE_MINIMAL for a file written
    by a CSV writer (`"a ""b"" c"` is `a "b" c`)."""
    lines = (decode(raw, f"{path}, line {n}", start) for n, start, raw in raw_lines(path))
    reader = csv.reader(lines, delimiter="\t", quoting=quoting)
    next(reader, None)
    for lineno, row in enumerate(reader, 2):
        if len(row) != columns:
            bad.add("malformed row", f"{path.name}:{lineno}: {chr(9).join(row)}")
            continue
        yield lineno, row


def _option_text(option: str) -> str:
    """A MedQA option without surrounding whitespace or the stray closing quote on a line of its own that 43
    options of the MIRAGE test file end with (`'Benzodiazepine intoxication\\n"'`)."""
    return re.sub(r'\n"$', "", option).strip()


def _choice_question(question: str, options: list[str]) -> str:
    return question.strip() + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


class ChEBI20(RecordBuilder, skip_registration=True):
    """ChEBI-20 molecule descriptions (MolT5 split files), as "Please describe this molecule."."""

    name = "chebi20"

    FILES = {"validation": ("molecules/chebi20_validation.txt",), "test": ("molecules/chebi20_test.txt",)}

    def _records(self, split, bad):
        for path in self.files(split):
            for lineno, (cid, smiles, description) in _tsv_rows(path, 3, bad):
                yield f"{path.name}:{lineno}", Record((("molecule", smiles),), DESCRIBE_MOLECULE, description,
                                                      id=cid)


class ChemblDrugQA(RecordBuilder, skip_registration=True):
    """ChEMBL drug QA (drugchat): `{SMILES: [[question, answer], ...]}`; numeric answers as JSON writes them,
    a null answer a malformed record."""

    name = "chembl_qa"

    FILES = {"test": ("molecules/chembl_drug_qa.json",)}

    def _records(self, split, bad):
        for path in self.files(split):
            qa = read_json(path, dict, "a JSON object {SMILES: [[question, answer], ...]}")
            for i, (smiles, pairs) in enumerate(qa.items()):
                for j, pair in enumerate(pairs if isinstance(pairs, list) else [pairs]):   # null: one bad
                    key = f"{i}:{j}"
                    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                            and pair[1] is not None):                  # (a null answer is no answer)
                        bad.add("malformed record", f"{key}: {str(pair)[:200]}")
                        continue
                    q, a = pair
                    answer = a if isinstance(a, str) else json.dumps(a)
                    yield key, Record((("molecule", smiles),), q, answer, id=key)


class SwissProtFunction(RecordBuilder, skip_registration=True):
    """Swiss-Prot FUNCTION comments, as "What is the function of this protein?"."""

    name = "swissprot"
    VERSION = tfds.core.Version("1.0.1")   # 1.0.1: the file's CSV quoting read (a cached 1.0.0 kept P27708's quotes)

    FILES = {"train": ("proteins/swissprot_function_pairs.tsv",)}

    def _records(self, split, bad):
        for path in self.files(split):
            for lineno, (acc, _name, _org, seq, function, _src) in _tsv_rows(path, 6, bad, csv.QUOTE_MINIMAL):
                yield acc, Record((("protein", seq),), PROTEIN_FUNCTION, function, id=acc)


class PubMedQA(RecordBuilder, skip_registration=True):
    """PubMedQA expert set: context + question -> "Yes/No/Maybe. long answer"; `test` = the standard 500.

    The test split is the ground-truth file's PMIDs, the train split the rest of the expert set: a test PMID
    the expert set lacks (files of two releases) is a ValueError, never a short test split beside a train
    split that holds test records; a `final_decision` other than yes/no/maybe is counted as "bad label".
    """

    name = "pubmedqa"

    FILES = {"train": ("qa/pubmedqa_pqal.json",), "test": ("qa/pubmedqa_pqal.json",)}
    EXTRA_FILES = ("qa/pubmedqa_test_ground_truth.json",)

    def _records(self, split, bad):
        truth = self.raw_dir / self.EXTRA_FILES[0]
        test_ids = set(read_json(truth, dict, "a JSON object {PMID: label}"))
        for path in self.files(split):
            items = read_json(path, dict, "a JSON object {PMID: record}")
            missing = sorted(test_ids - set(items))
            if missing:    # files of two releases: the test split would be short and train hold test records
                raise ValueError(f"{truth}: {len(missing)} of its {len(test_ids)} test PMIDs are not in {path} "
                                 f"(e.g. {', '.join(missing[:5])}); the two must come from one PubMedQA release")
            for pmid, item in items.items():
                if (pmid in test_ids) != (split == "test"):
                    continue
                contexts = item.get("CONTEXTS") if isinstance(item, dict) else None
                if not (isinstance(contexts, list) and all_str(*contexts, item.get("QUESTION"),
                                                               item.get("final_decision"), item.get("LONG_ANSWER"))):
                    bad.add("malformed record", f"{pmid}: {str(item)[:200]}")
                    continue
                label = item["final_decision"]
                if label not in ("yes", "no", "maybe"):
                    bad.add("bad label", f"{pmid}: final_decision {label!r}")
                    continue
                question = f"Context: {' '.join(contexts)}\nQuestion: {item['QUESTION']}\nAnswer yes, no or maybe."
                yield pmid, Record((), question, f"{label.capitalize()}. {item['LONG_ANSWER']}", label=label, id=pmid)


class MedMCQA(RecordBuilder, skip_registration=True):
    """MedMCQA dev (4 options, `cop` 1-based) -> "Letter. option"."""

    name = "medmcqa"

    FILES = {"validation": ("qa/medmcqa_dev.jsonl",)}

    def _records(self, split, bad):
        for path in self.files(split):
            for lineno, obj in read_jsonl(path, bad):
                options = [obj.get(k) for k in ("opa", "opb", "opc", "opd")]
                cop = obj.get("cop")
                if not (all_str(obj.get("question"), *options) and type(cop) is int and 1 <= cop <= 4):
                    bad.add("malformed record", f"{path.name}:{lineno}")
                    continue
                letter = LETTERS[cop - 1]
                yield str(lineno), Record((), _choice_question(obj["question"], options),
                                          f"{letter}. {options[cop - 1]}", label=letter, id=str(obj.get("id")))


class MedQAUSMLE(RecordBuilder, skip_registration=True):
    """MedQA (USMLE, 4 options A-D) -> "Letter. option"."""

    name = "medqa"
    VERSION = tfds.core.Version("1.0.1")   # 1.0.1: options without the raw file's stray '\n"' ends

    FILES = {"test": ("qa/medqa_usmle_4opt_test.jsonl",)}

    def _records(self, split, bad):
        for path in self.files(split):
            for lineno, obj in read_jsonl(path, bad):
                options, letter = obj.get("options"), obj.get("answer_idx")
                if (not all_str(obj.get("question"), letter) or not isinstance(options, dict)
                        or sorted(options) != list(LETTERS) or letter not in options or not all_str(*options.values())):
                    bad.add("malformed record", f"{path.name}:{lineno}")
                    continue
                options = {c: _option_text(o) for c, o in options.items()}
                yield str(lineno), Record((), _choice_question(obj["question"], [options[c] for c in LETTERS]),
                                          f"{letter}. {options[letter]}", label=letter, id=str(lineno))


class MolInstructionsBiotext(RecordBuilder, skip_registration=True):
    """Mol-Instructions biomolecular text instructions: instruction (+ input) -> output."""

    name = "biotext"

    FILES = {"train": ("biotext/*.json",)}

    def _records(self, split, bad):
        for path in self.files(split):
            for i, item in enumerate(read_json(path, list, "a JSON list of records")):
                key = f"{path.stem}:{i}"
                extra = item.get("input") if isinstance(item, dict) else None         # optional
                if not (isinstance(item, dict) and all_str(item.get("instruction"), item.get("output"), extra or "")):
                    bad.add("malformed record", f"{key}: {str(item)[:200]}")
                    continue
                yield key, Record((), item["instruction"] + (f"\n{extra}" if extra else ""), item["output"], id=key)

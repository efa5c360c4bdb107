"""Builders on bad input: a bad record is counted and skipped, a bad file is one ValueError naming it, a split
left with no record says why (docs/data.md, "Bad input"). Small hand-made folders, mostly not built through
tfds: `_generate_examples` is the build minus the writing."""
import json
import re

import pytest
import tensorflow_datasets as tfds

from bmgpt_jax.data.builders import make_builder, read_split
from bmgpt_jax.data.builders.base import read_json
from bmgpt_jax.data.records import Record

tfds.disable_progress_bar()
HEADER = "CID\tSMILES\tdescription\n"


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _generate(name, raw, split=None, **kwargs):
    """`(records, bad-record counts)` of `split` (default: the first) as a build generates them (nothing
    written)."""
    b = make_builder(name, raw, raw.parent / "out", **kwargs)
    split = split or next(iter(b.FILES))
    records = [Record.from_example(ex) for _, ex in b._generate_examples(split)]
    return records, dict(b.bad_records[split].counts)


def test_a_split_with_no_good_record_is_an_error_naming_its_files_and_bad_records(tmp_path):
    """tfds cannot write an empty split, so the build leaves it out; reading it then names the split, its
    files and what was skipped, on the first run and from the cache alike (where tfds said "Unknown split")."""
    raw = tmp_path / "raw" / "molecules"
    _write(raw / "chebi20_validation.txt", HEADER + "1\tCCO\n2\tCCN\n")                # both rows too narrow
    _write(raw / "chebi20_test.txt", HEADER + "3\tCCO\tEthanol.\n")
    want = (r"^chebi20: split 'validation' has no record: all 2 of molecules/chebi20_validation\.txt \(in .*raw\) "
            r"were bad \(malformed row: 2\); see bad_records in .*metadata\.json$")
    for _ in ("built", "cached"):
        b = make_builder("chebi20", tmp_path / "raw", tmp_path / "out")
        with pytest.raises(ValueError, match=want):
            read_split(b, "validation")
        assert [r.id for r in read_split(b, "test")] == ["3"]
    _write(tmp_path / "text" / "a.txt", "\n\n\n")                                     # no split at all
    with pytest.raises(ValueError, match=r"^text: split 'train' has no record: \*\.txt, \*\.jsonl \(in .*text\) "
                                         r"held none; see"):
        read_split(make_builder("text", tmp_path / "text", tmp_path / "out"), "train")


def test_a_file_that_is_not_utf8_is_an_error_naming_it_and_the_byte(tmp_path):
    """Python's UnicodeDecodeError names no file: whole-file JSON, a .txt corpus and a TSV are now one line
    naming the file and byte (and the TSV line); a JSON line that is not UTF-8 is a counted bad line."""
    path = _write(tmp_path / "a.json", b'["caf\xe9"]')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not UTF-8 \(byte 5\)$"):
        read_json(path, list, "a list")
    _write(tmp_path / "text" / "a.txt", b"doc one\n\ndoc \xe9two\n")
    with pytest.raises(ValueError, match=r"^/.*/text/a\.txt: not UTF-8 \(byte 13\)$"):
        _generate("text", tmp_path / "text", "train")
    raw = tmp_path / "raw"
    _write(raw / "molecules" / "chebi20_validation.txt", HEADER.encode() + b"1\tCCO\tEthanol.\n2\tCCN\tEth\xe9.\n")
    with pytest.raises(ValueError, match=r"^/.*/chebi20_validation\.txt, line 3: not UTF-8 \(byte 47\)$"):
        _generate("chebi20", raw, "validation")
    good = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}
    line = json.dumps(good).encode() + b"\n"
    _write(raw / "qa" / "medmcqa_dev.jsonl", line + line.replace(b"Q?", b"Q\xe9") + line)
    records, bad = _generate("medmcqa", raw, "validation")
    assert len(records) == 2 and bad == {"malformed JSON line": 1}


def test_a_byte_order_mark_is_dropped(tmp_path):
    """A UTF-8 byte-order mark cost the first JSON line (counted malformed), stayed in the first document
    of a .txt file and made a whole JSON file invalid."""
    bom = b"\xef\xbb\xbf"
    assert read_json(_write(tmp_path / "a.json", bom + b'{"P1": "MKV"}'), dict, "") == {"P1": "MKV"}
    _write(tmp_path / "text" / "a.txt", bom + b"doc one\r\n\r\ndoc two\r\n")      # CRLF as text mode reads it
    _write(tmp_path / "text" / "b.jsonl", bom + b'{"text": "three"}\n')
    records, bad = _generate("text", tmp_path / "text", "train")
    assert [r.answer for r in records] == ["doc one", "doc two", "three"] and bad == {}


def test_openbiomed_entities_of_another_type_are_malformed_records(tmp_path):
    """A null among the SMILES was skipped uncounted; a nested list was a TypeError (unhashable, in the
    entity check's cache); a sequence that is no string a TypeError deep in the protein encoder."""
    rows = [["CCO"], [None], ["CCO", None], [["CCO"]], {"a": "CCO"}, [5]]
    _write(tmp_path / "pc" / "train.json", [{"smiles": r, "question": "Q", "answer": "A"} for r in rows])
    records, bad = _generate("pubchemqa", tmp_path / "pc")
    assert [r.id for r in records] == ["CCO"] and bad == {"malformed record": 5}
    _write(tmp_path / "up" / "sequences.json", {"P1": "MKV", "P2": 5, "P3": None})
    accessions = [["P1"], [["P1"]], ["P2"], ["P3"], ["P9"]]
    _write(tmp_path / "up" / "train.json", [{"protein_accession": a, "question": "Q", "answer": "A"}
                                            for a in accessions])
    records, bad = _generate("uniprotqa", tmp_path / "up")
    assert [r.id for r in records] == ["P1"]
    assert bad == {"malformed record": 1, "malformed sequence": 2, "unknown accession": 1}


ROW = {"protein_accession": ["P1"], "question": "Q", "answer": "A"}


@pytest.mark.parametrize("name, files, want", [
    ("uniprotqa", {"sequences.json": [["P1", "MKV"]], "train.json": [ROW]},
     r"sequences\.json: expected a JSON object \{accession: sequence\}, got a JSON list"),
    ("pubchemqa", {"train.json": {"0": ROW}}, r"train\.json: expected a JSON list of records, got a JSON object"),
    ("chembl_qa", {"molecules/chembl_drug_qa.json": [["CCO", [["Q", "A"]]]]},
     r"chembl_drug_qa\.json: expected a JSON object \{SMILES: \[\[question, answer\], \.\.\.\]\}, got a JSON list"),
    ("pubmedqa", {"qa/pubmedqa_pqal.json": [], "qa/pubmedqa_test_ground_truth.json": {}},
     r"pubmedqa_pqal\.json: expected a JSON object \{PMID: record\}, got a JSON list"),
    ("pubmedqa", {"qa/pubmedqa_pqal.json": {}, "qa/pubmedqa_test_ground_truth.json": ["1"]},
     r"pubmedqa_test_ground_truth\.json: expected a JSON object \{PMID: label\}, got a JSON list"),
    ("biotext", {"biotext/x.json": None}, r"x\.json: expected a JSON list of records, got a JSON null"),
], ids=["sequences", "pubchemqa", "chembl", "pubmedqa", "pubmedqa-truth", "biotext"])
def test_a_json_file_of_another_top_level_type_is_one_error_naming_it(tmp_path, name, files, want):
    """Where an AttributeError (`.items()`, `.get` of a list) or a misread stood."""
    for rel, doc in files.items():
        _write(tmp_path / "raw" / rel, json.dumps(doc))
    with pytest.raises(ValueError, match=f"^/.*/{want}$"):
        _generate(name, tmp_path / "raw")


OK_QA = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}
OK_USMLE = {"question": "Q?", "options": {c: c.lower() for c in "ABCD"}, "answer_idx": "B"}
OK_PQAL = {"CONTEXTS": ["c"], "QUESTION": "Q?", "final_decision": "yes", "LONG_ANSWER": "L."}
OK_BIO = {"instruction": "i", "input": "", "output": "o"}
WRONG_TYPES = {      # name: (files, malformed records among them; each holds one good record)
    "biotext": ({"biotext/x.json": [OK_BIO, {**OK_BIO, "output": None}, {**OK_BIO, "output": 5},
                                    {**OK_BIO, "input": 5}, ["i", "o"]]}, 4),
    "chembl_qa": ({"molecules/chembl_drug_qa.json": {"CCO": [["Q?", 1.5], ["Q?", None]], "CCN": None,
                                                     "CCC": {"Q?": "A"}}}, 3),
    "medmcqa": ({"qa/medmcqa_dev.jsonl": "\n".join(json.dumps(r) for r in (
        OK_QA, {**OK_QA, "opa": None}, {**OK_QA, "opb": 5}, {**OK_QA, "cop": 1.0}, {**OK_QA, "question": 7}))}, 4),
    "medqa": ({"qa/medqa_usmle_4opt_test.jsonl": "\n".join(json.dumps(r) for r in (
        OK_USMLE, {**OK_USMLE, "answer_idx": ["B"]}, {**OK_USMLE, "options": {**OK_USMLE["options"], "C": 3}}))}, 2),
    "pubmedqa": ({"qa/pubmedqa_test_ground_truth.json": {}, "qa/pubmedqa_pqal.json": {
        "1": OK_PQAL, "2": {**OK_PQAL, "CONTEXTS": None}, "3": {**OK_PQAL, "CONTEXTS": [["c"]]},
        "4": {**OK_PQAL, "QUESTION": None}, "5": {**OK_PQAL, "LONG_ANSWER": 7}, "6": ["c", "Q?"]}}, 5),
}


@pytest.mark.parametrize("name", WRONG_TYPES)
def test_record_fields_of_another_json_type_are_malformed_records(tmp_path, name):
    """Where `.strip()` of a null answer, iterating a null, a list as a dict key or a float as an index was
    a traceback, or a null read as the text "None"."""
    files, malformed = WRONG_TYPES[name]
    for rel, doc in files.items():
        _write(tmp_path / "raw" / rel, doc)
    records, bad = _generate(name, tmp_path / "raw")
    assert len(records) == 1 and bad == {"malformed record": malformed}


def test_pubmedqa_refuses_test_ids_the_expert_set_lacks_and_counts_bad_labels(tmp_path):
    """Ground truth from another release silently shortened the test split and left test records in train;
    a final_decision outside yes/no/maybe was kept (its answer "Perhaps. ...")."""
    qa = tmp_path / "raw" / "qa"
    _write(qa / "pubmedqa_pqal.json", {"1": OK_PQAL, "2": OK_PQAL, "3": {**OK_PQAL, "final_decision": "perhaps"}})
    _write(qa / "pubmedqa_test_ground_truth.json", {"2": "yes"})
    records, bad = _generate("pubmedqa", tmp_path / "raw", "train")
    assert [r.id for r in records] == ["1"] and bad == {"bad label": 1}
    _write(qa / "pubmedqa_test_ground_truth.json", {"2": "yes", "9": "no", "8": "maybe"})
    for split in ("train", "test"):
        with pytest.raises(ValueError, match=r"^/.*/pubmedqa_test_ground_truth\.json: 2 of its 3 test PMIDs are not "
                                             r"in /.*/pubmedqa_pqal\.json \(e\.g\. 8, 9\); the two must come from one "
                                             r"PubMedQA release$"):
            _generate("pubmedqa", tmp_path / "raw", split)

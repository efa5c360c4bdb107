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


def _generate(name, raw, split, **kwargs):
    """`(records, bad-record counts)` of `split` as a build generates them (nothing written)."""
    b = make_builder(name, raw, raw.parent / "out", **kwargs)
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
        read_json(path)
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
    assert read_json(_write(tmp_path / "a.json", bom + b'{"P1": "MKV"}')) == {"P1": "MKV"}
    _write(tmp_path / "text" / "a.txt", bom + b"doc one\r\n\r\ndoc two\r\n")      # CRLF as text mode reads it
    _write(tmp_path / "text" / "b.jsonl", bom + b'{"text": "three"}\n')
    records, bad = _generate("text", tmp_path / "text", "train")
    assert [r.answer for r in records] == ["doc one", "doc two", "three"] and bad == {}

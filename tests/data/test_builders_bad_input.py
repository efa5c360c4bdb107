"""Builders on bad input: a bad record is counted and skipped, a bad file is one ValueError naming it, a split
left with no record says why (docs/data.md, "Bad input"). Small hand-made folders, mostly not built through
tfds: `_generate_examples` is the build minus the writing."""
import json

import pytest
import tensorflow_datasets as tfds

from bmgpt_jax.data.builders import make_builder, read_split

tfds.disable_progress_bar()
HEADER = "CID\tSMILES\tdescription\n"


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


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
                                         r"hold none; see"):
        read_split(make_builder("text", tmp_path / "text", tmp_path / "out"), "train")

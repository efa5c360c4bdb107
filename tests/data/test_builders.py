"""tfds builders: the real sample files and small OpenBioMed-layout fixtures, built and read back."""
import csv
import json

import pytest
import tensorflow_datasets as tfds

from bmgpt_jax.data.builders import SAMPLE_SETS, RecordSource, check_record, make_builder, read_split
from bmgpt_jax.data.records import BadRecords, Record

tfds.disable_progress_bar()


@pytest.fixture(scope="session")
def built(shared_data, tmp_path_factory):
    """Every sample set built once from ../shared/data into a temporary tfds data_dir."""
    data_dir = tmp_path_factory.mktemp("tfds")
    out = {}
    for name in SAMPLE_SETS:
        b = make_builder(name, raw_dir=shared_data, data_dir=data_dir)
        b.download_and_prepare()
        out[name] = b
    return out


def _converted(builder, split):
    """What the builder's conversion yields for `split`, minus what the checks reject."""
    return [r for _, r in builder._records(split, BadRecords()) if check_record(r) is None]


@pytest.mark.parametrize("name", SAMPLE_SETS)
def test_sample_sets_round_trip(built, name):
    b = built[name]
    for split in b.FILES:
        got = list(RecordSource(b, split))
        assert got == _converted(b, split), f"{name}:{split}"
        assert len(got) == b.info.splits[split].num_examples > 0
        assert b.info.metadata["bad_records"][split] == {}          # the shared files are clean


def test_chebi20_is_describe_this_molecule(built, shared_data):
    with open(shared_data / "molecules" / "chebi20_test.txt", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    got = list(RecordSource(built["chebi20"], "test"))
    assert len(got) == len(rows) == 3300
    for rec, (cid, smiles, desc) in zip(got, rows):
        assert rec == Record((("molecule", smiles),), "Please describe this molecule.", desc, id=cid)


def test_chembl_and_swissprot_against_raw(built, shared_data):
    raw = json.loads((shared_data / "molecules" / "chembl_drug_qa.json").read_text())
    want = [(smi, q, a if isinstance(a, str) else json.dumps(a)) for smi, qa in raw.items() for q, a in qa]
    got = list(RecordSource(built["chembl_qa"], "test"))
    assert [(r.entities[0][1], r.question, r.answer) for r in got] == want and len(got) == 12976
    prot = list(RecordSource(built["swissprot"], "train"))
    assert len(prot) == 141 and prot[0].id == "P15455" and prot[0].answer == "Seed storage protein."
    assert prot[0].entities[0][0] == "protein" and prot[0].question == "What is the function of this protein?"
    with open(shared_data / "proteins" / "swissprot_function_pairs.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]       # the file is CSV-quoted (P27708's ""fusion"")
    assert [(r.id, r.entities[0][1], r.answer) for r in prot] == [(a, seq, fn) for a, _, _, seq, fn, _ in rows]
    assert 'This protein is a "fusion" protein' in {r.id: r.answer for r in prot}["P27708"]


def test_text_qa_sets(built, shared_data):
    truth = json.loads((shared_data / "qa" / "pubmedqa_test_ground_truth.json").read_text())
    test = list(RecordSource(built["pubmedqa"], "test"))
    assert {r.id: r.label for r in test} == truth
    assert all(r.answer.lower().startswith(r.label) and "Question: " in r.question for r in test)
    assert len(RecordSource(built["pubmedqa"], "train")) == 500
    mc = list(RecordSource(built["medmcqa"], "validation"))
    assert len(mc) == 4183 and mc[0].label == "A" and mc[0].answer.startswith("A. Impulse through myelinated")
    assert mc[0].question.splitlines()[1:] == [f"{c}. {o}" for c, o in zip("ABCD", [
        "Impulse through myelinated fibers is slower than non-myelinated fibers",
        "Membrane currents are generated at nodes of Ranvier", "Saltatory conduction of impulses is seen",
        "Local anesthesia is effective only when the nerve is not covered by myelin sheath"])]
    usmle = list(RecordSource(built["medqa"], "test"))
    assert len(usmle) == 1273 and usmle[0].label == "B"
    assert usmle[0].answer == "B. Tell the attending that he cannot fail to disclose this mistake"
    # 43 raw options end in a stray '\n"' line: gone, so the gold answer is the option the question lists
    assert all(r.answer in r.question.splitlines() and not r.question.endswith('"') for r in usmle[:200])
    assert usmle[19].answer == "D. Benzodiazepine intoxication" and usmle[19].label == "D"
    bio = list(RecordSource(built["biotext"], "train"))
    assert len(bio) == 1000 + 1000 + 500 + 767 and all(not r.entities for r in bio)


def _write(folder, name, obj):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))


@pytest.fixture()
def openbiomed(tmp_path):
    """PubChemQA and UniProtQA folders in the released layout, with one bad record of each kind."""
    pc = tmp_path / "pubchemqa"
    _write(pc, "train.json", [
        {"smiles": ["CCO"], "question": "Q1", "answer": "A1"},
        {"smiles": ["C1CC"], "question": "Q2", "answer": "A2"},                   # invalid SMILES
        {"smiles": ["CCO"], "question": "Q3", "answer": "  "},                    # empty answer
        {"smiles": ["CCO", "c1ccccc1"], "question": "Q4", "answer": "A4"},       # two molecules
        {"question": "Q5", "answer": "A5"},                                       # no entity
        {"smiles": "CCN", "question": "Q6", "answer": "A6"}])
    _write(pc, "valid.json", [{"smiles": ["O=C=O"], "question": "Qv", "answer": "Av"}])
    _write(pc, "test.json", [])
    up = tmp_path / "uniprotqa"
    _write(up, "sequences.json", {"P1": "MKTAYIAK", "P2": "MKJAY"})
    _write(up, "train.json", [
        {"protein_accession": ["P1"], "question": "F?", "answer": "Kinase."},
        {"protein_accession": ["P9"], "question": "F?", "answer": "x"},           # unknown accession
        {"protein_accession": ["P2"], "question": "F?", "answer": "x"},           # J is no residue
        {"protein_accession": ["P1", "P1"], "question": "Same?", "answer": "Yes."}])
    for split in ("valid", "test"):
        _write(up, f"{split}.json", [])
    return tmp_path


def test_pubchemqa_layout_keep_and_single(openbiomed, tmp_path):
    keep = make_builder("pubchemqa", openbiomed / "pubchemqa", tmp_path / "out", multi_entity="keep")
    got = list(read_split(keep, "train"))
    assert got == [Record((("molecule", "CCO"),), "Q1", "A1", id="CCO"),
                   Record((("molecule", "CCO"), ("molecule", "c1ccccc1")), "Q4", "A4", id="CCO,c1ccccc1"),
                   Record((("molecule", "CCN"),), "Q6", "A6", id="CCN")]
    assert [r.question for r in RecordSource(keep, "valid")] == ["Qv"]
    assert sorted(keep.info.splits) == ["train", "valid"]                 # test.json is empty: no split
    bad = keep.info.metadata["bad_records"]["train"]
    assert {k: v["count"] for k, v in bad.items()} == {"invalid SMILES": 1, "empty answer": 1, "malformed record": 1}
    assert "C1CC" in bad["invalid SMILES"]["examples"][0]
    saved = json.loads((keep.data_path / "metadata.json").read_text())
    assert saved["bad_records"]["train"] == bad
    single = make_builder("pubchemqa", openbiomed / "pubchemqa", tmp_path / "out", multi_entity="single")
    assert [r.question for r in read_split(single, "train")] == ["Q1", "Q6"]
    assert single.bad_records["train"].counts["multiple entities"] == 1
    again = make_builder("pubchemqa", None, tmp_path / "out")            # reads the build, needs no raw files
    assert list(read_split(again, "train")) == got


def test_uniprotqa_layout(openbiomed, tmp_path):
    b = make_builder("uniprotqa", openbiomed / "uniprotqa", tmp_path / "out")
    got = list(read_split(b, "train"))
    assert [(r.entities, r.answer) for r in got] == [((("protein", "MKTAYIAK"),), "Kinase."),
                                                     ((("protein", "MKTAYIAK"),) * 2, "Yes.")]
    assert dict(b.bad_records["train"].counts) == {"unknown accession": 1, "bad residues": 1}
    assert "P9" in b.bad_records["train"].examples["unknown accession"][0]


def test_missing_inputs_name_the_expected_files(openbiomed, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.json.*valid\.json"):
        make_builder("pubchemqa", tmp_path / "nowhere", tmp_path / "out").download_and_prepare()
    (openbiomed / "uniprotqa" / "sequences.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks sequences\.json"):
        make_builder("uniprotqa", openbiomed / "uniprotqa", tmp_path / "out").download_and_prepare()
    with pytest.raises(FileNotFoundError, match=r"\*\.txt or \*\.jsonl"):
        make_builder("text", tmp_path / "nowhere", tmp_path / "out").download_and_prepare()


def test_malformed_json_lines_are_counted_not_fatal(tmp_path):
    good = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2, "id": "x"}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "cop": 7}), json.dumps({**good, "id": "y"})]
    _write(tmp_path / "raw" / "qa", "medmcqa_dev.jsonl", "\n".join(lines) + "\n")
    b = make_builder("medmcqa", tmp_path / "raw", tmp_path / "out")
    got = list(read_split(b, "validation"))
    assert [(r.id, r.label, r.answer) for r in got] == [("x", "B", "B. b"), ("y", "B", "B. b")]
    assert dict(b.bad_records["validation"].counts) == {"malformed JSON line": 1, "malformed record": 1}


def test_text_corpus(tmp_path, capfd):
    _write(tmp_path / "raw", "a.txt", "First document,\nstill first.\n\n\nSecond document.\n")
    _write(tmp_path / "raw", "b.jsonl", json.dumps({"text": "Third."}) + "\n[1]\n")
    long_doc = " ".join(f"w{i:04d}" for i in range(1000))                       # 5,999 characters
    _write(tmp_path / "raw", "c.txt", long_doc)
    b = make_builder("text", tmp_path / "raw", tmp_path / "out")
    capfd.readouterr()
    got = list(read_split(b, "train"))
    assert capfd.readouterr().out == ""      # tfds's "Downloading and preparing" kept off stdout (results go there)
    answers = [r.answer for r in got]                                         # *.txt files, then *.jsonl
    assert answers[:2] + answers[4:] == ["First document,\nstill first.", "Second document.", "Third."]
    assert [len(a) for a in answers[2:4]] == [3995, 2003] and " ".join(answers[2:4]) == long_doc
    assert all(r.is_plain_text for r in got) and b.bad_records["train"].counts["malformed JSON line"] == 1


def test_a_build_that_another_job_finished_first_reads_that_build(tmp_path, monkeypatch):
    """Two jobs building one cache folder at once: tfds renames each build into place at the end, so the
    later one fails (FileExistsError, what tfds does on its own, checked first); `read_split` then reads
    the build that won. Raced deterministically: the other job's whole build runs inside ours."""
    raw = tmp_path / "raw"
    _write(raw, "a.txt", "One document.\n\nAnother one.\n")
    mine, other = (make_builder("text", raw, tmp_path / "out") for _ in range(2))
    real = type(mine)._split_generators

    def split_generators(self, dl_manager):
        if self is mine:
            other.download_and_prepare()          # the other job finishes while ours is generating
        return real(self, dl_manager)
    monkeypatch.setattr(type(mine), "_split_generators", split_generators)
    with pytest.raises(FileExistsError):
        mine.download_and_prepare()
    mine, other = (make_builder("text", raw, tmp_path / "again") for _ in range(2))
    assert [r.answer for r in read_split(mine, "train")] == ["One document.", "Another one."]


def test_a_cached_build_of_other_raw_files_is_refused(tmp_path):
    """The cache is keyed by name/config/version only: raw files changed since the build (a newer release,
    another folder given as raw_dir) stop `read_split` in one line instead of serving the stale build."""
    raw = tmp_path / "raw"
    _write(raw, "a.txt", "One document.\n\nAnother one.\n")
    assert [r.answer for r in read_split(make_builder("text", raw, tmp_path / "out"), "train")] == \
        ["One document.", "Another one."]
    again = make_builder("text", raw, tmp_path / "out")                        # same files: the build is read
    assert len(list(read_split(again, "train"))) == 2
    _write(tmp_path / "copy", "a.txt", "One document.\n\nAnother one.\n")    # same content elsewhere: fine
    assert len(list(read_split(make_builder("text", tmp_path / "copy", tmp_path / "out"), "train"))) == 2
    _write(raw, "a.txt", "One document, revised.\n")
    changed = make_builder("text", raw, tmp_path / "out")
    with pytest.raises(ValueError, match=r"^text: the dataset in .*out/text/1\.0\.0 was built from other raw files "
                                         r"than .*raw holds now \(1 differ: a\.txt\); delete .* to rebuild it"):
        read_split(changed, "train")
    assert len(list(read_split(make_builder("text", None, tmp_path / "out"), "train"))) == 2   # no raw_dir: the cache
    long = "x" * (3 * (1 << 16)) + "\n"                                        # a change past the first 64 KiB
    _write(tmp_path / "big", "a.txt", long)
    read_split(make_builder("text", tmp_path / "big", tmp_path / "big_out"), "train")
    _write(tmp_path / "big", "a.txt", long[:-2] + "y\n")
    with pytest.raises(ValueError, match="1 differ: a.txt"):
        read_split(make_builder("text", tmp_path / "big", tmp_path / "big_out"), "train")


def test_a_raw_folder_lacking_the_built_files_names_them_and_keeps_the_build(tmp_path):
    """An existing folder without the files a cached build was made from (an empty one, the wrong one) was
    "built from other raw files (2 differ: ...); delete <the build>": the files are missing, not different,
    and the build is good. Files that do differ still get the advice to delete the build."""
    raw = tmp_path / "raw"
    _write(raw, "a.txt", "One document.\n")
    _write(raw, "b.txt", "Another one.\n")
    assert len(list(read_split(make_builder("text", raw, tmp_path / "out"), "train"))) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        read_split(make_builder("text", tmp_path / "empty", tmp_path / "out"), "train")
    message = str(e.value)
    assert message.startswith(f"text: {tmp_path / 'empty'} lacks 2 of the 2 raw files the dataset in "
                              f"{tmp_path / 'out' / 'text' / '1.0.0'} was built from (a.txt, b.txt); give the folder "
                              "that holds them"), message
    assert "delete" not in message and "differ" not in message
    _write(tmp_path / "half", "a.txt", "One document, revised.\n")        # one missing, one changed
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of the 2 raw files .*\(b\.txt\), and 1 of its files "
                                                r"differ \(a\.txt\); give the folder"):
        read_split(make_builder("text", tmp_path / "half", tmp_path / "out"), "train")
    assert len(list(read_split(make_builder("text", raw, tmp_path / "out"), "train"))) == 2    # the build is kept
    _write(raw, "c.txt", "A third.\n")                                    # a file more: they differ
    with pytest.raises(ValueError, match=r"\(1 differ: c\.txt\); delete "):
        read_split(make_builder("text", raw, tmp_path / "out"), "train")

"""Builders at real size (nw2): a split past tfds's in-memory limit builds without tensorflow, in several
shards, and a `.txt` corpus is read a document at a time. The sizes are shrunk: tfds's limit and the shard
size are lowered so that a few-MB corpus crosses both."""
import itertools
import logging
import random
import tracemalloc
import types

import tensorflow_datasets as tfds
from array_record.python.array_record_data_source import ArrayRecordDataSource
from tensorflow_datasets.core import shuffle

from bmgpt_jax.data.builders import base, make_builder, read_split
from bmgpt_jax.data.builders.base import read_text
from bmgpt_jax.data.builders.corpus import TextCorpus, chunks
from bmgpt_jax.data.records import BadRecords

tfds.disable_progress_bar()
WORDS = "the protein binds a molecule in the cell membrane and".split()


def _corpus(path, docs, words=400, seed=0):
    """`docs` documents of `words` random words, separated by blank lines (nw2's repro corpus)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(" ".join(rng.choices(WORDS, k=words)) for _ in range(docs)), encoding="utf-8")
    return path


def test_a_split_past_tfds_memory_limit_builds_in_order_in_several_shards(tmp_path, monkeypatch, caplog):
    """tfds's writer held a split in memory up to `MAX_MEM_BUFFER_SIZE` (1 GiB) and past it spilled to files
    through tensorflow, which is not installed: a GB-size corpus died with ModuleNotFoundError. With that
    limit at 1 MiB and shards of 512 KiB, a 3 MB corpus builds into several shards named and counted as tfds
    names them, and reads back as a build under neither limit does, in generation order."""
    raw = _corpus(tmp_path / "raw" / "c.txt", 1500).parent
    whole = list(read_split(make_builder("text", raw, tmp_path / "whole"), "train"))
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1 << 20)
    monkeypatch.setattr(base, "SHARD_BYTES", 1 << 19)
    clock = itertools.count()                            # a second passes at every reading of the clock
    monkeypatch.setattr(base, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    monkeypatch.setattr(base, "PROGRESS_SECONDS", 100.0)
    b = make_builder("text", raw, tmp_path / "sharded")
    with caplog.at_level(logging.INFO, logger=base.__name__):
        got = list(read_split(b, "train"))
    progress = [r.getMessage() for r in caplog.records if "examples written so far" in r.getMessage()]
    assert 1500 // 102 <= len(progress) <= 1500 // 100, len(progress)   # one line per 100 s of the build
    assert [p.split(" (")[0] for p in progress[:2]] == [f"text/1.0.0 train: {n} examples written so far"
                                                       for n in (99, 199)], progress[:2]
    assert got == whole == [r for _, r in b._records("train", BadRecords())] and len(got) == 1500
    lengths = b.info.splits["train"].shard_lengths
    shards = sorted((tmp_path / "sharded" / "text" / "1.0.0").glob("text-train.array_record-*"))
    assert [p.name for p in shards] == [f"text-train.array_record-{i:05d}-of-{len(lengths):05d}"
                                        for i in range(len(lengths))] and len(lengths) > 2
    assert [len(ArrayRecordDataSource([str(p)])) for p in shards] == lengths
    assert b.info.splits["train"].num_bytes == make_builder("text", raw, tmp_path / "whole").info.splits[
        "train"].num_bytes


def test_a_txt_corpus_is_streamed_to_the_same_records(tmp_path):
    """Documents and pieces are the ones the whole-file read gave (`read_text(...).split("\\n\\n")`): a
    byte-order mark, CRLF and lone CR endings, a blank line of spaces (no boundary), two and three blank
    lines (the third an empty document), a document cut in pieces, no final newline; documents with no
    text (0, 4, 6) are counted in the keys as before."""
    long = " ".join(random.Random(1).choices(WORDS, k=3000))
    text = ("\n\nfirst doc\r\nsecond line\r\n\r\n\r\nthird\rdoc\r\r" + long + "\n \nsame doc\n\n\n\n\n"
            + "x" * 9000 + "\n\n\t\n\nlast é doc\n\ntail")
    path = tmp_path / "raw" / "a.txt"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    want = [(f"a.txt:{i}:{j}", piece) for i, doc in enumerate(read_text(path).split("\n\n"))
            for j, piece in enumerate(chunks(doc))]
    got = [(key, r.answer) for key, r in TextCorpus(raw_dir=path.parent, data_dir=str(tmp_path))._records(
        "train", BadRecords())]
    assert got == want and sorted({key.split(":")[1] for key, _ in got}) == ["1", "2", "3", "5", "7", "8"]


def test_a_txt_corpus_is_read_in_memory_of_a_document(tmp_path):
    """The whole file was read, decoded and split at once, about 3x its size in memory (nw2 finding 3); a
    20 MB corpus of 4 KB documents now peaks far below its size."""
    path = _corpus(tmp_path / "raw" / "c.txt", 6000, words=700)
    size = path.stat().st_size
    builder = TextCorpus(raw_dir=path.parent, data_dir=str(tmp_path))
    tracemalloc.start()
    try:
        n = sum(1 for _ in builder._records("train", BadRecords()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size > 20e6 and n >= 6000 and peak < size / 20, (size, peak)

"""Builders at real size (nw2): a split past tfds's in-memory limit builds without tensorflow, in several
shards. The sizes are shrunk: tfds's limit and the shard size are lowered so that a few-MB corpus crosses
both."""
import random

import tensorflow_datasets as tfds
from array_record.python.array_record_data_source import ArrayRecordDataSource
from tensorflow_datasets.core import shuffle

from bmgpt_jax.data.builders import base, make_builder, read_split
from bmgpt_jax.data.records import BadRecords

tfds.disable_progress_bar()
WORDS = "the protein binds a molecule in the cell membrane and".split()


def _corpus(path, docs, words=400, seed=0):
    """`docs` documents of `words` random words, separated by blank lines (nw2's repro corpus)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(" ".join(rng.choices(WORDS, k=words)) for _ in range(docs)), encoding="utf-8")
    return path


def test_a_split_past_tfds_memory_limit_builds_in_order_in_several_shards(tmp_path, monkeypatch):
    """tfds's writer held a split in memory up to `MAX_MEM_BUFFER_SIZE` (1 GiB) and past it spilled to files
    through tensorflow, which is not installed: a GB-size corpus died with ModuleNotFoundError. With that
    limit at 1 MiB and shards of 512 KiB, a 3 MB corpus builds into several shards named and counted as tfds
    names them, and reads back as a build under neither limit does, in generation order."""
    raw = _corpus(tmp_path / "raw" / "c.txt", 1500).parent
    whole = list(read_split(make_builder("text", raw, tmp_path / "whole"), "train"))
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1 << 20)
    monkeypatch.setattr(base, "SHARD_BYTES", 1 << 19)
    b = make_builder("text", raw, tmp_path / "sharded")
    got = list(read_split(b, "train"))
    assert got == whole == [r for _, r in b._records("train", BadRecords())] and len(got) == 1500
    lengths = b.info.splits["train"].shard_lengths
    shards = sorted((tmp_path / "sharded" / "text" / "1.0.0").glob("text-train.array_record-*"))
    assert [p.name for p in shards] == [f"text-train.array_record-{i:05d}-of-{len(lengths):05d}"
                                        for i in range(len(lengths))] and len(lengths) > 2
    assert [len(ArrayRecordDataSource([str(p)])) for p in shards] == lengths
    assert b.info.splits["train"].num_bytes == make_builder("text", raw, tmp_path / "whole").info.splits[
        "train"].num_bytes

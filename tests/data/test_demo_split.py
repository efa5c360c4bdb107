"""The demo set's held-out split: `demo:test` shares no molecule with `demo:train` (= `demo`, what training
reads, `auto` included), the demo tokenizer never reads it, and an unknown split is an error naming the
valid ones."""
import pytest
from rdkit import Chem

from bmgpt_jax.data import demo
from bmgpt_jax.data.pipeline import DataConfig, Records, _source_records


def canonical(records):
    return {Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in {r.entities[0][1] for r in records}}


def test_test_split_is_held_out(monkeypatch, tmp_path):
    train, test = demo.demo_records(), demo.demo_records(split="test")
    assert len(test) > 400 * len(demo.QUESTIONS) and len(train) > 4000 * len(demo.QUESTIONS)
    assert not canonical(train) & canonical(test)
    assert not set(demo.demo_texts()) & ({r.answer for r in test} - {r.answer for r in train})
    cfg = DataConfig(sources=("demo",), demo_molecules=30)
    assert list(Records(cfg)) == list(Records(DataConfig(sources=("demo:train",), demo_molecules=30)))
    assert list(Records(DataConfig(sources=("demo:test",), demo_molecules=30))) == list(demo.demo_records(30, "test"))
    monkeypatch.setenv("BMGPT_SHARED_DATA", str(tmp_path / "absent"))          # `auto`: demo only here
    assert _source_records("auto", DataConfig())[0] is train                  # the default training data


def test_unknown_splits_are_errors():
    with pytest.raises(KeyError, match="demo has no split 'bogus'; splits: train, test"):
        Records(DataConfig(sources=("demo:bogus",)))
    with pytest.raises(KeyError, match="pubmedqa has no split 'dev'; splits: train, test"):
        Records(DataConfig(sources=("pubmedqa:dev",)))

"""Evaluation: BLEU / ROUGE / exact match against hand-computed cases, option extraction, scoring of
labelled and free-text records, skipped records, and the CLI end to end on a tiny random checkpoint."""
import dataclasses
import json
import math

import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import chat
from bmgpt_jax import config as config_lib
from bmgpt_jax import evaluate as ev
from bmgpt_jax.data.records import Record
from bmgpt_jax.convert.folder import save_pretrained
from bmgpt_jax.data.text import attach_tokenizer, load_tokenizer
from bmgpt_jax.models.biomedgpt import BioMedGPT, BioMedGPTConfig
from bmgpt_jax.models.esm import EsmConfig
from bmgpt_jax.models.gin import GinConfig
from bmgpt_jax.models.llama import LlamaConfig

REF, HYP = "The cat sat on the mat.", "the cat sat on a mat."


def test_identical_texts_score_one():
    texts = ["The molecule is a steroid ester.", "It binds DNA, and (maybe) RNA."]
    m = ev.overlap_metrics(texts, texts)
    assert all(m[k] == pytest.approx(1.0) for k in ev.OVERLAP_KEYS)
    assert ev.overlap_metrics(["abc def"], ["xyz"]) == {k: 0.0 for k in ev.OVERLAP_KEYS}


def test_bleu_by_hand():
    # tokens: the cat sat on the mat . | the cat sat on a mat .  (7 each: brevity penalty 1)
    # 1-grams 6/7, 2-grams (the cat, cat sat, sat on, mat .) 4/6, 3-grams 2/5, 4-grams 1/4
    assert ev.corpus_bleu([REF], [HYP], 2) == pytest.approx(math.sqrt(6 / 7 * 4 / 6))
    assert ev.corpus_bleu([REF], [HYP], 4) == pytest.approx((6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    # corpus, not sentence average: 1-grams (2 + 1) / 4, 2-grams (1 + 0) / 2
    assert ev.corpus_bleu(["a b", "c d"], ["a b", "c e"], 2) == pytest.approx(math.sqrt(3 / 4 * 1 / 2))
    # brevity penalty: precisions 1, hypothesis 3 tokens vs reference 6 -> exp(1 - 6/3)
    assert ev.corpus_bleu(["the cat sat on the mat"], ["the cat sat"], 2) == pytest.approx(math.exp(-1))
    assert ev.corpus_bleu(["a b"], ["a b c d"], 2) == pytest.approx(math.sqrt(2 / 4 * 1 / 3))  # longer: no penalty
    assert ev.corpus_bleu(["a b c d"], ["a b d c"], 4) == 0.0  # no 4-gram match, no smoothing


def test_rouge_and_exact_match_by_hand():
    # rouge tokens drop punctuation: the cat sat on the mat | the cat sat on a mat
    assert ev.rouge_n(REF, HYP, 1) == pytest.approx(5 / 6)          # the, cat, sat, on, mat
    assert ev.rouge_n(REF, HYP, 2) == pytest.approx(3 / 5)          # the cat, cat sat, sat on
    assert ev.rouge_l(REF, HYP) == pytest.approx(5 / 6)             # LCS: the cat sat on mat
    assert ev.rouge_l("a b c d", "b a d c") == pytest.approx(0.5) and ev.rouge_n("a b c d", "b a d c", 1) == 1.0
    # precision 2/2, recall 2/4 -> F1 2/3
    assert ev.rouge_l("w x y z", "w z") == pytest.approx(2 / 3)
    assert ev.rouge_n("w x y z", "w z", 1) == pytest.approx(2 / 3)
    assert ev.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    m = ev.overlap_metrics(["Aspirin.", "Caffeine"], ["aspirin", "Theine"])
    assert m["exact_match"] == 0.5


@pytest.mark.parametrize("text, options, expected", [
    ("B. Aspirin", None, "B"), ("(C)", None, "C"), ("D", None, "D"), ("E: last", None, "E"),
    ("The answer is A.", None, "A"), ("Answer: (B) because", None, "B"), ("I choose option C", None, "C"),
    ("A patient with fever", None, None), ("I do not know", None, None),
    ("aspirin and ibuprofen daily", {"A": "Aspirin", "B": "Aspirin and ibuprofen"}, "B"),
    ("Aspirin.", {"A": "Aspirin", "B": "Aspirin and ibuprofen"}, "A"),
    ("Aspirinate", {"A": "Aspirin", "B": "Aspirin and ibuprofen"}, None),
])
def test_letter_extraction(text, options, expected):
    assert ev.extract_choice(text, options=options) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes. The study shows ...", "yes"), ("no", "no"), ("MAYBE, the data are unclear", "maybe"),
    ("The answer is no.", "no"), ("Answer: yes", "yes"), ("Not clear", None), ("Nothing was found", None),
])
def test_yes_no_extraction(text, expected):
    assert ev.extract_choice(text, yes_no=True) == expected


def test_score_labelled_and_text_records():
    mc_q = "Which drug?\nA. Aspirin\nB. Caffeine\nC. Ethanol\nD. Water"
    records = [Record((), mc_q, "B. Caffeine", label="B"), Record((), mc_q, "A. Aspirin", label="A"),
               Record((), mc_q, "C. Ethanol", label="C"), Record((), "Q?", "Yes. It works.", label="yes"),
               Record((), "Describe.", "It is a molecule."), Record((), "Describe.", "Unused.")]
    assert [ev.has_long_answer(r) for r in records[:4]] == [False, False, False, True]
    rows = [{"prediction": "B. Caffeine"}, {"prediction": "Caffeine"}, {"prediction": "dunno"},
            {"prediction": "Yes. It works."}, {"prediction": "It is a molecule."}, {"error": "SMILES 'C1CC'"}]
    m = ev.score(records, rows)
    assert m["n"] == 5 and m["skipped"] == 1
    assert m["accuracy"] == pytest.approx(2 / 4) and m["extraction_failures"] == 1
    assert [r.get("choice") for r in rows[:4]] == ["B", "B", None, "yes"]
    assert rows[0]["correct"] and not rows[1]["correct"] and rows[3]["correct"]
    assert m["bleu4"] == pytest.approx(1.0) and m["rougeL"] == pytest.approx(1.0)  # the two texts only
    table = ev.format_table({"x:test": m, "y": {"n": 0, "skipped": 2}}).splitlines()
    assert table[0].split()[:4] == ["source", "n", "skipped", "accuracy"] and table[2].split()[3] == "-"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny BioMedGPT with the demo tokenizer, saved as a checkpoint folder."""
    tok = load_tokenizer(None)
    lm = dataclasses.replace(config_lib.load(LlamaConfig, "llama_tiny"), vocab_size=tok.vocab_size,
                             pad_token_id=tok.pad_id)
    cfg = BioMedGPTConfig(lm=lm, gin=config_lib.load(GinConfig, "gin_tiny"),
                          esm=config_lib.load(EsmConfig, "esm2_tiny"))
    model = attach_tokenizer(BioMedGPT(cfg, rngs=nnx.Rngs(0)), tok)
    return save_pretrained(model, None, tmp_path_factory.mktemp("ckpt"))


def test_prompts_near_the_context_limit(checkpoint):
    """A prompt that fits but whose width rounded up to 64 would not: `chat.collate_prompts` caps the width
    at the context left for new tokens, and it decodes what a model with a longer context does."""
    model, longer = chat.from_pretrained(checkpoint), chat.from_pretrained(checkpoint, max_position_embeddings=2048)
    records = [Record((("protein", "MKT" * 316),), "What is it?", "A protein."), Record((), "Hi?", "Hello.")]
    cfg = chat.generation_config(model.tokenizer, {"max_new_tokens": 4})
    encoded = [chat.encode_prompt(model, chat.make_prompt(r.question, r.entities), 4) for r in records]
    assert 960 < encoded[0].length <= 1020
    np.testing.assert_array_equal(chat.generate_tokens(model, encoded, cfg, 2),
                                  chat.generate_tokens(longer, encoded, cfg, 2))
    rows, m = ev.evaluate(model, records, batch_size=2, max_new_tokens=4)
    assert m["n"] == 2 and all("prediction" in r for r in rows)


def test_bad_records_are_reported_and_skipped(checkpoint, capsys):
    model = chat.from_pretrained(checkpoint)
    records = [Record((("molecule", "CCO"),), "What is it?", "Ethanol."),
               Record((("molecule", "C1CC"),), "What is it?", "Broken."),
               Record((("protein", "M" * 1000),), "What is it?", "Too long.")]
    rows, m = ev.evaluate(model, records, batch_size=2, max_new_tokens=4)
    assert m["n"] == 1 and m["skipped"] == 2 and "prediction" in rows[0]
    assert "SMILES 'C1CC'" in rows[1]["error"] and "exceeds the context" in rows[2]["error"]
    err = capsys.readouterr().err
    assert "skipped 2 of 3 record(s)" in err and "invalid SMILES: 1" in err and "too long: 1" in err


def test_cli_end_to_end(checkpoint, shared_data, tmp_path, capsys):
    out, metrics = tmp_path / "preds.jsonl", tmp_path / "metrics.json"
    argv = ["--checkpoint", str(checkpoint), "--source", "chebi20:test", "--source", "medqa:test", "--limit", "3",
            "--batch-size", "4", "--max-new-tokens", "6", "--data-dir", str(tmp_path / "tfds"),
            "--raw-dir", str(shared_data), "--output", str(out), "--metrics", str(metrics)]
    assert ev.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sources = ("chebi20:test", "medqa:test")
    assert [(r["source"], r["index"]) for r in rows] == [(s, i) for s in sources for i in range(3)]
    assert all(isinstance(r["prediction"], str) and r["reference"] for r in rows)
    assert all(r["label"] in "ABCD" and "choice" in r and isinstance(r["correct"], bool) for r in rows[3:])
    m = json.loads(metrics.read_text())
    assert set(ev.OVERLAP_KEYS) <= set(m["chebi20:test"]) and "accuracy" not in m["chebi20:test"]
    assert {"accuracy", "extraction_failures"} <= set(m["medqa:test"]) and "bleu4" not in m["medqa:test"]
    assert m["chebi20:test"]["n"] == m["medqa:test"]["n"] == 3
    table = capsys.readouterr().out
    assert "chebi20:test" in table and "medqa:test" in table and "bleu4" in table and "accuracy" in table

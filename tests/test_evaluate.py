"""Evaluation (reading choices: evaluation/test_choices.py): scoring of labelled and free-text rows, bad records
counted and written, the same answers on one device and on a sharded mesh, the CLI end to end (run folder, paper
rows, chart). Crash, resume and the one-line refusals: test_evaluate_resume.py."""
import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import chat
from bmgpt_jax import config as config_lib
from bmgpt_jax import evaluate as ev
from bmgpt_jax import parallel
from bmgpt_jax.data.records import Record
from bmgpt_jax.convert.folder import save_pretrained
from bmgpt_jax.data.text import attach_tokenizer, load_tokenizer
from bmgpt_jax.evaluation import report
from bmgpt_jax.evaluation.choices import has_long_answer
from bmgpt_jax.evaluation.scoring import MeshModel
from bmgpt_jax.models.biomedgpt import BioMedGPT, BioMedGPTConfig
from bmgpt_jax.models.esm import EsmConfig
from bmgpt_jax.models.gin import GinConfig
from bmgpt_jax.models.llama import LlamaConfig
from tests.test_chat_mesh import assert_read_as_shards, slice_reads

MC_Q = "Which drug?\nA. Aspirin\nB. Caffeine\nC. Ethanol\nD. Water"


def test_score_rows(shared_data):
    records = [Record((), MC_Q, "B. Caffeine", label="B"), Record((), MC_Q, "A. Aspirin", label="A"),
               Record((), MC_Q, "C. Ethanol", label="C"), Record((), "Q?", "Yes. It works.", label="yes"),
               Record((), "Describe.", "It is a molecule."), Record((), "Describe.", "Unused.")]
    assert [has_long_answer(r) for r in records[:4]] == [False, False, False, True]
    stray = Record((), "Q?\nA. Sepsis\nB. Benzodiazepine intoxication", 'B. Benzodiazepine intoxication\n"', label="B")
    assert not has_long_answer(stray)                          # as in a MedQA test record: stray quote
    rows = [{"prediction": "B. Caffeine"}, {"prediction": "Caffeine"}, {"prediction": "dunno"},
            {"prediction": "Yes. It works."}, {"prediction": "It is a molecule."},
            {"error": "SMILES 'C1CC' ...", "reason": "invalid SMILES"}]
    for r, row in zip(records[:4], rows):
        ev.read_choice(r, row)
    assert [row["choice"] for row in rows[:4]] == ["B", "B", None, "yes"]
    assert [row["correct"] for row in rows[:4]] == [True, False, False, True]
    for row, correct in zip(rows[:3], [True, False, False]):            # by sum: 1 of 3; per character: 3 of 3
        row.update(ll_logprobs={"A": -1.0}, ll_correct=correct, ll_correct_norm=True)
    m = ev.score(records, rows)
    assert m["n"] == 5 and m["skipped"] == 1 and m["skipped_reasons"] == {"invalid SMILES": 1}
    assert m["accuracy"] == pytest.approx(2 / 4) and m["extraction_failures"] == 1
    assert m["ll_accuracy"] == pytest.approx(1 / 3) and m["ll_accuracy_norm"] == pytest.approx(1.0)
    # the free text and PubMedQA's long answer only, both predicted exactly
    assert m["bleu4"] == pytest.approx(1.0) and m["meteor"] > 0.99 and m["exact_match"] == 1.0


def test_exact_match_compares_normalized_texts(shared_data):
    """exact_match compares the texts lowercased, with whitespace collapsed and a final period dropped
    (docs/evaluate.md), and nothing more: of the three generated answers below, the first two match by that
    rule (case / spacing / period, and PubMedQA's long answer), the third differs by a word: 2 of 3."""
    records = [Record((), "Describe.", "It is a molecule."), Record((), "Q?", "Yes. It works.", label="yes"),
               Record((), "Describe.", "It is an acid.")]
    rows = [{"prediction": "  it  is a MOLECULE"}, {"prediction": "yes.  it WORKS"},
            {"prediction": "It is a acid."}]
    for r, row in zip(records[1:2], rows[1:2]):
        ev.read_choice(r, row)
    assert ev.score(records, rows)["exact_match"] == pytest.approx(2 / 3)


def test_report_table_and_chart(tmp_path):
    metrics = {"pubmedqa:test": {"n": 4, "skipped": 1, "accuracy": 0.5, "ll_accuracy": 0.75},
               "chebi20:test": {"n": 3, "skipped": 0, "bleu2": 0.2, "meteor": 0.3}}
    lines = report.format_table(metrics).splitlines()
    assert lines[0].split()[:5] == ["source", "n", "skipped", "accuracy", "ll_accuracy"]
    assert lines[1].split()[:5] == ["pubmedqa:test", "4", "1", "0.5000", "0.7500"]
    assert lines[2].split()[:6] == ["paper:", "BioMedGPT-10B", "(fine-tuned)", "-", "-", "0.7610"]
    assert lines[3].startswith("chebi20:test") and len(lines) == 4
    other_splits = {"pubmedqa:train": {"n": 2, "skipped": 0, "accuracy": 0.5},
                    "pubchemqa:valid": {"n": 2, "skipped": 0, "bleu2": 0.1}}
    assert [line.split()[0] for line in report.format_table(other_splits).splitlines()] == [
        "source", "pubmedqa:train", "pubchemqa:valid"]                  # the paper reported on test splits only
    assert report.paper_row("pubmedqa") is None                        # its first split: train
    assert report.paper_row("medmcqa")["metrics"] == {"accuracy": 0.514}   # its only split: validation
    assert report.paper_row("pubchemqa:test")["metrics"] == {"bleu2": 0.234, "bleu4": 0.141, "rougeL": 0.332,
                                                               "meteor": 0.308}
    assert all(row["fine_tuned"] for row in report.PAPER.values())
    png = report.bar_chart(metrics, tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def tiny_checkpoint(folder):
    """A random tiny BioMedGPT with the demo tokenizer, saved as a checkpoint folder."""
    tok = load_tokenizer(None)
    lm = dataclasses.replace(config_lib.load(LlamaConfig, "llama_tiny"), vocab_size=tok.vocab_size,
                             pad_token_id=tok.pad_id)
    cfg = BioMedGPTConfig(lm=lm, gin=config_lib.load(GinConfig, "gin_tiny"),
                          esm=config_lib.load(EsmConfig, "esm2_tiny"))
    model = attach_tokenizer(BioMedGPT(cfg, rngs=nnx.Rngs(0)), tok)
    return save_pretrained(model, None, folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_prompts_near_the_context_limit(checkpoint):
    """A prompt that fits but whose width rounded up to 64 would not: `data.prompts.collate_prompts` caps the width
    at the context left for new tokens, and it decodes what a model with a longer context does."""
    model, longer = chat.from_pretrained(checkpoint), chat.from_pretrained(checkpoint, max_position_embeddings=2048)
    records = [Record((("protein", "MKT" * 316),), "What is it?", "A protein."), Record((), "Hi?", "Hello.")]
    cfg = chat.generation_config(model.tokenizer, {"max_new_tokens": 4})
    encoded = [chat.encode_prompt(model, chat.make_prompt(r.question, r.entities), 4) for r in records]
    assert 960 < encoded[0].length <= 1020
    np.testing.assert_array_equal(chat.generate_tokens(model, encoded, cfg, 2),
                                  chat.generate_tokens(longer, encoded, cfg, 2))
    rows, m = ev.evaluate(model, records, batch_size=2, max_new_tokens=4)
    assert all("prediction" in r for r in rows)


def test_bad_records_are_counted_and_written(checkpoint, shared_data, capsys):
    model = chat.from_pretrained(checkpoint)
    records = [Record((("molecule", "CCO"),), "What is it?", "Ethanol."),
               Record((("molecule", "C1CC"),), "What is it?", "Broken."),
               Record((("protein", "M" * 1000),), "What is it?", "Too long."),
               Record((), "What is it?", ""), Record((), "How many?", 3),
               Record((), MC_Q, "B. Caffeine", label="B")]
    written = []
    rows, m = ev.evaluate(model, records, batch_size=2, mesh=parallel.make_mesh((1, 1, 1)), sink=written.append,
                          max_new_tokens=4)
    assert m["n"] == 2 and m["skipped"] == 4
    assert m["skipped_reasons"] == {"invalid SMILES": 1, "too long": 1, "no answer": 1, "answer not a string": 1}
    assert "SMILES 'C1CC'" in rows[1]["error"] and "exceeds the context" in rows[2]["error"]
    assert rows[4]["error"] == "answer is int, not a string"
    assert isinstance(rows[0]["prediction"], str) and "ll_logprobs" not in rows[0]
    assert set(rows[5]["ll_logprobs"]) == set("ABCD") and rows[5]["choice"] in (None, *"ABCD")
    assert sorted(r["index"] for r in written) == list(range(6))            # every row reaches the sink once
    err = capsys.readouterr().err
    assert "skipped 4 of 6 record(s)" in err and "invalid SMILES: 1" in err and "too long: 1" in err


def test_loglik_scoring_does_not_depend_on_max_new_tokens(checkpoint, capsys):
    """Log-likelihood needs the prompt and an option to fit, generation the prompt and max_new_tokens: a
    labelled prompt of 984 positions (room for its options, not for 64 new tokens) is scored in `both` as in
    `loglik`, only its generation skipped (`gen_error`, `gen_skipped`); free text that long is skipped."""
    model = chat.from_pretrained(checkpoint)
    protein = (("protein", "MKT" * 300),)
    records = [Record(protein, MC_Q, "B. Caffeine", label="B", id="long"), Record((), MC_Q, "C. Ethanol", label="C"),
               Record((("protein", "MKT" * 310),), "What is it?", "A protein.", id="long text")]
    mesh = parallel.make_mesh((1, 1, 1))
    loglik, m_loglik = ev.evaluate(model, records[:2], batch_size=2, mesh=mesh, mode="loglik", max_new_tokens=64)
    written = []
    both, m = ev.evaluate(model, records, batch_size=2, mesh=mesh, max_new_tokens=64, sink=written.append)
    assert [r.get("gen_error", "")[:27] for r in both] == ["prompt of 984 positions plu", "", ""]
    assert both[0]["ll_logprobs"] == pytest.approx(loglik[0]["ll_logprobs"]) and "prediction" not in both[0]
    keys = ("ll_accuracy", "ll_accuracy_norm")
    assert [m[k] for k in keys] == [m_loglik[k] for k in keys]
    assert m["gen_skipped"] == 1 and m["n"] == 2 and m["skipped_reasons"] == {"too long": 1}
    assert isinstance(both[1]["prediction"], str) and "exceeds the context" in both[2]["error"]
    assert sorted(r["index"] for r in written) == [0, 1, 2]                 # every row reaches the sink once
    assert "1 labelled record(s) not generated (gen_skipped), scored by log-likelihood only" in capsys.readouterr().err
    shorter, _ = ev.evaluate(model, records[:1], batch_size=2, mesh=mesh, max_new_tokens=32)
    assert "gen_error" not in shorter[0] and shorter[0]["ll_logprobs"] == pytest.approx(both[0]["ll_logprobs"])
    alone = [Record((("protein", "MKT" * 340),), MC_Q, "B. Caffeine", label="B")]   # too long by itself
    for mode in ("both", "loglik"):   # the error said "plus max_new_tokens=0" to a run with 64
        rows, _ = ev.evaluate(model, alone, batch_size=2, mesh=mesh, mode=mode, max_new_tokens=64)
        assert rows[0]["reason"] == "too long" and rows[0]["error"].endswith(") exceeds the context of 1024")
        assert "max_new_tokens" not in rows[0]["error"]


def test_records_the_build_left_out_are_counted(checkpoint, tmp_path, capsys):
    """A ChEBI-20 test file with 3 good rows, 2 invalid SMILES and 1 empty answer: the build keeps 3, and the
    3 it left out are skipped with their reasons and listed on stderr, on the run that builds the dataset
    and on the run that finds it built; a --limit that cuts the split says why they are not counted."""
    rows = ["1\tCCO\tEthanol.", "2\tC1CC(\tBroken.", "3\tCCN\t ", "4\tCC[Xx]\tWeird.", "5\tCCC\tPropane.",
            "6\tCCCC\tButane."]
    raw = tmp_path / "raw" / "molecules"
    raw.mkdir(parents=True)
    for split in ("validation", "test"):
        (raw / f"chebi20_{split}.txt").write_text("CID\tSMILES\tdescription\n" + "\n".join(rows) + "\n")
    argv = ["--checkpoint", str(checkpoint), "--source", "chebi20:test", "--raw-dir", str(raw.parent), "--data-dir",
            str(tmp_path / "tfds"), "--out-dir", str(tmp_path / "run"), "--mode", "generate", "--max-new-tokens", "2",
            "--no-progress", "--overwrite"]          # each run replaces the one before
    for run in ("built", "cached"):
        assert ev.main(argv) == 0
        m = json.loads((tmp_path / "run" / "metrics.json").read_text())["sources"]["chebi20:test"]
        assert (m["n"], m["skipped"], m["skipped_reasons"]) == (3, 3, {"empty answer": 1, "invalid SMILES": 2}), run
        err = capsys.readouterr().err
        assert "build of the dataset left out 3 record(s) of the split" in err and "invalid SMILES: 2 (e.g." in err
    assert ev.main(argv + ["--limit", "2"]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["sources"]["chebi20:test"]
    assert (m["n"], m["skipped"]) == (2, 0)
    assert ("evaluate: chebi20:test: the build left out 3 record(s) of the split (empty answer: 1, invalid SMILES: 2); "
            "not counted: --limit 2 evaluates 2 of the 3 it kept") in capsys.readouterr().err
    demo = ev.load_records("demo:test")    # the demo set's unparseable molecules: a record per question each
    from bmgpt_jax.data.demo import QUESTIONS
    assert {r: d["count"] for r, d in demo.dropped.items()} == {"invalid SMILES": 4 * len(QUESTIONS)}
    assert len(demo) + 4 * len(QUESTIONS) + 12 * len(QUESTIONS) == 500 * len(QUESTIONS)   # 12 also in train


def test_sharded_mesh_gives_the_same_answers(checkpoint):
    model = chat.from_pretrained(checkpoint)
    records = ev.load_records("demo:test", limit=5) + [Record((), MC_Q, "C. Ethanol", label="C"),
                                                       Record((), "Q? Answer yes, no or maybe.", "No.", label="no")]
    one, m1 = ev.evaluate(model, records, batch_size=4, mesh=parallel.make_mesh((1, 1, 1)), max_new_tokens=5)
    many, m8 = ev.evaluate(MeshModel(model, parallel.make_mesh((2, 2, 2))), records, batch_size=4, max_new_tokens=5)
    assert [r["prediction"] for r in one] == [r["prediction"] for r in many]
    for a, b in zip(one[5:], many[5:]):
        assert a["ll_logprobs"] == pytest.approx(b["ll_logprobs"], abs=1e-3)
    assert m1["n"] == m8["n"] == 7 and m1["speed"]["generate_examples_per_s"] > 0


def test_cli_end_to_end(checkpoint, shared_data, tmp_path, monkeypatch, capsys):
    """On a 2x2x2 mesh, the checkpoint read slice by slice into its shards (never a sharded weight whole)."""
    out = tmp_path / "run"
    argv = ["--checkpoint", str(checkpoint), "--source", "demo:test", "--source", "medmcqa:validation",
            "--limit", "3", "--batch-size", "4", "--max-new-tokens", "6", "--data-dir", str(tmp_path / "tfds"),
            "--out-dir", str(out), "--no-progress", "--mesh", "2,2,2"]
    model = chat.from_pretrained(checkpoint)
    reads = slice_reads(monkeypatch)
    assert ev.main(argv) == 0
    assert_read_as_shards(reads, model, parallel.make_mesh((2, 2, 2)))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    sources = ("demo:test", "medmcqa:validation")
    assert [(r["source"], r["index"]) for r in rows] == [(s, i) for s in sources for i in range(3)]
    assert all(isinstance(r["prediction"], str) and r["reference"] for r in rows)
    assert all(r["label"] in "ABCD" and isinstance(r["correct"], bool) and set(r["ll_logprobs"]) == set("ABCD")
               for r in rows[3:])
    saved = json.loads((out / "metrics.json").read_text())
    m = saved["sources"]
    assert {"bleu2", "bleu4", "meteor", "rouge1", "rouge2", "rougeL"} <= set(m["demo:test"])
    assert "accuracy" not in m["demo:test"] and "bleu4" not in m["medmcqa:validation"]
    assert {"accuracy", "ll_accuracy", "ll_accuracy_norm", "extraction_failures"} <= set(m["medmcqa:validation"])
    assert saved["paper"]["medmcqa:validation"]["metrics"] == {"accuracy": 0.514}
    assert saved["run"]["processes"] == 1 and saved["run"]["generation"] == {"max_new_tokens": 6}
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    table = table[next(i for i, line in enumerate(table) if line.startswith("source ")):]   # after tfds' lines
    assert table[1].startswith("demo:test") and table[2].startswith("medmcqa:validation")
    assert table[3].split()[:3] == ["paper:", "BioMedGPT-10B", "(fine-tuned)"]
    assert "generate_examples_per_s" in captured.err


def test_predictions_end_at_eos_as_the_reference_and_at_the_separator_with_the_option(checkpoint, tmp_path,
                                                                                        monkeypatch):
    """Decoding stops at EOS only and the prediction is the text after the last `Assistant:` (the reference's
    chat); `--stop-at-separator` stops at `###` too, cuts the prediction there and is recorded in the run."""
    tok = chat.from_pretrained(checkpoint).tokenizer
    said = tok.encode("Ethanol. ### Human: And this one? ### Assistant: Methanol.") + [tok.eos_id]
    stops = []

    def generate(self, batch, config):   # a model that goes on past its answer into another turn
        stops.append(config.stop_sequences)
        return np.array([said + [tok.pad_id] * (config.max_new_tokens - len(said))] * batch["input_ids"].shape[0])
    monkeypatch.setattr(MeshModel, "generate", generate)
    argv = ["--checkpoint", str(checkpoint), "--source", "demo:test", "--limit", "2", "--batch-size", "2",
            "--mesh", "1,1,1", "--max-new-tokens", "48", "--mode", "generate", "--no-progress"]
    for flag, prediction, stop in (([], "Methanol.", "eos"), (["--stop-at-separator"], "Ethanol.", "separator")):
        out = tmp_path / ("cut" if flag else "plain")
        assert ev.main(argv + flag + ["--out-dir", str(out)]) == 0
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert [r["prediction"] for r in rows] == [prediction] * 2
        run = json.loads((out / "metrics.json").read_text())["run"]
        assert (run["generation"], run["stop"]) == ({"max_new_tokens": 48}, stop)
    assert stops == [(), chat.stop_sequences(tok)]

"""Evaluation's crash and resume (predictions kept, `--resume` asking only the rest and refusing rows of other
records, another system prompt or dtype), and the command line's one-line refusals, each before any work
(`tests/test_evaluate.py`: scoring, reports, the CLI end to end)."""
import json
from pathlib import Path

import pytest

from bmgpt_jax import chat
from bmgpt_jax import evaluate as ev
from bmgpt_jax.data.records import Record
from bmgpt_jax.evaluation.scoring import MeshModel
from tests.test_evaluate import MC_Q, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_a_crash_keeps_the_predictions_made_and_resume_asks_only_the_rest(checkpoint, tmp_path, monkeypatch,
                                                                           capsys):
    calls = []
    real = MeshModel.generate

    def failing(self, batch, config):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(self, batch, config)
    monkeypatch.setattr(MeshModel, "generate", failing)
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    argv = ["--checkpoint", str(checkpoint), "--source", "demo:test", "--limit", "6", "--batch-size", "2",
            "--mesh", "1,1,1", "--max-new-tokens", "3", "--no-progress"]
    with pytest.raises(RuntimeError, match="device lost"):
        ev.main(argv + ["--out-dir", str(out)])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("prediction" in r for r in rows)
    assert json.loads((out / "metrics.json").read_text())["run"]["generation"] == {"max_new_tokens": 3}
    assert ev.main(argv + ["--out-dir", str(out), "--resume", "--max-new-tokens", "5"]) == 2   # settings kept
    assert "was evaluated with generation={'max_new_tokens': 3}" in capsys.readouterr().err

    calls.clear()
    monkeypatch.setattr(MeshModel, "generate", lambda self, batch, config: calls.append(1) or real(self, batch, config))
    assert ev.main(argv + ["--out-dir", str(fresh)]) == 0
    assert len(calls) == 3
    planted = dict(rows[0], prediction=rows[0]["reference"])   # kept rows are scored as written, never re-asked
    with open(out / "predictions.jsonl", "w") as f:
        f.write(json.dumps(planted) + "\n" + json.dumps(rows[1]) + "\n" + '{"source": "demo:test", "ind')
    calls.clear()
    assert ev.main(argv + ["--out-dir", str(out), "--resume"]) == 0
    assert len(calls) == 2                           # 4 records left, batches of 2
    assert "--resume keeps 2 finished row(s)" in capsys.readouterr().err
    resumed = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (fresh / "predictions.jsonl").read_text().splitlines()]
    p = planted["index"]                             # rows are written as batches finish: any two records
    assert [r["index"] for r in resumed] == list(range(6)) and resumed[p] == planted
    assert resumed[:p] + resumed[p + 1:] == whole[:p] + whole[p + 1:]
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, fresh))
    assert ours["sources"]["demo:test"]["n"] == 6 and ours["run"]["resumed_rows"] == 2
    assert ours["sources"]["demo:test"]["exact_match"] == 1 / 6 != theirs["sources"]["demo:test"]["exact_match"]

    calls.clear()   # resuming a finished run asks nothing and scores what the fresh run scored
    assert ev.main(argv + ["--out-dir", str(fresh), "--resume"]) == 0 and not calls
    assert "demo:test: nothing left to ask" in capsys.readouterr().err
    again = json.loads((fresh / "metrics.json").read_text())["sources"]["demo:test"]
    assert {k: v for k, v in again.items() if k != "speed"} == {k: v for k, v in theirs["sources"]["demo:test"].items()
                                                                 if k != "speed"}
    for wrong, message in ((["--limit", "5"], "was evaluated with limit=6, this run has 5"),
                           (["--max-new-tokens", "4"], "was evaluated with generation={'max_new_tokens': 3}")):
        assert ev.main(argv + wrong + ["--out-dir", str(fresh), "--resume"]) == 2
        assert message in capsys.readouterr().err


def test_a_fresh_run_refuses_to_discard_an_earlier_run_s_predictions(checkpoint, tmp_path, monkeypatch, capsys):
    """Rerunning an interrupted evaluate without --resume rewrote its predictions.jsonl empty: hours of
    finished generations at 10B gone, nothing said. Now one line with the count, before the model loads;
    --resume and --overwrite go on, and a fresh folder (or one with only a torn line) is no obstacle."""
    out = tmp_path / "run"
    out.mkdir()
    rows = [{"source": "demo:test", "index": i, "prediction": "x"} for i in range(3)]
    kept = "".join(json.dumps(r) + "\n" for r in rows) + '{"source": "demo:te'       # 3 rows, then a torn line
    (out / "predictions.jsonl").write_text(kept)
    base = ["--checkpoint", str(checkpoint), "--source", "demo:test", "--limit", "2", "--mesh", "1,1,1",
            "--max-new-tokens", "2", "--no-progress", "--out-dir", str(out)]
    assert refused(base, monkeypatch, capsys) == (
        f"error: --out-dir {out} holds 3 finished prediction row(s) of an earlier run in predictions.jsonl: pass "
        "--resume to continue that run, --overwrite to discard them, or another --out-dir")
    assert (out / "predictions.jsonl").read_text() == kept
    with pytest.raises(SystemExit):
        ev.main(base + ["--resume", "--overwrite"])
    assert "--resume keeps the predictions in --out-dir, --overwrite discards them" in capsys.readouterr().err
    monkeypatch.undo()
    assert ev.main(base + ["--overwrite"]) == 0
    first = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in first] == [0, 1]
    assert ev.main(base + ["--resume"]) == 0                         # the same run goes on: nothing left to ask
    assert "demo:test: nothing left to ask" in capsys.readouterr().err
    (out / "predictions.jsonl").write_text('{"source": "demo:te')   # only a torn line: no finished row to lose
    assert ev.main(base) == 0
    assert ev.main(base[:-1] + [str(tmp_path / "fresh")]) == 0


def test_resume_refuses_rows_of_other_records(checkpoint, tmp_path, capsys):
    """A split rebuilt from other raw files (or another --raw-dir / --data-dir) has other records at the same
    indices: --resume kept the old rows and scored them against the new references, exit 0."""
    out = tmp_path / "run"
    argv = ["--checkpoint", str(checkpoint), "--source", "demo:test", "--limit", "2", "--batch-size", "2",
            "--mesh", "1,1,1", "--max-new-tokens", "2", "--no-progress", "--out-dir", str(out)]
    assert ev.main(argv) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for key, value in (("id", "another-record"), ("reference", "Another answer.")):
        changed = [dict(rows[0], **{key: value})] + rows[1:]
        (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
        capsys.readouterr()
        assert ev.main(argv + ["--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]      # the one-line error, after the build's counts
        assert f"holds a row of demo:test record {rows[0]['index']} with {key} {value!r}, but this run's record" in err
        assert "the split's contents changed" in err
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ev.main(argv + ["--resume"]) == 0          # the same records: resumed


def test_resume_refuses_another_system_or_dtype(checkpoint, tmp_path, capsys):
    """`--system` and `--dtype` change every answer, yet `--resume` continued a run started with other ones
    (one predictions file, two settings). A metrics.json that does not record them (an older version's)
    cannot be checked: its rows are kept and stderr says what was assumed."""
    out = tmp_path / "run"
    argv = ["--checkpoint", str(checkpoint), "--source", "demo:test", "--limit", "2", "--batch-size", "2",
            "--mesh", "1,1,1", "--max-new-tokens", "2", "--no-progress", "--out-dir", str(out)]
    assert ev.main(argv) == 0
    run = json.loads((out / "metrics.json").read_text())["run"]
    assert (run["system"], run["dtype"]) == (None, "float32")
    assert ev.main(argv + ["--resume", "--dtype", "float32"]) == 0      # the folder's dtype, named: the same
    for other, message in ((["--system", "Be brief."], "was evaluated with system=None, this run has 'Be brief.'"),
                           (["--dtype", "bfloat16"], "was evaluated with dtype='float32', this run has 'bfloat16'")):
        capsys.readouterr()
        assert ev.main(argv + ["--resume"] + other) == 2
        assert message in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("system", "dtype"):
        del metrics["run"][key]
    (out / "metrics.json").write_text(json.dumps(metrics))
    capsys.readouterr()
    assert ev.main(argv + ["--resume", "--system", "Be brief."]) == 0
    assert (f"evaluate: --resume: {out / 'metrics.json'} does not record system, dtype (an older run); its rows "
            "are kept as if evaluated with this run's system='Be brief.', dtype='float32'") in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["run"]["system"] == "Be brief."   # recorded from now on
    metrics = json.loads((out / "metrics.json").read_text())
    del metrics["run"]["stop"]       # a run of a version that always stopped at `###` and cut there
    (out / "metrics.json").write_text(json.dumps(metrics))
    capsys.readouterr()
    assert ev.main(argv + ["--resume", "--system", "Be brief."]) == 2
    assert "was evaluated with stop='separator', this run has 'eos'" in capsys.readouterr().err
    assert ev.main(argv + ["--resume", "--system", "Be brief.", "--stop-at-separator"]) == 0


def test_cli_errors_are_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    base = ["--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path)]
    assert ev.main(base + ["--source", "demo:bogus"]) == 2
    assert capsys.readouterr().err.strip() == "error: demo has no split 'bogus'; splits: train, test"
    assert ev.main(base + ["--source", "chebi20:bogus"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: data.sources: chebi20 has no split 'bogus'; splits: validation, test"
    monkeypatch.setenv("BMGPT_SHARED_DATA", str(tmp_path / "absent"))
    assert ev.main(base + ["--source", "chebi20:test", "--scibert-vocab", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: SciBERT vocabulary") and "from_pretrained" in err and "\n" not in err
    assert ev.main(base + ["--source", "chebi20:test", "--mode", "loglik"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: chebi20: no input folder given") and "--raw-dir ../shared/data" in err
    assert "\n" not in err and not (tmp_path / "run").exists()
    assert ev.main(base[:2] + ["--out-dir", "gs://bucket/eval", "--source", "demo:test"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --out-dir=gs://bucket/eval is a URL: the run writes its "
                                               "folders with file operations; mount the bucket (e.g. gcsfuse) on "
                                               "every host and give the mount's path")
    assert ev.main(base + ["--source", "demo:test", "--max-new-tokens", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: generation option max_new_tokens=-1 must be >= 1"
    for limit in ("0", "-1"):                        # evaluated nothing and reported success
        with pytest.raises(SystemExit) as exit_:
            ev.main(base + ["--source", "demo:test", "--limit", limit])
        assert exit_.value.code == 2 and f"argument --limit: {limit} is not a positive integer" in capsys.readouterr().err
    assert ev.main(base + ["--source", "demo:test", "--num-beams", "3", "--do-sample"]) == 2
    assert capsys.readouterr().err.strip() == ("error: generation options num_beams=3 and do_sample=True cannot be "
                                               "combined (beam sampling is not supported): use one or the other")
    assert ev.main(base + ["--source", "demo:bogus", "--limit", "1", "--mesh", "1,1,16"]) == 2   # before the sources
    assert capsys.readouterr().err.strip() == (
        "error: --mesh 1,1,16: mesh shape (1, 1, 16) needs 16 devices, which does not divide the 8 devices found; on "
        "CPU, XLA_FLAGS=--xla_force_host_platform_device_count=16 (set before JAX starts) simulates 16 devices")
    import shutil
    final = shutil.copytree(checkpoint, tmp_path / "train_run" / "final")
    assert ev.main(base[2:] + ["--checkpoint", str(final.parent), "--source", "demo:test", "--limit", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (   # one hint, not two
        f"error: {final.parent} is a training run's folder; its model is {final} (--checkpoint {final})")
    base[1] = str(tmp_path / "no_checkpoint")
    assert ev.main(base + ["--source", "demo:test", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model folder") and "python -m bmgpt_jax.train" in err


def refused(argv, monkeypatch, capsys, build: bool = False) -> str:
    """The one line on stderr of an evaluate command line refused (status 2) before any source is built
    (`build`: after the sources are built) or model loaded."""
    def never(*args, **kwargs):
        raise AssertionError("a source was built or the model loaded before the arguments were checked")
    if not build:
        monkeypatch.setattr(ev, "load_records", never)
    monkeypatch.setattr(chat, "model_and_options", never)
    assert ev.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or build and not any(line.startswith("error:") for line in err[:-1]), err
    return err[-1]                   # after a build, its notes come first


def test_an_out_dir_that_is_a_file_is_refused_up_front(checkpoint, tmp_path, monkeypatch, capsys):
    """`--out-dir` naming a file was a FileExistsError traceback (status 1) after the model had loaded."""
    afile = tmp_path / "afile"
    afile.write_text("notes\n")
    base = ["--checkpoint", str(checkpoint), "--source", "demo:test", "--limit", "2"]
    assert refused(base + ["--out-dir", str(afile)], monkeypatch, capsys) == \
        f"error: --out-dir {afile} is a file, not a folder"
    assert refused(base + ["--out-dir", str(afile / "run")], monkeypatch, capsys) == \
        f"error: --out-dir {afile / 'run'}: {afile} is a file, not a folder"
    assert afile.read_text() == "notes\n"


def test_an_out_dir_that_cannot_be_made_is_refused_up_front(checkpoint, tmp_path, monkeypatch, capsys):
    """`--out-dir /proc/ev` was a chained FileNotFoundError traceback after the model had loaded. Now one
    line naming the flag, before anything is built or loaded, and the probe leaves nothing behind."""
    base = ["--checkpoint", str(checkpoint), "--source", "demo:test", "--limit", "2"]
    long = tmp_path / "ok" / ("x" * 300)                          # a name too long: fails as non-root too
    assert refused(base + ["--out-dir", str(long)], monkeypatch, capsys) == \
        f"error: --out-dir {long}: cannot create it (File name too long)"
    assert not (tmp_path / "ok").exists()
    if Path("/proc/self").is_dir():                                # Linux: procfs takes no new folder
        line = refused(base + ["--out-dir", "/proc/bmgpt_jax_ev"], monkeypatch, capsys)
        assert line.startswith("error: --out-dir /proc/bmgpt_jax_ev: cannot create it ("), line


def test_the_model_folder_is_checked_before_any_source_is_built(checkpoint, tmp_path, monkeypatch, capsys):
    """`--checkpoint nope` built (or read) every source first, then said the folder did not exist."""
    import shutil
    base = ["--source", "demo:test", "--limit", "2", "--out-dir", str(tmp_path / "run")]
    nope = tmp_path / "nope"
    assert refused(["--checkpoint", str(nope)] + base, monkeypatch, capsys) == \
        f"error: model folder {nope} does not exist (`python -m bmgpt_jax.train` writes one to runs/tiny/final)"
    final = shutil.copytree(checkpoint, tmp_path / "train_run" / "final")
    assert refused(["--checkpoint", str(final.parent)] + base, monkeypatch, capsys) == \
        f"error: {final.parent} is a training run's folder; its model is {final} (--checkpoint {final})"
    (final / "llm_config.json").write_text("{")
    assert refused(["--checkpoint", str(final)] + base, monkeypatch, capsys).startswith(
        f"error: {final / 'llm_config.json'} is not valid JSON")
    assert not (tmp_path / "run").exists()


def test_a_system_prompt_with_a_placeholder_is_refused_up_front(checkpoint, tmp_path, monkeypatch, capsys):
    """`--system 'S <moleculeHere>'` made every record an `error` row (reason "other"), `n` 0, status 0; chat
    refuses such a system prompt, and so does evaluate now, before anything is built or loaded."""
    argv = ["--checkpoint", str(checkpoint), "--source", "demo:test", "--limit", "2", "--out-dir",
            str(tmp_path / "run"), "--system", "S <moleculeHere>"]
    assert refused(argv, monkeypatch, capsys) == ("error: the system prompt 'S <moleculeHere>' holds an entity "
                                                  "placeholder; entities go in questions")
    model = chat.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="holds an entity placeholder"):
        ev.evaluate(model, [Record((), "Hi?", "Hello.")], system="S <proteinHere>", max_new_tokens=2)


def test_loglik_on_free_text_is_refused_and_nothing_asked_is_told_as_it_is(checkpoint, tmp_path, monkeypatch, capsys):
    """`--mode loglik` on demo:test (free text, no options) scored nothing and printed `demo:test 2 0`, no
    metrics, and "nothing left to ask (every record has a row)" although nothing had been resumed; a run whose
    every record is skipped said the same."""
    base = ["--checkpoint", str(checkpoint), "--source", "demo:test", "--limit", "2", "--out-dir",
            str(tmp_path / "run"), "--no-progress", "--mesh", "1,1,1"]
    err = refused(base + ["--mode", "loglik"], monkeypatch, capsys, build=True)
    assert err.startswith("error: mode loglik scores only labelled (multiple-choice, yes/no/maybe) records; demo:test "
                          "has 2 free-text record(s) of 2 (no label, e.g. id 'NCI4554'): mode generate or both")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="free-text record"):     # the Python API: the same check
        ev.evaluate(None, [Record((), MC_Q, "B. Caffeine", label="B"), Record((), "Hi?", "Hello.")], mode="loglik")
    monkeypatch.undo()
    assert ev.main(base + ["--mode", "generate", "--max-new-tokens", "1020"]) == 0   # every prompt too long
    err = capsys.readouterr().err
    assert "demo:test: nothing asked: none of the 2 record(s) could be asked (see the skipped records above)" in err
    assert "nothing left to ask" not in err


def test_the_training_mixture_auto_is_refused(checkpoint, tmp_path, monkeypatch, capsys):
    """`--source auto` (DataConfig's default: demo:train plus sample sets' splits that training reads) was
    evaluated, scoring the model on its training data; the docs' source list did not name it."""
    def build(*args, **kwargs):
        raise AssertionError("auto was built")
    monkeypatch.setattr("bmgpt_jax.data.pipeline.Records", build)
    argv = ["--checkpoint", str(checkpoint), "--limit", "2", "--out-dir", str(tmp_path / "run")]
    for spec in ("auto", "auto:test"):
        assert refused(argv + ["--source", spec], monkeypatch, capsys, build=True) == (
            f"error: source {spec!r} is training's default mixture (demo:train, and chebi20:validation, chembl_qa, "
            "swissprot when the sample data is there): evaluating it scores the data training reads; name a source "
            "and split, e.g. demo:test")
    with pytest.raises(ValueError, match="training's default mixture"):
        ev.load_records("auto", limit=2)

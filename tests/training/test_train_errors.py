"""The training job's bad input and failures: one line naming the culprit (and the setting to change),
before any compute where it can be known then; a config's typos, a mesh or batch that does not divide, a
resume with other settings, out-of-vocabulary ids, paths that cannot be used, a second Ctrl-C."""
import re
import shlex
from pathlib import Path

import pytest

from bmgpt_jax.config import ConfigError
from bmgpt_jax.data.pipeline import BatchIterator
from bmgpt_jax.data.text import load_tokenizer
from bmgpt_jax.training import loop as train
from bmgpt_jax.training import messages
from tests.training.runs import SMALL, cfg_for


def test_errors_come_before_any_compute(tmp_path, capsys):
    assert train.main(["optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'stpes'; did you mean 'steps'"):
        train.load_config("tiny", ["stpes=3"])
    with pytest.raises(ConfigError, match=r"^steps=-1: a run takes at least 1 step$"):   # not optim.total_steps'
        train.load_config("tiny", ["steps=-1"])
    with pytest.raises(ValueError, match="needs 3 devices, which does not divide the 8 devices"):
        train.run(cfg_for(tmp_path, "mesh=[3,1,1]"))
    with pytest.raises(ValueError, match=r"data.batch_size 6 does not divide over the mesh's data axes \(data 4"):
        train.run(cfg_for(tmp_path, "mesh=[4,2,1]", "data.batch_size=6"))
    with pytest.raises(ValueError, match="data.graph_budget 12 per process does not divide over 8 data shards"):
        train.run(cfg_for(tmp_path, "mesh=[8,1,1]", "data.graph_budget=12"))
    train.run(cfg_for(tmp_path, "steps=2", "stage=align", name="shape"))
    with pytest.raises(ValueError, match=r"e\.g\. 'trainable\.proj_mol\.bias\.value': checkpoint \(64,\) vs model "
                                         r"\(96,\)\): .* that decide them: model\.lm\.hidden_size: 64 -> 96\."):
        train.run(cfg_for(tmp_path, "steps=4", "stage=align", "model.lm.hidden_size=96", name="shape"), resume=True)
    with pytest.raises(ValueError) as error:   # another trainable subset: named, in one line, before any restore
        train.run(cfg_for(tmp_path, "steps=4", "stage=align", "trainable=['^proj_mol']", name="shape"), resume=True)
    assert re.fullmatch(rf"--resume: checkpoint {tmp_path / 'shape' / 'checkpoints' / '2'} holds other arrays than this "
                        r"run trains \(6 mismatched keys, e\.g\. 'trainable\.proj_prot\.bias\.value': not in the model .*\): it was saved with other settings "
                        r"that decide them: trainable: \[\] -> \['\^proj_mol'\]\. Resume with the checkpoint's "
                        r"values, or start a new run \(another out_dir\)", str(error.value)), str(error.value)


class CorruptedIds:
    """The pipeline's stream with one out-of-vocabulary id planted in the second batch."""

    def __init__(self, it):
        self.it, self.tokenizer, self.n = it, it.tokenizer, 0

    def __next__(self):
        batch, self.n = next(self.it), self.n + 1
        if self.n == 2:
            batch = dict(batch, input_ids=batch["input_ids"].copy())
            batch["input_ids"][1, 4] = self.tokenizer.vocab_size + 5
        return batch

    def state(self):
        return self.it.state()

    def restore(self, state):
        self.it.restore(state)


def test_out_of_vocabulary_ids_are_refused_before_the_step(tmp_path):
    cfg = cfg_for(tmp_path, "stage=align", "steps=3")
    v = load_tokenizer(None).vocab_size
    with pytest.raises(ValueError, match=r"the batch at data position epoch 0, window 0, batch 1: input_ids\[1, 4\] = "
                                         rf"{v + 5} is outside \[0, {v}\) \(model.lm.vocab_size\)"):
        train.run(cfg, batches=CorruptedIds(BatchIterator(cfg.data)))


def test_one_line_errors_before_any_compute(tmp_path, capsys):
    def error(argv):
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    assert "XLA_FLAGS=--xla_force_host_platform_device_count=16 (set before JAX starts) simulates 16" in \
        error(["mesh=[4,4,1]"])
    line = error(["--config", "biomedgpt_10b_align", f"out_dir={tmp_path / 'big'}"])
    assert line.startswith("train: FileNotFoundError: not found") and \
        "init.hf_llama=checkpoints/BioMedGPT-LM-7B" in line and "data.tokenizer=" in line
    line = error(["--config", "biomedgpt_10b_align", f"out_dir={tmp_path / 'big'}", "init.hf_llama=", "init.hf_esm=",
                  "init.gin=", "data.tokenizer=", f"data.data_dir={tmp_path / 'tfds'}"])
    assert line.startswith("train: FileNotFoundError: pubchemqa: input folder data/PubChemQA not found")
    (tmp_path / "old" / "checkpoints" / "40").mkdir(parents=True)
    line = error(SMALL + [f"out_dir={tmp_path / 'old'}"])
    assert "holds checkpoints of an earlier run (steps [40]): pass --resume" in line
    (tmp_path / "exported" / "final" / "notes").mkdir(parents=True)     # the export would delete it at the end
    line = error(SMALL + ["export=true", f"out_dir={tmp_path / 'exported'}"])
    assert line.startswith(f"train: ValueError: refusing to replace {tmp_path / 'exported' / 'final'}: it holds 1 entry")
    line = error(SMALL + ["out_dir=gs://bucket/run"])     # pathlib would make it a local folder "gs:"
    assert line == ("train: ValueError: out_dir=gs://bucket/run is a URL: the run writes its folders with file "
                    "operations; mount the bucket (e.g. gcsfuse) on every host and give the mount's path")
    assert not Path("gs:").exists()
    (tmp_path / "notes.md").write_text("# not a tokenizer\n")      # sentencepiece's bare RuntimeError named no file
    line = error(SMALL + [f"out_dir={tmp_path / 'tok'}", f"data.tokenizer={tmp_path / 'notes.md'}"])
    assert line.startswith(f"train: ValueError: {tmp_path / 'notes.md'} is not a readable SentencePiece tokenizer "
                           "model"), line


def test_too_many_dropped_examples_stop_the_run_naming_the_setting(tmp_path, capsys):
    """The GIN's atom cap set to refuse molecules over 10 atoms: training drops those examples (as chat would
    refuse them) and, past data.max_dropped, stops with the setting to change."""
    argv = ["--config", "tiny_align"] + SMALL + ["steps=2", f"out_dir={tmp_path / 'cap'}", "model.gin.max_atoms=10",
                                                 "model.gin.over_cap=error", "data.max_dropped=0.05"]
    assert train.main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("train: TooManyDropped: the data pipeline dropped") and \
        "more than data.max_dropped=0.05; most are too_many_atoms" in line and "change model.gin.max_atoms" in line


def test_init_paths_a_stage_would_not_read_are_refused():
    with pytest.raises(ConfigError, match=r"init.openbiomed, init.lm_config would not be read \(stage 'lm' trains "
                                          r"the bare decoder: init.hf_llama\)"):
        train.load_config("tiny_lm", ["init.openbiomed=x.pth", "init.lm_config=c.json"])
    with pytest.raises(ConfigError, match=r"init.hf_esm would not be read \(init.openbiomed loads the whole model"):
        train.load_config("tiny_finetune", ["init.openbiomed=x.pth", "init.hf_esm=esm"])
    with pytest.raises(ConfigError, match=r"init.esm_config would not be read"):
        train.load_config("tiny_align", ["init.esm_config=c.json"])
    for name in ("biomedgpt_10b_lm", "biomedgpt_10b_align", "biomedgpt_10b_finetune"):
        train.load_config(name)                                   # the shipped configs are consistent


def test_the_command_that_continues_a_stopped_run_is_shell_quoted(tmp_path):
    argv = [f"out_dir={tmp_path}", "data.system_prompt=You are a chemist. ", "--resume"]
    line = messages.where_things_went(train.load_config("tiny", argv[:2]), {"stopped": "SIGTERM", "last_step": 3},
                                   argv)[0]
    command = line.split("continue with: ", 1)[1]
    assert shlex.split(command) == ["python", "-m", "bmgpt_jax.train", *argv]


def test_a_second_ctrl_c_aborts_in_one_line(monkeypatch, capsys):
    def interrupted(cfg, resume=False):
        raise KeyboardInterrupt   # what the handler raises on a Ctrl-C while a stop is pending
    monkeypatch.setattr(train, "run", interrupted)
    assert train.main(SMALL) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train: aborted by a second Ctrl-C; the last saved checkpoint is kept (--resume continues from it)"]


def test_an_encoding_worker_that_died_is_one_line(monkeypatch, capsys):
    from bmgpt_jax.data.workers import WorkerDied

    def died(cfg, resume=False):
        raise WorkerDied("data: encoding worker 1 (pid 7, data.workers=2) died (killed by SIGKILL) while encoding "
                         "window 3 of epoch 0: ...")
    monkeypatch.setattr(train, "run", died)
    assert train.main(SMALL) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: data: encoding worker 1 (pid 7, data.workers=2) died"), err


def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_build(tmp_path, monkeypatch, capsys):
    """`out_dir=/sys/run` was a PermissionError traceback from the checkpointer's mkdir, after the data and the
    model were built (at 10B: the init weights read). Now one line naming the key, before either, and the
    probe leaves no folder behind."""
    def never(*args, **kwargs):
        raise AssertionError("the data or the model was built before the run's folders were checked")
    monkeypatch.setattr(train, "BatchIterator", never)
    monkeypatch.setattr(train, "build_model", never)
    afile = tmp_path / "afile"
    afile.write_text("notes\n")
    long = tmp_path / ("x" * 300) / "run"                        # a name too long: mkdir fails as non-root too
    for key, path, why in [("out_dir", afile / "run", f"{afile} is a file, not a folder"),
                           ("out_dir", long, "cannot create it (File name too long)"),
                           ("checkpoint.dir", long, "cannot create it (File name too long)")]:
        assert train.main(SMALL + [f"out_dir={tmp_path / 'ok'}", f"{key}={path}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"train: ValueError: {key}={path}: {why}"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]   # the probe of ok/ removed what it made
    if Path("/sys").is_dir() and not Path("/sys/bmgpt_jax_run").exists():   # Linux: sysfs takes no new folder
        assert train.main(SMALL + ["out_dir=/sys/bmgpt_jax_run/x"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.fullmatch(r"train: ValueError: out_dir=/sys/bmgpt_jax_run/x: cannot create it "
                                              r"\((Operation not permitted|Permission denied)\)", err[0]), err

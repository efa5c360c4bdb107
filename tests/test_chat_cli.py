"""chat on the demo model: the Python API and conversations, the CLI (one answer, interactive, JSONL and
its resume), checkpoint folders, the one-atom cap, and bad input as one line naming the culprit."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import chat
from bmgpt_jax.convert.folder import save_pretrained
from bmgpt_jax.data.records import Record
from bmgpt_jax.models.biomedgpt import BioMedGPT
from tests.chat_models import demo_biomedgpt


@pytest.fixture(scope="module")
def demo_model():
    return demo_biomedgpt()


def test_chat_api_conversation_and_bad_input(demo_model):
    m = demo_model
    one = chat.ask(m, "What is this molecule?", smiles="CCO", max_new_tokens=8)
    assert isinstance(one, str) and one == chat.ask(m, "What is this molecule?", "CCO", max_new_tokens=8)
    conv = chat.Conversation(m, max_new_tokens=8)
    conv.append_molecule("CCO")
    a1 = conv.ask("What is this molecule?")
    assert a1 == one
    conv.append_protein("MKTAYIA")
    a2 = conv.ask("And this?")
    assert conv.history == [("<molecule><moleculeHere></molecule> What is this molecule?", a1),
                            ("<protein><proteinHere></protein> And this?", a2)]
    assert conv.entities == (("molecule", "CCO"), ("protein", "MKTAYIA"))
    p = chat.make_prompt("Bind <proteinHere>?", [("protein", "MK")], "S ", conv.history, conv.entities)
    assert p.text.endswith(f"### Assistant: {a2} ### Human: Bind <protein><proteinHere></protein>? ### Assistant: ")
    conv.reset()
    assert conv.history == [] and conv.entities == ()
    conv.append_protein("M" * 1000)   # too long for the context: the question fails and takes it along
    with pytest.raises(ValueError, match=r"exceeds the context of 1024 \(dropped with the question: protein 'MMM"):
        conv.ask("What is it?")
    assert conv.pending == [] and conv.history == [] and conv.ask("What is this molecule?", "CCO") == a1
    conv.history[-1] = (conv.history[-1][0], "Like <moleculeHere> or <proteinHere>.")  # a generated placeholder
    p = chat.make_prompt("And <proteinHere>?", [("protein", "MK")], None, conv.history, conv.entities)
    assert "Like  or ." in p.text and p.entities == (("molecule", "CCO"), ("protein", "MK"))
    assert isinstance(conv.ask("And <proteinHere>?", protein="MK"), str)
    with pytest.raises(ValueError, match="system prompt 'S <moleculeHere>' holds an entity placeholder"):
        chat.make_prompt("Q?", [], "S <moleculeHere>")
    with pytest.raises(ValueError, match="system prompt 'S <moleculeHere>' holds an entity placeholder"):
        chat.Conversation(m, "S <moleculeHere>")   # refused at once, not at every question
    inline = chat.make_prompt("Does <proteinHere> bind <molecule><moleculeHere></molecule>?",
                              chat.as_entities("CCO", "MK"), "")
    assert inline == chat.Prompt("### Human: Does <protein><proteinHere></protein> bind "
                                 "<molecule><moleculeHere></molecule>? ### Assistant: ", (("protein", "MK"), ("molecule", "CCO")))
    bad = [(dict(question="What is <moleculeHere>?"), r"1 <moleculeHere> placeholder\(s\) but 0 molecule"),
           (dict(question="Compare <moleculeHere>.", smiles=["CCO", "CCN"]), "molecule 'CCN' has no <moleculeHere>"),
           (dict(question="Q?", smiles="C1CC"), "SMILES 'C1CC'"),
           (dict(question="Q?", protein="MK1A"), "residue '1' at position 3"),
           (dict(question="Q?", protein="M" * 1000), "exceeds the context of 1024"),
           (dict(question="Q?", smiles="CCO", beams=2), "unknown generation option")]
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            chat.ask(m, **kw)
    with pytest.raises(ValueError, match="no tokenizer"):
        chat.ask(BioMedGPT(m.config, rngs=nnx.Rngs(0)), "Q?")


def test_checkpoint_folder_cli_interactive_and_jsonl(demo_model, tmp_path, capsys):
    m = demo_model
    ckpt = save_pretrained(m, None, tmp_path / "ckpt")
    back = chat.from_pretrained(ckpt)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.state(m, nnx.Param), nnx.state(back, nnx.Param))
    assert all(jax.tree.leaves(same)) and back.tokenizer.model_proto == m.tokenizer.model_proto
    expected = chat.ask(m, "What is this molecule?", smiles="CCO", max_new_tokens=8)
    base = ["--checkpoint", str(ckpt), "--max-new-tokens", "8"]
    assert chat.main(base + ["--smiles", "CCO", "--question", "What is this molecule?"]) == 0
    assert capsys.readouterr().out.strip() == expected
    chat.main(base + ["--interactive"], stdin=["/mol CCO", "What is this molecule?", "/mol C1CC", "/reset",
                                                  "/smiles CCO", "Hello?", "/quit", "never read"])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"Assistant: {expected}" and out[2].startswith("error: SMILES 'C1CC'")
    assert out[3].startswith("error: unknown command /smiles; commands: /mol SMILES")
    assert out[4].startswith("Assistant: ") and len(out) == 5

    def typed_then_ctrl_c():
        yield "/mol CCO"
        raise KeyboardInterrupt
    assert chat.main(base + ["--interactive"], stdin=typed_then_ctrl_c()) == 130   # was a traceback
    assert capsys.readouterr().err.strip().splitlines()[-1] == "chat: interrupted"
    rows = [{"question": "What is this molecule?", "smiles": "CCO", "id": "a"}, "not json",
            {"question": "Q?", "smiles": "C1CC"}, {"question": "Q?", "protein": "MK1A"},
            {"question": "What is <moleculeHere>?"}, {"question": "Q?", "protein": "M" * 1000},
            {"question": "Q?", "colour": "red"}, {"question": "What is this protein?", "protein": "MKTAYIA"}]
    src = tmp_path / "q.jsonl"
    src.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    assert chat.main(base + ["--jsonl", str(src), "--output", str(tmp_path / "a.jsonl"), "--batch-size", "4"]) == 0
    res = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["line"] for r in res] == list(range(1, 9))
    assert res[0]["answer"] == expected and res[0]["id"] == "a" and "answer" in res[7]
    assert all("error" in r and "answer" not in r for r in res[1:7])
    assert res[6]["colour"] == "red" and res[6]["question"] == "Q?"    # a refused object keeps its fields too
    assert "line 3: ValueError: SMILES 'C1CC'" in capsys.readouterr().err


def test_jsonl_rows_are_written_as_answered_and_resume_answers_only_the_rest(demo_model, tmp_path, capsys):
    """A long `--jsonl` job keeps what it finished: rows are yielded (and written) batch by batch while
    the input is still being read, and `--resume` keeps the rows of an earlier run, drops a torn last
    line and answers only the lines missing from the output."""
    molecules = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "C1CC", "CCCl", "OCC(O)CO"]   # C1CC: invalid
    rows = [{"question": "What is this molecule?", "smiles": s} for s in molecules]
    text = [json.dumps(r) for r in rows]

    def lines_then_crash():
        yield from text[:5]
        raise RuntimeError("the job died")

    got = []
    with pytest.raises(RuntimeError, match="the job died"):
        for row in chat.iter_answers(demo_model, lines_then_crash(), batch_size=2, max_new_tokens=6):
            got.append(row)
    assert [r["line"] for r in got] == [1, 2, 3, 4] and all("answer" in r for r in got)

    ckpt = save_pretrained(demo_model, None, tmp_path / "ckpt")
    src, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    src.write_text("\n".join(text) + "\n")
    base = ["--checkpoint", str(ckpt), "--max-new-tokens", "6", "--jsonl", str(src), "--batch-size", "2"]
    assert chat.main(base + ["--output", str(out)]) == 0
    full = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in full] == list(range(1, 8)) and "error" in full[4]
    assert [r["answer"] for r in full[:4]] == [r["answer"] for r in got]
    assert chat.answer_rows(demo_model, text, batch_size=3, max_new_tokens=6) == full   # the same, as a list
    planted = [dict(full[0], answer="PLANTED"), full[1], full[2]]
    out.write_text("".join(json.dumps(r) + "\n" for r in planted) + json.dumps(full[3])[:20])   # torn row 4
    capsys.readouterr()
    assert chat.main(base + ["--output", str(out), "--resume"]) == 0
    assert "already answers 3 line(s)" in capsys.readouterr().err
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert again == planted + full[3:]                  # rows 1-3 kept as written, 4-7 answered once
    assert chat.main(base + ["--output", str(out), "--resume"]) == 0   # nothing left: nothing changes
    assert [json.loads(x) for x in out.read_text().splitlines()] == again
    assert "already answers 7 line(s)" in capsys.readouterr().err

    other = tmp_path / "notes.txt"
    other.write_text("my notes\nmore notes\n")
    assert chat.main(base + ["--output", str(other), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (f"chat: {other} line 1 is not an answer row of `chat --jsonl`; "
                                               "--resume appends only to such a file")
    assert other.read_text() == "my notes\nmore notes\n"
    with pytest.raises(SystemExit) as exit_:
        chat.main(base + ["--resume"])
    assert exit_.value.code == 2 and "--resume needs --jsonl and --output" in capsys.readouterr().err


def test_one_atom_cap_for_training_evaluation_and_chat(demo_model):
    """The GIN's `max_atoms` / `over_cap` decide for the training pipeline and for chat (and evaluation,
    which encodes as chat does): the same atoms get tokens, or the molecule is refused by both."""
    from types import SimpleNamespace

    from bmgpt_jax.data.pipeline import BatchIterator, DataConfig
    gin = demo_model.config.gin
    assert (gin.max_atoms, gin.over_cap) == (64, "subsample")
    rec = Record((("molecule", "C" * 80),), "What is it?", "An alkane.")
    data = DataConfig(sources=("demo",), batch_size=1, seq_buckets=(256,), node_budget=128, edge_budget=256)
    batch = next(BatchIterator(data, records=[rec], max_atoms=gin.max_atoms, over_cap=gin.over_cap))
    prompt = chat.make_prompt(rec.question, rec.entities)
    asked = chat.encode_prompt(demo_model, prompt, 8).mols[0][3]
    assert (batch["mol_slot"] >= 0).sum() == 64
    np.testing.assert_array_equal(np.flatnonzero(batch["mol_slot"][:80] >= 0), np.flatnonzero(asked >= 0))
    strict = dataclasses.replace(gin, over_cap="error")
    it = BatchIterator(data, records=[rec], max_atoms=strict.max_atoms, over_cap=strict.over_cap)
    next(it)
    assert it.counts() == {"examples": 1, "too_many_atoms": 1}
    refusing = SimpleNamespace(config=dataclasses.replace(demo_model.config, gin=strict),
                               tokenizer=demo_model.tokenizer)
    with pytest.raises(ValueError, match="80 atoms exceed the cap of 64"):
        chat.encode_prompt(refusing, prompt, 8)


def test_command_line_errors_are_one_line_naming_the_culprit(demo_model, tmp_path, capsys):
    import shutil
    ckpt = save_pretrained(demo_model, None, tmp_path / "ckpt")
    capsys.readouterr()            # (the note on the folder's .pth, on stderr once convert_weights has run)
    ask = ["--question", "What is it?", "--smiles", "CCO", "--max-new-tokens", "4"]

    def error(folder, args=ask):
        assert chat.main(["--checkpoint", str(folder)] + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(ckpt, folder)
        change(folder)
        return folder

    assert error(tmp_path / "nope") == f"chat: model folder {tmp_path / 'nope'} does not exist"
    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "final")
    final = run / "final"
    assert error(run) == f"chat: {run} is a training run's folder; its model is {final} (--checkpoint {final})"
    weights = "model.safetensors"
    folder = broken("empty", lambda d: (d / weights).write_bytes(b""))
    assert error(folder) == f"chat: {folder / weights} is empty (0 bytes), not a weights file"
    folder = broken("cut", lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:5000]))
    assert error(folder).startswith(f"chat: {folder / weights}: ")
    folder = broken("json", lambda d: (d / "llm_config.json").write_text((d / "llm_config.json").read_text()[:40]))
    assert error(folder).startswith(f"chat: {folder / 'llm_config.json'} is not valid JSON (")
    folder = broken("tok", lambda d: (d / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes()[:999]))
    assert error(folder).startswith(f"chat: {folder / 'tokenizer.model'} is not a readable SentencePiece tokenizer")
    assert error(ckpt, ["--question", "  "]) == "chat: the question is empty ('  '): there is nothing to answer"
    assert error(ckpt, ["--jsonl", str(tmp_path / "absent.jsonl")]).startswith("chat: [Errno 2] No such file")
    with pytest.raises(SystemExit) as exit_:
        chat.main(["--checkpoint", str(ckpt), "--dtype", "float16x"] + ask)
    assert exit_.value.code == 2
    assert "argument --dtype: invalid choice: 'float16x'" in capsys.readouterr().err.strip().splitlines()[-1]
    assert error(ckpt, ask + ["--mesh", "3,1,1"]) == ("chat: --mesh 3,1,1: mesh shape (3, 1, 1) needs 3 devices, which "
                                                     "does not divide the 8 devices found")
    with pytest.raises(SystemExit):
        chat.main(["--checkpoint", str(ckpt), "--mesh", "1,2"] + ask)
    assert "argument --mesh: --mesh '1,2': expected data,fsdp,tensor" in capsys.readouterr().err
    # generation options out of Hugging Face's ranges: one line before the model loads (a length of 0
    # crashed inside the decode loop's compile; a top_p of 2 or a temperature of -1 ran as something else)
    assert error(ckpt, ask + ["--max-new-tokens", "0"]) == "chat: generation option max_new_tokens=0 must be >= 1"
    assert error(ckpt, ask + ["--top-p", "2"]) == "chat: generation option top_p=2.0 must be in (0, 1]"
    assert error(ckpt, ask + ["--do-sample", "--temperature", "-1"]) == \
        "chat: generation option temperature=-1.0 must be > 0 (greedy decoding is do_sample=False)"
    assert error(ckpt, ask + ["--num-beams", "0"]) == "chat: generation option num_beams=0 must be >= 1"
    assert error(ckpt, ask + ["--repetition-penalty", "0"]) == \
        "chat: generation option repetition_penalty=0.0 must be > 0 (1: none)"
    beam_sampling = ("chat: generation options num_beams=2 and do_sample=True cannot be combined (beam sampling "
                     "is not supported): use one or the other")      # a traceback after the model loaded
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"question": "Q?"}\n')
    for args in (ask, ["--jsonl", str(jsonl)]):      # refused before the folder is even looked at
        assert error(tmp_path / "nope", args + ["--num-beams", "2", "--do-sample"]) == beam_sampling
    for args in (ask, ["--jsonl", str(jsonl)], ["--interactive"]):   # was: every question's error
        assert error(tmp_path / "nope", args + ["--system", "S <moleculeHere>"]) == \
            "chat: the system prompt 'S <moleculeHere>' holds an entity placeholder; entities go in questions"
    with pytest.raises(SystemExit):
        chat.main(["--checkpoint", str(ckpt), "--jsonl", "q.jsonl", "--batch-size", "0"])
    assert "argument --batch-size: 0 is not a positive integer" in capsys.readouterr().err


def test_flags_of_another_mode_are_refused_not_ignored(tmp_path, capsys):
    """`--question hi --output x.jsonl` wrote no file, `--interactive --smiles CCO` and `--jsonl q --smiles CCO`
    asked without the molecule: each flag that the chosen mode does not use is refused, as `--resume` is."""
    base = ["--checkpoint", str(tmp_path / "nope")]    # refused before the folder is looked at
    for args, message in (
            (["--question", "hi", "--output", "x.jsonl"], "--output needs --jsonl"),
            (["--interactive", "--output", "x.jsonl"], "--output needs --jsonl"),
            (["--question", "hi", "--batch-size", "4"], "--batch-size needs --jsonl"),
            (["--interactive", "--smiles", "CCO"], "--smiles goes with --question only (--interactive: /mol SMILES"),
            (["--jsonl", "q.jsonl", "--smiles", "CCO", "--protein", "MK"],
             "--smiles and --protein go with --question only"),
            (["--jsonl", "q.jsonl", "--protein", "MK"], "--protein goes with --question only")):
        with pytest.raises(SystemExit) as exit_:
            chat.main(base + args)
        assert exit_.value.code == 2
        assert f"error: {message}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "x.jsonl").exists()

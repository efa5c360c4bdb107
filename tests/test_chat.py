"""Generation for BioMedGPT and chat: prompt-only encoding, greedy and beam parity with transformers'
`generate` on the reference composition's spliced embeddings, tokenizer attachment under jit, the Python
API, CLI (one answer, interactive, JSONL), checkpoint folders and bad input (--mesh: test_chat_mesh.py)."""
import argparse
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import chat, model_args
from bmgpt_jax import config as config_lib
from bmgpt_jax.convert import openbiomed
from bmgpt_jax.data import examples
from bmgpt_jax.data.records import Record
from bmgpt_jax.convert.folder import save_pretrained
from bmgpt_jax.data.text import attach_tokenizer, encode_record, format_prompt, load_tokenizer
from bmgpt_jax.models.biomedgpt import BioMedGPT
from bmgpt_jax.models.esm import EsmConfig
from tests.chat_models import demo_biomedgpt
from tests.torch_refs.hf_esm import hf_config

RECORDS = [  # mixed kinds and prompt lengths, answers only for the training-layout check
    Record((("molecule", "CC(=O)Oc1ccccc1C(=O)O"),), "What is this molecule?", "Aspirin."),
    Record((("protein", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"),), "What is the function of this protein?", "DNA binding."),
    Record((("molecule", "C1=CC=C(C=C1)O"), ("protein", "GSHMLEDPVDAFQLGLEHK")), "Do they bind?", "No."),
    Record((("molecule", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C"),), "Name it.", "Caffeine."),
]
N = 20


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(str(shared_data / "tokenizer" / "llama2_tokenizer.model"))


@pytest.fixture(scope="module")
def pair(tok, torch):
    from tests.torch_refs.biomedgpt import TorchBioMedGPT
    ref = TorchBioMedGPT(config_lib.load(EsmConfig, "esm2_tiny"), vocab_size=tok.vocab_size).eval()
    esm = hf_config(config_lib.load(EsmConfig, "esm2_tiny")).to_dict()
    ours = openbiomed.from_state_dict(ref.state_dict(), ref.llm_config(), esm)
    return ref, attach_tokenizer(ours, tok)


@pytest.fixture(scope="module")
def demo_model():
    return demo_biomedgpt()


def prompts_of(records):
    return [chat.make_prompt(r.question, r.entities) for r in records]


def test_prompt_only_encoding_is_the_training_prefix(pair, tok):
    _, ours = pair
    for r in RECORDS:
        prompt = chat.make_prompt(r.question, r.entities)
        assert prompt.text == format_prompt(dataclasses.replace(r, answer="")) and prompt.entities == r.entities
        enc = chat.encode_prompt(ours, prompt, N)
        mols, prots = iter(enc.mols), iter(enc.prots)
        lengths = [len(next(mols)[0]) if kind == "molecule" else len(next(prots)[0]) for kind, _ in r.entities]
        train = encode_record(tok, r, lengths)
        answer = len(tok.encode(r.answer)) + 1  # answer + EOS
        np.testing.assert_array_equal(enc.input_ids, train.input_ids[:-answer])
        assert enc.input_ids[-5:].tolist() == tok.encode("### Assistant: ") and tok.eos_id not in enc.input_ids
        assert not enc.loss_mask.any()


def hf_embeds(ref, tok, torch, records):
    """Left-padded prompt embeddings `[B, t, D]` and mask built by the torch reference composition."""
    rows = []
    for r in records:
        seen = {}
        hook = ref.llm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        try:
            ref.reference_forward(tok, dataclasses.replace(r, answer=""))
        finally:
            hook.remove()
        rows.append(seen["inputs_embeds"][0, :-1])  # the reference appends EOS after the (empty) answer
    t = max(len(x) for x in rows)
    embeds = torch.zeros(len(rows), t, rows[0].shape[-1])
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, x in enumerate(rows):
        embeds[i, t - len(x):], mask[i, t - len(x):] = x, 1
    return embeds, mask


def hf_generate(ref, tok, torch, stops=(), alone=False, **kw):
    """transformers' `generate` from the reference embeddings, as one left-padded batch or (`alone`) one
    prompt at a time; new tokens cut after EOS and padded to N like ours."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOn(StoppingCriteria):  # a stop-word criterion (`stop_at_separator`'s), per row
        def __call__(self, ids, scores, **_):
            done = torch.zeros(ids.shape[0], dtype=torch.bool)
            for s in stops:
                if ids.shape[1] >= len(s):
                    done |= (ids[:, -len(s):] == torch.tensor(s)).all(1)
            return done

    embeds, mask = hf_embeds(ref, tok, torch, RECORDS)
    batches = [(embeds[i:i + 1, mask[i] == 1], None) for i in range(len(RECORDS))] if alone else [(embeds, mask)]
    out = []
    with torch.no_grad():
        for x, m in batches:
            out += ref.llm.generate(inputs_embeds=x, attention_mask=m, max_new_tokens=N, do_sample=False,
                                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                    stopping_criteria=StoppingCriteriaList([StopOn()]), **kw).tolist()
    padded = np.full((len(RECORDS), N), tok.pad_id, np.int64)
    for i, row in enumerate(out):
        row = row[:row.index(tok.eos_id) + 1] if tok.eos_id in row else row
        padded[i, :len(row)] = row
    return padded


def test_greedy_equals_transformers_on_the_reference_embeddings(pair, tok, torch):
    ref, ours = pair
    cfg = chat.generation_config(tok, {"max_new_tokens": N})
    encoded = [chat.encode_prompt(ours, p, N) for p in prompts_of(RECORDS)]
    mine = chat.generate_tokens(ours, encoded, cfg)
    assert len({e.length for e in encoded}) == len(RECORDS)  # different prompt lengths, right-padded
    np.testing.assert_array_equal(mine, hf_generate(ref, tok, torch, stops=cfg.stop_sequences))
    assert len(set(mine.ravel().tolist())) > 8


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_beam_equals_transformers_on_the_reference_embeddings(pair, tok, torch):
    ref, ours = pair
    beam = {"num_beams": 5, "repetition_penalty": 1.5, "max_new_tokens": N}
    cfg = chat.generation_config(tok, beam)   # EOS only, as the reference
    encoded = [chat.encode_prompt(ours, p, N) for p in prompts_of(RECORDS)]
    # HF is run per prompt: on a left-padded embeddings batch its repetition penalty skips each row's first
    # `padding length` new tokens (prompt_ignore_length is meant for padded ids), so rows would not match
    # their own single-prompt result; ours does, batched.
    np.testing.assert_array_equal(chat.generate_tokens(ours, encoded, cfg),
                                  hf_generate(ref, tok, torch, alone=True, num_beams=5, repetition_penalty=1.5))


def test_a_reply_ends_at_any_eos_of_the_lm_config(pair, tok, monkeypatch):
    """A config.json list of EOS ids (`lm.eos_token_id`) ends a reply at any of them, as HF's `generate`:
    here the id greedy decoding says first, so the reply is that one token and nothing is decoded."""
    _, ours = pair
    prompt = prompts_of(RECORDS[:1])
    cfg = chat.generation_config(tok, {"max_new_tokens": N})
    first = int(chat.generate_tokens(ours, [chat.encode_prompt(ours, prompt[0], N)], cfg)[0, 0])
    assert first != tok.eos_id
    both = chat.generation_config(tok, {"max_new_tokens": N}, (first, tok.eos_id))
    assert both.eos_ids == (tok.eos_id, first)
    row = chat.generate_tokens(ours, [chat.encode_prompt(ours, prompt[0], N)], both)[0]
    assert row[0] == first and (row[1:] == tok.pad_id).all()
    lm = dataclasses.replace(ours.config.lm, eos_token_id=(tok.eos_id, first))
    monkeypatch.setattr(ours, "config", dataclasses.replace(ours.config, lm=lm))
    assert chat.answer_prompts(ours, prompt, max_new_tokens=N) == [""]
    assert chat.answer_text(tok, tok.encode("Yes. No.") + [first], eos=(first,)) == "Yes. No."


def test_answers_end_at_eos_as_the_reference_and_at_the_separator_when_asked(tok):
    """The reference's `Conversation.answer` decodes until EOS and keeps what follows the last `Assistant:`,
    stripped; stopping (and cutting) at `###` is `stop_at_separator`, with ids derived from the tokenizer."""
    said = tok.encode("It is a flavonoid. ### Human: And its role? ### Assistant: A plant metabolite.")
    assert chat.generation_config(tok, {}).stop_sequences == ()
    assert chat.answer_text(tok, said + [tok.eos_id, tok.pad_id]) == "A plant metabolite."
    assert chat.generation_config(tok, {"stop_at_separator": True}).stop_sequences == ((835,), (2277, 29937))
    assert chat.answer_text(tok, said + [tok.eos_id], stop_at_separator=True) == "It is a flavonoid."
    assert chat.answer_text(tok, tok.encode("It is aspirin.###Human: next"), True) == "It is aspirin."
    demo = load_tokenizer(None)
    assert all(demo.decode(s).strip() == "###" for s in chat.stop_sequences(demo))
    ap = argparse.ArgumentParser()
    model_args.add_generation_args(ap)     # chat's and evaluate's command lines
    assert model_args.options_of(ap.parse_args([])) == {}
    assert model_args.options_of(ap.parse_args(["--stop-at-separator"])) == {"stop_at_separator": True}


def test_attached_tokenizer_keeps_split_and_jit_working(pair, tok):
    _, ours = pair
    enc = examples.encode_example(tok, RECORDS[2], examples.EncodeOptions("", 256, 64, "error", 1024))
    batch = examples.collate([enc], 128, examples.Budget(1, 32, 64, 2, 1), 64)
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    assert not any("tokenizer" in str(p) for p, _ in nnx.to_flat_state(nnx.state(ours)))

    @jax.jit
    def step(params, rest, batch):
        return nnx.merge(graphdef, params, rest).loss(batch)[0]

    loss = step(params, rest, batch)
    assert np.isfinite(float(loss)) and abs(float(loss) - float(ours.loss(batch)[0])) < 1e-4
    assert nnx.merge(graphdef, params, rest).tokenizer is tok


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

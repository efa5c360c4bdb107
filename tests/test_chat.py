"""Generation for BioMedGPT and chat: prompt-only encoding, greedy and beam parity with transformers'
`generate` on the reference composition's spliced embeddings, tokenizer attachment under jit
(the Python API and the command line: test_chat_cli.py; --mesh: test_chat_mesh.py)."""
import argparse
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import chat, model_args
from bmgpt_jax import config as config_lib
from bmgpt_jax.convert import openbiomed
from bmgpt_jax.data import examples
from bmgpt_jax.data.records import Record
from bmgpt_jax.data.text import attach_tokenizer, encode_record, format_prompt, load_tokenizer
from bmgpt_jax.models.esm import EsmConfig
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

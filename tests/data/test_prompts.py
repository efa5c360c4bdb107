"""Chat prompts (`data.prompts`): the reference's `Conversation` layout (written out here by hand) and one
token per atom, every atom, by default."""
import dataclasses

import numpy as np
import pytest

from bmgpt_jax import config as config_lib
from bmgpt_jax.data import examples, molecules
from bmgpt_jax.data.prompts import encode_prompt, make_prompt
from bmgpt_jax.data.records import Record
from bmgpt_jax.data.text import DEFAULT_SYSTEM, format_prompt, load_tokenizer
from bmgpt_jax.models.gin import GinConfig

MOL, PROT = "<molecule><moleculeHere></molecule>", "<protein><proteinHere></protein>"


def reference_prompt(messages, system=DEFAULT_SYSTEM):
    """The reference's `_wrap_prompt`: `{system}###`, then `" Human: {message} ###"` per human message
    (`" Assistant: {answer} ###"` per answer) and a final `" Assistant: "`. Its `append_molecule` /
    `append_protein` each add a human message holding the entity's tag; `ask` appends the question to the
    last one when that ends with a tag. An empty message (an answer that began with EOS) is a bare
    `"{role}: "`, with no `###` after it."""
    text = system + "### "
    for role, message in messages:
        text += f"{role}: {message} ### " if message else f"{role}: "
    return text + "Assistant: "


def test_several_entities_are_one_human_turn_each_the_question_after_the_last():
    ents = [("molecule", "CCO"), ("protein", "MKV")]
    expected = reference_prompt([("Human", MOL), ("Human", f"{PROT} Does it bind?")])
    assert expected.endswith(f"### Human: {MOL} ### Human: {PROT} Does it bind? ### Assistant: ")
    prompt = make_prompt("Does it bind?", ents)
    assert prompt.text == expected and prompt.entities == tuple(ents)
    three = [("molecule", "CCO"), ("molecule", "CCN"), ("protein", "MKV")]
    assert make_prompt("Compare.", three).text == reference_prompt([("Human", MOL), ("Human", MOL),
                                                                    ("Human", f"{PROT} Compare.")])
    # one entity, none, and a second turn after an answer: the same rules
    assert make_prompt("Describe it.", ents[:1]).text == reference_prompt([("Human", f"{MOL} Describe it.")])
    assert make_prompt("Hello?", [], "S ").text == reference_prompt([("Human", "Hello?")], "S ")
    first = make_prompt("Does it bind?", ents)
    human = first.text[len(DEFAULT_SYSTEM + "### Human: "):-len(" ### Assistant: ")]
    again = make_prompt("And now?", ents, None, [(human, "Yes.")], first.entities)
    assert again.text == reference_prompt([("Human", MOL), ("Human", f"{PROT} Does it bind?"),
                                           ("Assistant", "Yes."), ("Human", MOL), ("Human", f"{PROT} And now?")])
    assert again.entities == tuple(ents + ents)
    empty = make_prompt("And now?", [], None, [(human, "")], first.entities)   # the model said EOS first
    assert empty.text == reference_prompt([("Human", MOL), ("Human", f"{PROT} Does it bind?"), ("Assistant", ""),
                                           ("Human", "And now?")])
    assert "### Assistant: Human: And now?" in empty.text
    # a question with its own placeholders keeps them where they are, in one turn
    inline = make_prompt("Does <proteinHere> bind <moleculeHere>?", ents, "")
    assert inline.text == f"### Human: Does {PROT} bind {MOL}? ### Assistant: "


def test_training_records_with_several_entities_use_the_chat_layout():
    record = Record((("molecule", "CCO"), ("protein", "MKV")), "Does it bind?", "Yes.")
    prompt = make_prompt(record.question, record.entities)
    assert format_prompt(record) == prompt.text + "Yes."
    assert format_prompt(dataclasses.replace(record, answer="")) == prompt.text


def test_every_atom_of_a_large_molecule_is_a_token_by_default(shared_data):
    """The reference gives the LLM one token per atom, every atom (its 256-node cut is commented out):
    ChEBI-20's CID 92136174, 312 atoms, gets 312 atom tokens in chat and in training by default."""
    rows = (line.split("\t") for line in (shared_data / "molecules" / "chebi20_test.txt").read_text().splitlines())
    smiles = next(r[1] for r in rows if r[0] == "92136174")
    n = len(molecules.featurize(smiles)[0])
    assert n == 312
    gin = GinConfig()
    tok = load_tokenizer(str(shared_data / "tokenizer" / "llama2_tokenizer.model"))
    prompt = make_prompt("Please describe this molecule.", [("molecule", smiles)])
    asked = encode_prompt(tok, prompt, max_new_tokens=256, context=4096, max_atoms=gin.max_atoms,
                          over_cap=gin.over_cap)
    head, tail = prompt.text.split("<moleculeHere>")
    assert asked.input_ids.tolist() == tok.encode(head, bos=True) + [0] * n + tok.encode(tail)
    node_pos = asked.mols[0][3]
    np.testing.assert_array_equal(node_pos, len(tok.encode(head, bos=True)) + np.arange(n))
    record = Record((("molecule", smiles),), "Please describe this molecule.", "A glycan.")
    opts = examples.EncodeOptions(DEFAULT_SYSTEM, 2048, gin.max_atoms, gin.over_cap, 1024)
    np.testing.assert_array_equal(examples.encode_example(tok, record, opts).mols[0][3], node_pos)
    assert gin.max_atoms is None and config_lib.load(GinConfig, "gin_graphmvp").max_atoms is None
    # too long for the context is still refused (chat) or dropped (training: `too_long`)
    with pytest.raises(ValueError, match=r"\(\d+ text tokens; molecule 'CC\(=O\)N.*': 312 tokens\) plus "
                                         r"max_new_tokens=256 exceeds the context of 512"):
        encode_prompt(tok, prompt, max_new_tokens=256, context=512, max_atoms=None, over_cap="subsample")
    assert examples.encode_example(tok, record, dataclasses.replace(opts, max_len=256)) == "too_long"


def test_a_system_prompt_is_checked_alone_as_make_prompt_checks_it():
    """`check_system`, which `make_prompt` calls, lets the command lines refuse `--system` before anything loads."""
    from bmgpt_jax.data.prompts import check_system
    check_system(None)
    check_system("Be brief. ")
    for bad, error, message in (("S <moleculeHere>", ValueError, "system prompt 'S <moleculeHere>' holds an entity "
                                 "placeholder"), (7, TypeError, "system must be a string")):
        with pytest.raises(error, match=message):
            check_system(bad)
        with pytest.raises(error, match=message):
            make_prompt("Q?", (), bad)


def test_a_prompt_too_long_by_itself_names_no_new_tokens():
    """Evaluation checks a labelled prompt alone (`max_new_tokens=0`); the error said `plus max_new_tokens=0`
    to a user who had passed `--max-new-tokens 64`."""
    tok = load_tokenizer(None)
    prompt = make_prompt("What is it?", [("protein", "MKT" * 20)])
    fit = dict(context=64, max_atoms=None, over_cap="subsample")
    with pytest.raises(ValueError, match=r"^prompt of \d+ positions \(\d+ text tokens; protein 'MKTM.*': 62 tokens\) "
                                         r"exceeds the context of 64$"):
        encode_prompt(tok, prompt, max_new_tokens=0, **fit)
    with pytest.raises(ValueError, match=r"\) plus max_new_tokens=8 exceeds the context of 64$"):
        encode_prompt(tok, prompt, max_new_tokens=8, **fit)

"""Tokenizer wrapper, prompt template and loss-mask layout, demo set."""
import numpy as np
import pytest

from bmgpt_jax.data import demo
from bmgpt_jax.data.records import Record
from bmgpt_jax.data.text import (DEFAULT_SYSTEM, Tokenizer, encode_record, format_prompt, load_tokenizer,
                                 prompt_segments, train_tokenizer)

MOL = Record((("molecule", "CCO"),), "What is it?", "Ethanol.")
PROT = Record((("protein", "MKTAY"),), "What is the function of this protein?", "A kinase.")


@pytest.fixture(scope="module")
def llama(shared_data):
    return Tokenizer.from_file(shared_data / "tokenizer" / "llama2_tokenizer.model")


def test_llama_ids_and_pad(llama):
    assert llama.encode("I believe the meaning of life is") == [306, 4658, 278, 6593, 310, 2834, 338]
    assert (llama.bos_id, llama.eos_id, llama.unk_id, llama.pad_id, llama.vocab_size) == (1, 2, 0, 32000, 32001)
    assert llama.encode("hi", bos=True, eos=True) == [1, 7251, 2]
    assert llama.decode([1, 306, 4658, 2, 32000, 278]) == "I believe"     # stops at EOS, drops [PAD]


@pytest.mark.parametrize("which", ["llama", "demo"])
def test_hf_tokenizer_config_makes_transformers_encode_as_ours(which, request, tmp_path, torch):
    """`tokenizer.model` + `Tokenizer.hf_config` in a folder: transformers' AutoTokenizer gives our ids
    (BOS first, no EOS), knows `[PAD]` at `pad_id`, has the model's vocabulary size and decodes back."""
    import json

    import transformers
    tok = request.getfixturevalue("llama") if which == "llama" else load_tokenizer(None)
    (tmp_path / "tokenizer.model").write_bytes(tok.model_proto)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok.hf_config(4096)))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Aspirin is an NSAID.", "CC(=O)Oc1ccccc1C(=O)O", DEFAULT_SYSTEM + "### Human: <molecule>",
             "</molecule> What is it?"]
    if which == "llama":
        texts += ["### Assistant: ", "line\nbreak\ttab", "µ-opioid, 5′-UTR"]
    # (transformers' tokenizer splits runs of spaces otherwise than SentencePiece: "a  b" -> ▁a ▁▁ b, not ▁a ▁ ▁b;
    # and it skips the demo model's normalisation, which drops a trailing space and maps a newline to a space
    # and µ to μ)
    assert [hf(t).input_ids for t in texts] == [tok.encode(t, bos=True) for t in texts]
    assert (len(hf), hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.vocab_size, tok.pad_id, 1, 2)
    assert hf.model_max_length == 4096
    assert hf.decode(tok.encode(texts[0], bos=True), skip_special_tokens=True) == texts[0]


def test_prompt_template_matches_reference():
    assert format_prompt(MOL) == (DEFAULT_SYSTEM + "### Human: <molecule><moleculeHere></molecule> What is it? "
                                  "### Assistant: Ethanol.")
    assert format_prompt(PROT, system="S ") == ("S ### Human: <protein><proteinHere></protein> What is the "
                                                "function of this protein? ### Assistant: A kinase.")
    two = Record((("molecule", "C"), ("protein", "MK")), "Bind?", "Yes.")
    assert prompt_segments(two, "") == ["### Human: <molecule>", 0, "</molecule> ### Human: <protein>", 1,
                                        "</protein> Bind? ### Assistant: ", "Yes."]
    assert prompt_segments(Record((), "Q?", "A."), "") == ["### Human: Q? ### Assistant: ", "A."]


def test_encode_layout_exact(llama):
    enc = encode_record(llama, MOL, [3])
    head = llama.encode(DEFAULT_SYSTEM + "### Human: <molecule>", bos=True)
    mid = llama.encode("</molecule> What is it? ### Assistant: ")
    ans = llama.encode("Ethanol.", eos=True)
    assert enc.input_ids.tolist() == head + [0, 0, 0] + mid + ans
    assert enc.loss_mask.tolist() == [0] * (len(head) + 3 + len(mid)) + [1] * len(ans)
    assert enc.slot_starts == [len(head)]
    assert enc.input_ids.tolist().count(llama.bos_id) == 1 and enc.input_ids[-1] == llama.eos_id
    assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == np.int32
    # two entities: slots in record order, each entity its own human turn
    two = encode_record(llama, Record((("molecule", "C"), ("protein", "MK")), "Bind?", "Yes."), [1, 4], system="")
    s0, s1 = two.slot_starts
    assert two.input_ids[s0] == 0 and two.input_ids[s1:s1 + 4].tolist() == [0] * 4
    assert two.input_ids[s0 + 1:s1].tolist() == llama.encode("</molecule> ### Human: <protein>")


def test_plain_text_is_all_target(llama):
    enc = encode_record(llama, Record((), "", "I believe the meaning of life is"), [])
    assert enc.input_ids.tolist() == [1, 306, 4658, 278, 6593, 310, 2834, 338, 2]
    assert enc.loss_mask.tolist() == [0] + [1] * 8
    assert encode_record(llama, Record((), "", "I believe the meaning"), [], max_len=3).input_ids.tolist() == [1, 306, 4658]


def test_demo_records_are_rdkit_answers():
    recs = demo.demo_records(20)
    assert len(recs) == 20 * len(demo.QUESTIONS)                     # the first 20 NCI SMILES all parse
    first = {r.question: r.answer for r in recs if r.id == "NCI1"}
    assert recs[0].entities == (("molecule", "CC1=CC(=O)C=CC1=O"),)   # 2-methyl-1,4-benzoquinone
    assert first["What is the molecular formula of this molecule?"] == "The molecular formula is C7H6O2."
    assert first["What is the molecular weight of this molecule?"] == "The molecular weight is 122.12 g/mol."
    assert first["How many rings does this molecule have?"] == "It has 1 ring(s)."
    assert first["How many hydrogen bond donors does this molecule have?"] == "It has 0 hydrogen bond donor(s)."


def test_demo_tokenizer_deterministic_and_cached(tmp_path, monkeypatch):
    texts = [DEFAULT_SYSTEM] + demo.demo_texts(30)
    monkeypatch.setenv("BMGPT_CACHE", str(tmp_path / "a"))
    a = train_tokenizer(texts, vocab_size=400)
    monkeypatch.setenv("BMGPT_CACHE", str(tmp_path / "b"))
    b = train_tokenizer(texts, vocab_size=400)
    assert a.model_proto == b.model_proto
    assert list((tmp_path / "b" / "tokenizers").glob("demo-*.model"))
    text = "The molecular weight is 122.12 g/mol."
    assert a.decode(a.encode(text, bos=True, eos=True)) == text
    assert (a.bos_id, a.eos_id, a.pad_id) == (1, 2, a.sp.get_piece_size())
    assert a.decode(a.encode("Zebra ünïcode")) == "Zebra ünïcode"       # byte fallback: nothing is lost


def test_the_demo_tokenizer_is_found_by_its_inputs_without_the_demo_text(tmp_path, monkeypatch):
    """`load_tokenizer("")` trains on the demo text once; a later process finds the same model by a key of
    that text's inputs without computing the text, and an input that changes (here rdkit's version) is a
    new key, so the text is computed and trained on again."""
    import rdkit
    monkeypatch.setenv("BMGPT_CACHE", str(tmp_path))
    first = load_tokenizer("")
    trained = [DEFAULT_SYSTEM, "### Human: <molecule></molecule> <protein></protein> ### Assistant:"]
    assert first.model_proto == train_tokenizer(trained + demo.demo_texts()).model_proto
    calls = []
    monkeypatch.setattr(demo, "demo_texts", lambda *a: calls.append(a) or [])
    assert load_tokenizer("").model_proto == first.model_proto and not calls
    monkeypatch.setattr(rdkit, "__version__", rdkit.__version__ + ".changed")
    load_tokenizer("")
    assert calls == [()]


def test_load_tokenizer_path_or_demo(shared_data):
    assert load_tokenizer(str(shared_data / "tokenizer" / "llama2_tokenizer.model")).vocab_size == 32001
    assert load_tokenizer(str(shared_data / "tokenizer")).encode("I believe") == [306, 4658]   # the folder
    demo_tok = load_tokenizer("")
    assert demo_tok.vocab_size < 32001 and demo_tok.decode(demo_tok.encode("It has 3 ring(s).")) == "It has 3 ring(s)."


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path):
    """sentencepiece's own error (RuntimeError: INTERNAL: ...(109)) names no file, and it accepts empty bytes as a
    model that fails at the first encode: both are a ValueError naming the file, once (also through
    inputs.check_tokenizer, which the command lines call)."""
    from bmgpt_jax import inputs
    (tmp_path / "README.md").write_text("# a project\n")
    (tmp_path / "empty.model").write_bytes(b"")
    for name, detail in [("README.md", "INTERNAL: "), ("empty.model", "it is empty (0 bytes)")]:
        path = tmp_path / name
        for load in (load_tokenizer, Tokenizer.from_file, inputs.check_tokenizer):
            with pytest.raises(ValueError) as e:
                load(str(path))
            message = str(e.value)
            assert message.startswith(f"{path} is not a readable SentencePiece tokenizer model") and detail in message
            assert "\n" not in message and message.count(str(path)) == 1, message
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "tokenizer.model").write_text("not a model")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'folder' / 'tokenizer.model'} is not a readable"):
        load_tokenizer(str(tmp_path / "folder"))

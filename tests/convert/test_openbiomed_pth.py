"""OpenBioMed's `.pth` loads strictly, as OpenBioMed loads it (`model.load_state_dict(torch.load(...))` in
`open_biomed/utils/chat_utils.py`): a `.pth` -> model folder -> `.pth` round trip gives back every key,
dtype and bit, what our model does not use included; a folder without those tensors exports a file whose
missing buffers are computed as OpenBioMed's modules compute them and whose unused pooler and contact
head are zeros, named in one stderr line."""
import json
import logging

import numpy as np
import pytest

import convert_weights
from bmgpt_jax import config as config_lib
from bmgpt_jax.convert import folder
from bmgpt_jax.data.text import load_tokenizer
from bmgpt_jax.models.esm import EsmConfig
from tests.biomedgpt_pair import tiny_pair
from tests.torch_refs.hf_esm import hf_config

VOCAB = 32001
ZEROS = [f"prot_structure_encoder.{k}" for k in ("pooler.dense.weight", "pooler.dense.bias",
                                                 "contact_head.regression.weight", "contact_head.regression.bias")]
IDS = np.array([[0, 5, 6, 7, 2]])


@pytest.fixture(scope="module")
def esm_cfg():
    return config_lib.load(EsmConfig, "esm2_tiny")


@pytest.fixture(scope="module")
def pair(torch):
    """(the reference BioMedGPTV-layout torch model, ours with its weights)."""
    return tiny_pair(VOCAB)


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(str(shared_data / "tokenizer" / "llama2_tokenizer.model"))


@pytest.fixture(scope="module")
def bare(pair, tok, tmp_path_factory):
    """A model folder written from our model (as training's export writes it, `.pth` included): it holds
    none of the tensors our model does not use."""
    return folder.save_pretrained(pair[1], tok, tmp_path_factory.mktemp("bare") / "model", pth=True)


def older_transformers(sd: dict, torch, num_layers: int) -> dict:
    """`sd` as saved by OpenBioMed with the transformers of its time and a float16 LLM: the ESM's rotary
    `inv_freq` once per layer (in float16) with `embeddings.position_ids`, the Llama's `inv_freq` in
    float16: keys and dtypes today's transformers would not write."""
    out = {k: v for k, v in sd.items() if k != "prot_structure_encoder.rotary_embeddings.inv_freq"}
    for i in range(num_layers):
        out[f"prot_structure_encoder.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = \
            sd["prot_structure_encoder.rotary_embeddings.inv_freq"].half()
    out["prot_structure_encoder.embeddings.position_ids"] = torch.arange(1026)[None]
    return {k: v.half() if k.startswith("llm.") and k.endswith("inv_freq") else v for k, v in out.items()}


def test_pth_to_folder_to_pth_gives_back_every_key_bit_for_bit(pair, tok, esm_cfg, tmp_path, torch, caplog):
    ref, _ = pair
    src = older_transformers(ref.state_dict(), torch, esm_cfg.num_layers)
    torch.save(src, tmp_path / "biomedgpt_10b.pth")
    folder.from_openbiomed(tmp_path / "biomedgpt_10b.pth", tmp_path / "model", ref.llm_config(),
                           hf_config(esm_cfg).to_dict(), tok, check=True)
    folder.from_pretrained(tmp_path / "model")            # what the folder carries over does not hinder loading
    with caplog.at_level(logging.INFO, logger="bmgpt_jax.convert"):
        folder.to_openbiomed(tmp_path / "model", tmp_path / "back.pth", check=True)
    assert "carried over 9 tensor(s)" in caplog.text and "filled" not in caplog.text
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == src.keys()
    bad = [k for k in src if back[k].dtype != src[k].dtype or not torch.equal(back[k], src[k])]
    assert not bad, bad


def test_a_folder_without_them_exports_a_pth_openbiomed_loads_strictly(pair, bare, esm_cfg, tmp_path, torch):
    from tests.torch_refs.biomedgpt import TorchBioMedGPT
    ref, ours = pair
    folder.to_openbiomed(bare, tmp_path / "back.pth", check=True)
    src = ref.state_dict()
    ids = torch.tensor(IDS)
    for path in (tmp_path / "back.pth", bare / folder.FILES["pth"]):       # to_openbiomed's, the export's
        sd = torch.load(path, weights_only=True)
        assert sd.keys() == src.keys()
        # the buffers bit for bit as OpenBioMed's modules compute them, the unused parameters zeros
        for k, want in src.items():
            want = torch.zeros_like(want) if k in ZEROS else want
            assert sd[k].dtype == want.dtype and torch.equal(sd[k], want), k
        fresh = TorchBioMedGPT(esm_cfg, vocab_size=VOCAB, seed=1).eval()
        fresh.load_state_dict(sd)                        # strict, as OpenBioMed's chat_utils loads it
        with torch.no_grad():
            esm = fresh.prot_structure_encoder(ids).last_hidden_state
            logits = fresh.llm(ids).logits
            assert torch.equal(esm, ref.prot_structure_encoder(ids).last_hidden_state)
            assert torch.equal(logits, ref.llm(ids).logits)
        np.testing.assert_allclose(esm.numpy(), np.asarray(ours.prot_structure_encoder(IDS)), atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits.numpy(), np.asarray(ours.llm(IDS)), atol=1e-4, rtol=0)


def test_the_zeros_are_named_in_one_stderr_line(bare, tmp_path, capsys):
    capsys.readouterr()
    assert convert_weights.main(["to_openbiomed", str(bare), str(tmp_path / "back.pth")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("back.pth: filled 4 tensor(s) with zeros because no source had them")
    assert err[0].count(", prot_structure_encoder.") == 3 and all(k in err[0] for k in ZEROS)
    assert "computed 3 deterministic buffer(s)" in err[0]                  # two Llama layers, the ESM's one


def hub_lm_config(ref, **changes) -> dict:
    """BioMedGPT-LM-7B's own config.json as the Hub has it for `ref`'s decoder: vocab_size 32000 (no `[PAD]`;
    OpenBioMed resizes to 32001 after building the LLM from it), pad_token_id 0."""
    return {**ref.llm_config(), "vocab_size": VOCAB - 1, "pad_token_id": 0, **changes}


def release_folder(d, ref, esm_cfg, tok, torch, **lm_changes):
    """An OpenBioMed release with the configs copied in: the `.pth` (32001 token rows), BioMedGPT-LM-7B's
    config.json as llm_config.json, the ESM's as esm_config.json, the tokenizer."""
    d.mkdir()
    torch.save(ref.state_dict(), d / folder.FILES["pth"])
    (d / folder.FILES["lm"]).write_text(json.dumps(hub_lm_config(ref, **lm_changes)))
    (d / folder.FILES["esm"]).write_text(json.dumps(hf_config(esm_cfg).to_dict()))
    (d / folder.FILES["tokenizer"]).write_bytes(tok.model_proto)
    return d


def test_a_release_whose_lm_config_says_32000_loads_with_the_pth_s_32001_rows(pair, tok, esm_cfg, tmp_path, torch,
                                                                              capsys):
    """The Hub's BioMedGPT-LM-7B config.json (32000) beside the released `.pth` (32001 rows, `[PAD]`
    added by OpenBioMed's resize_token_embeddings): the rows win, said in one line, as in `chat`."""
    from bmgpt_jax import chat
    ref, ours = pair
    d = release_folder(tmp_path / "release", ref, esm_cfg, tok, torch)
    model = folder.from_pretrained(d)
    assert model.config.lm.vocab_size == VOCAB
    np.testing.assert_array_equal(np.asarray(model.llm(IDS)), np.asarray(ours.llm(IDS)))
    capsys.readouterr()
    argv = ["--checkpoint", str(d), "--smiles", "CCO", "--question", "What is it?", "--max-new-tokens", "2"]
    assert chat.main(argv) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "token rows" in line]
    assert said == [f"{d / folder.FILES['pth']}: its {VOCAB} token rows override {d / folder.FILES['lm']}'s "
                    f"vocab_size {VOCAB - 1} (as OpenBioMed's resize_token_embeddings after adding [PAD])"]


def test_fewer_rows_than_the_lm_config_s_vocab_or_two_row_counts_are_one_error(pair, tok, esm_cfg, tmp_path, torch,
                                                                                capsys):
    from bmgpt_jax import chat
    ref, _ = pair
    d = release_folder(tmp_path / "release", ref, esm_cfg, tok, torch, vocab_size=VOCAB + 1)
    pth, lm = d / folder.FILES["pth"], d / folder.FILES["lm"]
    want = (f"{pth}: llm.model.embed_tokens.weight has {VOCAB} token rows, fewer than {lm}'s vocab_size "
            f"{VOCAB + 1}: not a checkpoint of this LM config")
    with pytest.raises(ValueError) as e:
        folder.from_pretrained(d)
    assert str(e.value) == want
    capsys.readouterr()
    assert chat.main(["--checkpoint", str(d), "--question", "Q?", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(want), err
    sd = ref.state_dict()
    sd["llm.lm_head.weight"] = sd["llm.lm_head.weight"][:-1]
    torch.save(sd, pth)
    lm.write_text(json.dumps(hub_lm_config(ref)))
    with pytest.raises(ValueError, match=rf"^{pth}: llm.model.embed_tokens.weight has {VOCAB} token rows but "
                                         rf"llm.lm_head.weight has {VOCAB - 1} \({pth}\): not one vocabulary$"):
        folder.from_pretrained(d)

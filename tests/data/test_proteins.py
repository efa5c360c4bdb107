"""ESM tokenizer: ids identical to transformers' EsmTokenizer on real Swiss-Prot sequences; bad input."""
import numpy as np
import pytest

from bmgpt_jax.data import proteins
from bmgpt_jax.data.proteins import SequenceTooLongError, tokenize
from tests.torch_refs.hf_esm import esm_tokenizer


@pytest.fixture(scope="session")
def swissprot(shared_data):
    return proteins.read_sequences_tsv(shared_data / "proteins" / "swissprot_function_pairs.tsv")


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory):
    return esm_tokenizer(tmp_path_factory.mktemp("esm_vocab"))


def test_alphabet_is_esm2_vocabulary(hf_tokenizer):
    assert len(proteins.ALPHABET) == 33
    assert hf_tokenizer.get_vocab() == proteins.TOKEN_TO_ID
    assert (proteins.CLS_ID, proteins.PAD_ID, proteins.EOS_ID, proteins.MASK_ID) == (0, 1, 2, 32)


@pytest.mark.parametrize("max_length", [1024, 200])
def test_ids_match_hf_on_all_swissprot(swissprot, hf_tokenizer, max_length):
    seqs, names = swissprot
    assert len(seqs) == 141
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tokenize(seqs, max_length=max_length, ids=names)
    ref = hf_tokenizer(seqs, truncation=True, max_length=max_length, padding=True, return_tensors="np")
    assert ids.dtype == mask.dtype == np.int32
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert ids.shape == (141, max_length)  # some sequences are longer, so the longest row is full


def test_framing_padding_and_mask_token(hf_tokenizer):
    ids, mask = tokenize(["MKV", "A<mask>C"], pad_to=8)
    np.testing.assert_array_equal(ids, [[0, 20, 15, 7, 2, 1, 1, 1], [0, 5, 32, 23, 2, 1, 1, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1, 0, 0, 0]] * 2)
    assert list(ids[1, :5]) == hf_tokenizer("A<mask>C")["input_ids"]
    with pytest.raises(ValueError, match="pad_to=4"):
        tokenize(["MKVLA"], pad_to=4)


def test_truncation_is_reported_and_can_be_an_error():
    with pytest.warns(UserWarning, match=r"1 sequence\(s\) to 3 residues: P12345 \(6\)"):
        ids, mask = tokenize(["MKVLAA", "MK"], max_length=5, ids=["P12345", "Q1"])
    np.testing.assert_array_equal(ids, [[0, 20, 15, 7, 2], [0, 20, 15, 2, 1]])
    with pytest.raises(SequenceTooLongError, match="P12345: 6 residues exceed max_length=5"):
        tokenize(["MKVLAA"], max_length=5, ids=["P12345"], overflow="error")


@pytest.mark.parametrize("seq, piece, pos", [("MKVJLA", "J", 4), ("MKvL", "v", 3), ("MK VL", " ", 3),
                                             ("MK<foo>", "<foo>", 3)])
def test_bad_residue_names_letter_position_and_id(seq, piece, pos):
    with pytest.raises(ValueError) as e:
        tokenize(["MK", seq], ids=["ok", "sp|P99999"])
    msg = str(e.value)
    assert f"sp|P99999: residue {piece!r} at position {pos}" in msg


def test_empty_and_malformed_input():
    with pytest.raises(ValueError, match="#1: empty protein sequence"):
        tokenize(["MK", ""])
    with pytest.raises(ValueError, match="no sequences"):
        tokenize([])
    with pytest.raises(TypeError, match="single str"):
        tokenize("MKV")
    with pytest.raises(ValueError, match="2 sequences but 1 ids"):
        tokenize(["MK", "MV"], ids=["a"])

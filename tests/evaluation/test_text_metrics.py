"""MolT5's text metrics: hand-checked cases (BLEU on word pieces, METEOR with WordNet synonyms, ROUGE on raw
strings, the [CLS] prefix, the 512-piece cut, empty predictions), MolT5's script rewritten step by step on
real ChEBI-20 descriptions, and the one-line errors for a missing vocabulary or WordNet."""
import csv
import math

import pytest

from bmgpt_jax.evaluate import text_metrics
from bmgpt_jax.evaluation import text_metrics as tm


@pytest.fixture(scope="module")
def resources(shared_data):
    """The sample folder's SciBERT vocabulary and WordNet (the defaults)."""
    vocab = shared_data / "tokenizer" / "scibert_scivocab_uncased" / "vocab.txt"
    assert tm.default_vocab() == str(vocab) and tm.default_nltk_data() == str(shared_data / "nltk_data")
    tok = tm.load_text_tokenizer(None)
    assert len(tok.get_vocab()) == tm.SCIBERT_VOCAB_SIZE
    return tok


def meteor(m, hyp_len, ref_len, chunks):
    """nltk's METEOR of one pair: harmonic mean (alpha 0.9) times (1 - 0.5 (chunks / m)^3)."""
    p, r = m / hyp_len, m / ref_len
    return p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (chunks / m) ** 3)


def test_by_hand(resources):
    tok = resources
    ref, hyp = "The cat sat on the mat.", "[CLS] the cat sat on a mat."
    assert tm.word_pieces(tok, ref) == ["the", "cat", "sat", "on", "the", "mat", "."]
    assert tm.word_pieces(tok, tm.strip_cls(hyp)) == ["the", "cat", "sat", "on", "a", "mat", "."]
    m = text_metrics([ref], [hyp])
    assert set(m) == set(tm.KEYS)
    # 7 pieces each (no brevity penalty): 1-grams 6/7; 2-grams the cat, cat sat, sat on, mat . -> 4/6;
    # 3-grams 2/5, 4-grams 1/4
    assert m["bleu2"] == pytest.approx(math.sqrt(6 / 7 * 4 / 6))
    assert m["bleu4"] == pytest.approx((6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    # 6 matches in 3 chunks: nltk matches from the end, so the prediction's "the" takes the reference's
    # second "the": (the) (cat sat on) (mat .)
    assert m["meteor"] == pytest.approx(meteor(6, 7, 7, 3))
    # ROUGE on raw words (punctuation dropped): the cat sat on the mat | the cat sat on a mat
    assert m["rouge1"] == pytest.approx(5 / 6) and m["rouge2"] == pytest.approx(3 / 5)
    assert m["rougeL"] == pytest.approx(5 / 6)


def test_meteor_uses_wordnet_synonyms_and_the_corpus_is_one_bleu(resources):
    m = text_metrics(["The auto is red."], ["The car is red."])     # car.n.01 lists auto: all 5 pieces match
    assert m["meteor"] == pytest.approx(meteor(5, 5, 5, 1))
    assert text_metrics(["The auto is red."], ["The bus is red."])["meteor"] == pytest.approx(meteor(4, 5, 5, 2))
    # corpus BLEU sums n-gram counts over pairs: 1-grams (2 + 1) / 4, 2-grams (1 + 0) / 2
    assert text_metrics(["alpha beta", "gamma delta"], ["alpha beta", "gamma omega"])["bleu2"] == \
        pytest.approx(math.sqrt(3 / 4 * 1 / 2))


def test_empty_predictions_and_long_texts(resources):
    # an empty prediction is an empty hypothesis: it shortens the corpus (brevity penalty exp(1 - 6/4)) and,
    # as in nltk's `modified_precision` (denominator at least 1), adds one unmatched n-gram of every order
    one = text_metrics(["alpha beta gamma delta"], ["alpha beta gamma delta"])
    assert all(one[k] == pytest.approx(1.0) for k in ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL"))
    two = text_metrics(["alpha beta gamma delta", "alpha beta"], ["alpha beta gamma delta", ""])
    assert two["bleu4"] == pytest.approx(math.exp(1 - 6 / 4) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    assert two["rougeL"] == pytest.approx(0.5) and two["meteor"] == pytest.approx(meteor(4, 4, 4, 1) / 2)
    assert text_metrics(["alpha beta"], [""]) == {k: 0.0 for k in tm.KEYS}
    # only the first 512 pieces count: the same 512 words then different tails score a perfect BLEU
    words = [f"w{i % 50}" for i in range(600)]
    long_ref = " ".join(words)
    long_hyp = " ".join(words[:256] + ["x"] * 400)      # "w0" -> 2 pieces, so word 256 starts past piece 512
    assert len(tm.word_pieces(resources, long_ref)) == tm.MAX_PIECES
    assert text_metrics([long_ref], [long_hyp])["bleu4"] == pytest.approx(1.0)
    assert text_metrics([long_ref], [long_hyp])["rougeL"] < 0.6          # ROUGE reads the whole strings


def test_molt5_protocol_on_chebi20(shared_data, resources):
    """MolT5's `text_translation_metrics.py` step by step (its tokenizer loaded the other way, through
    `from_pretrained` of the folder), on 60 real ChEBI-20 descriptions against perturbed predictions."""
    import numpy as np
    from nltk.translate.bleu_score import corpus_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer
    from transformers import BertTokenizerFast
    with open(shared_data / "molecules" / "chebi20_test.txt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:60]
    gts = [r["description"] for r in rows]
    outs = []
    for i, gt in enumerate(gts):       # kept, truncated, swapped with a neighbour, emptied, [CLS]-prefixed
        words = gt.split()
        outs.append([gt, " ".join(words[:len(words) // 2]), gts[(i + 1) % len(gts)], "",
                     "[CLS] " + " ".join(words[::-1])][i % 5])
    scibert = BertTokenizerFast.from_pretrained(str(shared_data / "tokenizer" / "scibert_scivocab_uncased"))
    tm.load_wordnet(None)

    def pieces(text):
        toks = scibert.tokenize(text)[:512]                  # truncation=True, max_length=512, padding stripped
        return [t for t in toks if t not in ("[PAD]", "[CLS]", "[SEP]")]
    refs, hyps, meteors = [], [], []
    for gt, out in zip(gts, outs):
        out = out[6:] if out.startswith("[CLS] ") else out
        refs.append([pieces(gt)])
        hyps.append(pieces(out))
        meteors.append(meteor_score([pieces(gt)], pieces(out)))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge = [scorer.score(out[6:] if out.startswith("[CLS] ") else out, gt) for gt, out in zip(gts, outs)]
    want = {"bleu2": corpus_bleu(refs, hyps, weights=(.5, .5)),
            "bleu4": corpus_bleu(refs, hyps, weights=(.25, .25, .25, .25)), "meteor": np.mean(meteors),
            **{k: np.mean([s[k].fmeasure for s in rouge]) for k in ("rouge1", "rouge2", "rougeL")}}
    got = text_metrics(gts, outs)
    assert got == pytest.approx(want, rel=1e-12)
    assert 0.2 < got["bleu4"] < got["bleu2"] < 0.9 and 0.2 < got["meteor"] < 0.9


def test_bad_input_and_missing_resources(tmp_path, resources, monkeypatch):
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        text_metrics(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="prediction 1 is int"):
        text_metrics(["a", "b"], ["a", 3])
    with pytest.raises(tm.MissingResource, match="from_pretrained"):
        tm.load_text_tokenizer(str(tmp_path / "absent"))
    import transformers                      # transformers 5's `vocab_file=` silently builds 5 entries: caught
    real = transformers.BertTokenizerFast
    monkeypatch.setattr(transformers, "BertTokenizerFast",
                        type("Buggy", (real,), {"__init__": lambda self, vocab=None, **kw: real.__init__(
                            self, vocab_file=vocab, **kw)}))
    with pytest.raises(ValueError, match="loaded 5 entries but the file has 31090"):
        tm.load_text_tokenizer.__wrapped__(tm.default_vocab())
    monkeypatch.undo()
    (tmp_path / "novocab").mkdir()                    # from_pretrained would build 5 entries from it: refused
    with pytest.raises(tm.MissingResource, match="novocab' holds no vocab.txt"):
        tm.load_text_tokenizer.__wrapped__(str(tmp_path / "novocab"))
    tiny = real(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])})
    monkeypatch.setattr(real, "from_pretrained", classmethod(lambda cls, *a, **kw: tiny))   # a hub name offline
    with pytest.raises(tm.MissingResource, match="'allenai/x': the tokenizer loaded only 5 entries"):
        tm.load_text_tokenizer.__wrapped__("allenai/x")
    monkeypatch.undo()
    with pytest.raises(tm.MissingResource, match="nltk.download"):
        tm.load_wordnet(str(tmp_path / "absent"))
    import nltk
    monkeypatch.setattr(nltk.data, "path", [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(tm.MissingResource, match=r"WordNet \(corpora/wordnet\) not found in .*empty.*nltk.download"):
        tm.load_wordnet.__wrapped__(str(tmp_path / "empty"))

"""Text-overlap metrics exactly as MolT5 computes them (blender-nlp/MolT5 `evaluation/text_translation_metrics.py`,
repeated by OpenBioMed's molecule-captioning task), so the numbers sit beside the BioMedGPT paper's.

- Tokens: SciBERT uncased WordPiece (`allenai/scibert_scivocab_uncased`: lowercased, accents stripped, no
  special tokens added), cut at 512 pieces, then `[PAD]`, `[CLS]` and `[SEP]` removed; a prediction that
  starts with `"[CLS] "` loses that prefix first.
- BLEU-2 / BLEU-4: nltk's `corpus_bleu` over the pieces, weights (.5, .5) and (.25, .25, .25, .25), one
  reference per hypothesis, no smoothing.
- METEOR: nltk's `meteor_score([reference_pieces], hypothesis_pieces)` per pair (WordNet synonyms, Porter
  stemmer: nltk's defaults), averaged.
- ROUGE-1 / 2 / L: rouge-score's `RougeScorer(["rouge1", "rouge2", "rougeL"])` (no stemmer) on the raw
  strings, mean F-measure.

Resources: the SciBERT vocabulary and WordNet 3.0 default to the shared sample folder
(`tokenizer/scibert_scivocab_uncased/vocab.txt`, `nltk_data/`); elsewhere the usual places
(`BertTokenizerFast.from_pretrained`, `nltk.download("wordnet")`). A missing one raises `MissingResource`
with a one-line fix; a metric is never silently dropped.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Sequence

from bmgpt_jax.data.builders import shared_data_dir

SCIBERT = "allenai/scibert_scivocab_uncased"
SCIBERT_VOCAB_SIZE = 31090
MAX_PIECES = 512
SPECIAL = ("[PAD]", "[CLS]", "[SEP]")
KEYS = ("bleu2", "bleu4", "meteor", "rouge1", "rouge2", "rougeL")
GET_SCIBERT = (f"python -c \"from transformers import BertTokenizerFast; "
               f"BertTokenizerFast.from_pretrained('{SCIBERT}').save_pretrained('scibert')\" and pass scibert/")
GET_WORDNET = "python -c \"import nltk; nltk.download('wordnet')\" (or pass the folder holding corpora/wordnet)"


MIN_VOCAB = 1000   # fewer WordPiece entries than this is no real vocabulary (SciBERT's has 31,090)


class MissingResource(FileNotFoundError):
    """A vocabulary or corpus the metrics need is not where it was looked for; the message says how to get it."""


def default_vocab() -> str:
    """The shared sample folder's SciBERT `vocab.txt` when present, else the hub name."""
    shared = shared_data_dir()
    path = shared / "tokenizer" / "scibert_scivocab_uncased" / "vocab.txt" if shared else None
    return str(path) if path and path.is_file() else SCIBERT


def default_nltk_data() -> str | None:
    """The shared sample folder's `nltk_data/` when present (else nltk's own search path)."""
    shared = shared_data_dir()
    return str(shared / "nltk_data") if shared and (shared / "nltk_data").is_dir() else None


def _vocab_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


@functools.lru_cache(maxsize=4)
def load_text_tokenizer(vocab: str | None = None):
    """The uncased SciBERT WordPiece tokenizer from `vocab`: a `vocab.txt` file, a folder holding one, or a
    hub name (None: `default_vocab()`). The loaded vocabulary must have as many entries as the file has
    lines, and at least MIN_VOCAB: transformers 5 silently builds a 5-token one from `vocab_file=`, from a
    folder without `vocab.txt` or from a hub name it cannot reach, which would score every word as `[UNK]`."""
    from transformers import BertTokenizerFast
    vocab = vocab or default_vocab()
    path = Path(vocab)
    if path.is_dir() and not (path / "vocab.txt").is_file():
        raise MissingResource(f"SciBERT vocabulary folder {vocab!r} holds no vocab.txt; get it with {GET_SCIBERT}")
    try:
        if path.is_file():
            tok, file = BertTokenizerFast(vocab=str(path), do_lower_case=True), path
        else:
            tok, file = BertTokenizerFast.from_pretrained(vocab, do_lower_case=True), path / "vocab.txt"
    except OSError as e:
        raise MissingResource(f"SciBERT vocabulary {vocab!r} not found ({type(e).__name__}); get it with "
                              f"{GET_SCIBERT}") from None
    size = len(tok.get_vocab())
    if file.is_file() and size != _vocab_lines(file):
        raise ValueError(f"{file}: the tokenizer loaded {size} entries but the file has {_vocab_lines(file)}")
    if size < MIN_VOCAB:
        raise MissingResource(f"SciBERT vocabulary {vocab!r}: the tokenizer loaded only {size} entries (not found, "
                              f"or unreachable offline?); get it with {GET_SCIBERT}")
    return tok


@functools.lru_cache(maxsize=4)
def load_wordnet(nltk_data: str | None = None):
    """nltk's WordNet reader, after putting `nltk_data` (default: `default_nltk_data()`) first on nltk's
    search path; `MissingResource` when WordNet is not found there or in nltk's usual places."""
    import nltk
    folder = nltk_data or default_nltk_data()
    if folder:
        if not os.path.isdir(folder):
            raise MissingResource(f"nltk data folder {folder} not found; get WordNet with {GET_WORDNET}")
        if folder not in nltk.data.path:
            nltk.data.path.insert(0, folder)
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        where = folder or "nltk's search path"
        raise MissingResource(f"WordNet (corpora/wordnet) not found in {where}; get it with {GET_WORDNET}") from None
    from nltk.corpus import wordnet
    wordnet.ensure_loaded()
    return wordnet


def word_pieces(tokenizer, text: str) -> list[str]:
    """MolT5's tokens of `text`: the first 512 word pieces, `[PAD]`/`[CLS]`/`[SEP]` removed."""
    return [p for p in tokenizer.tokenize(text)[:MAX_PIECES] if p not in SPECIAL]


def strip_cls(prediction: str) -> str:
    """A prediction without MolT5's leading `"[CLS] "` (generated by its T5 models)."""
    return prediction[6:] if prediction.startswith("[CLS] ") else prediction


def text_metrics(references: Sequence[str], predictions: Sequence[str], vocab: str | None = None,
                 nltk_data: str | None = None) -> dict[str, float]:
    """`bleu2`, `bleu4`, `meteor`, `rouge1`, `rouge2`, `rougeL` (fractions) of `predictions` against their
    `references` (one each, same order) by MolT5's protocol (module docstring). An empty prediction is an
    empty hypothesis (scores 0 for that pair and shortens the corpus for BLEU's brevity penalty).
    `vocab` / `nltk_data`: see `load_text_tokenizer` / `load_wordnet`."""
    from nltk.translate.bleu_score import corpus_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("text_metrics needs at least one (reference, prediction) pair")
    for name, texts in (("reference", references), ("prediction", predictions)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"{name} {bad} is {type(texts[bad]).__name__}, not a string: {texts[bad]!r:.80}")
    tok, wordnet = load_text_tokenizer(vocab), load_wordnet(nltk_data)
    predictions = [strip_cls(p) for p in predictions]
    refs = [word_pieces(tok, r) for r in references]
    hyps = [word_pieces(tok, p) for p in predictions]
    with warnings.catch_warnings():            # nltk warns when an n-gram order has no match (BLEU is then 0)
        warnings.simplefilter("ignore", UserWarning)
        bleu2 = corpus_bleu([[r] for r in refs], hyps, weights=(0.5, 0.5))
        bleu4 = corpus_bleu([[r] for r in refs], hyps, weights=(0.25, 0.25, 0.25, 0.25))
    meteor = sum(meteor_score([r], h, wordnet=wordnet) for r, h in zip(refs, hyps)) / len(refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge = [scorer.score(r, p) for r, p in zip(references, predictions)]
    mean = lambda key: sum(s[key].fmeasure for s in rouge) / len(rouge)  # noqa: E731
    return {"bleu2": float(bleu2), "bleu4": float(bleu4), "meteor": float(meteor),
            "rouge1": mean("rouge1"), "rouge2": mean("rouge2"), "rougeL": mean("rougeL")}

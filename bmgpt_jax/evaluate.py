"""Evaluate a BioMedGPT checkpoint on a dataset split: text-overlap metrics and multiple-choice accuracy.

    python -m bmgpt_jax.evaluate --checkpoint DIR --source chebi20:test --limit 200 --output preds.jsonl
    python -m bmgpt_jax.evaluate --checkpoint DIR --source pubmedqa:test --source medqa:test --max-new-tokens 64

Each record of a source (`DataConfig.sources` syntax, `name:split`) is asked as chat asks it (`make_prompt`
of its question and entities, the default system prompt), answered in batches by `generate_tokens` and
scored against its answer. Free-text records get the captioning metrics of MolT5 / BioMedGPT: corpus
BLEU-2/4 with brevity penalty (nltk's `corpus_bleu`, no smoothing), mean ROUGE-1/2/L F1 (rouge-score's
sentence-level rouge1/rouge2/rougeL, no stemming) and exact match. Records with a `label` (MedQA, MedMCQA:
a letter; PubMedQA: yes/no/maybe) get accuracy: the chosen option is extracted from the generated text
(`extract_choice`); an unreadable answer counts as wrong and is tallied as an extraction failure. Their
answers are also overlap-scored when they carry a long answer (PubMedQA's "Yes. <conclusion>").

Metrics are pure Python (no nltk / rouge-score dependency), so numbers are close to but not identical
with the papers': BLEU tokens are lowercased words and punctuation (`\\w+|[^\\w\\s]`) rather than SciBERT
word pieces; ROUGE tokens are rouge-score's (lowercase alphanumeric runs). METEOR (needs WordNet) is not
computed. Records that cannot be asked (invalid SMILES, bad residues, prompt longer than the context) are
reported on stderr, written with an `error`, and left out of the metrics.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence


from bmgpt_jax import chat
from bmgpt_jax.data.records import BadRecords, Record

YES_NO_MAYBE = ("yes", "no", "maybe")
OVERLAP_KEYS = ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "exact_match")
COLUMNS = ("n", "skipped", "accuracy", "extraction_failures") + OVERLAP_KEYS
_BLEU_TOKEN = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------- text-overlap metrics

def bleu_tokens(text: str) -> list[str]:
    """Lowercased words and punctuation marks: a dependency-free stand-in for MolT5's (uncased) SciBERT tokens."""
    return _BLEU_TOKEN.findall(text.lower())


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer: lowercase, every run of non-alphanumerics is a separator."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU with uniform weights over 1..`max_n`-grams, one reference per hypothesis, as nltk's
    `corpus_bleu` (what MolT5 reports): clipped n-gram matches and candidate n-grams are summed over the
    corpus before dividing; brevity penalty exp(1 - r/c) when the total hypothesis length c is below the
    total reference length r; 0 when some order has no match (no smoothing)."""
    matches, totals = [0] * max_n, [0] * max_n
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = bleu_tokens(ref), bleu_tokens(hyp)
        ref_len, hyp_len = ref_len + len(r), hyp_len + len(h)
        for n in range(1, max_n + 1):
            ref_counts, hyp_counts = ngrams(r, n), ngrams(h, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n)


def _f1(overlap: int, hyp_total: int, ref_total: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / hyp_total, overlap / ref_total
    return 2 * p * r / (p + r)


def rouge_n(reference: str, hypothesis: str, n: int) -> float:
    """ROUGE-N F1 of one pair: clipped n-gram overlap over the hypothesis' (precision) and the reference's
    (recall) n-grams."""
    r, h = ngrams(rouge_tokens(reference), n), ngrams(rouge_tokens(hypothesis), n)
    return _f1(sum((r & h).values()), sum(h.values()), sum(r.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) dynamic programming, one row kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F1 of one pair (rouge-score's `rougeL`: the LCS of the whole token sequences)."""
    r, h = rouge_tokens(reference), rouge_tokens(hypothesis)
    return _f1(lcs_length(r, h), len(h), len(r))


def normalize(text: str) -> str:
    """Lowercase, whitespace collapsed, a trailing period dropped: what exact match compares."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def overlap_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """BLEU-2/4 (corpus), mean ROUGE-1/2/L F1 and exact-match rate, all in [0, 1]."""
    n = max(len(references), 1)
    mean = lambda f: sum(f(r, h) for r, h in zip(references, hypotheses)) / n  # noqa: E731
    return {"bleu2": corpus_bleu(references, hypotheses, 2), "bleu4": corpus_bleu(references, hypotheses, 4),
            "rouge1": mean(lambda r, h: rouge_n(r, h, 1)), "rouge2": mean(lambda r, h: rouge_n(r, h, 2)),
            "rougeL": mean(rouge_l), "exact_match": mean(lambda r, h: float(normalize(r) == normalize(h)))}


# ---------------------------------------------------------------- multiple choice

def choice_options(question: str) -> dict[str, str]:
    """The lettered options listed in a question ("A. text" lines, as the MedQA/MedMCQA builders write them)."""
    return {m[1]: m[2].strip() for m in re.finditer(r"^([A-E])[.)]\s+(.+)$", question, re.M)}


def extract_choice(text: str, yes_no: bool = False, options: dict[str, str] | None = None) -> str | None:
    """The option chosen by generated `text`, or None when it cannot be read.

    yes/no/maybe (`yes_no`): the word at the start ("Yes. Because ..."), else after "answer is" / "answer:".
    Letters A-E: a letter at the start followed by `.`, `)`, `:`, `,` or the end ("B. Aspirin", "(C)", "D"),
    else "answer is B" / "Answer: (B)" / "option B"; else (with `options`, see `choice_options`) the option whose
    text starts the answer (the longest such).
    """
    if yes_no:
        words = "|".join(YES_NO_MAYBE)
        m = (re.match(rf"\W*({words})\b", text, re.I) or
             re.search(rf"\banswer(?:\s+is)?\s*:?\s*\W*({words})\b", text, re.I))
        return m[1].lower() if m else None
    m = (re.match(r"\s*[(\[]?([A-E])(?:[)\].:,]|\s*$)", text) or
         re.search(r"\b(?i:answer|option)(?:\s+is)?\s*:?\s*[(\[]?([A-E])\b(?![\w'-])", text))
    if m:
        return m[1]
    said = rouge_tokens(text)
    opts = {k: rouge_tokens(o) for k, o in (options or {}).items()}
    hits = [(len(o), k) for k, o in opts.items() if o and said[:len(o)] == o]
    return max(hits)[1] if hits else None


def has_long_answer(record: Record) -> bool:
    """Whether a labelled record's answer says more than its label and option: text after "Yes. " / "B. "
    that is not one of the question's options (PubMedQA's conclusion, not MedQA's "B. option")."""
    rest = re.sub(rf"^\W*{re.escape(record.label)}\b\W*", "", record.answer, flags=re.I).strip()
    return bool(rest) and normalize(rest) not in {normalize(o) for o in choice_options(record.question).values()}


def score(records: Sequence[Record], rows: Sequence[dict]) -> dict:
    """Metrics of one source from its records and prediction rows (rows with an `error` are skipped; rows of
    labelled records get `choice` and `correct` set here). Accuracy keys only when some record has a label,
    overlap keys only when some record is free text or carries a long answer."""
    done = [(r, row) for r, row in zip(records, rows, strict=True) if "error" not in row]
    out: dict = {"n": len(done), "skipped": len(rows) - len(done)}
    labelled = [(r, row) for r, row in done if r.label]
    if labelled:
        for r, row in labelled:
            yes_no = r.label.lower() in YES_NO_MAYBE
            row["choice"] = extract_choice(row["prediction"], yes_no, None if yes_no else choice_options(r.question))
            row["correct"] = row["choice"] is not None and row["choice"] == (r.label.lower() if yes_no else r.label)
        out["accuracy"] = sum(row["correct"] for _, row in labelled) / len(labelled)
        out["extraction_failures"] = sum(row["choice"] is None for _, row in labelled)
    texts = [(r.answer, row["prediction"]) for r, row in done if not r.label or has_long_answer(r)]
    if texts:
        out.update(overlap_metrics(*zip(*texts)))
    return out


# ---------------------------------------------------------------- running a model

def load_records(spec: str, raw_dir: str | None = None, data_dir: str | None = None,
                 limit: int | None = None) -> list[Record]:
    """The first `limit` records of source `spec` (`name:split`, `demo`, ...), built under `data_dir` if needed."""
    from bmgpt_jax.data.pipeline import DataConfig, Records
    name = spec.partition(":")[0]
    cfg = DataConfig(sources=(spec,), raw_dirs={name: raw_dir} if raw_dir else {}, data_dir=data_dir or "")
    records = Records(cfg)
    return [records[i] for i in range(len(records) if limit is None else min(limit, len(records)))]


def _reason(message: str) -> str:
    reasons = (("SMILES", "invalid SMILES"), ("residue", "bad residues"), ("context", "too long"))
    return next((reason for key, reason in reasons if key in message), "other")


def predict(model, records: Sequence[Record], batch_size: int = 8, system: str | None = None,
            log=None, **options) -> list[dict]:
    """One row per record: `index`, `id`, `reference`, `label`, and `prediction` or `error` (the record could not
    be encoded). Prompts are sorted by length before batching (less padding, fewer compiled shapes); every
    generate call has `batch_size` rows."""
    log = log or sys.stderr
    tok = chat.tokenizer_of(model)
    cfg = chat.generation_config(tok, options)
    rows, ready, bad = [], [], BadRecords()
    for i, r in enumerate(records):
        row = {"index": i, "id": r.id, "reference": r.answer, "label": r.label}
        try:
            ready.append((i, chat.encode_prompt(model, chat.make_prompt(r.question, r.entities, system),
                                                cfg.max_new_tokens)))
        except ValueError as e:
            row["error"] = str(e)
            bad.add(_reason(str(e)), f"record {i} (id {r.id!r}): {e}")
        rows.append(row)
    if bad.total:
        print(f"evaluate: skipped {bad.total} of {len(records)} record(s)", file=log)
        for reason, info in bad.as_dict().items():
            print(f"  {reason}: {info['count']} (e.g. {'; '.join(info['examples'])})", file=log)
    ready.sort(key=lambda x: x[1].length)
    for start in range(0, len(ready), batch_size):
        chunk = ready[start:start + batch_size]
        tokens = chat.generate_tokens(model, [enc for _, enc in chunk], cfg, batch_size)
        for (i, _), ids in zip(chunk, tokens):
            rows[i]["prediction"] = chat.answer_text(tok, ids)
        print(f"evaluate: {min(start + batch_size, len(ready))}/{len(ready)} answered", file=log, flush=True)
    return rows


def evaluate(model, records: Sequence[Record], batch_size: int = 8, system: str | None = None,
             log=None, **options) -> tuple[list[dict], dict]:
    """Prediction rows (with `choice` / `correct` for labelled records) and the metrics of `records`."""
    rows = predict(model, records, batch_size, system, log, **options)
    return rows, score(records, rows)


def format_table(metrics: dict[str, dict]) -> str:
    """One line per source, one column per metric any source has (`-` where a source lacks it)."""
    cols = [c for c in COLUMNS if any(c in m for m in metrics.values())]
    width = max([len(s) for s in metrics] + [6])
    cell = lambda v: "-" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}"  # noqa: E731
    lines = [f"{'source':<{width}}  " + "  ".join(f"{c:>{max(len(c), 6)}}" for c in cols)]
    for src, m in metrics.items():
        lines.append(f"{src:<{width}}  " + "  ".join(f"{cell(m.get(c)):>{max(len(c), 6)}}" for c in cols))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bmgpt_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder (see bmgpt_jax.chat)")
    ap.add_argument("--source", action="append", required=True, help="name:split, e.g. chebi20:test (repeatable)")
    ap.add_argument("--raw-dir", help="raw files of the source(s) (sample sets default to ../shared/data)")
    ap.add_argument("--data-dir", help="tfds folder for built datasets (default: the user cache)")
    ap.add_argument("--limit", type=int, help="evaluate the first N records of each source")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--output", help="per-example predictions JSONL")
    ap.add_argument("--metrics", help="also write the metrics as JSON here")
    ap.add_argument("--system", help="system prompt (default: the reference's)")
    chat.add_generation_args(ap)
    args = ap.parse_args(argv)
    try:
        model, options = chat.model_and_options(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: {chat.one_line(e)}", file=sys.stderr)
        return 2
    metrics, lines = {}, []
    for spec in args.source:
        records = load_records(spec, args.raw_dir, args.data_dir, args.limit)
        rows, metrics[spec] = evaluate(model, records, args.batch_size, args.system, **options)
        lines += [json.dumps({"source": spec, **row}) + "\n" for row in rows]
    if args.output:
        Path(args.output).write_text("".join(lines))
    if args.metrics:
        Path(args.metrics).write_text(json.dumps(metrics, indent=1))
    print(format_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One source's metrics from its records and their finished rows (see docs/evaluate.md, "Metrics").

The passes of `evaluate` leave on each row what it got (`prediction` and `choice` from generation,
`ll_logprobs` and `ll_correct` from log-likelihood scoring, `error` where the record could not be asked);
`score` turns the rows of one source into the numbers of `metrics.json` and the printed table.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

from bmgpt_jax.data.records import Record
from bmgpt_jax.evaluation.choices import has_long_answer, normalize
from bmgpt_jax.evaluation.text_metrics import text_metrics


def score(records: Sequence[Record], rows: Sequence[dict], vocab: str | None = None,
          nltk_data: str | None = None, dropped: Mapping[str, int] | None = None) -> dict:
    """Metrics of one source from its records and finished rows (rows with an `error` are skipped, and so
    are the `dropped` records, `{reason: count}`, that the dataset's build left out and that have no row).
    `accuracy` / `extraction_failures` when labelled records were generated, `ll_accuracy(_norm)` when they
    were scored by log-likelihood (`ll_skipped` / `gen_skipped`: records that could be scored only the other
    way, their rows' `ll_error` / `gen_error`), the text metrics (`text_metrics`) and `exact_match` over the generated
    free-text answers and PubMedQA-style long answers."""
    done = [(r, row) for r, row in zip(records, rows, strict=True) if "error" not in row]
    reasons = Counter(row["reason"] for row in rows if "error" in row) + Counter(dropped or {})
    out: dict = {"n": len(done), "skipped": sum(reasons.values())}
    if reasons:
        out["skipped_reasons"] = dict(reasons)
    generated = [row for r, row in done if r.label and "prediction" in row]
    if generated:
        out["accuracy"] = sum(row["correct"] for row in generated) / len(generated)
        out["extraction_failures"] = sum(row["choice"] is None for row in generated)
    scored = [row for r, row in done if r.label and "ll_logprobs" in row]
    if scored:
        out["ll_accuracy"] = sum(row["ll_correct"] for row in scored) / len(scored)
        out["ll_accuracy_norm"] = sum(row["ll_correct_norm"] for row in scored) / len(scored)
    for key, count in (("ll_error", "ll_skipped"), ("gen_error", "gen_skipped")):
        if any(key in row for _, row in done):
            out[count] = sum(key in row for _, row in done)
    texts = [(r.answer, row["prediction"]) for r, row in done
             if "prediction" in row and (not r.label or has_long_answer(r))]
    if texts:
        refs, preds = zip(*texts)
        out.update(text_metrics(refs, preds, vocab, nltk_data))
        out["exact_match"] = sum(normalize(r) == normalize(p) for r, p in texts) / len(texts)
    return out

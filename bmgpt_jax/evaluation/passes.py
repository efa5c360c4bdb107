"""The passes of an evaluation (`bmgpt_jax.evaluate`): records encoded as chat prompts (`encode_records`),
answers generated batch by batch (`generate_pass`, each row sunk as it is done) and read as a choice
(`read_choice`), and every option of a labelled record scored by log-likelihood (`options_of`,
`loglik_pass`). Each pass plans global batches (`evaluation.batches`) that every process cuts its block of.
"""
from __future__ import annotations

import sys
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from bmgpt_jax import chat
from bmgpt_jax.data.examples import Encoded
from bmgpt_jax.data.pipeline import global_batch
from bmgpt_jax.data.records import BadRecords, Record
from bmgpt_jax.evaluation import batches
from bmgpt_jax.evaluation.choices import answer_options, choice_options, extract_choice, gold_key, is_yes_no
from bmgpt_jax.evaluation.scoring import MeshModel

REASONS = (("not a string", "answer not a string"), ("no answer", "no answer"), ("SMILES", "invalid SMILES"),
           ("residue", "bad residues"), ("context", "too long"))
Sink = Callable[[dict], None]


class Option(NamedTuple):
    """One option of one record, encoded as prompt + option text (`loss_mask` 1 on the option's tokens)."""
    record: int
    key: str
    chars: int
    tokens: int
    encoded: Encoded


def _reason(message: str) -> str:
    return next((reason for key, reason in REASONS if key in message), "other")


def encode_records(mm: MeshModel, records: Sequence[Record], system: str | None, max_new_tokens: int,
                   log=None, done: Mapping[int, dict] | None = None,
                   loglik: bool = False) -> tuple[list[dict], dict[int, Encoded]]:
    """A row per record (`index`, `id`, `reference`, `label`; `error` and `reason` when it cannot be asked)
    and the encoded prompts of the others; what was skipped is summarised on `log` (stderr). `done`: the
    finished rows of an earlier run by record index, taken as they are (not encoded, not asked again).
    `max_new_tokens`: the room a generated answer needs after the prompt (0: nothing is generated).
    `loglik`: labelled records are scored by log-likelihood too, which needs only the prompt and an option
    to fit (`options_of`), so whether one is scored does not depend on `max_new_tokens`: a labelled prompt
    that fits alone but leaves no room for the new tokens gets `gen_error` (not generated) instead of `error`."""
    rows, encoded, bad, ungenerated = [], {}, BadRecords(), BadRecords()
    context = mm.config.lm.max_position_embeddings
    for i, r in enumerate(records):
        if done and i in done:
            rows.append(dict(done[i]))
            continue
        row = {"index": i, "id": r.id, "reference": r.answer, "label": r.label}
        try:
            if not isinstance(r.answer, str):
                raise ValueError(f"answer is {type(r.answer).__name__}, not a string")
            if not r.answer.strip():
                raise ValueError("the record has no answer")
            prompt = chat.make_prompt(r.question, r.entities, system)
            alone = loglik and bool(r.label)
            encoded[i] = chat.encode_prompt(mm.module, prompt, 0 if alone else max_new_tokens)
            if alone and encoded[i].length + max_new_tokens > context:
                row["gen_error"] = (f"prompt of {encoded[i].length} positions plus max_new_tokens={max_new_tokens} "
                                    f"exceeds the context of {context}: scored by log-likelihood only")
                ungenerated.add("too long to generate", f"record {i} (id {r.id!r}): {encoded[i].length} positions")
        except ValueError as e:
            row.update(error=str(e), reason=_reason(str(e)))
            bad.add(row["reason"], f"record {i} (id {r.id!r}): {e}")
        rows.append(row)
    if bad.total:
        tell(log, f"skipped {bad.total} of {len(records)} record(s)", bad.as_dict())
    if ungenerated.total:
        tell(log, f"{ungenerated.total} labelled record(s) not generated (gen_skipped), scored by log-likelihood "
              "only", ungenerated.as_dict())
    return rows, encoded


def tell(log, what: str, reasons: Mapping[str, dict]) -> None:
    """`evaluate: what` and a line per reason (its count and first examples) on `log` (stderr), by process 0."""
    if jax.process_index() == 0:
        log = log or sys.stderr
        print(f"evaluate: {what}", file=log)
        for reason, info in reasons.items():
            print(f"  {reason}: {info['count']} (e.g. {'; '.join(info['examples'])})", file=log)


def options_of(mm: MeshModel, records: Sequence[Record], rows: list[dict], encoded: dict[int, Encoded]) -> list[Option]:
    """Every option of every encoded labelled record; a record whose options cannot be read or do not fit
    the context gets `ll_error` instead."""
    tok, context = mm.tokenizer, mm.config.lm.max_position_embeddings
    out = []
    for i, enc in encoded.items():
        if not records[i].label:
            continue
        try:
            mine = []
            for key, text in answer_options(records[i]).items():
                ids = np.asarray(tok.encode(text), np.int32)
                if enc.length + len(ids) > context:
                    raise ValueError(f"prompt of {enc.length} positions plus option {key!r} ({len(ids)} tokens) "
                                     f"exceeds the context of {context}")
                target = np.concatenate([np.zeros_like(enc.input_ids), np.ones_like(ids)])
                mine.append(Option(i, key, len(text), len(ids),
                                   Encoded(np.concatenate([enc.input_ids, ids]), target, enc.mols, enc.prots)))
            out += mine
        except ValueError as e:
            rows[i]["ll_error"] = str(e)
    return out


def loglik_pass(mm: MeshModel, records: Sequence[Record], rows: list[dict], options: list[Option], rows_per: int,
                bar) -> None:
    """Score every option (one jitted call per global batch) and give each record its `ll_logprobs`,
    `ll_choice` / `ll_correct` (highest sum) and `ll_choice_norm` / `ll_correct_norm` (highest per character)."""
    scores: dict[int, dict[str, tuple[float, int, bool]]] = {}
    context = mm.config.lm.max_position_embeddings
    for plan in batches.plan_batches([o.encoded.length for o in options], rows_per):
        mine = [options[j].encoded for j in batches.local_part(plan, rows_per)]
        local = batches.collate_local(mine, rows_per, mm.mesh, filler=options[plan[0]].encoded, max_len=context)
        total, greedy = mm.option_logprobs(global_batch(local, mm.mesh), max(options[j].tokens for j in plan))
        for q in range(jax.process_count()):
            for j, idx in enumerate(plan[q * rows_per:(q + 1) * rows_per], q * rows_per):
                o = options[idx]
                scores.setdefault(o.record, {})[o.key] = (float(total[j]), o.chars, bool(greedy[j]))
        bar.update(len(plan))
    for i, per in scores.items():
        gold = gold_key(records[i])
        best = max(per, key=lambda k: per[k][0])
        best_norm = max(per, key=lambda k: per[k][0] / per[k][1])
        rows[i].update(ll_logprobs={k: v[0] for k, v in per.items()}, ll_greedy=[k for k, v in per.items() if v[2]],
                       ll_choice=best, ll_correct=best == gold, ll_choice_norm=best_norm,
                       ll_correct_norm=best_norm == gold)


def read_choice(record: Record, row: dict) -> None:
    """Set `choice` (the option read from `row["prediction"]`, or None) and `correct` on a labelled record's row."""
    yes_no = is_yes_no(record)
    row["choice"] = extract_choice(row["prediction"], yes_no, None if yes_no else choice_options(record.question))
    row["correct"] = row["choice"] is not None and row["choice"] == gold_key(record)


def generate_pass(mm: MeshModel, records: Sequence[Record], rows: list[dict], encoded: dict[int, Encoded], config,
                  rows_per: int, sink: Sink, bar, cut: bool = False) -> None:
    """Answer every encoded record (one generate call per global batch), writing each row as it is done;
    `cut`: the answers are cut at `###` (`stop_at_separator`)."""
    order = sorted(encoded)
    max_len = mm.config.lm.max_position_embeddings - config.max_new_tokens
    for plan in batches.plan_batches([encoded[i].length for i in order], rows_per):
        plan = [order[j] for j in plan]
        mine = [encoded[i] for i in batches.local_part(plan, rows_per)]
        local = batches.collate_local(mine, rows_per, mm.mesh, filler=encoded[plan[0]], max_len=max_len)
        tokens = mm.generate(global_batch(local, mm.mesh), config)
        for q in range(jax.process_count()):
            for j, i in enumerate(plan[q * rows_per:(q + 1) * rows_per], q * rows_per):
                rows[i]["prediction"] = chat.answer_text(mm.tokenizer, tokens[j], cut, config.eos_ids)
                if records[i].label:
                    read_choice(records[i], rows[i])
                sink(rows[i])
        bar.update(len(plan))

"""Evaluate a BioMedGPT checkpoint on dataset splits the way the paper does, and put our numbers beside its.

    python -m bmgpt_jax.evaluate --checkpoint DIR --source demo:test --limit 50 --out-dir runs/eval
    python -m bmgpt_jax.evaluate --checkpoint DIR --source pubmedqa:test --source medmcqa:validation --max-new-tokens 16

Each record of a source (`DataConfig.sources` syntax, `name:split`) is asked as chat asks it (`make_prompt`
of its question and entities, the default system prompt). Two kinds of scoring:
- generation: answers decoded in batches and scored against the gold answer. Free text (and PubMedQA's
  long answers) gets MolT5's captioning metrics (BLEU-2/4, METEOR, ROUGE-1/2/L by nltk and rouge-score on
  SciBERT word pieces: `evaluation/text_metrics.py`) and exact match; a labelled record (MedQA/MedMCQA
  letter, PubMedQA yes/no/maybe) gets `accuracy`, the option being read from the text (`extract_choice`;
  an unreadable answer is wrong and counted in `extraction_failures`).
- log-likelihood (labelled records, as lm-evaluation-harness scores them): each option's text as the
  answer ("B. Caffeine", "Yes.") gets its summed log-probability; the highest wins (`ll_accuracy`), or the
  highest per character (`ll_accuracy_norm`, the harness's `acc_norm`).

It runs on the training mesh (`--mesh data,fsdp,tensor`): parameters loaded straight into the shards of
the rule table (each process reads only its devices' slices; no device holds a sharded parameter whole), every
batch a global array sharded over `data` x `fsdp` with static shapes from a few buckets; with several
processes each feeds its block of every batch and process 0 writes. The run folder (`--out-dir`) gets
`predictions.jsonl` (each record's row as soon as it is answered, so a crash keeps what was done, and
`--resume` asks only the records without a row; a run without it refuses a folder whose file holds rows,
unless `--overwrite` discards them),
`metrics.json` (after every source), `report.png` (ours beside the paper's figures) and the table on
stdout. Records that cannot be asked (no answer, invalid SMILES, bad residues, too long) are reported on
stderr, written with an `error`, and left out of the metrics; those the dataset's build left out
(`evaluation/sources.py`) are reported and counted as skipped too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
from tqdm.auto import tqdm

from bmgpt_jax import chat, distributed, logs, model_args, parallel
from bmgpt_jax.data.prompts import check_system
from bmgpt_jax.data.records import Record
from bmgpt_jax.evaluation import batches
from bmgpt_jax.evaluation.choices import extract_choice
from bmgpt_jax.evaluation.metrics import score
from bmgpt_jax.evaluation.passes import (Option, Sink, encode_records, generate_pass, loglik_pass, options_of,
                                         read_choice, tell)
from bmgpt_jax.evaluation.report import bar_chart, format_table, paper_row
from bmgpt_jax.evaluation.resume import finished_rows
from bmgpt_jax.evaluation.scoring import MeshModel
from bmgpt_jax.evaluation.sources import SourceRecords, load_records
from bmgpt_jax.evaluation.text_metrics import MissingResource, load_text_tokenizer, load_wordnet, text_metrics
from bmgpt_jax.inputs import check_model_folder, check_not_url, check_output_folder, one_line, positive_int

MODES = ("both", "generate", "loglik")
# the Python API (docs/evaluate.md): this module's own, and the building blocks its examples call through it
__all__ = ["MODES", "Option", "ProcessesDisagree", "SourceRecords", "check_mode", "encode_records", "evaluate",
           "extract_choice", "generate_pass", "load_records", "loglik_pass", "main", "options_of", "read_choice",
           "score", "text_metrics"]


def check_mode(records: Sequence[Record], mode: str, what: str = "the records") -> None:
    """ValueError when `mode` cannot score every one of `records` (`what`: a source's name): `loglik` scores
    labelled records only (multiple choice, yes/no/maybe), so a free-text record would get a row and count in
    `n` with nothing scored. Cheap: checked on the records before any model loads."""
    free = [r for r in records if not r.label] if mode == "loglik" else []
    if free:
        raise ValueError(f"mode loglik scores only labelled (multiple-choice, yes/no/maybe) records; {what} has "
                         f"{len(free)} free-text record(s) of {len(records)} (no label, e.g. id {free[0].id!r}): "
                         "mode generate or both scores them")


class ProcessesDisagree(ValueError):
    """The processes of one evaluation hold different records (a one-line error on the command line)."""


def _check_processes_agree(*counts: int) -> None:
    """Every process plans the same batches from its own copy of the records; processes that read different
    data (or skip different records) would feed mismatched batches and hang in a collective: stop first."""
    every = distributed.per_process(counts)
    if (every != every[0]).any():
        raise ProcessesDisagree(f"the processes disagree on what to evaluate ((records, prompts, options) per "
                                f"process: {[tuple(map(int, c)) for c in every]}): each must read the same data")


def evaluate(model, records: Sequence[Record], *, batch_size: int = 8, system: str | None = None,
             mode: str = "both", mesh=None, sink: Sink | None = None, progress: bool = False, desc: str = "",
             log=None, vocab: str | None = None, nltk_data: str | None = None, done: Mapping[int, dict] | None = None,
             **options) -> tuple[list[dict], dict]:
    """Rows (one per record, see docs/evaluate.md) and metrics of `records`.

    model: a BioMedGPT with its tokenizer (placed on `mesh`, default all devices on `data`) or a `MeshModel`.
    records: a sequence of records, or `load_records`' `SourceRecords`, whose `dropped` (left out by the build)
    count as skipped. mode: `both`, `generate` or `loglik`. sink: called with each row once it is final.
    done: finished rows of an earlier run of the same evaluation, by record index (`--resume`): kept as
    they are, not asked again, not sunk again, scored with the others.
    options: chat's generation options (HF-named `max_new_tokens`, `num_beams`, ..., and `stop_at_separator`:
    stop at `###` too and cut the answer there). `batch_size` is rounded up so
    that every process's block divides over the batch axes. Metrics gain `speed` (examples/s).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    check_system(system)
    check_mode(records, mode)
    mm = model if isinstance(model, MeshModel) else MeshModel(model, mesh or parallel.make_mesh((-1, 1, 1)))
    sink = sink or (lambda row: None)
    config = chat.generation_config(mm.tokenizer, options, mm.config.lm.eos_token_id)
    rows_per = batches.rows_per_process(batch_size, mm.mesh)
    dropped = records.dropped if isinstance(records, SourceRecords) else {}
    if dropped:
        tell(log, f"the build of the dataset left out {sum(d['count'] for d in dropped.values())} record(s) of the "
              "split (the build's bad records): no row, counted in skipped", dropped)
    rows, encoded = encode_records(mm, records, system, 0 if mode == "loglik" else config.max_new_tokens, log, done,
                                   loglik=mode != "generate")
    for i, row in enumerate(rows):
        if "error" in row and not (done and i in done):
            sink(row)
    to_score = options_of(mm, records, rows, encoded) if mode != "generate" else []
    to_generate = {i: e for i, e in encoded.items() if "gen_error" not in rows[i]} if mode != "loglik" else {}
    _check_processes_agree(len(records), len(encoded), len(to_score))
    speed = {}
    with tqdm(total=len(to_score) + len(to_generate), desc=desc or "evaluate", unit="ex", file=log or sys.stderr,
              disable=not progress or jax.process_index() != 0) as bar:
        if to_score:
            start = time.perf_counter()
            loglik_pass(mm, records, rows, to_score, rows_per, bar)
            speed["loglik_options_per_s"] = len(to_score) / (time.perf_counter() - start)
        for i in encoded:
            if i not in to_generate:
                sink(rows[i])
        if to_generate:
            start = time.perf_counter()
            generate_pass(mm, records, rows, to_generate, config, rows_per, sink, bar,
                          cut=bool(options.get("stop_at_separator")))
            speed["generate_examples_per_s"] = len(to_generate) / (time.perf_counter() - start)
    metrics = score(records, rows, vocab, nltk_data, {reason: info["count"] for reason, info in dropped.items()})
    metrics["speed"] = speed
    return rows, metrics


def _earlier_rows(path: Path) -> str | None:
    """What an earlier run left in the predictions file `path` that a fresh run would discard, e.g. "48
    finished prediction rows of an earlier run in predictions.jsonl"; None when it holds no complete row
    (absent, empty, or only a torn line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path.name}, which cannot be read ({e.strerror or type(e).__name__})"
    n = sum(1 for line in data.split(b"\n")[:-1] if line.strip())      # the last piece: torn or empty
    return f"{n} finished prediction row(s) of an earlier run in {path.name}" if n else None


def _sorted_predictions(path: Path, sources: Sequence[str]) -> None:
    """Rewrite the predictions file (written in completion order) in source order, then by `index`."""
    rank = {s: k for k, s in enumerate(sources)}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: (rank[r["source"]], r["index"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


@logs.cli
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bmgpt_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder (see bmgpt_jax.chat)")
    ap.add_argument("--source", action="append", required=True, help="name:split, e.g. demo:test (repeatable)")
    ap.add_argument("--raw-dir", help="raw files of the source(s) (sample sets default to ../shared/data)")
    ap.add_argument("--data-dir", help="tfds folder for built datasets (default: the user cache)")
    ap.add_argument("--limit", type=positive_int, help="evaluate the first N records of each source")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="global rows per batch (default 8)")
    ap.add_argument("--mode", choices=MODES, default="both", help="generation, log-likelihood or both (default)")
    ap.add_argument("--mesh", type=model_args.mesh_shape, default=(-1, 1, 1), help="data,fsdp,tensor (default -1,1,1; "
                    "a leading -1 takes '=': --mesh=-1,2,1)")
    ap.add_argument("--out-dir", default="runs/eval", help="run folder for predictions, metrics and the chart")
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished rows in --out-dir (same checkpoint, mode, limit, options, system, "
                    "dtype) and ask the rest")
    ap.add_argument("--overwrite", action="store_true",
                    help="start afresh in an --out-dir that holds an earlier run's predictions, discarding them "
                    "(without it, or --resume, such a folder is refused)")
    ap.add_argument("--system", help="system prompt (default: the reference's)")
    ap.add_argument("--scibert-vocab", help="SciBERT vocab.txt, folder or hub name (default: the sample folder's)")
    ap.add_argument("--nltk-data", help="folder holding corpora/wordnet (default: the sample folder's nltk_data)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    model_args.add_generation_args(ap)
    args = ap.parse_args(argv)
    if args.resume and args.overwrite:
        ap.error("--resume keeps the predictions in --out-dir, --overwrite discards them: pass one")
    from bmgpt_jax.distributed import broadcast_json, initialize
    initialize()
    writer = jax.process_index() == 0
    problem = None
    try:
        check_not_url(args.out_dir, "--out-dir")
        check_output_folder(args.out_dir, "--out-dir", probe=writer)   # only process 0 writes there
        check_system(args.system)                   # as chat refuses it, not every record an error row
        model_args.options_of(args)                 # generation options in range, before any data is built
        model_args.mesh_of(args)                    # and a mesh the devices fit
    except ValueError as e:
        problem = str(e)
    if _stopped(problem):
        return 2
    if not (args.resume or args.overwrite):   # never discard finished work unasked (process 0's file decides)
        earlier = broadcast_json(_earlier_rows(Path(args.out_dir) / "predictions.jsonl") if writer else None)
        if earlier:
            print(f"error: --out-dir {args.out_dir} holds {earlier}: pass --resume to continue that run, --overwrite "
                  "to discard them, or another --out-dir", file=sys.stderr)
            return 2
    try:                                            # the model folder's files, before any data is built
        check_model_folder(args.checkpoint)
        if args.mode != "loglik":                   # text metrics need both: fail before any generation
            load_text_tokenizer(args.scibert_vocab)
            load_wordnet(args.nltk_data)
    except MissingResource as e:
        problem = str(e)
    except (FileNotFoundError, ValueError) as e:
        problem = _checkpoint_line(args.checkpoint, e)
    if _stopped(problem):
        return 2
    try:      # a build failing on any process is raised on every process (`builders.prepare`)
        sources = {spec: load_records(spec, args.raw_dir, args.data_dir, args.limit) for spec in args.source}
        for spec, records in sources.items():
            check_mode(records, args.mode, spec)
    except (FileNotFoundError, KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, FileNotFoundError) and not args.raw_dir:
            message += " (sample sets: pass --raw-dir ../shared/data or set BMGPT_SHARED_DATA)"
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        model, options, mesh = model_args.model_and_options(args)   # read into its shards
    except (FileNotFoundError, ValueError) as e:
        problem = _checkpoint_line(args.checkpoint, e)
    if _stopped(problem):
        return 2
    mm = MeshModel(model, mesh)
    del model
    out = Path(args.out_dir)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    run = {"checkpoint": str(args.checkpoint), "mesh": dict(mm.mesh.shape), "processes": jax.process_count(),
           "batch_size": args.batch_size, "limit": args.limit, "mode": args.mode,
           "generation": model_args.hf_options(options), "stop": "separator" if options.get("stop_at_separator") else "eos",
           "system": args.system, "dtype": mm.config.lm.dtype}
    try:
        done = finished_rows(out, run, sources) if args.resume else {}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kept = [{"source": spec, **row} for spec, rows in done.items() for row in rows.values()]
    run["resumed_rows"] = len(kept)
    if writer:   # the finished rows of an earlier run, rewritten whole (a torn last line gone), then appended to
        tmp = out / "predictions.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(out / "predictions.jsonl")
        if args.resume:
            print(f"evaluate: --resume keeps {len(kept)} finished row(s) of {out / 'predictions.jsonl'}", file=sys.stderr)
        # the settings first, so that a run which dies in its first source can still be resumed safely
        (out / "metrics.json").write_text(json.dumps({"sources": {}, "paper": {}, "run": run}, indent=1))
    try:
        metrics = _evaluate_sources(mm, sources, done, args, options, run)
    except ProcessesDisagree as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if writer:
        _sorted_predictions(out / "predictions.jsonl", list(sources))
        bar_chart(metrics, out / "report.png")
        print(format_table(metrics))
        print(f"wrote {out / 'predictions.jsonl'}, {out / 'metrics.json'}, {out / 'report.png'}", file=sys.stderr)
    return 0


def _asked(speed: Mapping[str, float], n: int, kept: int) -> str:
    """What a source's pass did, for stderr: its speeds; or that there was nothing left to ask (`--resume`
    kept a row for every record), or that none of the records left could be asked (the skips listed above)."""
    if speed:
        return ", ".join(f"{k} {v:.2f}" for k, v in speed.items())
    if kept == n:
        return "nothing left to ask (--resume kept a row for every record)"
    return (f"nothing asked: none of the {n - kept} record(s) {'left ' if kept else ''}could be asked (see the "
            "skipped records above)")


def _checkpoint_line(checkpoint: str, e: Exception) -> str:
    """The one line for a model folder that cannot be used (a hint where it does not exist)."""
    absent = isinstance(e, FileNotFoundError) and not Path(checkpoint).exists()
    hint = " (`python -m bmgpt_jax.train` writes one to runs/tiny/final)" if absent else ""
    return f"{one_line(e)}{hint}"


def _stopped(problem: str | None) -> bool:
    """Whether a step of the command line's checks failed on any process, after printing `error: ...`:
    this process's `problem`, or on the others the first failing process's, named. Every process calls it
    at the same point (`distributed.raise_on_every_process`), so a bad path or option on one host stops
    every host at once instead of leaving them to time out in their next collective."""
    from bmgpt_jax.distributed import raise_on_every_process
    try:
        raise_on_every_process(ValueError(problem) if problem else None, "evaluate's checks")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return True
    return False


def _evaluate_sources(mm: MeshModel, sources: Mapping[str, Sequence[Record]], done: Mapping[str, dict],
                      args, options: dict, run: dict) -> dict[str, dict]:
    """Each source's metrics, in turn; process 0 appends each row to `--out-dir`'s predictions.jsonl as it
    finishes and rewrites metrics.json after each source."""
    out, writer, metrics = Path(args.out_dir), jax.process_index() == 0, {}
    with (open(out / "predictions.jsonl", "a") if writer else contextlib.nullcontext()) as f:
        for spec, records in sources.items():
            def sink(row, spec=spec):
                if f is not None:
                    f.write(json.dumps({"source": spec, **row}) + "\n")
                    f.flush()
            _, metrics[spec] = evaluate(mm, records, batch_size=args.batch_size, system=args.system, mode=args.mode,
                                        sink=sink, progress=not args.no_progress, desc=spec, done=done.get(spec),
                                        vocab=args.scibert_vocab, nltk_data=args.nltk_data, **options)
            if writer:
                paper = {s: paper_row(s) for s in metrics if paper_row(s)}
                (out / "metrics.json").write_text(json.dumps({"sources": metrics, "paper": paper, "run": run},
                                                             indent=1))
                print(f"{spec}: {_asked(metrics[spec]['speed'], len(records), len(done.get(spec) or {}))}",
                      file=sys.stderr)
    return metrics


if __name__ == "__main__":
    sys.exit(main())

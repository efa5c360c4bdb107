"""Data pipeline throughput: examples/s and tokens/s with 0 (inline), 1 and 2 worker processes.

    python bench/pipeline.py                      # the real sample sets in ../shared/data, Llama tokenizer
    python bench/pipeline.py --sources demo --batches 200
    python bench/pipeline.py --workers 2 4 --batch-size 32 seq_buckets=[512,1024]

Datasets are built once into the tfds cache (not timed). `--step` also times the tiny Llama's train step
(forward + backward of the masked loss, configs/llama_tiny.yaml, no encoders: a lower bound of the tiny
BioMedGPT step) on one of these batches, to show the step never waits for data. Each run builds a fresh `BatchIterator`, takes
one warm-up batch (which starts the worker processes and encodes the first window) and then times
`--batches` batches. Examples/s counts real rows; tokens/s counts positions with attention 1 (text and
entity slots). Without ../shared/data it falls back to the demo set and the demo tokenizer. There is no
PyTorch peer; the worker settings are interleaved trial by trial (bench/protocol.py: machine header,
median and min-max over --trials, load average before and after).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


import tensorflow_datasets as tfds  # noqa: E402

import protocol as P  # noqa: E402  (bench/protocol.py; scripts run as python bench/x.py)

from bmgpt_jax.config import apply_overrides, from_dict, to_dict  # noqa: E402
from bmgpt_jax.data.builders import SAMPLE_SETS, shared_data_dir  # noqa: E402
from bmgpt_jax.data.pipeline import BatchIterator, DataConfig, Records  # noqa: E402


def run(cfg: DataConfig, records, batches: int, counts: dict) -> float:
    """Seconds for `batches` batches after one warm-up batch; `counts` gets the real rows and tokens."""
    it = BatchIterator(cfg, records=records)
    try:
        next(it)
        rows = tokens = 0
        start = time.perf_counter()
        for _ in range(batches):
            b = next(it)
            rows += int(b["attention_mask"].any(1).sum())
            tokens += int(b["attention_mask"].sum())
        dt = time.perf_counter() - start
    finally:
        it.close()
    counts.update(rows=rows, tokens=tokens)
    return dt


def tiny_step_seconds(batch: dict, steps: int = 5) -> float:
    """Seconds per jitted value-and-grad step of the tiny Llama on `batch` (after compilation)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from bmgpt_jax.config import load
    from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(load(LlamaConfig, "llama_tiny"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    @jax.jit
    def grad(params, ids, att, mask):
        def loss(p):
            logits = nnx.merge(graphdef, p)(ids, att)[:, :-1]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
            return (ce * mask[:, 1:]).sum() / jnp.maximum(mask[:, 1:].sum(), 1)
        return jax.value_and_grad(loss)(params)

    args = [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")]
    jax.block_until_ready(grad(params, *args))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(grad(params, *args))
    return (time.perf_counter() - start) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=None, help="default: the sample sets (or demo)")
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--step", action="store_true", help="also time the tiny Llama train step")
    ap.add_argument("overrides", nargs="*", help="DataConfig key=value overrides")
    P.add_trials_arg(ap)
    args = ap.parse_args()
    load_before = P.header("bench/pipeline.py: host data pipeline throughput")
    tfds.disable_progress_bar()
    shared = shared_data_dir()
    sources = args.sources or (list(SAMPLE_SETS) if shared else ["demo"])
    tokenizer = str(shared / "tokenizer" / "llama2_tokenizer.model") if shared else ""
    base = {"sources": sources, "tokenizer": tokenizer, "batch_size": args.batch_size}
    cfg = from_dict(DataConfig, apply_overrides(base, args.overrides, DataConfig))
    t = time.perf_counter()
    records = Records(cfg)
    print(f"{len(records)} records from {', '.join(sources)} (built/opened in {time.perf_counter() - t:.1f} s); "
          f"tokenizer {'llama2' if cfg.tokenizer else 'demo'}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus")
    print({k: v for k, v in to_dict(cfg).items() if k in ("batch_size", "seq_buckets", "window_batches")})
    counts = {}
    stats = P.interleave({w: (lambda w=w: run(from_dict(DataConfig, {**to_dict(cfg), "workers": w}), records,
                                              args.batches, counts.setdefault(w, {}))) for w in args.workers}, args.trials, warmup=0)
    print(f"{args.trials} interleaved trials, median (min-max)")
    P.table(["workers", "examples/s", "tokens/s", "batches/s"],
            [[w, P.rate(st, counts[w]["rows"], ",.1f"), P.rate(st, counts[w]["tokens"]), P.rate(st, args.batches, ".2f")]
             for w, st in stats.items()])
    if args.step:
        it = BatchIterator(cfg, records=records)
        batch = next(it)
        it.close()
        sec = tiny_step_seconds(batch)
        print(f"tiny Llama train step on a {batch['input_ids'].shape} batch: {sec * 1e3:.1f} ms "
              f"({1 / sec:.2f} steps/s)")
    P.footer(load_before)


if __name__ == "__main__":
    main()

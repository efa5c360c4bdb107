"""Sizing a config's per-host batch budgets (nodes, edges, graphs, proteins) from a length distribution.

    python -m bmgpt_jax.training.budgets --config biomedgpt_10b_align --tokenizer PATH/tokenizer.model

The pipeline (data/pipeline.py) packs each window of `window_batches x B` examples (B = the rows one
process holds) by sorting them by length and filling B-row batches in that order; a batch closes early
when a budget is full, and whatever no longer fits into the window's batch count is skipped. So a budget
is right when every *length-sorted run* of B examples fits it, which is a far stronger demand than a
random batch fitting: sorting puts the largest molecules of a window together. The worst case for the
graph budgets is a window of molecules only (e.g. PubChemQA alone), for the protein budget one of
proteins only; a mix (PubChemQA + UniProtQA) lies between, whatever its ratio.

PubChemQA and UniProtQA are not available offline, so their stand-ins are the sample data: ChEBI-20
molecules with their descriptions ("Please describe this molecule.", the kind of answer PubChemQA has)
and the Swiss-Prot function pairs ("What is the function of this protein?", UniProtQA's kind), encoded by
the pipeline's own `encode_example` with the config's tokenizer, buckets and caps.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from typing import Sequence

import numpy as np

from bmgpt_jax.data.builders import make_builder, read_split
from bmgpt_jax.data.examples import Budget, EncodeOptions, encode_example
from bmgpt_jax.data.records import Record
from bmgpt_jax.data.text import Tokenizer, load_tokenizer
from bmgpt_jax.inputs import one_line, positive_int

COSTS = ("length", "nodes", "edges", "graphs", "proteins")  # columns of a cost array
ROUND = 64  # budgets are rounded up to a multiple of this, so they divide over up to 64 data shards


def standin_records(n_molecules: int = 0, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(molecule records, protein records): ChEBI-20 validation + test (a seeded sample of `n_molecules`,
    0 = all 6,601) and the 141 Swiss-Prot function pairs, from the shared sample data."""
    mols = [r for split in ("validation", "test") for r in read_split(make_builder("chebi20"), split)]
    if n_molecules:
        mols = [mols[i] for i in np.random.default_rng(seed).choice(len(mols), n_molecules, replace=False)]
    prots = list(read_split(make_builder("swissprot"), "train"))
    return mols, prots


def encode_options(cfg) -> EncodeOptions:
    """What the pipeline encodes with under the training config `cfg` (longest bucket, the GIN's atom cap,
    the protein cap)."""
    d, gin = cfg.data, cfg.model.gin
    return EncodeOptions(d.system_prompt, d.seq_buckets[-1], gin.max_atoms, gin.over_cap, d.max_protein_len)


def example_costs(records: Sequence[Record], tok: Tokenizer, options: EncodeOptions) -> tuple[np.ndarray, Counter]:
    """`[n, 5]` int64 costs (`COSTS`) of the records that encode, and the reasons the others are skipped."""
    rows, skipped = [], Counter()
    for r in records:
        e = encode_example(tok, r, options)
        if isinstance(e, str):
            skipped[e] += 1
        else:
            rows.append((e.length,) + e.budget)
    return np.asarray(rows, np.int64).reshape(-1, len(COSTS)), skipped


def sorted_batch_costs(mols: np.ndarray, prots: np.ndarray, batch: int, window_batches: int, *,
                       molecule_fraction: float, windows: int, seed: int = 0) -> np.ndarray:
    """`[windows * window_batches, 5]` summed costs of the batches the pipeline's packing forms: each
    window draws `window_batches * batch` examples (each a molecule with probability `molecule_fraction`,
    drawn with replacement), sorts them by length and cuts them into runs of `batch`."""
    rng = np.random.default_rng(seed)
    size = window_batches * batch
    out = []
    for _ in range(windows):
        m = rng.binomial(size, molecule_fraction)
        ex = np.concatenate([mols[rng.integers(0, len(mols), m)], prots[rng.integers(0, len(prots), size - m)]])
        ex = ex[np.argsort(ex[:, 0], kind="stable")]
        out.append(ex.reshape(window_batches, batch, len(COSTS)).sum(1))
    return np.concatenate(out)


def fit_rate(batch_costs: np.ndarray, budget: Budget) -> float:
    """Fraction of batches (rows of `batch_costs`) that fit `budget` by the pipeline's own rule."""
    return float(np.mean([budget.fits((0, 0, 0, 0), tuple(int(v) for v in c[1:]), 0) for c in batch_costs]))


def required_budgets(batch_costs: np.ndarray, quantile: float = 0.999) -> dict[str, int]:
    """The smallest budgets holding the `quantile` of each batch cost, rounded up to a multiple of
    `min(ROUND, the next power of two)` (so they divide over the data shards): node and graph budgets
    count the padding graph (one more node, one more graph), edge and protein ones do not."""
    q = np.quantile(batch_costs, quantile, axis=0, method="higher")

    def up(v) -> int:
        step = min(ROUND, 1 << max(0, math.ceil(math.log2(max(v, 1)))))
        return int(math.ceil(max(v, 1) / step) * step)
    return {"node_budget": up(q[1] + 1), "edge_budget": up(q[2]), "graph_budget": up(q[3] + 1),
            "protein_budget": up(q[4])}


MIXES = {"molecules only": 1.0, "half and half": 0.5, "proteins only": 0.0}


def main(argv=None) -> dict[str, float]:
    """The CLI: percentiles of the stand-ins, the budgets they need, and the config's fit rate per mix."""
    from bmgpt_jax.training.loop import load_config
    ap = argparse.ArgumentParser(prog="python -m bmgpt_jax.training.budgets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="biomedgpt_10b_align", help="training config (YAML or a name in configs/)")
    ap.add_argument("--tokenizer", help="SentencePiece model to encode with (default: the config's data.tokenizer)")
    ap.add_argument("--processes", type=positive_int, default=1, help="processes sharing data.batch_size (default 1)")
    ap.add_argument("--windows", type=int, default=200, help="random windows per mix (default 200)")
    ap.add_argument("--molecules", type=int, default=0, help="ChEBI-20 molecules to sample (0 = all 6,601)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. data.batch_size=16")
    args = ap.parse_args(argv)
    train_cfg = load_config(args.config, args.overrides)
    cfg = train_cfg.data
    tok = load_tokenizer(args.tokenizer if args.tokenizer is not None else cfg.tokenizer)
    options = encode_options(train_cfg)
    mol_recs, prot_recs = standin_records(args.molecules)
    (mols, m_skip), (prots, p_skip) = (example_costs(r, tok, options) for r in (mol_recs, prot_recs))
    rows = cfg.batch_size // args.processes
    print(f"{args.config}: {rows} rows per process, window {cfg.window_batches} batches, buckets {cfg.seq_buckets}, "
          f"max_atoms {options.max_atoms}, max_protein_len {cfg.max_protein_len}")
    for name, costs, skipped, n in (("ChEBI-20", mols, m_skip, len(mol_recs)), ("Swiss-Prot", prots, p_skip, len(prot_recs))):
        pct = np.percentile(costs, [50, 90, 99, 100], axis=0)
        print(f"{name}: {len(costs)} of {n} encode (skipped: {dict(skipped) or 'none'}); per example p50/p90/p99/max: "
              + "; ".join(f"{c} {'/'.join(str(int(v)) for v in pct[:, i])}" for i, c in enumerate(COSTS) if pct[-1, i]))
    budget = Budget(rows, cfg.node_budget, cfg.edge_budget, cfg.graph_budget, cfg.protein_budget)
    rates = {}
    for mix, frac in MIXES.items():
        sums = sorted_batch_costs(mols, prots, rows, cfg.window_batches, molecule_fraction=frac, windows=args.windows)
        rates[mix] = fit_rate(sums, budget)
        pct = np.percentile(sums, [99, 99.9, 100], axis=0)
        print(f"{mix}: batch p99/p99.9/max " + "; ".join(f"{c} {'/'.join(str(int(v)) for v in pct[:, i])}"
                                                         for i, c in enumerate(COSTS[1:], 1))
              + f"; needs {required_budgets(sums)}; the config's budgets fit {rates[mix]:.1%} of batches")
    return rates


def cli(argv=None) -> int:
    """`main` with a config typo or a missing tokenizer as one line on stderr and status 2."""
    try:
        main(argv)
    except (ValueError, KeyError, FileNotFoundError) as e:
        hint = (" (--tokenizer: a SentencePiece model, e.g. ../shared/data/tokenizer/llama2_tokenizer.model)"
                if isinstance(e, FileNotFoundError) else "")
        print(f"budgets: {type(e).__name__}: {one_line(e)}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

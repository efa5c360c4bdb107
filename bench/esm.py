"""ESM-2 throughput: our Flax encoder vs transformers' PyTorch `EsmModel`, same weights, same real sequences.

    python bench/esm.py                         # ESM-2 8M shape, the 141 Swiss-Prot sequences, CPU
    python bench/esm.py --config esm2_35m --batch-size 16 --max-length 512
    python bench/esm.py --config esm2_650m dtype=bfloat16        # on a GPU

Both models get identical right-padded batches (sequences sorted by length, each batch padded to a
multiple of --pad-multiple so JAX compiles few shapes). Weights are random (no hub access), which does
not change the speed. The protocol of bench/protocol.py: machine header, one warm-up pass each (JAX
compiles there), then --trials passes over all batches, ours and torch interleaved pass by pass, median
and min-max, ratio of medians, load average before and after. Before timing, the last hidden states of
every batch must agree on real tokens (float32: within 1e-3; the difference is printed). Residues/s counts
real residues only (no `<cls>`/`<eos>`/padding). Torch runs on CUDA when available, in the config's
compute dtype, like ours.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx

import protocol as P  # (bench/protocol.py; scripts run as python bench/x.py)
from bmgpt_jax.config import load
from bmgpt_jax.convert import hf_esm
from bmgpt_jax.data import proteins
from bmgpt_jax.data.builders import shared_data_dir
from bmgpt_jax.models.esm import EsmConfig

SHARED = shared_data_dir()  # ../shared/data or $BMGPT_SHARED_DATA
DATA = SHARED / "proteins" / "swissprot_function_pairs.tsv" if SHARED else Path("-")


def make_batches(seqs: list[str], batch_size: int, max_length: int, multiple: int):
    """Length-sorted `(input_ids, attention_mask)` batches, each padded to a multiple of `multiple`."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = []
    for s in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[s:s + batch_size]]
        longest = min(max(len(c) for c in chunk), max_length - 2) + 2
        width = min(-(-longest // multiple) * multiple, max_length)
        out.append(proteins.tokenize(chunk, max_length=max_length, pad_to=width, overflow="truncate"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="esm2_8m", help="configs/<name>.yaml (default esm2_8m)")
    ap.add_argument("--data", default=str(DATA), help="TSV with `accession` and `sequence` columns")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--pad-multiple", type=int, default=64)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. dtype=bfloat16 scan_layers=true")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    P.add_trials_arg(ap)
    args = ap.parse_args()

    load_before = P.header(f"bench/esm.py: ESM-2 {args.config} inference, ours vs transformers' EsmModel")
    torch.set_num_threads(args.threads)
    cfg = load(EsmConfig, args.config, args.overrides)
    seqs, _ = proteins.read_sequences_tsv(args.data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation of the few >1022-residue proteins is expected here
        batches = make_batches(seqs, args.batch_size, args.max_length, args.pad_multiple)
    residues = int(sum(m.sum() - 2 * len(m) for _, m in batches))
    tokens = int(sum(i.size for i, _ in batches))

    import transformers
    torch.manual_seed(0)
    hf_cfg = {k: v for k, v in hf_esm.config_to_hf(cfg).items() if k not in ("architectures", "model_type", "dtype")}
    hf = transformers.EsmModel(transformers.EsmConfig(**hf_cfg), add_pooling_layer=False).float().eval()
    model = hf_esm.from_state_dict({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    hf = hf.to(device=tdev, dtype=getattr(torch, cfg.dtype))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, mask))

    def run_jax(ids, mask):
        return np.asarray(forward(state, ids, mask))

    def run_torch(ids, mask):
        with torch.inference_mode():
            out = hf(torch.from_numpy(ids).long().to(tdev), attention_mask=torch.from_numpy(mask).long().to(tdev))
            return out.last_hidden_state.float().cpu().numpy()

    t0 = time.perf_counter()
    out_jax = [run_jax(ids, mask) for ids, mask in batches]
    compile_s = time.perf_counter() - t0
    out_torch = [run_torch(ids, mask) for ids, mask in batches]
    diff = max(float(np.abs(a - b)[m.astype(bool)].max()) for a, b, (_, m) in zip(out_jax, out_torch, batches))
    if cfg.dtype == "float32":
        assert diff < 1e-3, f"max |ours - torch| on real tokens {diff:.2e} >= 1e-3"
    stats = P.interleave({"ours": lambda: [run_jax(i, m) for i, m in batches],
                          "torch": lambda: [run_torch(i, m) for i, m in batches]}, args.trials, warmup=0)

    dev = jax.devices()[0]
    print(f"ESM-2 {args.config}: {cfg.num_layers} layers x {cfg.hidden_size}, {cfg.dtype}; {len(seqs)} sequences, "
          f"{len(batches)} batches of <= {args.batch_size}, {residues} residues, {tokens} padded tokens")
    print(f"jax on {dev.platform}; torch on {tdev} ({args.threads} CPU threads); {args.trials} interleaved passes, "
          f"median (min-max)")
    print(f"max |ours - torch| on real tokens: {diff:.2e}; JAX first pass (compiles {len({i.shape for i, _ in batches})}"
          f" shapes): {compile_s:.1f} s")
    P.table(["implementation", "seconds per pass", "residues/s", "vs torch"],
            [[f"bmgpt_jax (jax.jit, {dev.platform})", P.seconds(stats["ours"], 1, ".2f"),
              P.rate(stats["ours"], residues), P.ratio(stats["ours"], stats["torch"])],
             [f"transformers EsmModel ({tdev})", P.seconds(stats["torch"], 1, ".2f"), P.rate(stats["torch"], residues),
              "1.00x"]])
    P.footer(load_before)


if __name__ == "__main__":
    main()

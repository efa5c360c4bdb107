"""Where a greedy decode step's time goes, measured without a profiler: wall-clock per new token of the
real `generation.generate` for decoders that differ in one thing at a time.

`bench/profile_step.py --decode` names the ops of a step and their times, but not what a part costs the
others: an op's time there includes what earlier ops did to the caches (the LM head streams its whole weight,
and YNNPACK writes a packed copy of it, on every step). Here each row is a separately compiled generation,
timed per new token as `(t(new) - t(1)) / (new - 1)` (prefill and dispatch cancel), the rows interleaved trial
by trial (bench/protocol.py). Differences between rows give:
- one decoder layer beside the full LM head: (L layers - 1 layer) / (L - 1). The whole 1-layer decoder
  with a 512-token head bounds a layer beside a small head; the first well above the second would mean
  the head slows the layers (its weight is read, and packed by YNNPACK, on every call);
- the vocabulary's part (LM head `[b, hidden] x [hidden, vocab]` plus the greedy pick over `[b, vocab]`):
  full vocabulary minus a 512-token one, 1 layer each;
- the LM-head product alone, ours (`layers.dense`, the model's product, jitted inside a loop, weights as
  an argument) and PyTorch's `F.linear` on the `[vocab, hidden]` weight, as HF's `lm_head` runs it.

    python bench/decode_parts.py                       # bench/generate.py's decoder: 4 x 256, vocab 32001, batch 8
    python bench/decode_parts.py --batch 1
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import protocol as P  # noqa: E402  (bench/protocol.py; puts this checkout's root first on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bmgpt_jax.generation import GenerationConfig, generate  # noqa: E402
from bmgpt_jax.models.layers import dense  # noqa: E402
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llama_step import add_shape_args, ffn_size  # noqa: E402

SMALL_VOCAB = 512


def decoder(layers: int, vocab: int, args) -> tuple[LlamaForCausalLM, jax.Array, jax.Array]:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_layers=layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads, max_position_embeddings=1024)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, vocab, (args.batch, args.seq)), jnp.int32)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), ids, jnp.ones_like(ids)


def per_token(model, ids, mask, new: int):
    """A callable timing one generation of `new` tokens minus one of 1 token (seconds per new token)."""
    def gen(n):
        return generate(model, ids, mask, config=GenerationConfig(max_new_tokens=n, eos_token_id=-1))

    def run():
        t = time.perf_counter()
        gen(new)
        a = time.perf_counter() - t
        t = time.perf_counter()
        gen(1)
        return (a - (time.perf_counter() - t)) / (new - 1)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)  # bench/llama_step.py's options, with bench/generate.py's decoder as the defaults
    ap.set_defaults(hidden=256, heads=4, seq=82)
    ap.add_argument("--ffn", type=int, default=0, help="FFN width (default: Llama's for --hidden)")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--new", type=int, default=129, help="new tokens per timed generation")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (LM-head row)")
    P.add_trials_arg(ap)
    args = ap.parse_args()
    args.ffn = args.ffn or ffn_size(args.hidden)
    load_before = P.header("bench/decode_parts.py: a greedy decode step's parts, by difference")
    import torch
    torch.set_num_threads(args.threads)

    shapes = {"full": (args.layers, args.vocab), "1 layer": (1, args.vocab), "1 layer, small vocab": (1, SMALL_VOCAB)}
    sides = {k: per_token(*decoder(*s, args), args.new) for k, s in shapes.items()}
    w = np.random.RandomState(1).randn(args.hidden, args.vocab).astype(np.float32) * 0.02
    x = np.random.RandomState(2).randn(args.batch, args.hidden).astype(np.float32)
    head = jax.jit(lambda x, w: jax.lax.fori_loop(0, 100, lambda i, c: (c[0] + 1e-6, c[1] + dense(c[0], w)[:, 0]),
                                                  (x, jnp.zeros(len(x))))[1])
    wj, xj, wt, xt = jnp.asarray(w), jnp.asarray(x), torch.from_numpy(np.ascontiguousarray(w.T)), torch.from_numpy(x)

    def ours_head():
        t = time.perf_counter()
        jax.block_until_ready(head(xj, wj))
        return (time.perf_counter() - t) / 100

    def torch_head():
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(100):
                torch.nn.functional.linear(xt, wt)
            return (time.perf_counter() - t) / 100

    sides.update({"LM head, ours": ours_head, "LM head, PyTorch": torch_head})
    # each side returns its own time per unit; interleave's warm-up call is each list's first entry
    samples = {k: [] for k in sides}
    P.interleave({k: (lambda k=k: samples[k].append(sides[k]())) for k in sides}, args.trials)
    stats = {k: P.Stats(v[1:]) for k, v in samples.items()}
    med = {k: s.median * 1e3 for k, s in stats.items()}
    rows = [[k, P.seconds(s, fmt=".3f")] for k, s in stats.items()]
    extra = max(args.layers - 1, 1)
    layer = (med["full"] - med["1 layer"]) / extra
    vocab_part = med["1 layer"] - med["1 layer, small vocab"]
    rows += [[f"= one decoder layer beside the {args.vocab}-token head: (full - 1 layer) / {extra}", f"{layer:.3f}"],
             [f"= the vocabulary's part (head + greedy pick, {args.vocab} vs {SMALL_VOCAB} tokens)",
              f"{vocab_part:.3f}"]]
    print(f"\nLlama {args.layers} x {args.hidden} ({args.heads} heads, {args.kv_heads} kv), FFN {args.ffn}, vocab "
          f"{args.vocab}, batch {args.batch}, {args.seq}-token prompt, {args.new} new tokens, float32, greedy; "
          f"{args.trials} interleaved trials, median (min-max)")
    P.table(["row", "ms per new token"], rows)
    P.footer(load_before)


if __name__ == "__main__":
    main()

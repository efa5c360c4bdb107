"""Where a Llama train step's time goes on the XLA backend: the compiled step's ops, slowest first.

    python bench/profile_step.py                     # bench/llama_step.py's shape: 4 x 512, vocab 32001, 8 x 256
    python bench/profile_step.py --layers 2 --top 20
    python bench/profile_step.py --dtype bfloat16    # parameters and compute in bfloat16 (the loss in float32)
    python bench/profile_step.py --decode 64 --hidden 256 --heads 4 --kv-heads 2 --batch 8 --seq 82
                                                     # bench/generate.py's decoder, per decode step

Runs `--steps` forward + backward steps of one of bench/llama_step.py's losses (`--loss`, default optax) under
`jax.profiler.trace(create_perfetto_trace=True)`, reads the Perfetto trace back and prints, per compiled
op (an XLA:CPU thunk: a YNNPACK GEMM fusion `ynn_fusion.N`, a plain `dot.N`, a loop fusion ...), its time
per step, its share of the step, the op's output shape and layout and the JAX operation it came from (the
HLO `op_name` metadata), then the totals per op kind. `--decode NEW` profiles greedy decoding instead
(`generation.generate`: the prefill of a random `--seq`-token prompt and NEW decode steps, one jit), per
decode step (one new token per row; the prefill's few ops are spread over the steps). Not a timed comparison, so no PyTorch side; it
tells which ops a change to the model should target (issue 16: the step's gap to PyTorch is mostly
outside the GEMMs).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import protocol as P  # noqa: E402  (bench/protocol.py; scripts run as python bench/x.py)
from bmgpt_jax.generation import GenerationConfig, generate, sampling  # noqa: E402
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llama_step import LOSSES, add_shape_args, ffn_size  # noqa: E402


def op_table(hlo: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (output shape with layout, the JAX op_name it came from)."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if m:
            origin = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = (m.group(2), origin.group(1) if origin else "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--loss", default="optax", choices=sorted(LOSSES), help="bench/llama_step.py's loss")
    ap.add_argument("--kv-heads", type=int, default=0, help="KV heads (default: --heads)")
    ap.add_argument("--decode", type=int, default=0, metavar="NEW",
                    help="profile greedy decoding of NEW tokens after a --seq-token prompt instead of a train step")
    args = ap.parse_args()
    load_before = P.header("bench/profile_step.py: a Llama train step's (or decode step's) compiled ops, slowest first")
    ffn = ffn_size(args.hidden)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=ffn, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads or args.heads, dtype=args.dtype,
                      param_dtype=args.dtype, max_position_embeddings=max(args.seq + args.decode, 512))
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, args.vocab, (args.batch, args.seq)))
    if args.decode:  # greedy decoding: prefill + `--decode` steps in one jit (generation.sampling._decode)
        gen = GenerationConfig(max_new_tokens=args.decode, eos_token_id=-1)
        mask = jnp.ones_like(ids)
        ops = op_table(sampling._decode.lower(graphdef, state, ids, None, mask, jax.random.key(gen.seed),
                                              cfg=gen).compile().as_text())
        run, per, unit = (lambda: generate(model, ids, mask, config=gen)), args.decode, "decode step"
        what = f"greedy decoding of {args.decode} new tokens after {args.seq} prompt tokens (prefill included)"
    else:
        step = jax.jit(jax.value_and_grad(lambda st, i: LOSSES[args.loss](nnx.merge(graphdef, st), i)))
        ops = op_table(step.lower(state, ids).compile().as_text())
        run, per, unit = (lambda: jax.block_until_ready(step(state, ids))), 1, "step"
        what = f"forward + backward of the {args.loss} loss"
    for _ in range(2):
        run()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.steps):
                run()
        trace = json.load(gzip.open(next(Path(d).rglob("*.trace.json.gz"))))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops:
            per_op[e["name"]] += e["dur"] / 1e3 / args.steps / per   # microseconds -> ms per step / token
    total = sum(per_op.values())
    print(f"\nLlama {args.layers} x {args.hidden}, {cfg.num_heads} heads ({cfg.num_kv_heads} kv), FFN {ffn}, vocab "
          f"{args.vocab}, batch {args.batch} x {args.seq}, {args.dtype}; {what}; {args.steps} profiled runs; the ops "
          f"below sum to {total:,.3f} ms per {unit}")
    P.table(["op", f"ms / {unit}", "share", "output", "from"],
            [[name, f"{ms:.3f}", f"{ms / total:.1%}", ops[name][0], ops[name][1][-70:]]
             for name, ms in per_op.most_common(args.top)])
    kinds = collections.Counter()
    for name, ms in per_op.items():
        kinds[name.rsplit(".", 1)[0]] += ms
    print()
    P.table(["op kind", f"ms / {unit}", "share"],
            [[k, f"{ms:.3f}", f"{ms / total:.1%}"] for k, ms in kinds.most_common(12)])
    P.footer(load_before)


if __name__ == "__main__":
    main()

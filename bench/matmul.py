"""The matrix products of a Llama train step, XLA's CPU GEMM against PyTorch's, shape by shape.

    python bench/matmul.py                         # the shapes of bench/llama_step.py's default
    python bench/matmul.py --hidden 320 --ffn 1280 --vocab 0 --tokens 4096   # ESM-2 8M-like, no LM head
    python bench/matmul.py --dtype bfloat16        # bfloat16 products (avx512_bf16 CPUs)

A forward + backward step of a decoder is almost all GEMMs: per layer the q/k/v/o projections
(`[tokens, hidden] x [hidden, hidden]`), the MLP's gate/up (`x [hidden, ffn]`) and down (`x [ffn, hidden]`),
then the LM head (`x [hidden, vocab]`); each appears three times, as the forward `x @ W`, the weight
gradient `x.T @ dy` and the input gradient `dy @ W.T`. This bench times each of those products alone,
float32, jitted `jnp.dot` against `torch.matmul` (same random operands; the results compared first,
relative 1e-4), on the protocol of bench/protocol.py (interleaved trials, median and min-max, the
machine and load average printed). The last row weights every product by how often one train step runs
it (`--layers` times for the layer products): the ratio a step made only of these GEMMs would have, the
ceiling of what layout and fusion work in the model can reach while XLA computes the products.

A third column compiles the same products with XLA:CPU's YNNPACK library fusions limited to reductions
(`compiler_options={"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}`), so a plain
dot runs on XLA's Eigen GEMM instead of YNNPACK's (the default): which is faster depends on the shape
and the CPU.

`--dtype bfloat16` times the products in bfloat16 on both sides. Our column is then what the model runs:
`layers.dense` and, for the two gradients, its VJP (on CPU the bfloat16 GEMM with a float32 result,
`layers._dense_bf16_cpu`); the second column is a plain bfloat16 `jnp.dot`, which XLA:CPU computes by
converting both operands to float32.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import protocol as P  # noqa: E402  (bench/protocol.py; scripts run as python bench/x.py)
from bmgpt_jax.models.layers import dense  # noqa: E402

EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}  # YNNPACK for reductions only


def products(tokens: int, hidden: int, ffn: int, vocab: int) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, times per layer or 0 for once per step) of the forward products `[M, K] x [K, N]`."""
    out = [("q/k/v/o proj", tokens, hidden, hidden, 4), ("gate/up proj", tokens, hidden, ffn, 2),
           ("down proj", tokens, ffn, hidden, 1)]
    return out + ([("LM head", tokens, hidden, vocab, 0)] if vocab else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8 * 255, help="rows: batch x positions")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=32001, help="0: no LM head")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    P.add_trials_arg(ap)
    args = ap.parse_args()

    import torch
    bf16 = args.dtype == "bfloat16"
    load_before = P.header(f"bench/matmul.py: {args.dtype} GEMMs of a Llama train step, XLA vs torch.matmul")
    torch.set_num_threads(args.threads)
    rs = np.random.RandomState(0)
    rows, total = [], {"xla": 0.0, "xla_eigen": 0.0, "torch": 0.0}
    # forward x @ W, weight gradient x.T @ dy, input gradient dy @ W.T: the transposes are views of the
    # stored matrices, inside the jitted program, as autodiff produces them
    kinds = (("x @ W", lambda a, b: a @ b, 1), ("x.T @ dy", lambda a, b: a.T @ b, 2), ("dy @ W.T", lambda a, b: a @ b.T, 0))
    # bfloat16: the model's products, `dense` and the two halves of its VJP (x, W, dy: shapes of `pair`)
    model = (lambda x, w: dense(x, w),
             lambda x, dy: jax.vjp(dense, x, jnp.zeros((x.shape[1], dy.shape[1]), x.dtype))[1](dy)[1],
             lambda dy, w: jax.vjp(dense, jnp.zeros((dy.shape[0], w.shape[0]), dy.dtype), w)[1](dy)[0])
    for name, m, k, n, per_layer in products(args.tokens, args.hidden, args.ffn, args.vocab):
        mats = [rs.rand(*shape).astype(np.float32) for shape in ((m, k), (k, n), (m, n))]  # x, W, dy
        for (kind, fn, first), ours in zip(kinds, model):
            pair = (mats[0], mats[1]) if first == 1 else (mats[0], mats[2]) if first == 2 else (mats[2], mats[1])
            ja, jb = (jnp.asarray(a, args.dtype) for a in pair)
            ta, tb = (torch.from_numpy(a).to(getattr(torch, args.dtype)) for a in pair)
            jfn, efn = (jax.jit(ours), jax.jit(fn)) if bf16 else (jax.jit(fn), jax.jit(fn, compiler_options=EIGEN_DOTS))
            for f in (jfn, efn):
                got, want = np.asarray(f(ja, jb), np.float32), fn(ta, tb).float().numpy()
                np.testing.assert_allclose(got, want, rtol=1e-2 if bf16 else 1e-4, atol=(1e-2 if bf16 else 1e-4) * max(m, k))
            s = P.interleave({"xla": lambda: jfn(ja, jb).block_until_ready(),
                              "xla_eigen": lambda: efn(ja, jb).block_until_ready(), "torch": lambda: fn(ta, tb)},
                             args.trials)
            flop = 2 * m * k * n
            weight = args.layers * per_layer if per_layer else 1
            for side in total:
                total[side] += weight * s[side].median
            rows.append([f"{name} {kind}", f"M {m}, K {k}, N {n}", P.rate(s["xla"], flop / 1e9, ".1f"),
                         P.rate(s["xla_eigen"], flop / 1e9, ".1f"), P.rate(s["torch"], flop / 1e9, ".1f"),
                         P.ratio(s["xla"], s["torch"]), P.ratio(s["xla_eigen"], s["torch"])])
    rows.append([f"one step's GEMMs ({args.layers} layers)", "", f"{1e3 * total['xla']:.0f} ms",
                 f"{1e3 * total['xla_eigen']:.0f} ms", f"{1e3 * total['torch']:.0f} ms",
                 f"{total['torch'] / total['xla']:.2f}x", f"{total['torch'] / total['xla_eigen']:.2f}x"])
    print(f"\n{args.dtype}, torch {args.threads} threads; {args.trials} interleaved trials, median (min-max) GFLOP/s")
    second = "plain jnp.dot" if bf16 else "Eigen dots"
    P.table(["product", "shape", "ours (dense + VJP)" if bf16 else "XLA GFLOP/s", f"XLA {second}", "torch GFLOP/s",
             "ours / torch" if bf16 else "XLA / torch", f"{second} / torch"], rows)
    P.footer(load_before)


if __name__ == "__main__":
    main()

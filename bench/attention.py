"""Attention memory and speed: compiled temporaries and time of forward + backward per implementation.

    python bench/attention.py                                  # CPU: xla vs flash, 1 x T x 8 heads of 64
    python bench/attention.py --impl xla flash cudnn --dtype bfloat16 --batch 8 --heads 32 --head-dim 128  # GPU

For each T: the temporary bytes XLA allocates for `jax.grad` of a causal, right-padded attention call
(`jit(...).lower(...).compile().memory_analysis()`, nothing run), then, for T <= --time-max, the median
wall time of the compiled forward + backward over --repeats runs. Then the same memory figure for the
gradient of a whole training loss: a 1-layer, 64-wide Llama with the 32001-token vocabulary (`lm_loss`:
attention + chunked cross-entropy), against the dense form (`attention=xla`, `loss_chunk_size=0`).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmgpt_jax.models import attention as A
from bmgpt_jax.models.biomedgpt import lm_loss
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM

MiB = 2 ** 20


def attention_grad(impl: str, t: int, args) -> tuple[object, tuple]:
    """The jitted gradient of sum(attention) and its abstract arguments."""
    dt = jnp.dtype(args.dtype)

    def loss(q, k, v, ids):
        out = A.attention(q, k, v, A.Segments.self_attention(ids), causal=True, implementation=impl)
        return jnp.sum(out.astype(jnp.float32))
    shapes = ((args.batch, t, args.heads, args.head_dim), (args.batch, t, args.kv_heads, args.head_dim))
    avals = (jax.ShapeDtypeStruct(shapes[0], dt), jax.ShapeDtypeStruct(shapes[1], dt),
             jax.ShapeDtypeStruct(shapes[1], dt), jax.ShapeDtypeStruct((args.batch, t), jnp.int32))
    return jax.jit(jax.grad(loss, (0, 1, 2))), avals


def time_it(fn, avals, repeats: int) -> float:
    rs = np.random.RandomState(0)
    real = [jnp.asarray(rs.randn(*a.shape), a.dtype) for a in avals[:3]]
    ids = np.ones(avals[3].shape, np.int32)
    ids[:, avals[3].shape[1] * 3 // 4:] = 0  # a quarter of right padding
    jax.block_until_ready(fn(*real, jnp.asarray(ids)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*real, jnp.asarray(ids)))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def model_temp(t: int, **changes) -> float:
    cfg = LlamaConfig(vocab_size=32001, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                      intermediate_size=128, max_position_embeddings=max(t, 4096), **changes)
    gdef, params = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    batch = {k: jax.ShapeDtypeStruct((1, t), jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    grad = jax.jit(jax.grad(lambda p, b: lm_loss(nnx.merge(gdef, p), b)[0]))
    return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes / MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", nargs="+", default=["xla", "flash"], choices=A.IMPLEMENTATIONS[1:])
    ap.add_argument("--seq", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    ap.add_argument("--time-max", type=int, default=2048, help="time the runs up to this T")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); batch {args.batch}, "
          f"{args.heads} heads ({args.kv_heads} kv) of {args.head_dim}, {args.dtype}, causal, fwd+bwd")
    print(f"{'T':>6} {'impl':>6} {'temp MiB':>10} {'ms':>9}")
    for t in args.seq:
        for impl in args.impl:
            fn, avals = attention_grad(impl, t, args)
            temp = fn.lower(*avals).compile().memory_analysis().temp_size_in_bytes / MiB
            ms = f"{1e3 * time_it(fn, avals, args.repeats):9.1f}" if t <= args.time_max else f"{'-':>9}"
            print(f"{t:>6} {impl:>6} {temp:10.1f} {ms}", flush=True)
    print("\n1-layer 64-wide Llama, vocab 32001, grad of lm_loss: compiled temp MiB")
    print(f"{'T':>6} {'flash + chunked loss':>21} {'xla + dense logits':>19}")
    for t in (4096, 8192):
        print(f"{t:>6} {model_temp(t):21.1f} {model_temp(t, attention='xla', loss_chunk_size=0):19.1f}", flush=True)


if __name__ == "__main__":
    main()

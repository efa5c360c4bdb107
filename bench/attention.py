r"""Attention memory and speed: compiled temporaries and time of forward + backward per implementation.

    python bench/attention.py                                  # CPU: xla vs flash, 1 x T x 8 heads of 64
    python bench/attention.py --impl xla flash cudnn --dtype bfloat16 --batch 8 --heads 32 --head-dim 128  # GPU
    python bench/attention.py --bidirectional --forward-only --batch 8 --heads 20 --kv-heads 20 --head-dim 16 \
        --seq 256 512 1024 --time-max 1024       # ESM-2 8M's attention at inference

For each T: the temporary bytes XLA allocates for `jax.grad` of a causal, right-padded attention call
(`jit(...).lower(...).compile().memory_analysis()`, nothing run), then, for T <= --time-max, the wall time
of the compiled forward + backward on the protocol of bench/protocol.py (machine header, every
implementation and PyTorch's `scaled_dot_product_attention` with the same causal + key-padding boolean
mask interleaved trial by trial, median and min-max, load average before and after; before timing, every
implementation's output on the real query rows must equal PyTorch's within 1e-4 in float32). Then the same memory figure for the
gradient of a whole training loss: a 1-layer, 64-wide Llama with the 32001-token vocabulary (`lm_loss`:
attention + chunked cross-entropy), against the dense form (`attention=xla`, `loss_chunk_size=0`).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import protocol as P  # (bench/protocol.py; scripts run as python bench/x.py)
from bmgpt_jax.models import attention as A
from bmgpt_jax.models.biomedgpt import lm_loss
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM

MiB = 2 ** 20


def attention_grad(impl: str, t: int, args) -> tuple[object, tuple]:
    """The jitted gradient of sum(attention) (with --forward-only: the attention itself) and its abstract
    arguments."""
    dt = jnp.dtype(args.dtype)

    def forward(q, k, v, ids):
        # bidirectional: ids 0/1 as ESM passes them (`num_ids=2`, which `rows` folds into its scores)
        segments = A.Segments.self_attention(ids, num_ids=2 if args.bidirectional else None)
        return A.attention(q, k, v, segments, causal=not args.bidirectional, implementation=impl)

    def loss(q, k, v, ids):
        return jnp.sum(forward(q, k, v, ids).astype(jnp.float32))
    shapes = ((args.batch, t, args.heads, args.head_dim), (args.batch, t, args.kv_heads, args.head_dim))
    avals = (jax.ShapeDtypeStruct(shapes[0], dt), jax.ShapeDtypeStruct(shapes[1], dt),
             jax.ShapeDtypeStruct(shapes[1], dt), jax.ShapeDtypeStruct((args.batch, t), jnp.int32))
    return jax.jit(forward if args.forward_only else jax.grad(loss, (0, 1, 2))), avals


def inputs(avals) -> tuple[list[np.ndarray], np.ndarray]:
    """Random q, k, v and the segment ids (a quarter of right padding) for `avals`."""
    rs = np.random.RandomState(0)
    qkv = [rs.randn(*a.shape).astype(np.float32) for a in avals[:3]]
    ids = np.ones(avals[3].shape, np.int32)
    ids[:, avals[3].shape[1] * 3 // 4:] = 0
    return qkv, ids


def torch_side(qkv, ids, dtype: str, causal: bool, backward: bool):
    """PyTorch's fused SDPA on the same inputs (`[b, h, t, d]`, GQA by repeating k/v heads): (output
    `[b, t, h, d]` as numpy, a callable running forward + backward of its sum)."""
    import torch
    import torch.nn.functional as F
    td = getattr(torch, dtype)
    q, k, v = (torch.from_numpy(x).to(td).transpose(1, 2).contiguous().requires_grad_() for x in qkv)
    rep = q.shape[1] // k.shape[1]
    t = q.shape[2]
    valid = torch.from_numpy(ids.astype(bool))
    mask = (torch.ones(t, t, dtype=torch.bool).tril() if causal else torch.ones(t, t, dtype=torch.bool))[None, None]
    mask = mask & valid[:, None, None, :]

    def run():
        with torch.set_grad_enabled(backward):
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                 attn_mask=mask)
            if backward:
                out.float().sum().backward()
        return out
    out = run().detach().float().transpose(1, 2).numpy()
    return out, run


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
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--forward-only", action="store_true", help="time the forward alone (inference, e.g. ESM)")
    ap.add_argument("--bidirectional", action="store_true", help="no causal mask (ESM); padding masked still")
    P.add_trials_arg(ap)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    load_before = P.header("bench/attention.py: attention forward + backward, memory and time, ours vs PyTorch SDPA")
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); batch {args.batch}, "
          f"{args.heads} heads ({args.kv_heads} kv) of {args.head_dim}, {args.dtype}, "
          f"{'bidirectional' if args.bidirectional else 'causal'}, {'forward' if args.forward_only else 'fwd+bwd'}")
    rows = []
    for t in args.seq:
        fns = {impl: attention_grad(impl, t, args) for impl in args.impl}
        temps = {impl: fn.lower(*avals).compile().memory_analysis().temp_size_in_bytes / MiB
                 for impl, (fn, avals) in fns.items()}
        if t > args.time_max:
            rows += [[t, impl, f"{temps[impl]:.1f}", "", ""] for impl in args.impl]
            continue
        avals = fns[args.impl[0]][1]
        qkv, ids = inputs(avals)
        real = [jnp.asarray(x, avals[0].dtype) for x in qkv] + [jnp.asarray(ids)]
        ref, torch_run = torch_side(qkv, ids, args.dtype, not args.bidirectional, not args.forward_only)
        keep = ids.astype(bool)
        for impl in args.impl:
            out = A.attention(*real[:3], A.Segments.self_attention(real[3]), causal=not args.bidirectional,
                              implementation=impl)
            diff = float(np.abs(np.asarray(out, np.float32) - ref)[keep].max())
            assert args.dtype != "float32" or diff < 1e-4, f"{impl} at T={t}: max |ours - torch| {diff:.2e}"
        sides = {impl: (lambda fn=fn: jax.block_until_ready(fn(*real))) for impl, (fn, _) in fns.items()}
        stats = P.interleave({**sides, "torch": torch_run}, args.trials)
        rows += [[t, impl, f"{temps[impl]:.1f}", P.seconds(stats[impl]), P.ratio(stats[impl], stats["torch"])]
                 for impl in args.impl]
        rows.append([t, "PyTorch SDPA", "", P.seconds(stats["torch"]), "1.00x"])
    print(f"{args.trials} interleaved trials, median (min-max); outputs on real rows equal PyTorch's (asserted)")
    P.table(["T", "impl", "temp MiB", "ms forward" if args.forward_only else "ms fwd+bwd", "vs PyTorch"], rows)
    print("\n1-layer 64-wide Llama, vocab 32001, grad of lm_loss: compiled temp MiB")
    print(f"{'T':>6} {'flash + chunked loss':>21} {'xla + dense logits':>19}")
    for t in (4096, 8192):
        print(f"{t:>6} {model_temp(t):21.1f} {model_temp(t, attention='xla', loss_chunk_size=0):19.1f}", flush=True)
    P.footer(load_before)


if __name__ == "__main__":
    main()

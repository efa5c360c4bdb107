"""Benchmark: Llama train step (forward + backward) and greedy decoding, ours vs transformers' PyTorch.

Same config, same weights, the protocol of bench/protocol.py (machine header, ours and PyTorch
interleaved trial by trial, median and min-max over --trials, ratio of medians, load before and after).

Train step: `value_and_grad` of the mean next-token loss over batch x (seq - 1) targets, three ways on our
side against one PyTorch reference (`LlamaForCausalLM` logits + `F.cross_entropy`, `backward()`):
"optax" (full logits, `optax.softmax_cross_entropy_with_integer_labels`), "plain" (full logits,
`log_softmax` + `take_along_axis`) and "chunked" (the project's training loss `lm_loss`, logits in chunks of
`loss_chunk_size` tokens). Before timing, every loss must equal PyTorch's (float32: within 2e-4).
MFU is against this machine's measured matmul rate in the same dtype.

Decode: greedy, a fixed number of new tokens, ours (`generation.generate`) vs HF `generate`, the same
tokens asserted first; per decode batch. Ours decodes the model as the inference loaders build it
(`scan_layers=False`); the train step's scanned layout is timed beside it ("ours, scanned layers"): on CPU
a scanned decode copies every layer's weights out of the stack for each token (XLA:CPU's GEMMs read no
slice in place), so it is the slower layout for decoding. The batch-1 row also reports the memory-bandwidth bound: bytes
that must be read per new token (every weight matrix, the LM head, one embedding row, and the KV cache of
the positions so far) over the measured read bandwidth (`protocol.read_bandwidth`).

`--dtype bfloat16`: both sides in bfloat16 (parameters and compute; the loss in float32), the loss and
logit differences of each side against its float32 self printed (and ours against PyTorch's bfloat16
loss asserted within 5e-2). Decoding is then timed in float32 as above and also in bfloat16 (ours
unscanned against HF, both models in bfloat16): bfloat16 rounding differs between the two, so greedy
paths may part after a near tie; both always generate `--gen-new` tokens per row (no early stop), and the
table gives the share of new tokens equal to HF's instead of asserting them; the bandwidth bound counts
2-byte weights. Without avx512_bf16 in the CPU flags bfloat16 matmuls are emulated, and the header says so.

    python bench/llama_step.py                       # 4 layers, hidden 512, 8 heads, batch 8 x 256
    python bench/llama_step.py --layers 2 --trials 5 --losses optax --gen-batch 1   # quicker
    python bench/llama_step.py --dtype bfloat16 --gen-batch      # the bfloat16 train step, no decode
    python bench/llama_step.py --dtype bfloat16 --losses optax   # + float32 and bfloat16 decoding
    python bench/llama_step.py --losses optax --gen-batch 1 4 --gen-prompt 1024   # decoding after a long prompt
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import protocol as P  # noqa: E402  (bench/protocol.py; scripts run as python bench/x.py)
from bmgpt_jax.convert import hf_llama  # noqa: E402
from bmgpt_jax.generation import generate  # noqa: E402
from bmgpt_jax.models.biomedgpt import lm_loss  # noqa: E402
from bmgpt_jax.training.monitor import measure_matmul_flops, train_flops_per_token  # noqa: E402


def optax_loss(model, ids):
    logits = model(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids[:, 1:]).mean()


def plain_loss(model, ids):
    logp = jax.nn.log_softmax(model(ids[:, :-1]).astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


def chunked_loss(model, ids):
    ones = jnp.ones_like(ids)
    total, count = lm_loss(model, {"input_ids": ids, "attention_mask": ones, "loss_mask": ones})
    return total / count


LOSSES = {"optax": optax_loss, "plain": plain_loss, "chunked": chunked_loss}


def jit_step(model, loss):
    """A jitted `(state, ids) -> (loss, grads)` over the split model (no graph traversal per call)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(jax.value_and_grad(lambda st, ids: loss(nnx.merge(graphdef, st), ids)))
    return lambda ids: fn(state, ids)


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The model and batch shape options of this bench (bench/profile_step.py takes the same)."""
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32001)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)


def ffn_size(hidden: int) -> int:
    """Llama's SwiGLU width for `hidden`: 8/3 of it, rounded up to a multiple of 64."""
    return int(hidden * 8 / 3 + 63) // 64 * 64


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--gen-batch", type=int, nargs="*", default=[1, 4], help="decode batches (none: no decode)")
    ap.add_argument("--gen-prompt", type=int, default=32)
    ap.add_argument("--gen-new", type=int, default=64)
    P.add_trials_arg(ap)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    load_before = P.header(f"bench/llama_step.py: Llama train step and greedy decode, ours vs transformers, {args.dtype}")
    if args.dtype == "bfloat16" and not P.has_flag("avx512_bf16"):
        print("# this CPU has no avx512_bf16: bfloat16 matmuls are emulated on both sides")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ffn = ffn_size(args.hidden)
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads,
                         max_position_embeddings=max(args.seq, args.gen_prompt + args.gen_new, 512),
                         attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = hf_llama.load(d, scan_layers=True)
        ours_dec = hf_llama.load(d)  # decoding: the inference loaders' layout (scan_layers=False)
        ours_lp = (hf_llama.load(d, scan_layers=True, dtype="bfloat16", param_dtype="bfloat16")
                   if args.dtype == "bfloat16" else ours)
        ours_dec_lp = hf_llama.load(d, dtype="bfloat16", param_dtype="bfloat16") if args.dtype == "bfloat16" else None
    hf_lp = copy.deepcopy(hf).to(torch.bfloat16) if args.dtype == "bfloat16" else hf
    cfg = ours.config

    rs = np.random.RandomState(0)
    ids = rs.randint(3, args.vocab, (args.batch, args.seq))
    tokens = args.batch * args.seq
    batch, tids = jnp.asarray(ids), torch.tensor(ids)

    def torch_loss(model):
        out = model(tids[:, :-1]).logits.float()
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), tids[:, 1:].reshape(-1))

    # --- parity: every loss of ours equals PyTorch's in float32 before anything is timed ---
    hf.train()
    with torch.no_grad():
        ref = float(torch_loss(hf))
    for name in args.losses:
        got = float(LOSSES[name](ours, batch))
        assert abs(got - ref) < 2e-4, f"{name} loss {got:.6f} != PyTorch {ref:.6f}"
    print(f"# parity: float32 loss {ref:.6f} (PyTorch); ours ({', '.join(args.losses)}) within 2e-4")
    if args.dtype == "bfloat16":
        hf_lp.train()
        with torch.no_grad():
            ref_lp = float(torch_loss(hf_lp))
            t_logits = hf_lp(tids[:1, :64]).logits.float().numpy()
            t_logits32 = hf(tids[:1, :64]).logits.numpy()
        loss_lp = float(optax_loss(ours_lp, batch))
        assert abs(loss_lp - ref_lp) < 5e-2, f"bfloat16 loss ours {loss_lp:.4f} vs PyTorch {ref_lp:.4f}"
        o_logits = np.asarray(ours_lp(batch[:1, :64]))
        o_logits32 = np.asarray(ours(batch[:1, :64]))
        print(f"# bfloat16 vs float32: loss ours {loss_lp - ref:+.2e}, PyTorch "
              f"{ref_lp - ref:+.2e}; max |logit diff| (first row, 64 tokens) ours "
              f"{np.abs(o_logits - o_logits32).max():.3f}, PyTorch {np.abs(t_logits - t_logits32).max():.3f}; "
              f"ours bf16 vs PyTorch bf16 {np.abs(o_logits - t_logits).max():.3f}")

    # --- train step: forward + backward (the optimizer update is cheap and equal) ---
    steps = {f"ours {n}": jit_step(ours_lp, LOSSES[n]) for n in args.losses}
    sides = {k: (lambda f=f: jax.block_until_ready(f(batch))) for k, f in steps.items()}

    def torch_step():
        hf_lp.zero_grad(set_to_none=True)
        torch_loss(hf_lp).backward()
    sides["PyTorch"] = torch_step
    hf_lp.train()
    stats = P.interleave(sides, args.trials)

    peak = measure_matmul_flops(dtype=jnp.dtype(args.dtype))
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # embedding lookups are gathers
    flops = train_flops_per_token(matmul_params, n_layers=cfg.num_layers, seq_len=args.seq,
                                  d_model=cfg.hidden_size) * tokens
    print(f"\nLlama {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, FFN {ffn}, "
          f"vocab {cfg.vocab_size}, {args.dtype}, torch {args.threads} threads; train step on batch "
          f"{args.batch} x {args.seq}; measured {args.dtype} matmul rate {peak / 1e9:.1f} GFLOP/s; "
          f"{args.trials} interleaved trials, median (min-max)")
    rows = [[name, P.rate(s, tokens), f"{flops / s.median / peak:.1%}", P.ratio(s, stats["PyTorch"])]
            for name, s in stats.items()]
    P.table(["train step", "tokens/s", "MFU", "vs PyTorch"], rows)

    # --- greedy decoding, float32 (and bfloat16 with --dtype bfloat16) ---
    if args.gen_batch:
        hf.eval()
        hf_lp.eval()
        bw = P.read_bandwidth()
        rows, rows_lp = [], []

        def bf16_decode(gb, gids, new):
            """One bfloat16 row: ours (unscanned) vs HF, both bfloat16, token agreement reported."""
            def ours_gen():
                return np.asarray(generate(ours_dec_lp, gids, max_new_tokens=args.gen_new, eos_token_id=-1))

            def hf_gen():
                with torch.no_grad():
                    return hf_lp.generate(torch.tensor(gids), max_new_tokens=args.gen_new, min_new_tokens=args.gen_new,
                                          do_sample=False, pad_token_id=0).numpy()[:, args.gen_prompt:]
            a, b = ours_gen(), hf_gen()
            assert a.shape == b.shape == (gb, args.gen_new), (a.shape, b.shape)
            s = P.interleave({"ours": ours_gen, "hf": hf_gen}, args.trials)
            bound = ""
            if gb == 1:
                limit = bw / P.decode_bytes_per_token(cfg, args.gen_prompt, args.gen_new, 2)
                bound = f"{new / s['ours'].median / limit:.0%} / {new / s['hf'].median / limit:.0%} of {limit:,.0f} tok/s"
            return [f"{gb} x ({args.gen_prompt} + {args.gen_new} new)", P.rate(s["ours"], new), P.rate(s["hf"], new),
                    P.ratio(s["ours"], s["hf"]), f"{(a == b).mean():.0%}", bound]
        for gb in args.gen_batch:
            gids = rs.randint(3, args.vocab, (gb, args.gen_prompt))
            new = gb * args.gen_new

            def gen(model):
                return lambda: generate(model, gids, max_new_tokens=args.gen_new, eos_token_id=-1)

            def hf_gen():
                with torch.no_grad():
                    return hf.generate(torch.tensor(gids), max_new_tokens=args.gen_new,
                                       min_new_tokens=args.gen_new, do_sample=False, pad_token_id=0).numpy()
            want = hf_gen()[:, args.gen_prompt:]
            for model in (ours_dec, ours):
                assert np.array_equal(gen(model)(), want), f"decode batch {gb}: tokens differ"
            s = P.interleave({"ours": gen(ours_dec), "ours scanned": gen(ours), "hf": hf_gen}, args.trials)
            bound = ""
            if gb == 1:
                limit = bw / P.decode_bytes_per_token(cfg, args.gen_prompt, args.gen_new, 4)
                bound = (f"{new / s['ours'].median / limit:.0%} / {new / s['hf'].median / limit:.0%} "
                         f"of {limit:,.0f} tok/s")
            rows.append([f"{gb} x ({args.gen_prompt} + {args.gen_new} new)", P.rate(s["ours"], new),
                         P.rate(s["ours scanned"], new), P.rate(s["hf"], new), P.ratio(s["ours"], s["hf"]), bound])
            if ours_dec_lp is not None:
                rows_lp.append(bf16_decode(gb, gids, new))
        print(f"\ngreedy decode, float32, same tokens asserted; measured read bandwidth {bw / 1e9:.1f} GB/s; "
              f"batch-1 bound = that / bytes read per token "
              f"({P.decode_bytes_per_token(cfg, args.gen_prompt, args.gen_new, 4) / 1e6:.1f} MB: weights + KV cache)")
        P.table(["decode batch x tokens", "ours new tok/s", "ours, scanned layers", "HF generate new tok/s", "ours / HF",
                 "ours / HF of the bandwidth bound"], rows)
        if rows_lp:
            print(f"\ngreedy decode, bfloat16 (both sides); batch-1 bound = {bw / 1e9:.1f} GB/s / "
                  f"{P.decode_bytes_per_token(cfg, args.gen_prompt, args.gen_new, 2) / 1e6:.1f} MB per token")
            P.table(["decode batch x tokens", "ours new tok/s", "HF generate new tok/s", "ours / HF",
                     "new tokens equal to HF's", "ours / HF of the bandwidth bound"], rows_lp)
    P.footer(load_before)


if __name__ == "__main__":
    main()

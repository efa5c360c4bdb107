"""Benchmark: Llama train step (forward+backward) and greedy decoding, ours vs transformers' PyTorch.

Same config, same weights, float32, measured in one run, so the ratios are meaningful on a noisy
machine. MFU is against this machine's measured float32 matmul rate.

    python bench/llama_step.py                       # 4 layers, hidden 512, 8 heads, batch 8 x 256
    python bench/llama_step.py --layers 2 --steps 3  # quicker
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from bmgpt_jax.convert import hf_llama  # noqa: E402
from bmgpt_jax.generation import generate  # noqa: E402
from bmgpt_jax.training.monitor import measure_matmul_flops, train_flops_per_token  # noqa: E402
from timing import median_time  # noqa: E402  (bench/timing.py; scripts run as python bench/x.py)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32001)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-batch", type=int, default=4)
    ap.add_argument("--gen-prompt", type=int, default=32)
    ap.add_argument("--gen-new", type=int, default=64)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ffn = int(args.hidden * 8 / 3 + 63) // 64 * 64
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(args.seq, 512),
                         attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = hf_llama.load(d, scan_layers=True)
    cfg = ours.config

    rs = np.random.RandomState(0)
    ids = rs.randint(3, args.vocab, (args.batch, args.seq))
    tokens = args.batch * args.seq

    # --- train step: forward + backward + SGD-free grads (the optimizer update is cheap and equal) ---
    def loss_fn(model, batch):
        logits = model(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @nnx.jit
    def jax_step(model, batch):
        return nnx.value_and_grad(loss_fn)(model, batch)

    batch = jnp.asarray(ids)
    t_jax = median_time(lambda: jax.block_until_ready(jax_step(ours, batch)), args.steps)

    hf.train()
    tids = torch.tensor(ids)

    def torch_step():
        hf.zero_grad(set_to_none=True)
        out = hf(tids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), tids[:, 1:].reshape(-1))
        loss.backward()
    t_torch = median_time(torch_step, args.steps)

    peak = measure_matmul_flops()
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # embedding lookups are gathers
    flops = train_flops_per_token(matmul_params, n_layers=cfg.num_layers, seq_len=args.seq,
                                  d_model=cfg.hidden_size) * tokens

    # --- greedy decoding ---
    hf.eval()
    gids = rs.randint(3, args.vocab, (args.gen_batch, args.gen_prompt))
    new = args.gen_batch * args.gen_new
    t_gen = median_time(lambda: generate(ours, gids, max_new_tokens=args.gen_new, eos_token_id=-1), 3)

    def hf_gen():
        with torch.no_grad():
            hf.generate(torch.tensor(gids), max_new_tokens=args.gen_new, min_new_tokens=args.gen_new,
                        do_sample=False, pad_token_id=0)
    t_hf_gen = median_time(hf_gen, 3)

    print(f"\nLlama {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, FFN {ffn}, "
          f"vocab {cfg.vocab_size}, float32, {args.threads} threads; {jax.devices()[0].device_kind}; "
          f"measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| measure | ours (JAX) | PyTorch | ours / PyTorch |")
    print("|---|---|---|---|")
    print(f"| train step tokens/s (batch {args.batch} x {args.seq}) | {tokens / t_jax:,.0f} | "
          f"{tokens / t_torch:,.0f} | {t_torch / t_jax:.2f}x |")
    print(f"| train step MFU | {flops / t_jax / peak:.1%} | {flops / t_torch / peak:.1%} | |")
    print(f"| greedy decode new tokens/s (batch {args.gen_batch}, prompt {args.gen_prompt}, "
          f"{args.gen_new} new) | {new / t_gen:,.0f} | {new / t_hf_gen:,.0f} | {t_hf_gen / t_gen:.2f}x |")


if __name__ == "__main__":
    main()

"""Benchmark: the tiny BioMedGPT `align` and `finetune` train steps, ours (JAX) vs the PyTorch reference.

Ours is the real step of `python -m bmgpt_jax.train` (training.stages.build_model's loss, optim.split_trainable,
step.make_train_step / jit_train_step on a 1x1x1 mesh, data.pipeline.global_batch every step). PyTorch's
is the reference composition of tests/torch_refs/biomedgpt.py (HF LlamaForCausalLM + HF EsmModel + torch
GIN + two nn.Linear) run on the same batch dict by bench/_torch_batched.py, frozen parts
`requires_grad_(False)`, torch.optim.AdamW with the same schedule and clipping. Same weights (ours is
loaded from the torch state dict), same real batches from the data pipeline (one sequence bucket, a few
batches reused), same thread count, on the protocol of bench/protocol.py: machine header, then per stage
one warm-up pass and --trials timed passes over the batches (one step per batch), ours and PyTorch
interleaved pass by pass, median and min-max, ratio of medians, load average before and after (and how
busy other processes kept the CPUs while timing). Before timing, the first batch's loss must agree within
1e-4 (and the losses of every later step are compared as well: both sides see the same batches in order).

tokens/s counts real (non-padding) positions, as the training monitor does. MFU = the monitor's FLOP
count (`train_flops_per_token`: 6N for trainable, 4N for frozen matmul parameters, plus attention) over
this machine's measured float32 matmul rate (`measure_matmul_flops`).

    python bench/train_step.py                          # tiny config (LM 64 wide, 2 layers), < 1 min
    python bench/train_step.py --hidden 256 --layers 4  # a wider decoder, ~1-2 min
    python bench/train_step.py --tokenizer demo         # the embedded default's 1001-token vocabulary
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import protocol as P  # noqa: E402  (bench/protocol.py)


def pick_batches(it, n: int, scan: int = 200) -> list[dict]:
    """`n` fixed batches from the stream: the first with a protein (rare in the sample sets), the first
    with molecules, then the next ones in stream order."""
    seen, prot = [], []
    for _ in range(scan):
        b = next(it)
        if (b["prot_slot"] >= 0).any():
            prot = [b]
            break
        if len(seen) < n:
            seen.append(b)
    mol = [x for x in seen if (x["mol_slot"] >= 0).any()][:1]
    rest = [x for x in seen if not any(x is m for m in mol)]
    return (prot + mol + rest)[:n]


def matmul_params(state) -> int:
    """Parameters that take part in matmuls: embedding tables (`...weight` with ndim >= 2) are gathers
    (the rule of `training.loop`; it also leaves out scan-stacked norm scales, which are no matmuls)."""
    return sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(state)
               if p[-1] != "weight" or len(v.shape) < 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny_finetune", help="training config for model/data/optim")
    ap.add_argument("--stages", nargs="+", default=["align", "finetune"], choices=["align", "finetune"])
    ap.add_argument("--hidden", type=int, default=0, help="LM width (0 = the config's)")
    ap.add_argument("--layers", type=int, default=0, help="LM layers (0 = the config's)")
    ap.add_argument("--heads", type=int, default=0, help="LM heads (0 = the config's, or hidden/64)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256, help="the one sequence bucket (no per-bucket recompiles)")
    ap.add_argument("--batches", type=int, default=3, help="fixed batches, reused")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", default="auto",
                    help="auto (the Llama tokenizer in ../shared/data/tokenizer, else the demo one), demo, or a path")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. model.lm.scan_layers=false")
    P.add_trials_arg(ap)
    args = ap.parse_args()

    import torch

    from _torch_batched import TorchStep, build_reference
    from bmgpt_jax import parallel
    from bmgpt_jax.convert import openbiomed
    from bmgpt_jax.data.builders import shared_data_dir
    from bmgpt_jax.data.pipeline import BatchIterator, global_batch
    from bmgpt_jax.parallel import batch_shardings, shard
    from bmgpt_jax.training.loop import load_config, resolve_tokenizer
    from bmgpt_jax.training.monitor import measure_matmul_flops, train_flops_per_token
    from bmgpt_jax.training.optim import count_params, make_optimizer, make_schedule, split_trainable, trainable_filter
    from bmgpt_jax.training.stages import build_model, trainable_patterns
    from bmgpt_jax.training.step import init_opt_state, jit_train_step, make_train_step
    from tests.torch_refs.hf_esm import hf_config

    start = time.perf_counter()
    load_before = P.header("bench/train_step.py: tiny BioMedGPT align / finetune train steps, ours vs PyTorch")
    torch.set_num_threads(args.threads)
    shared = shared_data_dir()
    if args.tokenizer == "auto":
        tok = str(shared / "tokenizer") if shared is not None and (shared / "tokenizer").is_dir() else ""
    else:
        tok = "" if args.tokenizer == "demo" else args.tokenizer
    overrides = [f"data.tokenizer={tok}", f"data.batch_size={args.batch}", f"data.seq_buckets=[{args.seq}]",
                 *args.overrides]
    cfg = load_config(args.config, overrides)
    it = BatchIterator(cfg.data, max_atoms=cfg.model.gin.max_atoms, over_cap=cfg.model.gin.over_cap)
    lm = resolve_tokenizer(cfg, it.tokenizer).model.lm
    if args.hidden:
        heads = args.heads or max(1, args.hidden // 64)
        lm = dataclasses.replace(lm, hidden_size=args.hidden, num_heads=heads, num_kv_heads=heads,
                                 intermediate_size=(int(args.hidden * 2.75) + 15) // 16 * 16)
    elif args.heads:
        lm = dataclasses.replace(lm, num_heads=args.heads, num_kv_heads=args.heads)
    if args.layers:
        lm = dataclasses.replace(lm, num_layers=args.layers)
    model_cfg = dataclasses.replace(cfg.model, lm=lm)
    batches = pick_batches(it, args.batches)
    it.close()
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    peak = measure_matmul_flops()
    mesh = parallel.make_mesh((1, 1, 1))

    print(f"BioMedGPT: LM {lm.num_layers} layers x {lm.hidden_size} ({lm.num_heads} heads, {lm.num_kv_heads} kv, FFN "
          f"{lm.intermediate_size}, vocab {lm.vocab_size}, scan_layers={lm.scan_layers}), GIN {model_cfg.gin.num_layers}"
          f"x{model_cfg.gin.emb_dim}, ESM {model_cfg.esm.num_layers}x{model_cfg.esm.hidden_size}; float32")
    print(f"data: {'demo + shared sample sets' if shared is not None else 'demo'}, tokenizer "
          f"{tok or 'demo'}; {len(batches)} batches of {args.batch} x {args.seq} ({real_tokens / len(batches):.0f} "
          f"real tokens per batch; {sum(int((b['mol_slot'] >= 0).sum()) for b in batches)} atom and "
          f"{sum(int((b['prot_slot'] >= 0).sum()) for b in batches)} protein slots in all)")
    print(f"{args.threads} threads (torch.set_num_threads; XLA uses the machine's {os.cpu_count()} cores); "
          f"measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s; {jax.devices()[0].device_kind}")

    rows = []
    for stage in args.stages:
        ref = build_reference(model_cfg)
        ours = openbiomed.from_state_dict(ref.state_dict(), ref.llm_config(), hf_config(model_cfg.esm).to_dict(),
                                          gin_config=model_cfg.gin, scan_layers=lm.scan_layers, remat=lm.remat)
        # the converted model has exactly the parameter shapes of the one `python -m bmgpt_jax.train` builds
        made = {}

        def build():
            model, made["loss_fn"] = build_model(stage, model_cfg, cfg.init)
            return model
        built = nnx.eval_shape(build)
        loss_fn = made["loss_fn"]
        shapes = lambda m: {p: v.shape for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa: E731
        assert shapes(built) == shapes(ours), "converted model differs from the configured one"

        patterns = trainable_patterns(stage, model_cfg, cfg.trainable if stage == "finetune" else ())
        graphdef, trainable, frozen = split_trainable(ours, trainable_filter(patterns))
        n_train, n_all = count_params(trainable), count_params(nnx.state(ours, nnx.Param))
        mm_all, mm_train = matmul_params(nnx.state(ours, nnx.Param)), matmul_params(trainable)
        trainable, frozen = shard(trainable, mesh), shard(frozen, mesh)
        tx = make_optimizer(cfg.optim)
        opt_state = init_opt_state(tx, trainable, mesh)
        step_fn = make_train_step(loss_fn, tx, schedule=make_schedule(cfg.optim))
        shapes0 = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
        step = jit_train_step(step_fn, graphdef, trainable, frozen, opt_state, batch_shardings(shapes0, mesh), mesh)

        tstep = TorchStep(ref, patterns, cfg.optim, make_schedule(cfg.optim))
        assert tstep.num_trainable() == n_train, (tstep.num_trainable(), n_train)

        state = {"trainable": trainable, "opt_state": opt_state}
        del trainable, opt_state

        def ours_step(batch):
            state["trainable"], state["opt_state"], metrics = step(state["trainable"], frozen, state["opt_state"],
                                                                   global_batch(batch, mesh))
            return float(metrics["loss"])

        # first batch, identical initial weights (the first update has lr 0): the losses must agree
        t0 = time.perf_counter()
        l_ours = ours_step(batches[0])
        compile_s = time.perf_counter() - t0
        l_torch = tstep(batches[0])
        assert abs(l_ours - l_torch) < 1e-4, f"{stage}: first-batch loss ours {l_ours:.6f} vs torch {l_torch:.6f}"

        # passes over the batches, one step each, ours and PyTorch interleaved pass by pass
        losses = {"ours": [], "torch": []}
        snap = P.cpu_snapshot()
        stats = P.interleave({"ours": lambda: losses["ours"].extend(ours_step(b) for b in batches),
                              "torch": lambda: losses["torch"].extend(tstep(b) for b in batches)}, args.trials)
        busy = P.others_busy(snap, P.cpu_snapshot())
        assert step._cache_size() == 1, f"ours recompiled: {step._cache_size()} programs"
        drift = max(abs(a - b) for a, b in zip(losses["ours"], losses["torch"]))
        t_ours, t_torch = stats["ours"].median, stats["torch"].median
        flops = train_flops_per_token(mm_all, n_trainable=mm_train, n_layers=lm.num_layers, seq_len=args.seq,
                                      d_model=lm.hidden_size) * real_tokens
        rows.append([stage, f"{n_train:,} / {n_all:,}", P.rate(stats["ours"], real_tokens),
                     P.rate(stats["torch"], real_tokens), f"{flops / t_ours / peak:.1%}", f"{flops / t_torch / peak:.1%}",
                     P.seconds(stats["ours"], 1e3 / len(batches), ".0f"),
                     P.seconds(stats["torch"], 1e3 / len(batches), ".0f"), P.ratio(stats["ours"], stats["torch"])])
        print(f"{stage}: first-batch loss ours {l_ours:.6f}, PyTorch {l_torch:.6f} (|diff| {abs(l_ours - l_torch):.1e}); "
              f"max |loss diff| over the next {len(losses['ours'])} steps {drift:.1e}; ours compiled in "
              f"{compile_s:.1f} s (one program)"
              + (f"; other processes kept {busy:.1f} of {os.cpu_count()} cores busy while timing" if busy is not None
                 else ""), flush=True)
        del state, frozen, ours, ref, tstep, step

    print(f"\n{args.trials} interleaved passes over the {len(batches)} batches, median (min-max)")
    P.table(["stage", "trainable / all params", "ours tokens/s", "PyTorch tokens/s", "ours MFU", "PyTorch MFU",
             "ours ms/step", "PyTorch ms/step", "ours / PyTorch"], rows)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    P.footer(load_before)


if __name__ == "__main__":
    main()

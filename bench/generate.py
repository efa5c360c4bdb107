"""Benchmark: BioMedGPT generation with a molecule prompt, new tokens/s at batch 1 and batch 8, ours vs the
PyTorch reference composition (transformers' LlamaForCausalLM + EsmModel, the torch GIN, two nn.Linear)
with HF `generate`. Same tiny config, same weights, float32, greedy, a fixed number of new tokens (no
early stop), on the protocol of bench/protocol.py (machine header, the three sides interleaved trial by
trial, median and min-max over --trials, ratio of medians, load average before and after).

Columns: "ours, end to end" is `chat.generate_tokens` (collate, jitted embed + splice, jitted decode);
"ours, decode" and "PyTorch + HF" both start from the prompt embeddings each side's composition built
(the prefill over the prompt is inside both). Before timing, ours (end to end) and PyTorch must give the
same tokens (asserted). The batch-1 row also gives the memory-bandwidth bound of the decoder: bytes read
per new token (weights and KV cache, `protocol.decode_bytes_per_token`) over the read bandwidth measured
in the same run (`protocol.read_bandwidth`), and each side's share of it.

    python bench/generate.py                          # hidden 256, 4 layers, 64 new tokens
    python bench/generate.py --hidden 128 --new 32    # quicker
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bmgpt_jax import chat  # noqa: E402
from bmgpt_jax.config import load  # noqa: E402
from bmgpt_jax.convert import openbiomed  # noqa: E402
from bmgpt_jax.data.builders import shared_data_dir  # noqa: E402
from bmgpt_jax.data.records import Record  # noqa: E402
from bmgpt_jax.data.text import load_tokenizer  # noqa: E402
from bmgpt_jax.data.text import attach_tokenizer  # noqa: E402
from bmgpt_jax.generation import generate  # noqa: E402
from bmgpt_jax.models.esm import EsmConfig  # noqa: E402
import protocol as P  # noqa: E402  (bench/protocol.py; scripts run as python bench/x.py)

MOLECULES = ["CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "C1=CC=C(C=C1)O", "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
             "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O", "CCO", "c1ccc2ccccc2c1", "CC(=O)Nc1ccc(O)cc1"]
SHARED = shared_data_dir()  # ../shared/data or $BMGPT_SHARED_DATA
LLAMA_TOKENIZER = SHARED / "tokenizer" / "llama2_tokenizer.model" if SHARED else Path("-")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    P.add_trials_arg(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", default=str(LLAMA_TOKENIZER) if LLAMA_TOKENIZER.exists() else "",
                    help="SentencePiece model (default: the shared Llama 2 one, else the demo tokenizer)")
    args = ap.parse_args()

    load_before = P.header("bench/generate.py: BioMedGPT greedy generation with a molecule prompt, ours vs PyTorch + HF")
    import torch
    from tests.test_chat import hf_embeds
    from tests.torch_refs.biomedgpt import TorchBioMedGPT
    from tests.torch_refs.hf_esm import hf_config
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer or None)
    esm_cfg = load(EsmConfig, "esm2_tiny")
    ref = TorchBioMedGPT(esm_cfg, vocab_size=tok.vocab_size, hidden=args.hidden, layers=args.layers).eval()
    ours = attach_tokenizer(openbiomed.from_state_dict(ref.state_dict(), ref.llm_config(),
                                                       hf_config(esm_cfg).to_dict()), tok)
    cfg = dataclasses.replace(chat.generation_config(tok, {"max_new_tokens": args.new}), eos_token_id=-1,
                              stop_sequences=())
    rows = []
    bw = P.read_bandwidth()
    for batch in (1, 8):
        records = [Record((("molecule", s),), "What is this molecule? Describe it.", "") for s in MOLECULES[:batch]]
        encoded = [chat.encode_prompt(ours, chat.make_prompt(r.question, r.entities), args.new) for r in records]
        embeds, mask = hf_embeds(ref, tok, torch, records)  # left-padded, from the torch composition

        def hf_generate():
            with torch.no_grad():
                return ref.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=args.new,
                                        min_new_tokens=args.new, do_sample=False, pad_token_id=tok.pad_id).numpy()

        ours_embeds, ours_mask = embeds.numpy(), mask.numpy()
        assert np.array_equal(chat.generate_tokens(ours, encoded, cfg), hf_generate()), f"batch {batch}: tokens differ"
        s = P.interleave({"e2e": lambda: chat.generate_tokens(ours, encoded, cfg),
                          "decode": lambda: jax.block_until_ready(generate(ours.llm, inputs_embeds=ours_embeds,
                                                                           attention_mask=ours_mask, config=cfg)),
                          "hf": hf_generate}, args.trials)
        n = batch * args.new
        prompt = max(e.length for e in encoded)
        bound = ""
        if batch == 1:
            limit = bw / P.decode_bytes_per_token(ours.config.lm, prompt, args.new, 4)
            bound = (f"{n / s['decode'].median / limit:.0%} / {n / s['hf'].median / limit:.0%} of "
                     f"{limit:,.0f} tok/s")
        rows.append([batch, prompt, P.rate(s["e2e"], n), P.rate(s["decode"], n), P.rate(s["hf"], n),
                     P.ratio(s["decode"], s["hf"]), bound])
    c = ours.config
    print(f"\nBioMedGPT tiny: Llama {c.lm.num_layers} layers x {c.lm.hidden_size} ({c.lm.num_heads} heads, "
          f"{c.lm.num_kv_heads} kv), vocab {c.lm.vocab_size}; GIN {c.gin.num_layers}x{c.gin.emb_dim}; "
          f"ESM {c.esm.num_layers}x{c.esm.hidden_size}; float32, greedy, {args.new} new tokens; "
          f"{jax.devices()[0].device_kind}, torch {args.threads} threads; same tokens asserted; "
          f"{args.trials} interleaved trials, median (min-max); measured read bandwidth {bw / 1e9:.1f} GB/s")
    P.table(["batch", "longest prompt", "ours, end to end (new tok/s)", "ours, decode", "PyTorch + HF generate",
             "ours decode / PyTorch", "decode / HF of the batch-1 bandwidth bound"], rows)
    P.footer(load_before)


if __name__ == "__main__":
    main()

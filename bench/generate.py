"""Benchmark: BioMedGPT generation with a molecule prompt, new tokens/s at batch 1 and batch 8, ours vs the
PyTorch reference composition (transformers' LlamaForCausalLM + EsmModel, the torch GIN, two nn.Linear)
with HF `generate`. Same tiny config, same weights, float32, greedy, a fixed number of new tokens (no
early stop), measured in one run.

Columns: "ours, end to end" is `chat.generate_tokens` (collate, jitted embed + splice, jitted decode);
"ours, decode" and "PyTorch + HF" both start from the prompt embeddings each side's composition built
(the prefill over the prompt is inside both). Outputs are checked to be the same tokens.

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
from bmgpt_jax.data.records import Record  # noqa: E402
from bmgpt_jax.data.text import load_tokenizer  # noqa: E402
from bmgpt_jax.data.text import attach_tokenizer  # noqa: E402
from bmgpt_jax.generation import generate  # noqa: E402
from bmgpt_jax.models.esm import EsmConfig  # noqa: E402
from timing import median_time  # noqa: E402  (bench/timing.py; scripts run as python bench/x.py)

MOLECULES = ["CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "C1=CC=C(C=C1)O", "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
             "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O", "CCO", "c1ccc2ccccc2c1", "CC(=O)Nc1ccc(O)cc1"]
LLAMA_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizer" / "llama2_tokenizer.model"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", default=str(LLAMA_TOKENIZER) if LLAMA_TOKENIZER.exists() else "",
                    help="SentencePiece model (default: the shared Llama 2 one, else the demo tokenizer)")
    args = ap.parse_args()

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
    for batch in (1, 8):
        records = [Record((("molecule", s),), "What is this molecule? Describe it.", "") for s in MOLECULES[:batch]]
        encoded = [chat.encode_prompt(ours, chat.make_prompt(r.question, r.entities), args.new) for r in records]
        embeds, mask = hf_embeds(ref, tok, torch, records)  # left-padded, from the torch composition

        def hf_generate():
            with torch.no_grad():
                return ref.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=args.new,
                                        min_new_tokens=args.new, do_sample=False, pad_token_id=tok.pad_id).numpy()

        ours_embeds, ours_mask = embeds.numpy(), mask.numpy()
        t_e2e = median_time(lambda: chat.generate_tokens(ours, encoded, cfg), args.repeats)
        t_dec = median_time(lambda: jax.block_until_ready(
            generate(ours.llm, inputs_embeds=ours_embeds, attention_mask=ours_mask, config=cfg)), args.repeats)
        t_hf = median_time(hf_generate, args.repeats)
        same = np.array_equal(chat.generate_tokens(ours, encoded, cfg), hf_generate())
        n = batch * args.new
        rows.append(f"| {batch} | {max(e.length for e in encoded)} | {n / t_e2e:,.0f} | {n / t_dec:,.0f} | "
                    f"{n / t_hf:,.0f} | {t_hf / t_dec:.1f}x | {'yes' if same else 'NO'} |")
    c = ours.config
    print(f"\nBioMedGPT tiny: Llama {c.lm.num_layers} layers x {c.lm.hidden_size} ({c.lm.num_heads} heads, "
          f"{c.lm.num_kv_heads} kv), vocab {c.lm.vocab_size}; GIN {c.gin.num_layers}x{c.gin.emb_dim}; "
          f"ESM {c.esm.num_layers}x{c.esm.hidden_size}; float32, greedy, {args.new} new tokens; "
          f"{jax.devices()[0].device_kind}, torch {args.threads} threads\n")
    print("| batch | longest prompt | ours, end to end (new tok/s) | ours, decode | PyTorch + HF generate "
          "| ours / PyTorch | same tokens |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Convert and check PyTorch / Hugging Face checkpoints with bmgpt_jax's converters.

Every conversion reads the source into our model (so every key and shape is checked against the
config, and mismatches name the key and both shapes), then writes it in the target layout. With
`--check`, the written file is read back and compared with the model bit for bit.

    python convert_weights.py hf_llama  SRC_HF_DIR  DST_HF_DIR          # e.g. .bin -> sharded safetensors
    python convert_weights.py hf_esm    SRC_HF_DIR  DST_HF_DIR
    python convert_weights.py graphmvp_gin SRC.pth DST.pth [--prefix mol_structure_encoder.]
    python convert_weights.py openbiomed biomedgpt_10b.pth DST_DIR --lm-config LM/config.json \
        --esm-config ESM/config.json --tokenizer llama/tokenizer.model   # -> a chat/training checkpoint dir
    python convert_weights.py to_openbiomed RUN/final DST.pth           # our checkpoint dir -> OpenBioMed .pth
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def _same(a: dict, b: dict) -> None:
    if a.keys() != b.keys():
        raise SystemExit(f"round trip changed the keys: {sorted(a.keys() ^ b.keys())[:10]}")
    bad = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    if bad:
        raise SystemExit(f"round trip changed {len(bad)} tensors, e.g. {bad[:5]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["hf_llama", "hf_esm", "graphmvp_gin", "openbiomed", "to_openbiomed"])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--prefix", default="", help="graphmvp_gin: key prefix in the source and target")
    ap.add_argument("--lm-config", help="openbiomed: the LM's HF config.json")
    ap.add_argument("--esm-config", help="openbiomed: the ESM-2 HF config.json")
    ap.add_argument("--tokenizer", help="openbiomed: SentencePiece model or HF tokenizer folder")
    ap.add_argument("--check", action="store_true", help="read the output back and compare bit for bit")
    args = ap.parse_args(argv)

    if args.kind == "hf_llama":
        from bmgpt_jax.convert import hf_llama as conv
        model = conv.load(args.src)
        conv.save(model, args.dst)
        if args.check:
            _same(conv.to_state_dict(model), conv.to_state_dict(conv.load(args.dst)))
    elif args.kind == "hf_esm":
        from bmgpt_jax.convert import hf_esm as conv
        model = conv.load(args.src)
        conv.save(model, args.dst)
        if args.check:
            _same(conv.to_state_dict(model), conv.to_state_dict(conv.load(args.dst)))
    elif args.kind == "graphmvp_gin":
        from bmgpt_jax.convert import graphmvp_gin as conv
        model = conv.load(args.src, prefix=args.prefix)
        conv.save(model, args.dst, prefix=args.prefix)
        if args.check:
            _same(conv.to_state_dict(model), conv.to_state_dict(conv.load(args.dst, prefix=args.prefix)))
    elif args.kind == "openbiomed":
        if not (args.lm_config and args.esm_config and args.tokenizer):
            ap.error("openbiomed needs --lm-config, --esm-config and --tokenizer")
        from bmgpt_jax.convert import openbiomed
        from bmgpt_jax.convert.folder import from_pretrained, save_pretrained
        from bmgpt_jax.data.text import tokenizer_of
        model = openbiomed.load(args.src, args.lm_config, args.esm_config, tokenizer=args.tokenizer)
        save_pretrained(model, tokenizer_of(model), args.dst)
        if args.check:
            _same(openbiomed.to_state_dict(model), openbiomed.to_state_dict(from_pretrained(args.dst)))
    else:
        from bmgpt_jax.convert import openbiomed
        from bmgpt_jax.convert.folder import from_pretrained
        model = from_pretrained(args.src)
        openbiomed.save(model, args.dst)
        if args.check:
            from bmgpt_jax.convert.torch_io import read_state_dict
            _same(openbiomed.to_state_dict(model), read_state_dict(args.dst))
    print(f"{args.kind}: {args.src} -> {args.dst}" + (" (checked bit for bit)" if args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

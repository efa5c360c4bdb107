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

A missing, empty, truncated or corrupt input (a `.pth` cut short, a broken `config.json` or tokenizer)
is one line naming the file on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _same(a: dict, b: dict) -> None:
    if a.keys() != b.keys():
        raise SystemExit(f"round trip changed the keys: {sorted(a.keys() ^ b.keys())[:10]}")
    bad = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    if bad:
        raise SystemExit(f"round trip changed {len(bad)} tensors, e.g. {bad[:5]}")


def check_sources(args) -> None:
    """The inputs of `args.kind`, checked with `bmgpt_jax.inputs` before any conversion reads them."""
    from bmgpt_jax import inputs
    if args.kind in ("hf_llama", "hf_esm"):
        src = Path(args.src)
        if (src / "config.json").exists():
            inputs.check_json(src / "config.json")
        for f in sorted(src.glob("*.safetensors")) + sorted(src.glob("pytorch_model*.bin")):
            inputs.check_weights(f)
    elif args.kind in ("graphmvp_gin", "openbiomed"):
        inputs.check_weights(args.src)
        for config in (args.lm_config, args.esm_config) if args.kind == "openbiomed" else ():
            path = Path(config)
            inputs.check_json(path / "config.json" if path.is_dir() else path)
        if args.kind == "openbiomed":
            inputs.check_tokenizer(args.tokenizer)
    else:
        inputs.check_model_folder(args.src)


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
    if args.kind == "openbiomed" and not (args.lm_config and args.esm_config and args.tokenizer):
        ap.error("openbiomed needs --lm-config, --esm-config and --tokenizer")
    from bmgpt_jax.inputs import one_line
    try:
        check_sources(args)
        convert(args)
    except Exception as e:  # noqa: BLE001 -- a command line reports what failed in one line
        print(f"convert_weights.py {args.kind}: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"{args.kind}: {args.src} -> {args.dst}" + (" (checked bit for bit)" if args.check else ""))
    return 0


def convert(args) -> None:
    """Read `args.src` into our model and write it as `args.kind` says (checked back with `--check`)."""
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


if __name__ == "__main__":
    sys.exit(main())

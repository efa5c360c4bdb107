r"""Convert and check PyTorch / Hugging Face checkpoints and training runs with bmgpt_jax's converters.
The same command line is `python convert_weights.py` in a checkout and `python -m bmgpt_jax.convert` (or
`bmgpt-convert`) wherever the package is installed.

Every conversion streams: tensors are read lazily and written one at a time (peak memory about the
largest tensor, not the model), into a temporary folder or file renamed at the end. Before anything is
written, every key, shape and dtype kind of the source is checked against the model the config
describes (mismatches name the file, the key and both shapes). The dtype is kept unless `--dtype`;
HF output is sharded safetensors with an index. With `--check`, the output is read back, one tensor at
a time, and compared with the source bit for bit.

    python convert_weights.py hf_llama  SRC_HF_DIR  DST_HF_DIR          # e.g. .bin -> sharded safetensors
    python convert_weights.py hf_esm    SRC_HF_DIR  DST_HF_DIR
    python convert_weights.py graphmvp_gin SRC.pth DST.pth [--prefix mol_structure_encoder.]
    python convert_weights.py openbiomed biomedgpt_10b.pth DST_DIR --lm-config LM/config.json \
        --esm-config ESM/config.json --tokenizer llama/tokenizer.model   # -> our model folder (chat, training)
    python convert_weights.py to_openbiomed MODEL_DIR DST.pth           # our model folder -> OpenBioMed .pth
        # (which OpenBioMed loads strictly: what the folder carried over from a .pth goes back as it was,
        # else the buffers are computed and the unused pooler and contact head zero-filled, named on stderr)
        # and back: openbiomed DST.pth DIR ... --gin-config MODEL_DIR/gin_config.json keeps the atom cap
    python convert_weights.py orbax RUN/checkpoints DST_DIR [--step N]  # a training run's checkpoint ->
                                                                        # model folder (HF Llama for `lm`)

Each option serves the kinds its help names (`--dtype` and `--check` every kind); given to another kind it
is refused (usage and one line, exit status 2), as is a `--max-shard-gb` that is not > 0.

A missing, empty, truncated or corrupt input (a `.pth` cut short, a broken `config.json` or tokenizer),
a source of another family, a weights file given for SRC_HF_DIR (a folder holding config.json and the
weights), or a key or shape the model does not have is one line on stderr naming the
file (and the key and both shapes) with exit status 2; nothing is left at the destination. So is a
destination whose replacement would delete what is not ours: the source itself or a folder holding it, a
folder holding anything but an earlier output of these converters (a subfolder, any other file), or, for
a `.pth`, an existing folder; it is refused before anything is read.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from bmgpt_jax import logs

KINDS = ["hf_llama", "hf_esm", "graphmvp_gin", "openbiomed", "to_openbiomed", "orbax"]
# The options each kind reads besides --dtype and --check (which every kind takes); any other is refused.
OPTIONS = {
    "hf_llama": {"max_shard_gb"},
    "hf_esm": {"max_shard_gb"},
    "graphmvp_gin": {"prefix"},
    "openbiomed": {"lm_config", "esm_config", "gin_config", "tokenizer", "max_shard_gb"},
    "to_openbiomed": set(),
    "orbax": {"step", "pth", "tokenizer", "max_shard_gb"},
}
DEFAULTS = {"prefix": "", "pth": False, "max_shard_gb": 5.0}   # filled in once the options are checked
FILE_KINDS = ("graphmvp_gin", "to_openbiomed")   # these write one .pth file; the others a folder


def check_sources(args) -> None:
    """The user-named inputs of `args.kind`, checked with `bmgpt_jax.inputs` before any conversion reads them
    (an orbax run is checked by its reader)."""
    from bmgpt_jax import inputs
    if args.kind in ("hf_llama", "hf_esm"):
        src = Path(args.src)
        if src.exists() and not src.is_dir():     # its config.json is beside it, not in it: refused, not guessed
            raise ValueError(f"{src} is not a folder: SRC must be a folder holding config.json and the weights")
        if (src / "config.json").exists():
            inputs.check_json(src / "config.json")
        for f in sorted(src.glob("*.safetensors")) + sorted(src.glob("pytorch_model*.bin")):
            inputs.check_weights(f)
    elif args.kind in ("graphmvp_gin", "openbiomed"):
        inputs.check_weights(args.src)
        for config in (args.lm_config, args.esm_config, args.gin_config) if args.kind == "openbiomed" else ():
            if config is None:
                continue
            path = Path(config)
            inputs.check_json(path / "config.json" if path.is_dir() else path)
        if args.kind == "openbiomed":
            inputs.check_tokenizer(args.tokenizer)
    elif args.kind == "to_openbiomed":
        inputs.check_model_folder(args.src, flag=None)


def positive_gb(text: str) -> float:
    """An argparse type: a size in GiB, finite and > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive size in GiB")
    return value


@logs.cli   # the converters' notes (keys skipped, wrappers removed) on stderr, each once
def main(argv=None, prog: str | None = None) -> int:
    """The command line; `prog` names it in usage and errors (default: argparse's, from sys.argv[0])."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--prefix", help="graphmvp_gin: key prefix in the source and target (default: none)")
    ap.add_argument("--lm-config", help="openbiomed: the LM's HF config.json")
    ap.add_argument("--esm-config", help="openbiomed: the ESM-2 HF config.json")
    ap.add_argument("--gin-config", help="openbiomed: a GIN config JSON (e.g. a model folder's gin_config.json) "
                    "for what the .pth does not hold: the atom cap (max_atoms, over_cap), dropout")
    ap.add_argument("--tokenizer", help="openbiomed: SentencePiece model or HF tokenizer folder; orbax: instead "
                    "of the run's own")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="cast floating tensors (default: keep the source's dtype)")
    ap.add_argument("--step", type=int, help="orbax: the checkpoint step (default: the latest)")
    ap.add_argument("--pth", action=argparse.BooleanOptionalAction,
                    help="orbax: also write OpenBioMed's biomedgpt_10b.pth in the model folder (needs torch; "
                    "default: no)")
    ap.add_argument("--max-shard-gb", type=positive_gb, help="hf_llama, hf_esm, openbiomed, orbax: safetensors "
                    "shard size in GiB, > 0 (default 5)")
    ap.add_argument("--check", action="store_true", help="read the output back and compare bit for bit")
    args = ap.parse_args(argv)
    foreign = [f"--{dest.replace('_', '-')}" for dest in sorted(set().union(*OPTIONS.values()) - OPTIONS[args.kind])
               if getattr(args, dest) is not None]
    if foreign:
        takes = ", ".join(f"--{dest.replace('_', '-')}" for dest in sorted(OPTIONS[args.kind]))
        ap.error(f"{args.kind} does not take {', '.join(foreign)} (its options: {takes + ', ' if takes else ''}"
                 "--dtype, --check)")
    for dest, value in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.kind == "openbiomed" and not (args.lm_config and args.esm_config and args.tokenizer):
        ap.error("openbiomed needs --lm-config, --esm-config and --tokenizer")
    from bmgpt_jax.inputs import one_line
    start = time.perf_counter()
    try:
        from bmgpt_jax.convert import stream
        stream.check_destination(args.dst, "file" if args.kind in FILE_KINDS else "dir", keep=args.src)
        check_sources(args)
        n = convert(args)
    except Exception as e:  # noqa: BLE001 -- a command line reports what failed in one line
        print(f"{ap.prog} {args.kind}: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"{args.kind}: {args.src} -> {args.dst}: {n} tensors in {time.perf_counter() - start:.1f} s"
          + (" (checked bit for bit)" if args.check else ""))
    return 0


def convert(args) -> int:
    """Stream `args.src` into `args.dst` as `args.kind` says; returns the number of tensors written."""
    shard = int(args.max_shard_gb * 2**30)
    if args.kind == "hf_llama":
        from bmgpt_jax.convert import hf_llama
        n = hf_llama.convert(args.src, args.dst, dtype=args.dtype, check=args.check, max_shard_bytes=shard)
    elif args.kind == "hf_esm":
        from bmgpt_jax.convert import hf_esm
        n = hf_esm.convert(args.src, args.dst, dtype=args.dtype, check=args.check, max_shard_bytes=shard)
    elif args.kind == "graphmvp_gin":
        from bmgpt_jax.convert import graphmvp_gin
        n = graphmvp_gin.convert(args.src, args.dst, prefix=args.prefix, dtype=args.dtype, check=args.check)
    elif args.kind == "openbiomed":
        from bmgpt_jax.convert import folder
        n = folder.from_openbiomed(args.src, args.dst, args.lm_config, args.esm_config, args.tokenizer,
                                   dtype=args.dtype, check=args.check, max_shard_bytes=shard,
                                   gin_config=args.gin_config)
    elif args.kind == "to_openbiomed":
        from bmgpt_jax.convert import folder
        n = folder.to_openbiomed(args.src, args.dst, dtype=args.dtype, check=args.check)
    else:
        from bmgpt_jax.convert import run_export
        tok = None
        if args.tokenizer:
            from bmgpt_jax.data.text import load_tokenizer
            tok = load_tokenizer(args.tokenizer)
        n = run_export.export(args.src, args.dst, args.step, tokenizer=tok, pth=args.pth, dtype=args.dtype,
                              check=args.check, max_shard_bytes=shard)
    return n


"""Streaming conversion at real size: peak resident memory and time of `convert_weights.py`, per direction,
on synthetic checkpoints of BioMedGPT's 7B and 10B shapes written to disk.

    python bench/convert.py [--model 7b|10b|all] [--layers N] [--dtype float16] [--dir DIR] [--keep]

7b:  BioMedGPT-LM-7B (Llama-2-7B + [PAD]: hidden 4096, FFN 11008, vocab 32001, 32 layers) as a Hugging
     Face folder of sharded safetensors; `hf_llama` re-shards it into a new HF folder.
10b: BioMedGPT-10B (that LM + ESM-2 3B + GraphMVP GIN + adaptors) as OpenBioMed's flat `.pth`;
     `openbiomed` turns it into our model folder (safetensors), `to_openbiomed` turns that back into a `.pth`.

Every conversion runs with `--check` (the output is re-read and compared bit for bit) in its own child
process; the peak RSS is that child's `ru_maxrss` (RUSAGE_CHILDREN of a launcher with one child), the time
its wall clock (Python and JAX start-up included). `--layers` shrinks both decoder and encoder depth (the
widths stay real). A model is skipped, saying so, when `DIR` lacks the free disk it needs (source plus
output, checked with `shutil.disk_usage`); everything written is removed at the end unless `--keep`.
There is no PyTorch peer and one conversion of the real size takes minutes, so each runs once; the
machine header and the load average before and after are those of bench/protocol.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bmgpt_jax import config as config_lib  # noqa: E402
from bmgpt_jax.convert import hf_esm, hf_llama, openbiomed  # noqa: E402
from bmgpt_jax.data.text import load_tokenizer  # noqa: E402
from bmgpt_jax.models.biomedgpt import BioMedGPTConfig  # noqa: E402
from bmgpt_jax.models.llama import LlamaConfig  # noqa: E402
from tests.convert import synthetic  # noqa: E402

import protocol as P  # noqa: E402  (bench/protocol.py; scripts run as python bench/x.py)

GB = 1e9


def _bytes(layout, dtype) -> int:
    return sum(int(np.prod(shape)) * dt.itemsize for _, shape, dt in synthetic.specs(layout, dtype))


def _convert(args: list[str]) -> tuple[float, float, str]:
    start = time.perf_counter()
    out, peak = synthetic.run_child(["convert_weights.py", *args, "--check"], timeout=7200)
    return time.perf_counter() - start, peak, out.strip().splitlines()[-1]


def bench_7b(root: Path, layers: int | None, dtype: str) -> list[dict]:
    cfg = config_lib.load(LlamaConfig, "biomedgpt_lm_7b")
    cfg = dataclasses.replace(cfg, num_layers=layers or cfg.num_layers)
    lay = hf_llama.layout(cfg)
    size = _bytes(lay, dtype)
    if shutil.disk_usage(root).free < 2 * size + 2 * GB:
        print(f"7b: skipped, needs {2 * size / GB:.1f} GB free in {root}")
        return []
    src, dst = root / "llama_src", root / "llama_dst"
    start = time.perf_counter()
    synthetic.write(lay, src, dtype=dtype, scale=None, extra_files=lambda t: (t / "config.json").write_text(
        json.dumps(hf_llama.config_to_hf(dataclasses.replace(cfg, param_dtype=dtype)))))
    print(f"7b ({cfg.num_layers} layers): wrote {size / GB:.2f} GB in {time.perf_counter() - start:.0f} s")
    seconds, peak, line = _convert(["hf_llama", str(src), str(dst)])
    print("  " + line)
    return [dict(model=f"7B LM, {cfg.num_layers} layers", direction="HF safetensors -> HF safetensors (hf_llama)",
                 size=size, seconds=seconds, peak=peak)]


def bench_10b(root: Path, layers: int | None, dtype: str) -> list[dict]:
    cfg = config_lib.load(BioMedGPTConfig, "biomedgpt_10b")
    if layers:
        cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, num_layers=layers),
                                  esm=dataclasses.replace(cfg.esm, num_layers=layers))
    lay = openbiomed.layout(cfg.lm, cfg.esm, cfg.gin)
    size = _bytes(lay, dtype)
    if shutil.disk_usage(root).free < 2 * size + 2 * GB:
        print(f"10b: skipped, needs {2 * size / GB:.1f} GB free in {root}")
        return []
    pth, folder, back = root / "biomedgpt_10b.pth", root / "model", root / "back.pth"
    (root / "lm.json").write_text(json.dumps(hf_llama.config_to_hf(cfg.lm)))
    (root / "esm.json").write_text(json.dumps(hf_esm.config_to_hf(cfg.esm)))
    tok = root / "tokenizer.model"
    tok.write_bytes(load_tokenizer("").model_proto)
    start = time.perf_counter()
    synthetic.write(lay, pth, fmt="pth", dtype=dtype, scale=None)
    print(f"10b ({cfg.lm.num_layers}+{cfg.esm.num_layers} layers): wrote {size / GB:.2f} GB in "
          f"{time.perf_counter() - start:.0f} s")
    name = f"10B BioMedGPT, {cfg.lm.num_layers}+{cfg.esm.num_layers} layers"
    rows = []
    seconds, peak, line = _convert(["openbiomed", str(pth), str(folder), "--lm-config", str(root / "lm.json"),
                                    "--esm-config", str(root / "esm.json"), "--tokenizer", str(tok)])
    print("  " + line)
    rows.append(dict(model=name, direction="OpenBioMed .pth -> model folder (openbiomed)", size=size,
                     seconds=seconds, peak=peak))
    pth.unlink()                                      # only two copies on disk at a time
    seconds, peak, line = _convert(["to_openbiomed", str(folder), str(back)])
    print("  " + line)
    rows.append(dict(model=name, direction="model folder -> OpenBioMed .pth (to_openbiomed)", size=size,
                     seconds=seconds, peak=peak))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["7b", "10b", "all"], default="all")
    ap.add_argument("--layers", type=int, help="decoder (and encoder) depth; default: the real one")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--dir", help="where to write (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    load_before = P.header("bench/convert.py: streaming checkpoint conversion, peak memory and time")
    root = Path(args.dir or tempfile.mkdtemp(prefix="bmgpt_convert_bench_"))
    rows = []
    try:
        for model, fn in (("7b", bench_7b), ("10b", bench_10b)):
            if args.model in (model, "all"):
                sub = root / model
                sub.mkdir(parents=True, exist_ok=True)
                try:
                    rows += fn(sub, args.layers, args.dtype)
                finally:
                    if not args.keep:
                        shutil.rmtree(sub, ignore_errors=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.dtype} checkpoints, `--check` on (written, then re-read and compared bit for bit)\n")
    print("| checkpoint | direction | size | peak RSS | time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['direction']} | {r['size'] / GB:.2f} GB | {r['peak'] / GB:.2f} GB | "
              f"{r['seconds']:.0f} s |")
    P.footer(load_before)


if __name__ == "__main__":
    main()

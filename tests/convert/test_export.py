"""The export at the end of training, streamed from the final checkpoint: two processes write exactly what
one process writes, the default export needs no torch, the `lm` export loads in transformers, and a
run's checkpoint converts to the same folder with `convert_weights.py orbax`."""
import json
import re
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convert_weights
from bmgpt_jax.convert import folder, run_export
from bmgpt_jax.convert.sources import read_state_dict
from bmgpt_jax.training import loop as train
from tests.children import communicate, xla_flags
from tests.convert.synthetic import REPO
from tests.training.runs import SMALL

STAGES = ("finetune", "align")
MESH = "mesh=[1,2,1]"     # fsdp across the two processes: each holds half of every weight and feeds half the batch
SETTINGS = [s for s in SMALL if not s.startswith("export=")] + ["steps=2", "export=true", "checkpoint.every=1"]
BLOCK_TORCH = "import sys\nsys.modules['torch'] = None   # `import torch` raises ImportError\n"
DEFAULT_FILES = ["esm_config.json", "gin_config.json", "llm_config.json", "model.safetensors", "tokenizer.model"]


def same_folders(a: Path, b: Path) -> None:
    """Two exports hold the same tensors bit for bit, the same configs and tokenizer; an OpenBioMed `.pth`
    present in either holds that folder's tensors, and the filled ones OpenBioMed's strict load needs."""
    names = sorted(p.name for p in a.iterdir() if p.suffix != ".pth")
    assert names == sorted(p.name for p in b.iterdir() if p.suffix != ".pth")
    for name in names:
        if name.endswith(".json") or name.endswith(".model"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    x, y = read_state_dict(a), read_state_dict(b)
    assert x.keys() == y.keys()
    bad = [k for k in x if x[k].dtype != y[k].dtype or x[k].tobytes() != y[k].tobytes()]
    assert not bad, bad[:5]
    for d in (a, b):
        if (d / folder.FILES["pth"]).exists():
            p = read_state_dict(d / folder.FILES["pth"])
            assert all(p[k].dtype == x[k].dtype and p[k].tobytes() == x[k].tobytes() for k in x)
            filled = p.keys() - x.keys()
            assert filled and all(re.search(r"inv_freq|\.pooler\.|\.contact_head\.", k) for k in filled), filled


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict:
    """An environment where `import torch` fails (a sitecustomize that poisons `sys.modules`), as on a TPU
    VM after `pip install -e .` without extras."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(BLOCK_TORCH)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}


SINGLE = r"""
import sys
from bmgpt_jax.training import loop
from tests.training.runs import MergedShards
for stage, out_dir in zip(sys.argv[1::2], sys.argv[2::2]):
    cfg = loop.load_config(f"tiny_{stage}", SETTINGS + [MESH, f"out_dir={out_dir}"])
    loop.run(cfg, batches=MergedShards(cfg))
"""


def _run(code: str, args: list[str], env: dict, n: int = 1, port: int = 0) -> None:
    """`python -c code args` as `n` processes (n > 1: one JAX job over 127.0.0.1:port, one CPU device each)."""
    def env_of(p):
        if n == 1:
            return {**env, "XLA_FLAGS": xla_flags(2)}
        return {**env, "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(p), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "XLA_FLAGS": xla_flags(1)}
    full = f"SETTINGS = {SETTINGS!r}\nMESH = {MESH!r}\n" + code
    procs = [subprocess.Popen([sys.executable, "-c", full, *args], cwd=REPO, env=env_of(p), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for p in range(n)]
    outputs = communicate(procs, timeout=900)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert not any("PRNGKey" in o for o in outputs)


@pytest.fixture(scope="module")
def single(tmp_path_factory, no_torch) -> dict[str, Path]:
    """Each stage run by one process on a 2-device mesh, fed what two processes would feed, without torch."""
    out = {stage: tmp_path_factory.mktemp(stage) for stage in STAGES}
    _run(SINGLE, [a for stage in STAGES for a in (stage, str(out[stage]))], no_torch)
    return out


WORKER = r"""
import sys
from bmgpt_jax import distributed
distributed.initialize()
from bmgpt_jax.training import loop
for stage, out_dir in zip(sys.argv[1::2], sys.argv[2::2]):
    loop.run(loop.load_config(f"tiny_{stage}", SETTINGS + [MESH, f"out_dir={out_dir}"]))
"""


def test_two_processes_export_what_one_process_exports(single, no_torch, tmp_path):
    """Two processes, fsdp across them (each holds half of every weight, feeds half of each batch and reads
    its share of each window), train to the weights one process reaches on the same mesh, bit for bit. No
    process gathers the model: each saves its own shards, process 0 streams the export from the final
    checkpoint (both runs without torch, so no `.pth` either way)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run(WORKER, [a for stage in STAGES for a in (stage, str(tmp_path / stage))], no_torch, n=2, port=port)
    for stage in STAGES:
        assert (tmp_path / stage / "checkpoints" / run_export.FROZEN / "ocdbt.process_1").exists()  # both wrote
        same_folders(tmp_path / stage / "final", single[stage] / "final")


def test_default_export_needs_no_torch(single, no_torch):
    """The default folder is safetensors + configs + tokenizer, and chat loads it, all without torch."""
    check = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch, capture_output=True, text=True)
    assert check.returncode != 0 and "import of torch halted" in check.stderr
    for stage in STAGES:
        assert sorted(p.name for p in (single[stage] / "final").iterdir()) == DEFAULT_FILES
    reload = ("import sys\nfrom bmgpt_jax import chat\nfrom bmgpt_jax.convert.folder import from_pretrained\n"
              "m = from_pretrained(sys.argv[1])\n"
              "print(repr(chat.ask(m, 'What is this?', smiles='CCO', max_new_tokens=4)))\n"
              "assert not [k for k, v in sys.modules.items() if k.startswith('torch') and v is not None]\n")
    back = subprocess.run([sys.executable, "-c", reload, str(single["finetune"] / "final")], cwd=REPO, env=no_torch,
                          capture_output=True, text=True, timeout=600)
    assert back.returncode == 0, back.stderr[-3000:]


def test_orbax_checkpoint_converts_like_the_export(single, tmp_path, capsys):
    ckpt = str(single["align"] / "checkpoints")
    assert convert_weights.main(["orbax", ckpt, str(tmp_path / "again"), "--pth", "--check"]) == 0
    assert "checked bit for bit" in capsys.readouterr().out
    assert (tmp_path / "again" / folder.FILES["pth"]).exists()               # torch is here
    same_folders(tmp_path / "again", single["align"] / "final")
    assert convert_weights.main(["orbax", ckpt, str(tmp_path / "again"), "--step", "1"]) == 0   # (as a resumed
    assert not (tmp_path / "again" / folder.FILES["pth"]).exists()    # run's export does): replaced, .pth and all
    convert_weights.main(["orbax", ckpt, str(tmp_path / "half"), "--dtype", "bfloat16", "--no-pth", "--step", "1"])
    half = read_state_dict(tmp_path / "half")
    assert str(half["llm.lm_head.weight"].dtype) == "bfloat16"
    assert half["mol_structure_encoder.batch_norms.0.num_batches_tracked"].dtype == np.int64
    assert json.loads((tmp_path / "half" / "llm_config.json").read_text())["torch_dtype"] == "bfloat16"

    def error(*argv):
        assert convert_weights.main(["orbax", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]
    assert re.search(r"FileNotFoundError: .*no checkpoint for step 7 \(have \[1, 2\]\)",
                     error(ckpt, tmp_path / "x", "--step", "7"))
    assert error(single["align"], tmp_path / "x").endswith(f"{single['align']}: no finished checkpoint step (a run "
                                                           f"folder? its checkpoints are in {ckpt})")
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    shutil.rmtree(copy / run_export.FROZEN)
    assert "holds only the trainable parameters and the frozen part was never saved" in error(copy, tmp_path / "x")
    for f in (copy / "2" / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])                     # truncate the data files
    shutil.copytree(f"{ckpt}/{run_export.FROZEN}", copy / run_export.FROZEN)
    assert re.search(r"ValueError: .*ckpt/2/state: cannot (open|read) array", error(copy, tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_lm_stage_export_loads_in_transformers(tmp_path, torch, capsys):
    import transformers
    from bmgpt_jax.convert import hf_llama
    from bmgpt_jax.data.text import load_tokenizer
    cfg = train.load_config("tiny_lm", [s for s in SETTINGS if not s.startswith("data.seq")] +
                            ["data.seq_buckets=[96]", f"out_dir={tmp_path}"])
    out = train.run(cfg)
    final = tmp_path / "final"
    assert (final / "tokenizer.model").exists() and (final / "config.json").exists()
    hf_tok, tok = transformers.AutoTokenizer.from_pretrained(final), load_tokenizer(cfg.data.tokenizer)
    assert hf_tok("Aspirin is a drug.").input_ids == tok.encode("Aspirin is a drug.", bos=True)  # BOS, as trained
    assert (len(hf_tok), hf_tok.pad_token_id) == (out["model"].config.vocab_size, tok.pad_id)
    ref = transformers.LlamaForCausalLM.from_pretrained(final).eval()
    ours = hf_llama.to_state_dict(out["model"])
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert all(np.array_equal(theirs[k], v) for k, v in ours.items())
    ids = np.array([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(out["model"](ids)), want, atol=1e-4)
    capsys.readouterr()
    assert convert_weights.main(["orbax", str(tmp_path / "checkpoints"), str(tmp_path / "x"), "--pth"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no OpenBioMed .pth form (leave out --pth)" in err[0], err
    assert not (tmp_path / "x").exists()

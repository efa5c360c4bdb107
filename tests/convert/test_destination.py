"""Where a conversion may write: never over its source or a folder holding it, never over a folder holding
anything but an earlier output of ours (refused before a tensor is read), always over such an output,
and a `.pth` never over a folder or its own source; a failed rename leaves no temporary behind."""
import dataclasses
import json
import re

import numpy as np
import pytest

import convert_weights
from bmgpt_jax.convert import graphmvp_gin, hf_esm, hf_llama, stream
from bmgpt_jax.convert.safetensors_io import SafetensorsFile
from bmgpt_jax.convert.sources import read_state_dict
from bmgpt_jax.convert.tensor_map import ModelSource
from bmgpt_jax.models.esm import EsmConfig
from bmgpt_jax.models.gin import GinConfig
from bmgpt_jax.models.llama import LlamaConfig
from tests.convert import synthetic

LM = LlamaConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=32)


def llama_dir(path, **kw):
    return synthetic.write(hf_llama.layout(LM), path, extra_files=lambda t: (t / "config.json").write_text(
        json.dumps(hf_llama.config_to_hf(LM))), **kw)


def snapshot(root):
    """Every file under `root` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def reads(monkeypatch):
    """The keys read from safetensors files from now on."""
    real, seen = SafetensorsFile.read, []

    def counting(self, key, index=None):
        seen.append(key)
        return real(self, key, index)
    monkeypatch.setattr(SafetensorsFile, "read", counting)
    return seen


def test_the_source_or_a_folder_holding_it_is_refused(tmp_path, reads, capsys):
    """`hf_llama models/llama models --check` used to rename `models` aside and delete it: the source, its
    siblings and every other file in it."""
    models = tmp_path / "models"
    llama_dir(models / "llama")
    (models / "other").mkdir()
    (models / "other" / "weights.bin").write_bytes(b"someone's")
    (models / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    for dst, says in [(models, "holds"), (models / "llama", "is")]:
        assert convert_weights.main(["hf_llama", str(models / "llama"), str(dst), "--check"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"ValueError: refusing to write {dst}: it {says} the source {models / 'llama'}" \
            in err[0], err
        with pytest.raises(ValueError, match=f"refusing to write {re.escape(str(dst))}: it {says} the source"):
            hf_llama.convert(models / "llama", dst, check=True)          # the library refuses too
    assert snapshot(tmp_path) == before and not reads                    # nothing read, nothing moved


def test_a_folder_holding_other_things_is_refused_before_any_work(tmp_path, reads):
    src = llama_dir(tmp_path / "src")
    dst = tmp_path / "dst"
    (dst / "runs").mkdir(parents=True)
    for name in ("notes.txt", "config.json", "a.txt", "b.txt", "c.txt", "d.txt"):
        (dst / name).write_text(name)
    with pytest.raises(ValueError, match=r"refusing to replace .*/dst: it holds 6 entries that no bmgpt_jax writer "
                                         r"produces \(a\.txt, b\.txt, c\.txt, d\.txt, notes\.txt, \.\.\.\)"):
        hf_llama.convert(src, dst)
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "notes.txt"):
        (dst / name).unlink()
    with pytest.raises(ValueError, match=r"it holds 1 entry that no bmgpt_jax writer produces \(runs/\)"):
        hf_llama.convert(src, dst)
    (dst / "runs").rmdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"refusing to replace .*/file with a folder: it is a file"):
        hf_llama.convert(src, tmp_path / "file")
    assert not reads and sorted(p.name for p in tmp_path.iterdir()) == ["dst", "file", "src"]
    assert hf_llama.convert(src, dst) == len(hf_llama.layout(LM).entries)     # only our config.json left: replaced
    assert json.loads((dst / "config.json").read_text())["model_type"] == "llama"


def test_every_writer_output_is_replaced_by_the_next(tmp_path, torch):
    """What each writer of a folder puts there (the allow-list's single source) is replaceable, so the
    export at the end of a resumed training run, or a second conversion, writes over the first."""
    from flax import nnx

    from bmgpt_jax.convert import folder
    from bmgpt_jax.data.text import load_tokenizer
    from bmgpt_jax.models.biomedgpt import BioMedGPT, BioMedGPTConfig
    from bmgpt_jax.models.esm import Esm
    tok = load_tokenizer(None)
    src = llama_dir(tmp_path / "src", max_shard_bytes=2_000)                  # shards + index
    for name in hf_llama.TOKENIZER_FILES:
        (src / name).write_text("{}")
    esm = EsmConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    cfg = BioMedGPTConfig(lm=dataclasses.replace(LM, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id),
                          esm=esm, gin=GinConfig(num_layers=2, emb_dim=8))
    writers = {
        "hf_llama.convert": lambda d, seed: hf_llama.convert(src, d, max_shard_bytes=2_000),
        "hf_llama.write": lambda d, seed: hf_llama.write(d, cfg.lm, ModelSource(hf_llama.init(cfg.lm, seed)), tok),
        "hf_esm.save": lambda d, seed: hf_esm.save(Esm(esm, rngs=nnx.Rngs(seed)), d),
        "folder.write": lambda d, seed: folder.write(d, cfg, tok, ModelSource(BioMedGPT(cfg, rngs=nnx.Rngs(seed))),
                                                     pth=True),
    }
    for name, write in writers.items():
        d = tmp_path / name
        write(d, 0)
        assert all(stream.ours(p.name) for p in d.iterdir()), (name, sorted(p.name for p in d.iterdir()))
        first = read_state_dict(d)
        write(d, 1)
        second = read_state_dict(d)
        assert first.keys() == second.keys()
        if name != "hf_llama.convert":                                        # (the same source twice)
            assert any(not np.array_equal(first[k], second[k]) for k in first), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", *writers])   # no .tmp/.old left


def test_a_pth_is_never_written_over_a_folder_or_its_source(tmp_path, torch, monkeypatch):
    """A folder at the `.pth` path used to be found only after the whole conversion, by `os.replace`, which
    left the full-size temporary behind; the `.pth` being converted was overwritten by its conversion."""
    gin = synthetic.write(graphmvp_gin.layout(GinConfig(num_layers=2, emb_dim=8)), tmp_path / "gin.pth", fmt="pth")
    (tmp_path / "out.pth").mkdir()
    (tmp_path / "out.pth" / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"refusing to write the file .*/out\.pth: it is an existing folder"):
        graphmvp_gin.convert(gin, tmp_path / "out.pth")
    with pytest.raises(ValueError, match=r"refusing to write .*/gin\.pth: it is the source .*/gin\.pth"):
        graphmvp_gin.convert(gin, gin, dtype="bfloat16")
    assert snapshot(tmp_path) == before
    assert convert_weights.main(["graphmvp_gin", str(gin), str(tmp_path / "out.pth")]) == 2

    def failing(a, b):
        raise OSError(f"cannot rename {a}")
    monkeypatch.setattr(stream.os, "replace", failing)
    with pytest.raises(OSError, match="cannot rename .*/\\.new\\.pth\\.tmp-"):
        graphmvp_gin.convert(gin, tmp_path / "new.pth")
    assert snapshot(tmp_path) == before                                  # the temporary went with the error

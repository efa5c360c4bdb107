"""convert_weights.py: every conversion streams and round-trips bit for bit, keeps the dtype unless told,
checks the source before writing, and leaves nothing that looks valid when it fails."""
import json
import re

import ml_dtypes
import numpy as np
import pytest

import convert_weights
from bmgpt_jax.convert import cli, hf_esm, hf_llama
from bmgpt_jax.convert.safetensors_io import write_tensors
from bmgpt_jax.convert.sources import open_source, read_state_dict
from bmgpt_jax.models.esm import EsmConfig
from bmgpt_jax.models.llama import LlamaConfig
from tests.convert import synthetic
from tests.torch_refs.hf_llama import make_hf_llama

SMALL = LlamaConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def llama_dir(path, cfg=SMALL, dtype=None, **kw):
    """A synthetic HF Llama folder (config.json + safetensors) of `cfg`."""
    return synthetic.write(hf_llama.layout(cfg), path, dtype=dtype, extra_files=lambda t: (t / "config.json").write_text(
        json.dumps(hf_llama.config_to_hf(cfg))), **kw)


def write_hf(path, tensors, config: dict):
    write_tensors(tensors, path)
    (path / "config.json").write_text(json.dumps(config))
    return path


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_hf_llama_round_trip(tmp_path, torch, capsys):
    make_hf_llama(tmp_path / "src", num_kv_heads=2)
    files = {"tokenizer.model": b"\x0a\x01sp", "tokenizer_config.json": b'{"add_bos_token": true}',
             "generation_config.json": b'{"bos_token_id": 1}'}
    for name, data in files.items():
        (tmp_path / "src" / name).write_bytes(data)
    assert convert_weights.main(["hf_llama", str(tmp_path / "src"), str(tmp_path / "dst"), "--check"]) == 0
    assert "checked bit for bit" in capsys.readouterr().out
    a, b = read_state_dict(tmp_path / "src"), read_state_dict(tmp_path / "dst")
    assert a.keys() - b.keys() == {k for k in a if "inv_freq" in k} and all(np.array_equal(a[k], b[k]) for k in b)
    assert all((tmp_path / "dst" / name).read_bytes() == data for name, data in files.items())  # copied beside


def test_dtype_is_kept_unless_asked_and_output_is_sharded(tmp_path):
    src = llama_dir(tmp_path / "src", dtype="float16")
    convert_weights.main(["hf_llama", str(src), str(tmp_path / "f16"), "--check", "--max-shard-gb", "0.00005"])
    assert (tmp_path / "f16" / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["torch_dtype"] == "float16"
    a, b = read_state_dict(src), read_state_dict(tmp_path / "f16")
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    convert_weights.main(["hf_llama", str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16", "--check"])
    c = read_state_dict(tmp_path / "bf16")
    assert all(same_bits(c[k], a[k].astype(ml_dtypes.bfloat16)) for k in a)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_esm_masked_lm_bin_becomes_a_canonical_esm_folder(tmp_path, torch, capsys):
    cfg = EsmConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    good = dict(synthetic.tensors(hf_esm.layout(cfg)))
    legacy = {"esm." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
              torch.from_numpy(v) for k, v in good.items()}
    legacy["lm_head.dense.weight"] = torch.zeros(4, 4)
    legacy["esm.encoder.layer.0.attention.self.rotary_embeddings.inv_freq"] = torch.zeros(4)
    (tmp_path / "src").mkdir()
    torch.save(legacy, tmp_path / "src" / "pytorch_model.bin")
    (tmp_path / "src" / "config.json").write_text(json.dumps(hf_esm.config_to_hf(cfg)))
    capsys.readouterr()
    convert_weights.main(["hf_esm", str(tmp_path / "src"), str(tmp_path / "dst"), "--check"])
    err = capsys.readouterr().err       # the keys the encoder does not use are named, and carried over
    assert "carried over 1 key(s) outside the encoder's prefix 'esm.': lm_head.dense.weight" in err
    assert "carried over 1 tensor(s) the Hugging Face ESM-2 encoder does not use: encoder.layer.0." in err
    out = read_state_dict(tmp_path / "dst")
    kept = {"lm_head.dense.weight": legacy["lm_head.dense.weight"].numpy(),     # outside the prefix: as named
            "encoder.layer.0.attention.self.rotary_embeddings.inv_freq": np.zeros(4, np.float32)}  # canonical
    assert out.keys() == good.keys() | kept.keys()
    assert all(same_bits(out[k], {**good, **kept}[k]) for k in out)
    assert (tmp_path / "dst" / "vocab.txt").exists()


def test_gin_round_trip_with_prefix(tmp_path, torch):
    from tests.torch_refs.gin import TorchGIN
    sd = {f"mol_structure_encoder.{k}": v for k, v in TorchGIN(2, 16).state_dict().items()}
    torch.save(sd, tmp_path / "gin.pth")
    convert_weights.main(["graphmvp_gin", str(tmp_path / "gin.pth"), str(tmp_path / "out.pth"),
                          "--prefix", "mol_structure_encoder.", "--check"])
    out = torch.load(tmp_path / "out.pth")
    assert list(out) == list(sd) and all(torch.equal(out[k], sd[k]) and out[k].dtype == sd[k].dtype for k in sd)


def test_openbiomed_to_checkpoint_dir_and_back(tmp_path, torch, shared_data):
    from bmgpt_jax import config as config_lib
    from tests.torch_refs.biomedgpt import TorchBioMedGPT
    from tests.torch_refs.hf_esm import hf_config
    esm_cfg = config_lib.load(EsmConfig, "esm2_tiny")
    ref = TorchBioMedGPT(esm_cfg, vocab_size=32001)
    torch.save(ref.state_dict(), tmp_path / "biomedgpt_10b.pth")
    (tmp_path / "lm.json").write_text(json.dumps(ref.llm_config()))
    (tmp_path / "esm.json").write_text(json.dumps(hf_config(esm_cfg).to_dict()))
    tok = str(shared_data / "tokenizer" / "llama2_tokenizer.model")
    convert_weights.main(["openbiomed", str(tmp_path / "biomedgpt_10b.pth"), str(tmp_path / "ckpt"),
                          "--lm-config", str(tmp_path / "lm.json"), "--esm-config", str(tmp_path / "esm.json"),
                          "--tokenizer", tok, "--check"])
    assert not (tmp_path / "ckpt" / "biomedgpt_10b.pth").exists()     # the folder's weights are safetensors
    convert_weights.main(["to_openbiomed", str(tmp_path / "ckpt"), str(tmp_path / "back.pth"), "--check"])
    back = torch.load(tmp_path / "back.pth")
    src = ref.state_dict()
    # every key back, bit for bit: the folder carried over what our model does not use (the Llama's and
    # the ESM's rotary buffers, the ESM's pooler and contact head)
    assert back.keys() == src.keys()
    assert all(back[k].dtype == src[k].dtype and torch.equal(back[k], src[k]) for k in src)
    # what OpenBioMed does with it: a strict load, which gives the same model
    fresh = TorchBioMedGPT(esm_cfg, vocab_size=32001, seed=1)
    fresh.load_state_dict(back)
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with torch.no_grad():
        for part, run in [("esm", lambda m: m.prot_structure_encoder(ids).last_hidden_state),
                          ("llm", lambda m: m.llm(ids).logits)]:
            assert torch.equal(run(fresh), run(ref)), part
    # the .pth holds no atom cap: a folder's gin_config.json given back keeps it (depth and width still
    # from the weights), without it the default cap applies
    gin = json.loads((tmp_path / "ckpt" / "gin_config.json").read_text())
    (tmp_path / "gin.json").write_text(json.dumps({**gin, "max_atoms": 64, "over_cap": "error", "num_layers": 9}))
    args = ["--lm-config", str(tmp_path / "lm.json"), "--esm-config", str(tmp_path / "esm.json"), "--tokenizer", tok]
    assert convert_weights.main(["openbiomed", str(tmp_path / "back.pth"), str(tmp_path / "again"), *args,
                                 "--gin-config", str(tmp_path / "gin.json")]) == 0
    again = json.loads((tmp_path / "again" / "gin_config.json").read_text())
    assert again == {**gin, "max_atoms": 64, "over_cap": "error"}
    assert gin["max_atoms"] != 64 and gin["over_cap"] != "error"
    # as a DistributedDataParallel training loop saves it: wrapped, every key under `module.`
    torch.save({"model": {f"module.{k}": v for k, v in src.items()}, "epoch": 1}, tmp_path / "ddp.pth")
    assert convert_weights.main(["openbiomed", str(tmp_path / "ddp.pth"), str(tmp_path / "ddp"), *args]) == 0
    a, b = read_state_dict(tmp_path / "ckpt"), read_state_dict(tmp_path / "ddp")
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)


def test_openbiomed_takes_the_pth_s_token_rows_over_the_lm_config_json(tmp_path, torch, shared_data, capsys):
    """BioMedGPT-LM-7B's config.json says vocab_size 32000; the released `.pth` holds 32001 rows (OpenBioMed
    adds `[PAD]` and resizes): the rows win, said in one line, and the folder's llm_config.json says 32001.
    Fewer rows than the config.json says, or a tokenizer (with `[PAD]`) the rows do not fit, is one line."""
    from bmgpt_jax import config as config_lib
    from tests.torch_refs.biomedgpt import TorchBioMedGPT
    from tests.torch_refs.hf_esm import hf_config
    esm_cfg = config_lib.load(EsmConfig, "esm2_tiny")
    ref = TorchBioMedGPT(esm_cfg, vocab_size=32001)
    pth, lm = tmp_path / "biomedgpt_10b.pth", tmp_path / "config.json"
    torch.save(ref.state_dict(), pth)
    lm.write_text(json.dumps({**ref.llm_config(), "vocab_size": 32000, "pad_token_id": 0}))
    (tmp_path / "esm.json").write_text(json.dumps(hf_config(esm_cfg).to_dict()))
    tok = str(shared_data / "tokenizer" / "llama2_tokenizer.model")        # 32000 pieces + [PAD]

    def run(src, dst):
        return convert_weights.main(["openbiomed", str(src), str(tmp_path / dst), "--lm-config", str(lm),
                                     "--esm-config", str(tmp_path / "esm.json"), "--tokenizer", tok, "--check"])
    capsys.readouterr()
    assert run(pth, "ckpt") == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "token rows" in line]
    assert said == [f"{pth}: its 32001 token rows override {lm}'s vocab_size 32000 (as OpenBioMed's "
                    "resize_token_embeddings after adding [PAD])"]
    assert json.loads((tmp_path / "ckpt" / "llm_config.json").read_text())["vocab_size"] == 32001
    a, b = read_state_dict(tmp_path / "ckpt"), ref.state_dict()
    assert a["llm.lm_head.weight"].shape == (32001, ref.llm.config.hidden_size)
    assert same_bits(a["llm.model.embed_tokens.weight"], b["llm.model.embed_tokens.weight"].numpy())
    lm.write_text(json.dumps({**ref.llm_config(), "vocab_size": 32002}))
    assert run(pth, "fewer") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"convert_weights.py openbiomed: ValueError: {pth}: llm.model.embed_tokens.weight has 32001 token rows, "
        f"fewer than {lm}'s vocab_size 32002: not a checkpoint of this LM config"]
    small = TorchBioMedGPT(esm_cfg, vocab_size=32000)                      # no row for [PAD]
    torch.save(small.state_dict(), tmp_path / "small.pth")
    lm.write_text(json.dumps({**small.llm_config(), "vocab_size": 32000}))
    assert run(tmp_path / "small.pth", "small") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "convert_weights.py openbiomed: ValueError: the tokenizer has 32001 ids ([PAD] included) but "
        f"{tmp_path / 'small.pth'}'s LM has only 32000 token rows"]
    assert not any((tmp_path / d).exists() for d in ("fewer", "small"))


def test_bad_inputs_are_one_line_naming_the_file(tmp_path, torch, capsys):
    from bmgpt_jax.data.text import load_tokenizer
    from tests.torch_refs.gin import TorchGIN

    def error(*argv):
        assert convert_weights.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    out = tmp_path / "out"
    assert "config.json not found: a Hugging Face Llama directory" in error("hf_llama", tmp_path, out)
    torch.save(TorchGIN(2, 16).state_dict(), tmp_path / "gin.pth")
    whole = (tmp_path / "gin.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    assert error("graphmvp_gin", tmp_path / "cut.pth", out).startswith(
        f"convert_weights.py graphmvp_gin: ValueError: {tmp_path / 'cut.pth'} is truncated or corrupt")
    assert f"{tmp_path / 'empty.pth'} is empty (0 bytes)" in error("graphmvp_gin", tmp_path / "empty.pth", out)
    (tmp_path / "lm.json").write_text('{"vocab_size": 32001, "hidden')
    (tmp_path / "esm.json").write_text("{}")
    (tmp_path / "tok.model").write_bytes(load_tokenizer(None).model_proto[:500])
    opts = ["--lm-config", tmp_path / "lm.json", "--esm-config", tmp_path / "esm.json",
            "--tokenizer", tmp_path / "tok.model"]
    assert f"{tmp_path / 'lm.json'} is not valid JSON" in error("openbiomed", tmp_path / "gin.pth", out, *opts)
    (tmp_path / "lm.json").write_text("{}")
    assert f"{tmp_path / 'tok.model'} is not a readable SentencePiece tokenizer" in \
        error("openbiomed", tmp_path / "gin.pth", out, *opts)
    make_hf_llama(tmp_path / "hf", num_kv_heads=2)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    capsys.readouterr()                                   # transformers' progress bar while saving
    assert f"{weights}: truncated: " in error("hf_llama", tmp_path / "hf", out)
    assert f"model folder {tmp_path / 'none'} does not exist" in error("to_openbiomed", tmp_path / "none", out)
    (tmp_path / "run" / "final").mkdir(parents=True)   # a training run's folder: the hint names SRC's path only
    assert error("to_openbiomed", tmp_path / "run", out).endswith(
        f"{tmp_path / 'run'} is a training run's folder; its model is {tmp_path / 'run' / 'final'}")



@pytest.mark.parametrize("kind", ["hf_llama", "hf_esm"])
def test_a_weights_file_as_source_is_refused_in_one_line(tmp_path, kind, capsys):
    """`hf_llama DIR/model.safetensors OUT` used to fail with a UnicodeDecodeError (the weights parsed as its
    config.json); SRC_HF_DIR is a folder holding config.json and the weights, for both families."""
    if kind == "hf_llama":
        src = llama_dir(tmp_path / "src")
    else:
        esm = EsmConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
        src = write_hf(tmp_path / "src", dict(synthetic.tensors(hf_esm.layout(esm))), hf_esm.config_to_hf(esm))
    weights, dst = src / "model.safetensors", tmp_path / "dst"
    capsys.readouterr()
    assert convert_weights.main([kind, str(weights), str(dst)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"convert_weights.py {kind}: ValueError: {weights} is not a folder: SRC must be a folder holding config.json "
        "and the weights"]
    assert not dst.exists()
    if kind == "hf_llama":     # the library call (a training run's init.hf_llama) names the file too
        with pytest.raises(ValueError, match=re.escape(f"{weights} is not a JSON config (UnicodeDecodeError): give "
                                                       "the Hugging Face Llama folder holding config.json")):
            hf_llama.config_from_hf(weights)

def _bad_sources(tmp_path):
    """(name, make(folder) -> folder, exception, message regex): one defect each."""
    good = dict(synthetic.tensors(hf_llama.layout(SMALL)))
    cfg = hf_llama.config_to_hf(SMALL)
    esm = EsmConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)

    def edited(**changes):
        return lambda d: write_hf(d, {k: v for k, v in {**good, **changes}.items() if v is not None}, cfg)

    def truncated(d):
        llama_dir(d)
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])
        return d

    def missing_shard(d):
        llama_dir(d, max_shard_bytes=100_000)
        sorted(d.glob("model-*.safetensors"))[1].unlink()
        return d
    down = "model.layers.0.mlp.down_proj.weight"
    return [
        ("esm_config", lambda d: write_hf(d, good, hf_esm.config_to_hf(esm)), ValueError,
         r"'esm' config, not a Llama one"),
        ("esm_weights", lambda d: write_hf(d, dict(synthetic.tensors(hf_esm.layout(esm))), cfg), KeyError,
         r"model\.safetensors: holds none of the \d+ tensors of a Hugging Face Llama .* another model"),
        ("truncated", truncated, ValueError, r"model\.safetensors: truncated: tensor '[\w.]+' ends at byte"),
        ("missing_shard", missing_shard, FileNotFoundError,
         r"index\.json names shard\(s\) that are missing: \['.*model-00002-of-0000\d\.safetensors'\]"),
        ("missing_key", edited(**{"model.norm.weight": None}), KeyError,
         r"missing tensor 'model\.norm\.weight' \(shape \(64,\), parameter model\.norm\.weight\)"),
        ("unexpected_key", edited(**{"model.extra.weight": np.zeros(3, np.float32)}), KeyError,
         r"unexpected tensors not used by the Hugging Face Llama: \['model\.extra\.weight \(3,\)'\]"),
        ("shape", edited(**{down: np.zeros((64, 120), np.float32)}), ValueError,
         r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 120\) but the "
         r"model expects \(64, 128\) \(parameter model\.layers\.0\.mlp\.down_proj\.kernel, ours \(128, 64\)"),
        ("dtype", edited(**{"model.norm.weight": np.ones(64, np.int32)}), ValueError,
         r"model\.safetensors: tensor 'model\.norm\.weight' has dtype int32 but the model expects float32"),
    ]


@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in _bad_sources(None)])
def test_bad_input_is_named_and_leaves_no_output(tmp_path, case, capsys):
    name, make, exc, message = _bad_sources(tmp_path)[case]
    src = make(tmp_path / "src")
    dst = tmp_path / "dst"
    capsys.readouterr()
    assert convert_weights.main(["hf_llama", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{exc.__name__}: " in err[0] and re.search(message, err[0]), err
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_a_failure_midway_keeps_the_old_output_and_leaves_no_partial(tmp_path, monkeypatch, capsys):
    from bmgpt_jax.convert.safetensors_io import SafetensorsFile
    src = llama_dir(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "config.json").write_text("previous output")       # an earlier output of ours
    real, calls = SafetensorsFile.read, []

    def flaky(self, key, index=None):
        calls.append(key)
        if len(calls) == 5:
            raise OSError("disk went away")
        return real(self, key, index)
    monkeypatch.setattr(SafetensorsFile, "read", flaky)
    assert convert_weights.main(["hf_llama", str(src), str(tmp_path / "dst")]) == 2
    assert "OSError: disk went away" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["config.json"]
    assert (tmp_path / "dst" / "config.json").read_text() == "previous output"


CONVERT_BASELINE = r"""
import sys, convert_weights
from bmgpt_jax.convert import hf_llama, stream
from bmgpt_jax.convert.sources import open_source
with open_source(sys.argv[1]) as src:
    hf_llama.layout(hf_llama.config_from_hf(sys.argv[1]))
"""


def test_real_width_conversion_streams(tmp_path):
    """hidden 4096, FFN 11008, vocab 32001, one layer, float16 (0.9 GB): `--check` conversion peaks at
    the baseline (imports, the name table) plus about two of the largest tensors, whatever the depth."""
    cfg = LlamaConfig(vocab_size=32001, hidden_size=4096, num_layers=1, num_heads=32, num_kv_heads=32,
                      intermediate_size=11008)
    src = llama_dir(tmp_path / "src", cfg, dtype="float16", scale=None)
    largest = 32001 * 4096 * 2
    _, base = synthetic.run_child(["-c", CONVERT_BASELINE, str(src)])
    out, peak = synthetic.run_child(["convert_weights.py", "hf_llama", str(src), str(tmp_path / "dst"), "--check"])
    assert "checked bit for bit" in out
    with open_source(tmp_path / "dst") as d:
        assert d.dtype("lm_head.weight") == np.float16 and d.shape("lm_head.weight") == (32001, 4096)
    assert peak - base < 2.5 * largest, ((peak - base) / 2**20, largest / 2**20)


@pytest.mark.parametrize("argv, message", [
    (["to_openbiomed", "RUN/final", "y.pth", "--step", "5"], "to_openbiomed does not take --step (its options: --dtype, --check)"),
    (["to_openbiomed", "RUN/final", "y.pth", "--no-pth"], "to_openbiomed does not take --pth"),
    (["hf_llama", "src", "dst", "--prefix", "x.", "--tokenizer", "t.model"], "hf_llama does not take --prefix, --tokenizer"),
    (["hf_esm", "src", "dst", "--lm-config", "c.json"], "hf_esm does not take --lm-config"),
    (["graphmvp_gin", "a.pth", "b.pth", "--max-shard-gb", "1"], "graphmvp_gin does not take --max-shard-gb"),
    (["graphmvp_gin", "a.pth", "b.pth", "--gin-config", "g.json"], "graphmvp_gin does not take --gin-config"),
    (["orbax", "RUN/checkpoints", "dst", "--esm-config", "e.json"], "orbax does not take --esm-config"),
    (["openbiomed", "a.pth", "dst", "--step", "1"], "openbiomed does not take --step"),
    (["hf_llama", "src", "dst", "--max-shard-gb", "-1"], "argument --max-shard-gb: -1 is not a positive size in GiB"),
    (["hf_llama", "src", "dst", "--max-shard-gb", "0"], "argument --max-shard-gb: 0 is not a positive size in GiB"),
    (["orbax", "RUN/checkpoints", "dst", "--max-shard-gb", "inf"], "argument --max-shard-gb: inf is not a positive"),
])
def test_an_option_of_another_kind_is_refused(tmp_path, monkeypatch, capsys, argv, message):
    """An option the kind does not read, and a shard size that is not > 0, are a usage error (status 2) whose last
    line names the option, before anything is read or written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        convert_weights.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and message in err[-1] and "Traceback" not in "\n".join(err), err
    assert list(tmp_path.iterdir()) == []


def test_options_table_covers_every_kind_and_option():
    """Every kind has its row, and every per-kind option of the parser is in some row (--dtype, --check: all)."""
    assert set(cli.OPTIONS) == set(cli.KINDS)
    ap_dests = {"prefix", "lm_config", "esm_config", "gin_config", "tokenizer", "step", "pth", "max_shard_gb"}
    assert set().union(*cli.OPTIONS.values()) == ap_dests

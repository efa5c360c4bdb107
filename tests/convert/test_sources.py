"""`open_source` over every checkpoint layout we accept, the source combinators, and their bad-input errors."""
import json

import numpy as np
import pytest

from bmgpt_jax.convert.safetensors_io import SAFE_INDEX, write_tensors
from bmgpt_jax.convert.sources import open_source, read_state_dict
from bmgpt_jax.convert.tensor_source import DictSource, Union, View

TENSORS = {f"layers.{i}.w": np.full((4, 4), i, np.float32) for i in range(4)}


@pytest.fixture
def sharded(tmp_path):
    write_tensors(TENSORS, tmp_path, max_shard_bytes=130)         # two tensors a shard
    return tmp_path


def test_sharded_folder_index_and_single_file(sharded, tmp_path_factory):
    assert read_state_dict(sharded).keys() == TENSORS.keys()
    with open_source(sharded / SAFE_INDEX) as src:                # the index file itself
        assert src.file_of("layers.3.w").endswith("model-00002-of-00002.safetensors")
        assert np.array_equal(src.read("layers.3.w", (slice(1, 2),)), TENSORS["layers.3.w"][1:2])
    single = tmp_path_factory.mktemp("single")
    write_tensors(TENSORS, single)
    assert open_source(single / "model.safetensors").keys() == list(TENSORS)


def test_missing_shard_and_index_mismatches_are_named(sharded):
    index = json.loads((sharded / SAFE_INDEX).read_text())
    (sharded / "model-00002-of-00002.safetensors").rename(sharded / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json names shard\(s\) that are missing: "
                                                r"\['.*model-00002-of-00002\.safetensors'\]"):
        open_source(sharded)
    (sharded / "elsewhere.safetensors").rename(sharded / "model-00002-of-00002.safetensors")
    index["weight_map"]["layers.0.w"] = "model-00002-of-00002.safetensors"
    (sharded / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"tensor 'layers.0.w' is named for .*model-00002-of-00002.safetensors, "
                                       "which does not hold it"):
        open_source(sharded)
    del index["weight_map"]["layers.0.w"]
    index["weight_map"]["layers.1.w"] = "model-00001-of-00002.safetensors"
    (sharded / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"shards hold tensors the index does not name: \['layers.0.w'\]"):
        open_source(sharded)
    (sharded / SAFE_INDEX).write_text("{oops")
    with pytest.raises(ValueError, match="not a Hugging Face index file"):
        open_source(sharded)


def test_torch_files_and_folders(torch, tmp_path):
    sd = {k: torch.from_numpy(v) for k, v in TENSORS.items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert all(np.array_equal(v, TENSORS[k]) for k, v in read_state_dict(tmp_path).items())
    shards = tmp_path / "shards"
    shards.mkdir()
    torch.save({k: sd[k] for k in list(sd)[:2]}, shards / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in list(sd)[2:]}, shards / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 + i // 2}-of-00002.bin" for i, k in enumerate(sd)}
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert read_state_dict(shards).keys() == TENSORS.keys()


def test_a_trainer_checkpoint_folder_is_read_from_pytorch_model_bin(torch, tmp_path):
    """A Hugging Face Trainer's `checkpoint-N` holds the weights' `pytorch_model.bin` beside other torch
    files (it used to be refused as lacking pytorch_model.bin); without it, the error lists them."""
    torch.save({k: torch.from_numpy(v) for k, v in TENSORS.items()}, tmp_path / "pytorch_model.bin")
    for name in ("training_args.bin", "optimizer.pt", "rng_state.pth"):
        (tmp_path / name).write_bytes(b"not read")
    assert read_state_dict(tmp_path).keys() == TENSORS.keys()
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match=r"3 torch files and none is pytorch_model\.bin: \['optimizer\.pt', "
                                         r"'rng_state\.pth', 'training_args\.bin'\]; name that file"):
        open_source(tmp_path)


def test_unknown_folders_say_what_they_lack(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors .* it holds \['notes\.txt'\]"):
        open_source(tmp_path)
    (tmp_path / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(ValueError, match="orbax training checkpoint .*convert_weights.py orbax"):
        open_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.safetensors not found"):
        open_source(tmp_path / "nothere.safetensors")


def test_views_and_unions():
    src = DictSource({"enc.LayerNorm.gamma": np.ones(2), "enc.x": np.zeros(3), "other": np.zeros(1)}, name="sd")
    v = View(src, "enc.", lambda k: k.replace("gamma", "weight"))
    assert sorted(v.keys()) == ["LayerNorm.weight", "x"] and v.original("x") == "enc.x"
    with pytest.raises(KeyError, match="sd: both 'enc.a.weight' and 'enc.a.gamma' stand for 'a.weight'"):
        View(DictSource({"enc.a.weight": np.ones(1), "enc.a.gamma": np.ones(1)}, name="sd"), "enc.",
             lambda k: k.replace("gamma", "weight"))
    with pytest.raises(KeyError, match="tensor 'x' is in both a and b"):
        Union([DictSource({"x": np.ones(1)}, name="a"), DictSource({"x": np.ones(1)}, name="b")], name="u")

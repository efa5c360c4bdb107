"""The safetensors and torch file readers/writers against the reference libraries (the `safetensors`
package, `torch.load`/`torch.save`): every dtype (bfloat16 without torch), slices, sharding, and bad files."""
import warnings

import ml_dtypes
import numpy as np
import pytest

from bmgpt_jax.convert.safetensors_io import SAFE_INDEX, SafetensorsFile, SafetensorsWriter, write_tensors


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((5, 7), dtype=np.float32),
        "bf16": rng.standard_normal((6, 3, 4)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((9,)).astype(np.float16),
        "i64": np.asarray(12345, np.int64),                     # 0-d, like num_batches_tracked
        "i32": rng.integers(-5, 5, (4, 4)).astype(np.int32),
        "bool": rng.integers(0, 2, (3,)).astype(bool),
        "empty": np.zeros((0, 3), np.float32),
    }


def same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_safetensors_both_ways_with_the_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file
    tensors = sample()
    assert write_tensors(tensors, tmp_path / "ours") == ["model.safetensors"]
    theirs = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert theirs.keys() == tensors.keys() and all(same(theirs[k], v) for k, v in tensors.items())
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    with SafetensorsFile(tmp_path / "theirs.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert f.shape(k) == v.shape and f.dtype(k) == v.dtype and same(f.read(k), v), k


@pytest.mark.parametrize("index", [(slice(1, 4),), (slice(None), slice(2, 5)), (slice(2, 3), slice(0, 7, 2)),
                                   (slice(4, 0, -2), slice(1, 2)), (slice(3, 3),)], ids=str)
def test_safetensors_slices_equal_numpy_and_get_slice(tmp_path, index):
    from safetensors import safe_open
    a = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    write_tensors({"a": a}, tmp_path)
    with SafetensorsFile(tmp_path / "model.safetensors") as f:
        got = f.read("a", index)
    assert same(got, a[index]) and got.flags.c_contiguous
    if all(s.step in (None, 1) for s in index):
        with safe_open(str(tmp_path / "model.safetensors"), "np") as ref:
            assert same(got, ref.get_slice("a")[index])


def test_safetensors_shards_plan_offsets_and_accept_any_write_order(tmp_path):
    tensors = {f"t{i}": np.full((10, 10), i, np.float32) for i in range(7)}     # 400 bytes each
    w = SafetensorsWriter(tmp_path, [(k, v.shape, v.dtype) for k, v in tensors.items()], max_shard_bytes=1000)
    for k in reversed(list(tensors)):
        w.write(k, tensors[k])
    files = w.close()
    assert files[-1] == SAFE_INDEX and len(files) == 5                          # 2+2+2+1 tensors, + the index
    from bmgpt_jax.convert.sources import open_source
    with open_source(tmp_path) as src:
        assert all(same(src.read(k), v) for k, v in tensors.items())


def test_safetensors_writer_refuses_wrong_writes(tmp_path):
    w = SafetensorsWriter(tmp_path, [("a", (2, 3), np.float32), ("b", (4,), np.float16)])
    with pytest.raises(ValueError, match=r"'a' is float64\[2, 3\] but was planned as float32\[2, 3\]"):
        w.write("a", np.zeros((2, 3)))
    with pytest.raises(KeyError, match="'c' was not planned"):
        w.write("c", np.zeros(1))
    w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(KeyError, match="'a' written twice"):
        w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"1 planned tensors were never written, e.g. \['b'\]"):
        w.close()


def test_safetensors_bad_files_name_the_file_and_tensor(tmp_path):
    write_tensors({"w": np.ones((64, 64), np.float32), "b": np.ones(64, np.float32)}, tmp_path)
    good = (tmp_path / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:-100])
    with pytest.raises(ValueError, match=r"cut\.safetensors: truncated: tensor '\w' ends at byte"):
        SafetensorsFile(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(good[:20])
    with pytest.raises(ValueError, match=r"tiny\.safetensors: not a safetensors file or truncated"):
        SafetensorsFile(tiny)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 31 + b"\0" * 64)
    with pytest.raises(ValueError, match=r"junk\.safetensors: corrupt safetensors header"):
        SafetensorsFile(junk)
    odd = tmp_path / "odd.safetensors"
    header = b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}'
    odd.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(ValueError, match=r"odd\.safetensors: tensor 'x' F32\[4\] needs 16 bytes but its data "
                                         r"offsets are \[0, 12\)"):
        SafetensorsFile(odd)
    unknown = tmp_path / "unknown.safetensors"
    header = b'{"x":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}'
    unknown.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(ValueError, match=r"unknown\.safetensors: corrupt header entry for tensor 'x'"):
        SafetensorsFile(unknown)


@pytest.mark.parametrize("chunk", [64 * 2**20, 16], ids=["whole", "16-byte-blocks"])
def test_torch_file_reads_lazily_and_slices(torch, tmp_path, monkeypatch, chunk):
    from bmgpt_jax.convert import torch_io
    from bmgpt_jax.convert.tensor_source import to_numpy
    from bmgpt_jax.convert.torch_io import TorchFile
    monkeypatch.setattr(torch_io, "_CHUNK", chunk)                # big tensors are copied out block by block
    sd = {"w": torch.randn(8, 6), "bf": torch.randn(4, 5).to(torch.bfloat16), "n": torch.tensor(7),
          "t": torch.randn(6, 8).t(), "h": torch.randn(3).half()}                  # `t`: a non-contiguous view
    torch.save({"state_dict": sd}, tmp_path / "m.pth")                             # nested, as some trainers save
    with TorchFile(tmp_path / "m.pth") as f:
        assert sorted(f.keys()) == sorted(sd)
        for k, v in sd.items():
            assert f.shape(k) == tuple(v.shape) and f.dtype(k) == to_numpy(v).dtype, k
            assert same(f.read(k), to_numpy(v)), k
        assert same(f.read("t", (slice(2, 5), slice(1, 3))), to_numpy(sd["t"])[2:5, 1:3])
        assert same(f.read("bf", (slice(1, 2),)), to_numpy(sd["bf"])[1:2])


def test_torch_training_checkpoints_are_unwrapped(torch, tmp_path, caplog):
    """A trainer's dict around the state dict, and DDP's `module.` on every key, used to be refused as
    'entries that are not tensors' or as a checkpoint of another model; each unwrapping is logged."""
    from bmgpt_jax.convert.torch_io import TorchFile
    sd = {"a.w": torch.randn(2, 3), "n": torch.tensor(4)}
    ddp = {f"module.{k}": v for k, v in sd.items()}
    cases = {"model": ({"model": sd, "optimizer": {"state": {}}, "epoch": 3},
                       "under 'model'; left aside 2 other entries: optimizer, epoch"),
             "model_state_dict": ({"model_state_dict": sd}, "under 'model_state_dict'"),
             "module": ({"module": sd, "args": "lr=1"}, "under 'module'; left aside 1 other entries: args"),
             "ddp": (ddp, "removed the 'module.' prefix every key has"),
             "wrapped_ddp": ({"state_dict": ddp, "step": 9}, "removed the 'module.' prefix")}
    for name, (obj, says) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        caplog.clear()
        with caplog.at_level("INFO", logger="bmgpt_jax.convert.torch_io"), TorchFile(tmp_path / f"{name}.pth") as f:
            assert sorted(f.keys()) == sorted(sd) and same(f.read("a.w"), sd["a.w"].numpy()), name
        assert says in caplog.text, (name, caplog.text)
    torch.save({"model": sd, "module": sd}, tmp_path / "two.pth")
    with pytest.raises(ValueError, match=r"two\.pth: several state dicts \(\['model', 'module'\]\)"):
        TorchFile(tmp_path / "two.pth")
    torch.save({**sd, "module.x": torch.zeros(1)}, tmp_path / "some.pth")       # not every key: kept as is
    assert sorted(TorchFile(tmp_path / "some.pth").keys()) == ["a.w", "module.x", "n"]


def test_torch_writer_output_loads_in_torch(torch, tmp_path, capfd):
    from bmgpt_jax.convert.tensor_source import to_numpy
    from bmgpt_jax.convert.torch_io import TorchWriter
    tensors = sample()
    for v in tensors.values():
        v.setflags(write=False)                       # read-only arrays (a jax array's numpy view) are fine
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)                       # torch's C++ warnings print every time, not once
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            w = TorchWriter(tmp_path / "out.pth", [(k, v.shape, v.dtype) for k, v in tensors.items()])
            for k in sorted(tensors, reverse=True):                                 # any order
                w.write(k, tensors[k])
            w.close()
    finally:
        torch.set_warn_always(warn_always)
    assert "deprecated" not in capfd.readouterr().err  # torch 2.13 deprecates writing records by raw pointer
    for mmap in (False, True):
        back = torch.load(tmp_path / "out.pth", weights_only=True, mmap=mmap)
        assert list(back) == list(tensors)                                          # the planned order
        assert all(same(to_numpy(back[k]), v) for k, v in tensors.items())


def test_torch_bad_and_legacy_files(torch, tmp_path, caplog):
    from bmgpt_jax.convert.torch_io import TorchFile
    sd = {"w": torch.randn(32, 32)}
    torch.save(sd, tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut\.pth: cannot read as a PyTorch checkpoint \(truncated or corrupt\?\)"):
        TorchFile(tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"junk\.pth: cannot read as a PyTorch checkpoint"):
        TorchFile(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: holds a list, not a state dict"):
        TorchFile(tmp_path / "list.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with caplog.at_level("WARNING"):
        with TorchFile(tmp_path / "legacy.pth") as f:
            assert same(f.read("w"), sd["w"].numpy())
    assert "legacy (non-zip) torch format" in caplog.text

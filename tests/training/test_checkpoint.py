"""Checkpointer: bitwise round trip, restore onto another mesh, keep-last-K, SIGTERM, shape mismatch."""
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import parallel
from bmgpt_jax.parallel import abstract_state, batch_shardings, shard
from bmgpt_jax.training.checkpoint import CheckpointConfig, Checkpointer
from bmgpt_jax.training.optim import make_optimizer, split_trainable
from bmgpt_jax.training.step import init_opt_state, jit_train_step, make_train_step
from tests.training.test_optim import CFG, Toy, toy_batch, toy_loss


def trained_state(mesh, width=16):
    """{"trainable", "opt_state"} after one update, sharded on `mesh` (non-zero Adam moments)."""
    graphdef, trainable, frozen = split_trainable(Toy(nnx.Rngs(0), width=width))
    tx = make_optimizer(CFG)
    trainable = shard(trainable, mesh)
    opt_state = init_opt_state(tx, trainable, mesh)
    trainable, opt_state, _ = jax.jit(make_train_step(toy_loss, tx))(graphdef, trainable, frozen, opt_state,
                                                                        toy_batch())
    return {"trainable": trainable, "opt_state": opt_state}


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_bitwise_with_iterator_state_and_metadata(tmp_path):
    mesh = parallel.make_mesh((8, 1, 1))
    state = trained_state(mesh)
    data_state = {"epoch": 1, "position": 17, "seed": 3}
    with Checkpointer(CheckpointConfig(dir=str(tmp_path), every=5)) as ckpt:
        assert not ckpt.save(3, state)  # not a multiple of `every`
        assert ckpt.save(5, state, data_state=data_state, metadata={"config": {"stage": "lm"}})
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path)))
    assert ckpt.latest_step() == 5
    restored, data, meta = ckpt.restore(abstract_state(state, mesh))
    ckpt.close()
    assert_same(restored, state)
    assert data == data_state and meta == {"config": {"stage": "lm"}, "step": 5}


def test_restore_onto_other_meshes(tmp_path):
    state = trained_state(parallel.make_mesh((8, 1, 1)))
    with Checkpointer(CheckpointConfig(dir=str(tmp_path), every=1)) as ckpt:
        ckpt.save(1, state)
    for shape in [(1, 8, 1), (2, 2, 2)]:
        mesh = parallel.make_mesh(shape)
        target = abstract_state(state, mesh)
        with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
            restored, _, _ = ckpt.restore(target, step=1)
        assert_same(restored, state)
        for arr, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
            assert arr.sharding.mesh.shape == mesh.shape and arr.sharding.spec == want.sharding.spec
        kernel = restored["trainable"]["up"]["kernel"][...]
        assert kernel.sharding.spec == parallel.logical_to_spec(("embed", "mlp"))


def test_keep_last_k_and_final_forced_save(tmp_path):
    state = {"w": np.arange(4.0, dtype=np.float32)}
    with Checkpointer(CheckpointConfig(dir=str(tmp_path), every=2, keep=2)) as ckpt:
        saved = [step for step in range(1, 8) if ckpt.save(step, state, force=step == 7)]
        assert not ckpt.save(7, state, force=True)  # already on disk
    assert saved == [2, 4, 6, 7]
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        assert ckpt.all_steps() == [6, 7]
        with pytest.raises(FileNotFoundError, match="step 2"):
            ckpt.restore(state, step=2)


def test_sigterm_requests_a_save(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), every=100))
    ckpt.install_signal_handlers()
    assert not ckpt.stop_requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.stop_requested() and ckpt.stop_signal == "SIGTERM"
    assert ckpt.save(3, {"w": np.ones(2, np.float32)}, force=ckpt.stop_requested())
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is before
    assert Checkpointer(CheckpointConfig(dir=str(tmp_path))).latest_step() == 3


def test_first_ctrl_c_requests_a_save_the_second_aborts(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), every=100))
    ckpt.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGINT)                 # no KeyboardInterrupt: the loop saves and exits
    assert ckpt.stop_requested() and ckpt.stop_signal == "SIGINT"
    assert "Ctrl-C again aborts" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    ckpt.close()
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    state = {"w": np.arange(1000, dtype=np.float32), "b": np.ones((3, 4), np.float32)}
    with Checkpointer(CheckpointConfig(dir=str(tmp_path), every=1, keep=4)) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, jax.tree.map(lambda x: x + step, state), data_state={"batch": step})
    (tmp_path / "4" / "meta" / "metadata").write_text('{"ste')                       # torn JSON
    for f in (tmp_path / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])                                           # torn arrays
    with Checkpointer(CheckpointConfig(dir=str(tmp_path), every=1)) as ckpt:
        restored, data, meta, unreadable = ckpt.restore_intact(state)
        assert meta["step"] == 2 and data == {"batch": 2}
        assert_same(restored, jax.tree.map(lambda x: x + 2, state))
        assert [s for s, _ in unreadable] == [4, 3]
        assert unreadable[0][1].startswith("JSONDecodeError") and "byte range" in unreadable[1][1].lower()
        assert ckpt.all_steps() == [1, 2] and (tmp_path / "4.unreadable").is_dir()
        assert ckpt.save(3, state, force=True)                                          # the resumed run saves again
    for step in (1, 2, 3):
        (tmp_path / str(step) / "_CHECKPOINT_METADATA").write_text("")
        (tmp_path / str(step) / "meta" / "metadata").write_text("")
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        with pytest.raises(ValueError, match="no readable checkpoint in .*step 3: .*step 2: .*step 1: "):
            ckpt.restore_intact(state)
    with Checkpointer(CheckpointConfig(dir=str(tmp_path / "none"))) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore_intact(state)


def test_other_model_shape_errors_naming_key_and_shapes(tmp_path):
    mesh = parallel.make_mesh((8, 1, 1))
    with Checkpointer(CheckpointConfig(dir=str(tmp_path), every=1)) as ckpt:
        ckpt.save(1, trained_state(mesh, width=16))
    wider = abstract_state(trained_state(mesh, width=32), mesh)
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        with pytest.raises(ValueError, match=r"'trainable\.up\.kernel\.value': checkpoint \(8, 16\) vs model \(8, 32\)"):
            ckpt.restore(wider)
        with pytest.raises(ValueError, match=r"'extra\.value': missing from the checkpoint"):
            ckpt.check_compatible({**trained_state(mesh), "extra": nnx.Param(np.zeros(3, np.float32))})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(CheckpointConfig(dir=str(tmp_path / "empty"))).restore(wider)


def test_async_save_survives_donation_by_the_next_step(tmp_path):
    """The next jitted step donates the buffers just handed to an async save; the checkpoint is intact."""
    mesh = parallel.make_mesh((2, 2, 2))
    graphdef, trainable, frozen = split_trainable(Toy(nnx.Rngs(5)))
    tx = make_optimizer(CFG)
    trainable, frozen = shard(trainable, mesh), shard(frozen, mesh)
    opt_state = init_opt_state(tx, trainable, mesh)
    bsh = batch_shardings(toy_batch(), mesh)
    step = jit_train_step(make_train_step(toy_loss, tx), graphdef, trainable, frozen, opt_state, bsh, mesh)
    with Checkpointer(CheckpointConfig(dir=str(tmp_path), every=1)) as ckpt:
        for i in range(1, 4):
            trainable, opt_state, _ = step(trainable, frozen, opt_state, jax.device_put(toy_batch(i), bsh))
            if i == 2:
                snapshot = jax.tree.map(np.array, {"trainable": trainable, "opt_state": opt_state})
            ckpt.save(i, {"trainable": trainable, "opt_state": opt_state})
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        restored, _, _ = ckpt.restore(abstract_state(snapshot, mesh), step=2)
    assert_same(restored, snapshot)

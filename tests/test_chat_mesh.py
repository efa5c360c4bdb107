"""`chat --mesh`: the weights read slice by slice into their shards (no device holds a sharded weight
whole), every attention traced within the mesh, and the answers those of one device."""
import jax
import pytest
from flax import nnx

from bmgpt_jax import chat, parallel
from bmgpt_jax.convert import tensor_map
from bmgpt_jax.convert.folder import save_pretrained
from bmgpt_jax.models import attention
from tests.chat_models import demo_biomedgpt


@pytest.fixture(scope="module")
def demo_model():
    return demo_biomedgpt()


def slice_reads(monkeypatch) -> list[tuple]:
    """Every slice the checkpoint loader reads from now on, as (variable path, its shape, the slice's shape)."""
    reads, reader = [], tensor_map._reader

    def spy(source, entries, shape, dtype):
        read = reader(source, entries, shape, dtype)

        def recorded(index):
            out = read(index)
            reads.append((entries[0].path, tuple(shape), out.shape))
            return out
        return recorded
    monkeypatch.setattr(tensor_map, "_reader", spy)
    return reads


def assert_read_as_shards(reads: list[tuple], model, mesh) -> None:
    """Each read is one device's slice of its variable under the rule shardings on `mesh` (never a sharded
    variable whole), and the big weights were split (so the check is not vacuous)."""
    shards = {path: s.get_value() for path, s in nnx.to_flat_state(parallel.tree_shardings(nnx.state(model), mesh))}
    for path, shape, got in reads:
        assert got == shards[path].shard_shape(shape), (path, shape, got)
    assert len({path for path, shape, got in reads if got != shape}) >= 10


def test_mesh_reads_each_device_its_slices_and_answers_the_same(demo_model, tmp_path, monkeypatch, capsys):
    """`--mesh`: the weights go straight into their shards, read slice by slice (a model larger than one device
    loads, and no device holds a sharded weight whole); the answers are those of one device. Every attention
    (ESM's, the decoder's prefill and decode steps) is traced within the mesh, so it runs per shard."""
    ckpt = save_pretrained(demo_model, None, tmp_path / "ckpt")
    ask = ["--checkpoint", str(ckpt), "--question", "What is it?", "--smiles", "CCO", "--protein", "MKTAYIAKQR",
           "--max-new-tokens", "8"]
    reads = slice_reads(monkeypatch)
    meshes = []
    traced = attention.per_shard
    monkeypatch.setattr(attention, "per_shard", lambda *a: meshes.append(dict(jax.sharding.get_abstract_mesh().shape))
                        or traced(*a))
    assert chat.main(ask) == 0
    one = capsys.readouterr().out
    assert reads and all(got == shape for _, shape, got in reads)         # one device: every variable read whole
    assert meshes and all(m == {} for m in meshes)
    for shape in ((1, 2, 4), (2, 2, 2)):
        reads.clear()
        meshes.clear()
        assert chat.main(ask + ["--mesh", ",".join(map(str, shape))]) == 0
        assert capsys.readouterr().out == one
        assert_read_as_shards(reads, demo_model, parallel.make_mesh(shape))
        assert len(meshes) >= 3 and all(m == dict(zip(parallel.MESH_AXES, shape)) for m in meshes), meshes  # ESM, prefill, step

"""Sharded initialisation (`parallel.sharded_init` / `init_sharded`, `stages.build_model`) on 8 virtual CPU
devices: each device creates only its own shards, no parameter is ever whole on a device, and building a
real-width model keeps the host's memory at the size of the model (once), not twice."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import config, parallel
from bmgpt_jax.models.biomedgpt import BioMedGPTConfig
from bmgpt_jax.training import optim, stages
from bmgpt_jax.training.step import init_opt_state
from tests.children import xla_flags

REPO = Path(__file__).resolve().parent.parent
# widths where fsdp=8 divides every sharded dimension and no shard shape equals a whole parameter's shape
NARROW = ["lm.num_layers=2", "lm.hidden_size=512", "lm.intermediate_size=1024", "lm.num_heads=8", "lm.num_kv_heads=8",
          "lm.vocab_size=32000", "esm.num_layers=2", "esm.hidden_size=256", "esm.intermediate_size=768",
          "esm.num_heads=8"]


def narrow_cfg() -> BioMedGPTConfig:
    return config.load(BioMedGPTConfig, "biomedgpt_10b", NARROW)


def sharded_shapes(state, mesh) -> set[tuple]:
    """Full shapes of the variables the rules shard on `mesh` (replicated norms and the GIN excluded)."""
    shardings = parallel.tree_shardings(state, mesh)
    return {tuple(x.shape) for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings))
            if not s.is_fully_replicated}


def arrays(module) -> list[np.ndarray]:
    """The module's variable values as numpy (RNG key streams as their raw key data)."""
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(nnx.state(module))]


def test_compiled_init_holds_an_eighth_and_never_a_whole_parameter():
    mesh = parallel.make_mesh((1, 8, 1))
    make, _ = stages.model_factory("lm", narrow_cfg())
    graphdef, init, rest = parallel.sharded_init(make, mesh)
    abstract = nnx.state(nnx.eval_shape(make))
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    compiled = init.lower().compile()
    ma = compiled.memory_analysis()
    assert ma.argument_size_in_bytes == 0 and not jax.tree.leaves(rest)
    assert ma.output_size_in_bytes == pytest.approx(total / 8, rel=0.01)  # only the norms are replicated
    whole = sharded_shapes(abstract, mesh)
    assert (32000, 512) in whole and (2, 512, 1024) in whole
    # the per-device program (after SPMD partitioning) has no value of a whole sharded parameter's shape
    hlo_shapes = {tuple(int(d) for d in m.split(",")) for m in re.findall(r"\w+\[([\d,]+)\]", compiled.as_text())}
    assert not hlo_shapes & whole, sorted(hlo_shapes & whole)
    assert (32000, 64) in hlo_shapes  # the embedding table's shard, for contrast


def test_build_model_places_every_array_in_shards_only():
    mesh = parallel.make_mesh((1, 8, 1))
    cfg = narrow_cfg()
    model, _ = stages.build_model("finetune", cfg, stages.InitConfig(seed=3), mesh)
    graphdef, trainable, frozen = optim.split_trainable(model, nnx.Param)
    opt_state = init_opt_state(optim.make_optimizer(optim.OptimConfig(total_steps=1000)), trainable, mesh)
    whole = sharded_shapes(nnx.state(model), mesh)
    # no live array holds a whole sharded parameter on a device (the norms and the GIN, and their Adam
    # moments, are replicated by the rules and may share a shape with a sharded bias)
    replicated = {id(x) for x in jax.tree.leaves((nnx.state(model), opt_state)) if x.sharding.is_fully_replicated}
    for x in jax.live_arrays():
        if id(x) not in replicated:
            for shard in x.addressable_shards:
                assert tuple(shard.data.shape) not in whole, (x.shape, shard.data.shape)
    want = parallel.tree_shardings(nnx.state(model), mesh)
    for x, s in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(want)):
        assert x.sharding == s
    mu = [x for x in jax.tree.leaves(opt_state) if x.ndim == 3]
    assert mu and all(not x.sharding.is_fully_replicated for x in mu)
    # the values do not depend on the mesh: the same seed on one device gives the same model
    one, _ = stages.build_model("finetune", cfg, stages.InitConfig(seed=3))
    for a, b in zip(arrays(model), arrays(one), strict=True):
        np.testing.assert_array_equal(a, b)


def test_pretrained_part_is_loaded_not_created(tmp_path):
    """init.hf_llama: the decoder comes from the folder (no random decoder is ever made), the rest is the
    same random init as without it."""
    from bmgpt_jax.convert import hf_llama
    from bmgpt_jax.models.llama import LlamaForCausalLM
    mesh = parallel.make_mesh((2, 4, 1))
    cfg = narrow_cfg()
    lm = LlamaForCausalLM(cfg.lm, rngs=nnx.Rngs(7))
    hf_llama.save(lm, tmp_path / "llama")
    model, _ = stages.build_model("align", cfg, stages.InitConfig(hf_llama=str(tmp_path / "llama")), mesh)
    random, _ = stages.build_model("align", cfg, stages.InitConfig(), mesh)
    for a, b in zip(arrays(model.llm), arrays(lm), strict=True):
        np.testing.assert_array_equal(a, b)
    for x in jax.tree.leaves(nnx.state(model)):
        assert isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh.shape == mesh.shape
    for name in ("proj_mol", "proj_prot", "mol_structure_encoder", "prot_structure_encoder"):
        for a, b in zip(arrays(getattr(model, name)), arrays(getattr(random, name)), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="init.hf_llama: .*hidden_size: config 256 vs checkpoint 512"):
        stages.build_model("align", config.load(BioMedGPTConfig, "biomedgpt_10b", NARROW + ["lm.hidden_size=256"]),
                           stages.InitConfig(hf_llama=str(tmp_path / "llama")), mesh)


def test_skipped_parts_stay_abstract_with_their_target_sharding():
    mesh = parallel.make_mesh((1, 8, 1))
    make, _ = stages.model_factory("align", narrow_cfg())
    model = parallel.init_sharded(make, mesh, skip=lambda path, _: path[0] == "llm")
    kernel = model.llm.lm_head.kernel.get_value()
    assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert isinstance(model.proj_mol.kernel.get_value(), jax.Array)


CHILD = r"""
import json, resource, sys
import jax
from flax import nnx
from bmgpt_jax import config, parallel
from bmgpt_jax.models.biomedgpt import BioMedGPTConfig
from bmgpt_jax.training import optim, stages
from bmgpt_jax.training.step import init_opt_state
mesh = parallel.make_mesh((1, 8, 1))
cfg = config.load(BioMedGPTConfig, "biomedgpt_10b", ["lm.num_layers=1", "esm.num_layers=1"])
make, _ = stages.model_factory(sys.argv[1], cfg)
temp = parallel.sharded_init(make, mesh)[1].lower().compile().memory_analysis().temp_size_in_bytes
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model, _ = stages.build_model(sys.argv[1], cfg, stages.InitConfig(), mesh)
graphdef, trainable, frozen = optim.split_trainable(model, optim.trainable_filter(
    stages.trainable_patterns(sys.argv[1], cfg, ())))
opt_state = init_opt_state(optim.make_optimizer(optim.OptimConfig(total_steps=1000)), trainable, mesh)
jax.block_until_ready((trainable, frozen, opt_state))
state = sum(x.nbytes for x in jax.tree.leaves((trainable, frozen, opt_state)))
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "state": state,
                  "init_temp": 8 * temp}))
"""


def test_real_width_build_keeps_host_memory_at_one_model():
    """BioMedGPT at the 10B's widths (LM hidden 4096 / FFN 11008 / vocab 32001, ESM 2560, GIN 300) with one
    decoder and one ESM layer (2.3 GB in float32), `align` stage, 8 virtual devices (whose memory is the
    host's): the child's peak RSS grows by the state and the init program's own temporaries, as XLA
    planned them, and nothing else -- no whole copy of the model on a device, no host copy. (XLA:CPU lowers
    the threefry hash as rolled loops whose shard-sized bit buffers all stay alive until the loops end:
    ~1x the state in temporaries; the TPU compiler fuses it into the outputs, docs/plan.md.)"""
    env = {"XLA_FLAGS": xla_flags(8, fast_compile=False), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", CHILD, "align"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["state"] > 2e9 and r["init_temp"] < 1.5 * r["state"], r
    assert r["peak"] - r["base"] < r["state"] + r["init_temp"] + 200 * 1024 ** 2, r

"""`python -m bmgpt_jax.plan`: the LM-7B train step compiled ahead of time at full size (32 layers, hidden 4096,
vocab 32001, batch 16 x 2048) on the 8 virtual CPU devices, and on a TPU slice's compile-only devices when
libtpu is installed. Scanning over layers keeps the compile about as fast as one layer's (~10 s on CPU)."""
import dataclasses
import importlib.util

import jax
import pytest

from bmgpt_jax import config
from bmgpt_jax.training import plan
from bmgpt_jax.models.llama import LlamaConfig

DEVICES = jax.devices()  # initialise the 8-device CPU backend (conftest) before plan touches jax config
GiB = 1024 ** 3


def test_7b_on_cpu_table_counts_and_fsdp_scaling(capsys):
    assert len(DEVICES) == 8
    (p8,) = plan.main(["--devices", "8", "--stage", "lm", "--mesh", "1,-1,1", "--batch", "16", "--seq", "2048"])
    out = capsys.readouterr().out
    assert "8 virtual CPU devices -- figures from the CPU compiler" in out
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}, batch 16 x seq 2048, compute bfloat16, remat full" in out
    header = next(l for l in out.splitlines() if l.startswith("stage"))
    for col in ("params", "trainable", "opt GiB", "args/dev", "out/dev", "alias/dev", "temp/dev", "code/dev", "peak/dev"):
        assert col in header
    row = next(l for l in out.splitlines() if l.startswith("lm "))
    assert row.split()[1:6] == ["2048", "flash", "512", "6,738,423,808", "6,738,423,808"]

    n = config.load(LlamaConfig, "biomedgpt_lm_7b").num_params()
    assert n == 6_738_423_808 and p8.params == p8.trainable == p8.expected_params == n
    assert p8.param_bytes == 4 * n  # float32 master weights
    assert p8.opt_state_bytes == 8 * n + 8  # Adam mu + nu float32, two int32 counters
    # each device holds 1/8 of params + moments (fsdp shards every matrix); donation aliases them to the output
    assert p8.memory["argument"] == pytest.approx((p8.param_bytes + p8.opt_state_bytes) / 8, rel=0.01)
    assert p8.memory["alias"] == pytest.approx(p8.memory["argument"], rel=0.01)
    assert p8.peak > p8.memory["argument"] + p8.memory["temp"] - 1

    p2 = plan.plan_stage("lm", DEVICES[:2], mesh_shape=(1, 2, 1), batch=16, seq=2048)
    assert p2.params == n
    assert p2.memory["argument"] == pytest.approx(4 * p8.memory["argument"], rel=0.01)
    assert p8.peak < p2.peak / 2
    assert p8.memory["temp"] < p2.memory["temp"]


def test_trainable_subset_and_overrides():
    """A frozen-decoder variant: only `lm_head` trainable -> optimizer state sized by it alone."""
    spec = plan.model_spec("lm", dtype="bfloat16", remat="full", overrides=["num_layers=2", "hidden_size=256",
                                                                            "intermediate_size=512", "num_heads=4",
                                                                            "num_kv_heads=4"])
    spec = dataclasses.replace(spec, trainable=("lm_head",))
    p = plan.plan_stage("lm", DEVICES[:4], mesh_shape=(2, 2, 1), batch=8, seq=128, spec=spec)
    assert p.params == spec.num_params and p.trainable == 256 * 32001
    assert p.opt_state_bytes == 8 * p.trainable + 8


def esm_params(c) -> int:
    """ESM-2 encoder parameters: token table, per layer q/k/v/o + FFN (with biases) + 2 LayerNorms, final LN."""
    d, f = c.hidden_size, c.intermediate_size
    return c.vocab_size * d + c.num_layers * (4 * (d * d + d) + 2 * d * f + f + d + 4 * d) + 2 * d


def test_10b_align_freezes_all_but_adaptors():
    """BioMedGPT-10B widths (LM 4096, ESM 2560, GIN 300) with 2 decoder / 2 ESM layers, multimodal batch."""
    from flax import nnx

    from bmgpt_jax.models.gin import GIN
    small = ["lm.num_layers=2", "esm.num_layers=2"]
    kw = dict(mesh_shape=(1, 8, 1), batch=8, seq=512, overrides=small)
    align, full = plan.plan_stage("align", DEVICES, **kw), plan.plan_stage("finetune", DEVICES, **kw)
    cfg = plan.model_spec("align", dtype="bfloat16", remat="full", overrides=small).config
    adaptors = (cfg.gin.emb_dim + 1) * 4096 + (cfg.esm.hidden_size + 1) * 4096
    gin = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: GIN(cfg.gin, rngs=nnx.Rngs(0))), nnx.Param)))
    assert align.params == full.params == cfg.lm.num_params() + esm_params(cfg.esm) + gin + adaptors
    assert align.trainable == adaptors == 11_722_752 and full.trainable == full.params
    assert align.opt_state_bytes == 8 * adaptors + 8 and full.opt_state_bytes == 8 * full.params + 8
    # frozen weights are read, not updated: no moments, no donated outputs
    assert align.memory["argument"] < full.memory["argument"] / 2
    assert align.memory["output"] < 0.05 * full.memory["output"]


def test_10b_parameter_count():
    """The full configs/biomedgpt_10b.yaml, built abstractly: 9.58B = LM 6.74B + ESM-2 3B + GIN + adaptors."""
    import math

    from flax import nnx
    spec = plan.model_spec("finetune", dtype="bfloat16", remat="full", overrides=[])
    n = sum(math.prod(x.shape) for x in plan.param_leaves(nnx.state(nnx.eval_shape(spec.make))))
    assert spec.config.lm.num_params() == 6_738_423_808 and esm_params(spec.config.esm) == 2_832_442_880
    assert n == 9_584_447_340 == 6_738_423_808 + 2_832_442_880 + 11_722_752 + 1_857_900  # GIN 5 x 300


def test_bad_mesh_and_batch():
    with pytest.raises(ValueError, match="needs 6 devices"):
        plan.plan_stage("lm", DEVICES, mesh_shape=(1, 6, 1), overrides=["num_layers=1"])
    with pytest.raises(ValueError, match="not divisible"):
        plan.plan_stage("lm", DEVICES, mesh_shape=(1, 8, 1), batch=12, seq=64, overrides=["num_layers=1"])


def test_several_lengths_beside_the_dense_form(capsys):
    """`--seq 512 1024 --dense`: a row per length with flash attention + chunked loss, each beside the plain
    attention + whole-logits step; the dense temporaries grow with T^2 and whole logits, the others do not."""
    small = ["-o", "num_layers=1", "-o", "hidden_size=256", "-o", "intermediate_size=512", "-o", "num_heads=4",
             "-o", "num_kv_heads=4", "-o", "loss_chunk_size=256"]
    plans = plan.main(["--devices", "8", "--stage", "lm", "--batch", "8", "--seq", "512", "1024", "--dense"] + small)
    out = capsys.readouterr().out
    assert "batch 8 x seq 512/1024" in out
    assert [(p.seq, p.attention, p.loss_chunk) for p in plans] == [(512, "flash", 256), (512, "xla", 0),
                                                                   (1024, "flash", 256), (1024, "xla", 0)]
    rows = [line.split()[:4] for line in out.splitlines() if line.startswith("lm ")]
    assert rows == [["lm", "512", "flash", "256"], ["lm", "512", "xla", "-"], ["lm", "1024", "flash", "256"],
                    ["lm", "1024", "xla", "-"]]
    flash, dense = plans[2].memory["temp"], plans[3].memory["temp"]
    assert flash < dense / 2
    assert plans[2].params == plans[3].params


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e .[tpu-plan])")
def test_tpu_topology_compiles_7b_layer(capsys):
    """v5e:4x4 (16 chips, 4 hosts): the 7B width with 1 layer, compiled by libtpu's TPU compiler; at 512
    tokens `attention: auto` is the Pallas splash kernel."""
    (p,) = plan.main(["--topology", "v5e:4x4", "--stage", "lm", "--batch", "16", "--seq", "512",
                      "-o", "num_layers=1"])
    out = capsys.readouterr().out
    assert p.attention == "splash" and p.loss_chunk == 512
    assert next(l for l in out.splitlines() if l.startswith("lm ")).split()[1:4] == ["512", "splash", "512"]
    assert "v5e:4x4: 16 x TPU v5 lite (4 hosts) -- figures from the TPU compiler" in out
    assert "yes (16)" in out  # fits the 16 GiB of HBM per v5e chip
    assert p.params == config.load(LlamaConfig, "biomedgpt_lm_7b", ["num_layers=1"]).num_params()
    assert p.memory["argument"] == pytest.approx((p.param_bytes + p.opt_state_bytes) / 16, rel=0.01)
    assert 0 < p.peak < 16 * GiB

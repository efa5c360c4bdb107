"""`python -m bmgpt_jax.plan`: the training configs' init, restore and train step planned ahead of time --
the LM-7B at full size (32 layers, hidden 4096, vocab 32001, batch 16 x 2048) on the 8 virtual CPU
devices, the 10B's widths with 2 layers, and a TPU slice's compile-only devices when libtpu is installed.
Scanning over layers keeps each compile about as fast as one layer's."""
import importlib.util
import os
import math

import jax
import pytest
from flax import nnx

from bmgpt_jax.data.pipeline import BatchIterator
from bmgpt_jax.training import plan
from bmgpt_jax.training.loop import load_config

DEVICES = jax.devices()  # initialise the 8-device CPU backend (conftest) before plan touches jax config
GiB = 1024 ** 3
SMALL_10B = ["-o", "model.lm.num_layers=2", "-o", "model.esm.num_layers=2", "--batch", "8", "--grad-accum", "1", "--seq", "512",
             "-o", "data.node_budget=1024", "-o", "data.edge_budget=2048", "-o", "data.graph_budget=16",
             "-o", "data.protein_budget=8"]


def batch_bytes_per_device(p: plan.Plan, n: int) -> int:
    """Every batch array is int32 with its leading dimension split over the n devices (pure fsdp)."""
    return sum(4 * math.prod(s) // n for s in p.batch.values())


def test_7b_lm_config_phases_on_cpu(capsys):
    assert len(DEVICES) == 8
    (p8,) = plan.main(["--devices", "8", "--config", "biomedgpt_10b_lm", "--batch", "16", "--grad-accum", "1",
                       "--seq", "2048"])
    out = capsys.readouterr().out
    assert "8 virtual CPU devices -- figures from the CPU compiler" in out
    assert "stage lm, mesh {'data': 1, 'fsdp': 8, 'tensor': 1}, batch 16 x 1 micro-batch(es) x seq 2048, compute bfloat16" in out
    header = next(line for line in out.splitlines() if line.startswith("config"))
    for col in ("init/dev", "restore/dev", "step args/dev", "step temp/dev", "step peak/dev"):
        assert col in header
    row = next(line for line in out.splitlines() if line.startswith("biomedgpt_10b_lm "))
    assert row.split()[1:6] == ["2048", "flash", "512", "6,738,423,808", "6,738,423,808"]

    n = 6_738_423_808
    assert p8.params == p8.trainable == p8.expected_params == n
    assert p8.param_bytes == 4 * n and p8.opt_state_bytes == 8 * n + 8  # float32 weights, Adam mu + nu, counts
    # restore: one eighth of weights + moments (fsdp shards every matrix) ...
    assert p8.state_per_device == pytest.approx((p8.param_bytes + p8.opt_state_bytes) / 8, rel=0.01)
    # ... which is what the compiled step takes as state arguments, besides its batch shard
    assert p8.step.memory["argument"] == p8.state_per_device + batch_bytes_per_device(p8, 8)
    assert p8.step.memory["alias"] == p8.state_per_device  # donated: the update is written in place
    # init: the jitted sharded init outputs one eighth of the weights, the optimizer init one of the moments
    assert p8.init.memory["argument"] == 0
    assert p8.init.memory["output"] == pytest.approx(p8.param_bytes / 8, rel=0.01)
    assert p8.opt_init.memory["output"] == pytest.approx(p8.opt_state_bytes / 8, rel=0.01)
    assert p8.init_peak < p8.step.peak and p8.peak == p8.step.peak

    cfg = load_config("biomedgpt_10b_lm", ["data.batch_size=16", "optim.grad_accum=1", "data.seq_buckets=[2048]",
                                             "mesh=[1,2,1]"])
    p2 = plan.plan_job(cfg, DEVICES[:2])
    assert p2.params == n and p2.state_per_device == pytest.approx(4 * p8.state_per_device, rel=0.01)
    assert p8.step.peak < p2.step.peak / 2 and p8.init_peak < p2.init_peak / 3


def test_10b_align_and_finetune_configs():
    """The 10B's widths (LM 4096, ESM 2560, GIN 300), 2 decoder / 2 ESM layers, multimodal batch: align
    trains the adaptors only (frozen weights read, no moments), the finetune config adaptors + decoder."""
    align, fine = plan.main(["--devices", "8", "--config", "biomedgpt_10b_align", "--config", "biomedgpt_10b_finetune",
                             *SMALL_10B])
    adaptors = (300 + 1) * 4096 + (2560 + 1) * 4096
    assert align.params == fine.params and align.trainable == adaptors == 11_722_752
    lm = load_config("biomedgpt_10b_finetune", ["model.lm.num_layers=2"]).model.lm.num_params()
    assert fine.trainable == adaptors + lm
    assert align.opt_state_bytes == 8 * adaptors + 8
    for p in (align, fine):  # (jit drops the RNG streams and other leaves the step never reads: a few KiB)
        assert p.step.memory["argument"] == pytest.approx(p.state_per_device + batch_bytes_per_device(p, 8), abs=4096)
        assert p.batch["prot_ids"] == (8, 512) and p.batch["mol_atoms"] == (1024, 2)
    assert align.state_per_device < fine.state_per_device / 2
    assert align.step.memory["output"] < 0.05 * fine.step.memory["output"]
    assert align.params_per_device == fine.params_per_device < fine.state_per_device


def test_abstract_batch_is_the_pipelines(shared_data):
    """The planned batch has the shapes of a real pipeline batch (tiny config, one bucket), concatenated
    over hosts and stacked over micro-batches; the `lm` stage keeps the text keys."""
    cfg = load_config("tiny", ["data.seq_buckets=[256]", "data.sources=[demo]"])
    real = next(BatchIterator(cfg.data))
    planned = plan.abstract_batch(cfg, 1)
    assert {k: (v.shape, v.dtype) for k, v in planned.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
    two = plan.abstract_batch(load_config("tiny", ["data.seq_buckets=[256]", "optim.grad_accum=3"]), 2)
    assert two["input_ids"].shape == (3, 8, 256) and two["mol_atoms"].shape == (3, 2 * real["mol_atoms"].shape[0], 2)
    lm = {"input_ids", "attention_mask", "loss_mask"}
    assert set(plan.abstract_batch(load_config("tiny_lm", ["data.pack=false"]), 1)) == lm
    assert set(plan.abstract_batch(load_config("tiny_lm"), 1)) == lm | {"segment_ids"}     # packed rows
    packed = load_config("tiny", ["data.seq_buckets=[256]", "data.sources=[demo]", "data.pack=true"])
    real = next(BatchIterator(packed.data))
    assert {k: (v.shape, v.dtype) for k, v in plan.abstract_batch(packed, 1).items()} == \
        {k: (v.shape, v.dtype) for k, v in real.items()}


def test_10b_parameter_count():
    """The full configs/biomedgpt_10b.yaml, built abstractly: 9.58B = LM 6.74B + ESM-2 3B + GIN + adaptors."""
    from bmgpt_jax.training import stages
    cfg = load_config("biomedgpt_10b_finetune").model
    make, _ = stages.model_factory("finetune", cfg)
    n = sum(math.prod(x.shape) for x in plan.param_leaves(nnx.state(nnx.eval_shape(make))))
    assert cfg.lm.num_params() == 6_738_423_808
    assert n == 9_584_447_340 == 6_738_423_808 + 2_832_442_880 + 11_722_752 + 1_857_900  # ESM-2 3B, GIN 5 x 300


def test_bad_inputs():
    one_layer = ["model.lm.num_layers=1"]
    with pytest.raises(ValueError, match="needs 6 devices"):
        plan.plan_job(load_config("biomedgpt_10b_lm", one_layer + ["mesh=[1,6,1]"]), DEVICES)
    with pytest.raises(ValueError, match="not divisible"):
        plan.plan_job(load_config("biomedgpt_10b_lm", one_layer + ["data.batch_size=12"]), DEVICES[:8])
    with pytest.raises(ValueError, match="does not divide over 3 hosts"):
        plan.plan_job(load_config("biomedgpt_10b_lm", one_layer), DEVICES, processes=3)
    with pytest.raises(ValueError, match="vocab_size is 0"):
        plan.plan_job(load_config("tiny"), DEVICES)
    with pytest.raises(SystemExit, match="biomedgpt_10b_align: .*mol_n_node"):
        plan.main(["--devices", "8", "--stage", "align", "-o", "data.graph_budget=12", *SMALL_10B[:4]])


def test_several_lengths_beside_the_dense_form(capsys):
    """`--seq 512 1024 --dense`: a row per length with flash attention + chunked loss, each beside the plain
    attention + whole-logits step; the dense temporaries grow with T^2 and whole logits, the others do not."""
    small = [f"model.lm.{kv}" for kv in ("num_layers=1", "hidden_size=256", "intermediate_size=512", "num_heads=4",
                                          "num_kv_heads=4", "loss_chunk_size=256")]
    plans = plan.main(["--devices", "8", "--config", "biomedgpt_10b_lm", "--batch", "8", "--seq", "512", "1024",
                       "--dense"] + [a for o in small for a in ("-o", o)])
    out = capsys.readouterr().out
    assert [(p.seq, p.attention, p.loss_chunk) for p in plans] == [(512, "flash", 256), (512, "xla", 0),
                                                                   (1024, "flash", 256), (1024, "xla", 0)]
    rows = [line.split()[:5] for line in out.splitlines()
            if line.startswith("biomedgpt_10b_lm") and ("flash" in line or "xla" in line)]
    n = f"{plans[0].params:,}"
    assert rows == [["biomedgpt_10b_lm", "512", "flash", "256", n], ["biomedgpt_10b_lm", "(dense)", "512", "xla", "-"],
                    ["biomedgpt_10b_lm", "1024", "flash", "256", n], ["biomedgpt_10b_lm", "(dense)", "1024", "xla", "-"]]
    flash, dense = plans[2].step.memory["temp"], plans[3].step.memory["temp"]
    assert flash < dense / 2
    assert plans[2].params == plans[3].params


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e .[tpu-plan])")
def test_tpu_topology_fits_and_refuses(capsys):
    """v5e:4x4 (16 chips, 4 hosts): the 7B width with 1 layer fits, and at 512 tokens `attention: auto` is
    the Pallas splash kernel; 64 x 4096 tokens per chip does not fit, which the TPU compiler says
    (RESOURCE_EXHAUSTED) and the table reports."""
    (fits,) = plan.main(["--topology", "v5e:4x4", "--config", "biomedgpt_10b_lm", "-o", "model.lm.num_layers=1",
                         "--batch", "16", "--seq", "512"])
    out = capsys.readouterr().out
    assert fits.attention == "splash" and fits.loss_chunk == 512
    assert next(line for line in out.splitlines() if line.startswith("biomedgpt_10b_lm")).split()[1:4] == \
        ["512", "splash", "512"]
    assert "v5e:4x4: 16 x TPU v5 lite (4 hosts) -- figures from the TPU compiler" in out
    assert "yes (16)" in out
    assert fits.state_per_device == pytest.approx((fits.param_bytes + fits.opt_state_bytes) / 16, rel=0.01)
    assert 0 < fits.peak < 16 * GiB
    # the TPU compiler fuses the random bits into the outputs: initialising costs the state and little more
    assert fits.init.memory["temp"] < 0.1 * fits.init.memory["output"]
    assert fits.init_peak < 1.1 * fits.state_per_device
    (oom,) = plan.main(["--topology", "v5e:4x4", "--config", "biomedgpt_10b_lm", "-o", "model.lm.num_layers=1",
                        "--batch", "1024", "--seq", "4096"])
    out = capsys.readouterr().out
    assert oom.peak is None and "RESOURCE_EXHAUSTED" in oom.step.error and "NO (16)" in out and "OOM" in out


def test_command_line_bad_input_is_one_line_with_status_2():
    """As chat, evaluate, train and convert_weights: a bad value is one line on stderr and status 2 (SystemExit
    with a message alone would exit 1)."""
    import subprocess
    import sys
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cases = ((["--devices", "8", "--config", "tiny_algn"], "plan: tiny_algn: config file 'tiny_algn' not found"),
             (["--devices", "0"], "argument --devices: 0 is not a positive integer"),
             (["--devices", "8", "--num-beams", "4", "--weight-layouts", "auto"],
              "--num-beams, --weight-layouts: only with --generate"))
    for args, message in cases:
        run = subprocess.run([sys.executable, "-m", "bmgpt_jax.plan", *args], capture_output=True, text=True, env=env,
                             timeout=300)
        assert run.returncode == 2 and message in run.stderr.strip().splitlines()[-1], (args, run.stderr[-500:])
        assert "Traceback" not in run.stderr


def test_generate_plans_the_sharded_decode(capsys):
    """`--generate`: the decode `chat --mesh` and `evaluate` run, at the 7B width (2 layers) over 8 devices with
    fsdp: each device holds an eighth of the decoder's weights (fsdp splits even the 32001-token embedding and
    head, by their 4096 dim), and the compiled program takes them as they lie: its arguments are that eighth
    plus its rows of the prompt embeddings, never a whole weight."""
    (p,) = plan.main(["--devices", "8", "--generate", "--mesh", "1,8,1", "-o", "model.lm.num_layers=2",
                      "--seq", "256", "--new", "32"])
    lm = load_config("biomedgpt_10b_finetune", ["model.lm.num_layers=2"]).model.lm
    assert p.params == lm.num_params() and p.dtype == "bfloat16" and p.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    assert p.params_per_device == pytest.approx(2 * p.params / 8, rel=0.01)
    embeds_and_mask = (8 * 256 * 4096 * 2 + 8 * 256 * 4) // 8
    assert p.program.memory["argument"] == pytest.approx(p.params_per_device + embeds_and_mask, rel=0.01)
    assert p.cache_bytes == 2 * 2 * 8 * 32 * (256 + 32) * 128 * 2   # k and v, 2 layers, 8 rows, 32 heads of 128
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("biomedgpt_10b_finetune"))
    assert row.split()[1:7] == ["1x8x1", "8", "x", "256+32", "1", "bfloat16"]
    (beams,) = plan.main(["--devices", "8", "--generate", "--mesh", "1,8,1", "-o", "model.lm.num_layers=2",
                          "--seq", "256", "--new", "32", "--num-beams", "4"])   # beam search's program
    assert beams.beams == 4 and beams.cache_bytes == 4 * p.cache_bytes and beams.program.memory
    assert p.program.memory["argument"] - beams.program.memory["argument"] == 8   # the same but greedy's random key
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("biomedgpt_10b_finetune"))
    assert row.split()[1:7] == ["1x8x1", "8", "x", "256+32", "4", "bfloat16"]
    (one,) = plan.main(["--devices", "8", "--generate", "--mesh", "1,8,1", "-o", "model.lm.num_layers=2",
                        "--seq", "256", "--new", "32", "--batch", "1"])    # `chat --question`: one row, whole
    assert not one.program.error and one.batch == 1
    assert one.program.memory["argument"] == pytest.approx(p.params_per_device + 256 * 4096 * 2 + 256 * 4, rel=0.01)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e .[tpu-plan])")
def test_tpu_decode_moves_activations_not_weights_or_caches(capsys):
    """The 10B decoder (2 layers) compiled for one v5e host. Heads over a 4-way tensor axis: each chip attends
    with its own 8 of the 32 kv heads, holds a quarter of every weight (the 32001-token embedding and head
    too, split by their hidden columns: before, whole on every chip) and gathers only each step's new
    token's embedding (8 x 4096); traced without its mesh (as chat and evaluate once ran it) the prefill
    all-gathered each layer's whole KV cache onto every chip, and a head split on its columns without the
    hidden states pinned made the prefill all-gather the residual stream (64 MiB) in every layer.
    fsdp over the 4 chips: the weights stay in their shards (under the training rules the decode loop
    all-gathered every layer's weights on every step); what is gathered is rows of activations."""
    (tensor,) = plan.main(["--topology", "v5e:2x2", "--generate", "--mesh", "1,1,4", "-o", "model.lm.num_layers=2",
                           "--seq", "512", "--new", "32"])
    assert tensor.mesh == {"data": 1, "fsdp": 1, "tensor": 4} and tensor.program.memory
    quarter = tensor.params * 2 / 4    # bfloat16; only the norms' vectors are whole on each chip
    assert quarter <= tensor.params_per_device < 1.001 * quarter, (tensor.params_per_device, tensor.params)
    assert max(tensor.program.collectives.get("all-gather", [0])) <= 8 * 4096 * 2, tensor.program.collectives
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("biomedgpt_10b_finetune"))
    assert row.split()[-4] == "0.1" and row.endswith("yes (16)")   # the gathers column, MiB
    # fsdp x tensor (two hosts): the head's rows split over both; its input is split as they are, so the
    # prefill sums partial logits (without `head_in`, it all-gathered the 250 MiB head)
    (both,) = plan.main(["--topology", "v5e:2x4", "--generate", "--mesh", "1,2,4", "-o", "model.lm.num_layers=2",
                         "--seq", "256", "--new", "32"])
    assert both.params_per_device < 1.001 * both.params * 2 / 8
    assert both.program.memory and max(both.program.collectives.get("all-gather", [0])) < 32 * 2 ** 20
    (fsdp,) = plan.main(["--topology", "v5e:2x2", "--generate", "--mesh", "1,4,1", "-o", "model.lm.num_layers=2",
                         "--seq", "256", "--new", "32"])
    gathered = fsdp.program.collectives.get("all-gather", [])
    # the smallest whole weight is a 4096 x 4096 projection (32 MiB); the prefill's 8 x 256 x 4096 rows are 16
    assert fsdp.program.memory and max(gathered, default=0) < 32 * 2 ** 20, gathered
    # beam search reorders each row's beams where the row lies (a flat gather all-gathered each layer's cache)
    (beams,) = plan.main(["--topology", "v5e:2x2", "--generate", "--mesh", "1,4,1", "-o", "model.lm.num_layers=2",
                          "--seq", "256", "--new", "32", "--num-beams", "4"])
    gathered = beams.program.collectives.get("all-gather", [])
    assert beams.program.memory and max(gathered, default=0) < 32 * 2 ** 20, gathered


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e .[tpu-plan])")
def test_tpu_decode_with_the_compilers_weight_layouts(capsys):
    """`--weight-layouts auto`: the 10B decoder (4 layers, tensor over one v5e host) compiled with the
    weights' layouts left to the TPU compiler. It lays out the q, k, v, gate and up kernels and the LM head
    with their 4096-wide input dim minor (PyTorch's `[out, in]`), down_proj as it is, and with a 1024-token
    prompt the program needs fewer temporaries than with the row-major weights, whose relaid copies it
    holds (docs/plan.md; with a 3840-token prompt at full size it needs more)."""
    args = ["--topology", "v5e:2x2", "--generate", "--mesh", "1,1,4", "-o", "model.lm.num_layers=4", "--seq", "1024"]
    (auto,) = plan.main(args + ["--weight-layouts", "auto"])
    (rows,) = plan.main(args)
    assert auto.program.memory["temp"] < rows.program.memory["temp"] and not rows.relaid
    kernels = {f"['model']['layers']['{m}']['{p}_proj']['kernel'].value" for m, ps in
               (("self_attn", "qkv"), ("mlp", ("gate", "up"))) for p in ps}
    assert kernels <= set(auto.relaid) and "['lm_head']['kernel'].value" in auto.relaid, auto.relaid
    assert "['model']['layers']['mlp']['down_proj']['kernel'].value" not in auto.relaid
    assert "weights laid out other than row-major: ['lm_head']" in capsys.readouterr().out


def test_the_attention_a_packed_run_gets_on_a_gpu(monkeypatch):
    """The plan names the attention the step compiles with: on a GPU in bfloat16, cuDNN for rows of one
    example, `flash` for packed rows (which cuDNN cannot keep apart: docs/attention.md)."""
    import jax

    from bmgpt_jax import parallel
    from bmgpt_jax.models import attention
    monkeypatch.setattr(attention, "platform", lambda: "gpu")
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    assert [plan.attention_used(load_config("biomedgpt_10b_lm", [f"data.pack={p}"]), mesh)
            for p in ("true", "false")] == ["flash", "cudnn"]

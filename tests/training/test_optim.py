"""Optimizer, trainable subset and the generic train step (training.optim, training.step) on a toy model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bmgpt_jax import parallel
from bmgpt_jax.config import from_dict
from bmgpt_jax.models.layers import Linear
from bmgpt_jax.training.optim import (OptimConfig, check_patterns_match, count_params, make_optimizer, make_schedule,
                                      split_trainable, trainable_filter)
from bmgpt_jax.parallel import batch_shardings, shard, tree_shardings
from bmgpt_jax.training.step import init_opt_state, jit_train_step, make_train_step


class Toy(nnx.Module):
    """Two Linear layers with logical axes: x [B, T, 8] -> [B, T, 8]."""

    def __init__(self, rngs: nnx.Rngs, width: int = 16):
        self.up = Linear(8, width, axes=("embed", "mlp"), use_bias=True, rngs=rngs)
        self.down = Linear(width, 8, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def toy_loss(model, batch):
    """Squared error summed over masked positions; n_tokens = number of masked positions."""
    err = jnp.sum(jnp.square(model(batch["x"]) - batch["y"]), axis=-1)
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum(err * mask), jnp.sum(mask)


def toy_batch(seed: int = 0, rows: int = 8, seq: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    mask = (rng.random((rows, seq)) < 0.7).astype(np.int32)
    mask[:, 0] = 1  # token counts differ per row, none is empty
    return {"x": rng.normal(size=(rows, seq, 8)).astype(np.float32),
            "y": rng.normal(size=(rows, seq, 8)).astype(np.float32), "mask": mask}


def micro_batches(batch: dict, k: int) -> dict:
    """`[B, ...]` -> `[k, B/k, ...]`, micro-batch j holding rows j, j+k, ... (as the pipeline's k batches)."""
    return {key: np.stack([x[j::k] for j in range(k)]) for key, x in batch.items()}


CFG = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=20, weight_decay=0.1, clip_norm=1.0)
NO_WARMUP = dataclasses.replace(CFG, warmup_steps=0)   # a first update that moves the weights (lr > 0)


def test_config_loads_and_rejects_unknown_keys():
    assert from_dict(OptimConfig, {"lr": 1e-3, "grad_accum": 4}).grad_accum == 4
    with pytest.raises(ValueError, match="unknown config key .lrr"):
        from_dict(OptimConfig, {"lrr": 1.0})
    with pytest.raises(ValueError, match="grad_accum"):
        OptimConfig(grad_accum=0)


def test_schedule_warmup_peak_end():
    s = make_schedule(OptimConfig(lr=1e-3, warmup_steps=10, total_steps=110, end_lr_ratio=0.1))
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110), s(500)],
                               [0.0, 5e-4, 1e-3, 0.55e-3, 1e-4, 1e-4], rtol=1e-5, atol=1e-9)


def test_clipping_rescales_large_gradients_only():
    """What Adam receives, read from its first moment after one update (mu = (1 - b1) g): the gradient
    scaled to norm 0.5 when larger, as is when smaller. (Adam's first step itself hardly depends on the
    gradient's scale, so comparing updates could not tell a clip from none.)"""
    params = {"w": jnp.ones((3, 4))}
    cfg = OptimConfig(clip_norm=0.5, warmup_steps=0, total_steps=1000)
    clip = make_optimizer(cfg)
    big = {"w": jnp.full((3, 4), 2.0)}  # norm sqrt(12) * 2 = 6.93
    small = {"w": jnp.full((3, 4), 0.01)}
    for grads, seen in ((big, 2.0 * 0.5 / (2.0 * np.sqrt(12))), (small, 0.01)):
        _, state = clip.update(grads, clip.init(params), params)
        np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["w"], np.full((3, 4), (1 - cfg.b1) * seen),
                                   rtol=1e-6)


def test_grad_accumulation_equals_big_batch():
    model = Toy(nnx.Rngs(0))
    graphdef, trainable, frozen = split_trainable(model)
    tx = make_optimizer(NO_WARMUP)
    batch = toy_batch()
    one = jax.jit(make_train_step(toy_loss, tx))
    four = jax.jit(make_train_step(toy_loss, tx, grad_accum=4))
    t1, o1, m1 = one(graphdef, trainable, frozen, tx.init(trainable), batch)
    t4, o4, m4 = four(graphdef, trainable, frozen, tx.init(trainable), micro_batches(batch, 4))
    assert float(m1["n_tokens"]) == float(m4["n_tokens"]) == batch["mask"].sum()
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-6)
    for a, b, p in zip(jax.tree.leaves(t1), jax.tree.leaves(t4), jax.tree.leaves(trainable), strict=True):
        assert np.abs(a - p).max() > 1e-3                       # a real update (lr > 0 from the first step)
        np.testing.assert_allclose(a - p, b - p, atol=1e-6)  # the updates agree
    with pytest.raises(ValueError, match="leading micro-batch axis of 4"):
        four(graphdef, trainable, frozen, tx.init(trainable), batch)


def test_frozen_params_get_no_state_and_stay_identical():
    model = Toy(nnx.Rngs(1))
    graphdef, trainable, frozen = split_trainable(model, trainable_filter([r"^up\."]))
    tx = make_optimizer(CFG)
    opt_state = tx.init(trainable)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert names == {"up.kernel", "up.bias"}
    assert count_params(opt_state) == 2 * count_params(trainable) + 2  # mu, nu and two counters
    frozen_before = jax.tree.map(np.array, frozen)
    trainable_before = jax.tree.map(np.array, trainable)
    step = jax.jit(make_train_step(toy_loss, tx, schedule=make_schedule(CFG)))
    for i in range(3):
        trainable, opt_state, metrics = step(graphdef, trainable, frozen, opt_state, toy_batch(i))
    assert float(metrics["lr"]) == pytest.approx(float(make_schedule(CFG)(2)))
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(trainable["up"]["kernel"][...], trainable_before["up"]["kernel"][...])
    merged = nnx.merge(graphdef, trainable, frozen)  # the result is a whole model again
    np.testing.assert_array_equal(merged.down.kernel[...], frozen_before["down"]["kernel"][...])
    with pytest.raises(ValueError, match="selects no parameter"):
        split_trainable(Toy(nnx.Rngs(0)), trainable_filter(["adaptor"]))


def test_a_nonfinite_step_keeps_state():
    graphdef, trainable, frozen = split_trainable(Toy(nnx.Rngs(2)))
    tx = make_optimizer(CFG)
    opt_state = tx.init(trainable)
    bad = toy_batch()
    bad["x"][0, 0, 0] = np.nan
    step = jax.jit(make_train_step(toy_loss, tx))
    t2, o2, m = step(graphdef, trainable, frozen, opt_state, bad)
    assert float(m["finite"]) == 0.0
    for a, b in zip(jax.tree.leaves((t2, o2)), jax.tree.leaves((trainable, opt_state))):
        np.testing.assert_array_equal(a, b)


def test_a_batch_without_loss_tokens_changes_nothing():
    """A batch whose every example was dropped (the pipeline's padding batch, `n_tokens` 0) has a zero gradient,
    yet the update still moved the weights (Adam's momentum, the weight decay) and advanced the schedule."""
    graphdef, trainable, frozen = split_trainable(Toy(nnx.Rngs(4)))
    tx = make_optimizer(NO_WARMUP)
    step = jax.jit(make_train_step(toy_loss, tx, schedule=make_schedule(NO_WARMUP)))
    trainable, opt_state, m = step(graphdef, trainable, frozen, tx.init(trainable), toy_batch(0))
    assert float(m["applied"]) == 1.0                            # a real step first: Adam's momentum is not zero
    empty = dict(toy_batch(1), mask=np.zeros((8, 4), np.int32))
    t2, o2, m = step(graphdef, trainable, frozen, opt_state, empty)
    assert (float(m["n_tokens"]), float(m["applied"]), float(m["finite"])) == (0.0, 0.0, 1.0)
    for a, b in zip(jax.tree.leaves((t2, o2)), jax.tree.leaves((trainable, opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    t3, o3, m = step(graphdef, t2, frozen, o2, toy_batch(2))    # the next real batch is update 2, not 3
    assert float(m["applied"]) == 1.0 and float(m["lr"]) == pytest.approx(float(make_schedule(NO_WARMUP)(1)))
    assert not np.allclose(t3["up"]["kernel"][...], trainable["up"]["kernel"][...])


def test_bfloat16_compute_keeps_float32_master():
    """The loss sees bfloat16 parameters (what it reads is recorded at trace time), the update and the
    returned master weights stay float32."""
    graphdef, trainable, frozen = split_trainable(Toy(nnx.Rngs(3)))
    tx = make_optimizer(NO_WARMUP)
    seen = {}

    def recording_loss(model, batch):
        seen[model.down.kernel.dtype] = True
        return toy_loss(model, batch)
    f32 = jax.jit(make_train_step(toy_loss, tx))
    bf16 = jax.jit(make_train_step(recording_loss, tx, compute_dtype=jnp.bfloat16))
    t32, _, m32 = f32(graphdef, trainable, frozen, tx.init(trainable), toy_batch())
    t16, _, m16 = bf16(graphdef, trainable, frozen, tx.init(trainable), toy_batch())
    assert list(seen) == [jnp.dtype(jnp.bfloat16)]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(t16))
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
    for a, b, p in zip(jax.tree.leaves(t16), jax.tree.leaves(t32), jax.tree.leaves(trainable), strict=True):
        np.testing.assert_allclose(a - p, b - p, rtol=0.1, atol=1e-5)   # the same step, to bfloat16 precision


def test_bfloat16_compute_keeps_batchnorm_statistics_float32():
    """Only parameters are cast to the compute dtype: a frozen BatchNorm statistic reads as at inference."""
    class Normed(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((), jnp.float32))
            self.mean = nnx.BatchStat(jnp.full((), 100.3, jnp.float32))

    def loss(model, batch):
        return model.w[...].astype(jnp.float32) * 0 + model.mean[...].astype(jnp.float32), 1.0
    graphdef, trainable, frozen = split_trainable(Normed())
    tx = optax.sgd(0.0)
    step = jax.jit(make_train_step(loss, tx, compute_dtype=jnp.bfloat16))
    _, _, metrics = step(graphdef, trainable, frozen, tx.init(trainable), {})
    assert float(metrics["loss"]) == np.float32(100.3)                  # bfloat16 would read 100.5


def test_trainable_patterns_each_select_a_parameter():
    model = Toy(nnx.Rngs(0))
    check_patterns_match(model, ["^up[.]", "kernel"])
    with pytest.raises(ValueError, match=r"trainable pattern\(s\) \['\^layers.1.'\] select no parameter \(the "
                                         r"paths look like \['down.kernel', "):
        check_patterns_match(model, ["^up[.]", "^layers.1."])
    with pytest.raises(ValueError, match=r"trainable pattern '\(' is not a regular expression"):
        trainable_filter(["("])


def test_sharded_step_matches_single_device_and_rules():
    mesh = parallel.make_mesh((2, 2, 2))
    graphdef, trainable, frozen = split_trainable(Toy(nnx.Rngs(4)), trainable_filter([r"^up\."]))
    tx = make_optimizer(NO_WARMUP)
    batch = toy_batch()
    ref_t, _, ref_m = jax.jit(make_train_step(toy_loss, tx))(graphdef, trainable, frozen, tx.init(trainable), batch)

    s_trainable, s_frozen = shard(trainable, mesh), shard(frozen, mesh)
    opt_state = init_opt_state(tx, s_trainable, mesh)
    mu_kernel = opt_state[1][0].mu["up"]["kernel"][...]
    assert mu_kernel.sharding.spec == parallel.logical_to_spec(("embed", "mlp"))
    bsh = batch_shardings(batch, mesh)
    step = jit_train_step(make_train_step(toy_loss, tx), graphdef, s_trainable, s_frozen, opt_state, bsh, mesh)
    new_t, opt_state, m = step(s_trainable, s_frozen, opt_state, jax.device_put(batch, bsh))
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-6)    # the gradients' reduction
    for a, b, p in zip(jax.tree.leaves(new_t), jax.tree.leaves(ref_t), jax.tree.leaves(trainable), strict=True):
        assert np.abs(b - p).max() > 1e-3                       # a real update to compare
        np.testing.assert_allclose(a, b, atol=1e-6)
    want = tree_shardings(trainable, mesh)
    for arr, sh in zip(jax.tree.leaves(new_t), jax.tree.leaves(want)):
        assert arr.sharding.spec == sh.spec
    # accumulation under sharding: the micro-batch axis stays unsharded, rows split over data x fsdp
    micro = micro_batches(batch, 2)
    msh = batch_shardings(micro, mesh, microbatched=True)
    assert msh["x"].spec == P(None, ("data", "fsdp"), None, None)
    s_trainable = shard(trainable, mesh)
    opt_state = init_opt_state(tx, s_trainable, mesh)
    step2 = jit_train_step(make_train_step(toy_loss, tx, grad_accum=2), graphdef, s_trainable, s_frozen,
                           opt_state, msh, mesh)
    acc_t, _, acc_m = step2(s_trainable, s_frozen, opt_state, jax.device_put(micro, msh))
    np.testing.assert_allclose(acc_m["loss"], ref_m["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc_m["grad_norm"], ref_m["grad_norm"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(acc_t), jax.tree.leaves(ref_t), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match=r"batch\['x'\] dimension 0 has size 6"):
        batch_shardings(toy_batch(rows=6), mesh)


def test_weight_decay_skips_stacked_norms_and_biases():
    from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM
    from bmgpt_jax.training.optim import _decay_mask
    model = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=2,
                                         intermediate_size=16, scan_layers=True), rngs=nnx.Rngs(0))
    mask = {".".join(map(str, p)): bool(v.get_value()) for p, v in _decay_mask(nnx.state(model, nnx.Param)).flat_state()}
    assert mask["model.layers.mlp.up_proj.kernel"] and mask["model.embed_tokens.weight"]
    assert not mask["model.layers.input_layernorm.weight"] and not mask["model.norm.weight"]


def test_schedule_length_zero_means_the_run_decides():
    assert OptimConfig().total_steps == 0
    with pytest.raises(ValueError, match="optim.total_steps is 0"):
        make_schedule(OptimConfig())
    with pytest.raises(ValueError, match=r"optim.warmup_steps \(50\) exceeds optim.total_steps \(40\)"):
        OptimConfig(warmup_steps=50, total_steps=40)


def test_make_optimizer_decays_matrices_and_not_biases():
    """The AdamW that `make_optimizer` builds applies `_decay_mask` (the mask test above checks only the
    mask itself). With a zero gradient Adam's own step is 0 (mu = nu = 0), so the whole update is the decay:
    -lr * weight_decay * w on the kernels, nothing on the (non-zero) bias."""
    model = Toy(nnx.Rngs(0))
    model.up.bias[...] = jnp.linspace(0.5, 2.0, model.up.bias.shape[0])      # a decayed bias would move
    graphdef, trainable, frozen = split_trainable(model)
    lr, wd = 0.1, 0.5
    tx = make_optimizer(OptimConfig(lr=lr, warmup_steps=0, total_steps=10, weight_decay=wd, clip_norm=0))
    zero = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = tx.update(zero, tx.init(trainable), trainable)
    np.testing.assert_array_equal(updates["up"]["bias"][...], np.zeros(16))
    for name in ("up", "down"):
        w = np.asarray(trainable[name]["kernel"][...])
        np.testing.assert_allclose(updates[name]["kernel"][...], -lr * wd * w, rtol=1e-6, err_msg=name)


def test_grad_norm_metric_is_the_norm_of_the_token_mean_gradient_before_clipping():
    """metrics['grad_norm'] is the global norm of the gradient of loss_sum / n_tokens (what the optimizer
    receives), before the clip: the reference differentiates the token-mean toy loss directly, and the clip
    (1e-3) is far below it, so neither the summed gradient's norm (n_tokens times larger) nor the clipped
    one's would match."""
    graphdef, trainable, frozen = split_trainable(Toy(nnx.Rngs(0)))
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, total_steps=20, clip_norm=1e-3))
    batch = toy_batch()

    def mean_loss(params):
        s, n = toy_loss(nnx.merge(graphdef, params, frozen), batch)
        return s / n
    grads = jax.grad(mean_loss)(trainable)
    want = np.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(grads)))
    assert want > 1e-2                                       # ten times the clip
    for k, b in ((1, batch), (2, micro_batches(batch, 2))):
        _, _, m = jax.jit(make_train_step(toy_loss, tx, grad_accum=k))(graphdef, trainable, frozen,
                                                                       tx.init(trainable), b)
        np.testing.assert_allclose(m["grad_norm"], want, rtol=1e-5, err_msg=f"grad_accum={k}")


def test_a_nonfinite_gradient_under_a_finite_loss_is_not_applied():
    """A step whose loss is finite but whose gradient is not (here an identity with an infinite backward pass
    around the loss) is not applied either: the state stays as it was and `finite` is 0."""
    graphdef, trainable, frozen = split_trainable(Toy(nnx.Rngs(2)))
    tx = make_optimizer(NO_WARMUP)

    @jax.custom_vjp
    def inf_grad(x):
        return x
    inf_grad.defvjp(lambda x: (x, None), lambda _, g: (g * jnp.inf,))

    def loss(model, batch):
        s, n = toy_loss(model, batch)
        return inf_grad(s), n
    opt_state = tx.init(trainable)
    t2, o2, m = jax.jit(make_train_step(loss, tx))(graphdef, trainable, frozen, opt_state, toy_batch())
    assert np.isfinite(float(m["loss"])) and (float(m["finite"]), float(m["applied"])) == (0.0, 0.0)
    for a, b in zip(jax.tree.leaves((t2, o2)), jax.tree.leaves((trainable, opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)

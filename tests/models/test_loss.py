"""Chunked cross-entropy: equal to the dense form (values and gradients), never holding [B, T, vocab]
float32 logits; the decoder's and BioMedGPT's losses use it with `lm.loss_chunk_size`."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bmgpt_jax import config as config_lib
from bmgpt_jax.models.biomedgpt import lm_loss
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM
from bmgpt_jax.models.loss import chunked_cross_entropy

MiB = 2 ** 20


def dense(w, hidden, targets, weights):
    nll = optax.softmax_cross_entropy_with_integer_labels((hidden @ w).astype(jnp.float32), targets)
    return jnp.sum(nll * weights)


@pytest.mark.parametrize("chunk", [0, 16, 40, 64, 1000])
def test_chunked_equals_dense_values_and_grads(chunk):
    """T = 64 in chunks of 16 (even), 40 (last chunk padded), 64/1000/0 (one pass)."""
    rs = np.random.RandomState(0)
    b, t, d, vocab = 3, 64, 16, 97
    w = jnp.asarray(rs.randn(d, vocab).astype(np.float32))
    hidden = jnp.asarray(rs.randn(b, t, d).astype(np.float32))
    targets = jnp.asarray(rs.randint(0, vocab, (b, t)))
    weights = jnp.asarray((rs.rand(b, t) > 0.3).astype(np.float32))

    def chunked(w, hidden):
        return chunked_cross_entropy(lambda h: h @ w, hidden, targets, weights, chunk)[0]
    assert float(chunked_cross_entropy(lambda h: h @ w, hidden, targets, weights, chunk)[1]) == float(weights.sum())
    want, want_g = jax.value_and_grad(dense, (0, 1))(w, hidden, targets, weights)
    got, got_g = jax.jit(jax.value_and_grad(chunked, (0, 1)))(w, hidden)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for a, r in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5, rtol=1e-5)


def test_chunks_never_hold_the_whole_logits():
    """Compiled temporaries of the loss gradient at B=2, T=4096, vocab 32001: the dense form holds
    [2, 4096, 32001] float32 logits and their gradient (1 GiB each); chunks of 256 hold 62.5 MiB."""
    b, t, d, vocab = 2, 4096, 64, 32001

    def temp(chunk):
        def loss(w, hidden, targets, weights):
            return chunked_cross_entropy(lambda h: h @ w, hidden, targets, weights, chunk)[0]
        sds = jax.ShapeDtypeStruct
        lowered = jax.jit(jax.grad(loss, (0, 1))).lower(sds((d, vocab), jnp.float32), sds((b, t, d), jnp.float32),
                                                        sds((b, t), jnp.int32), sds((b, t), jnp.float32))
        return lowered.compile().memory_analysis().temp_size_in_bytes / MiB
    logits_mib = b * t * vocab * 4 / MiB
    assert temp(0) > logits_mib
    assert temp(256) < logits_mib / 4


def test_lm_loss_same_with_and_without_chunks():
    cfg = LlamaConfig(vocab_size=211, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, loss_chunk_size=0)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    rs = np.random.RandomState(1)
    ids = jnp.asarray(rs.randint(3, 211, (3, 50)))
    mask = jnp.asarray((np.arange(50)[None] < np.array([[50], [31], [7]])).astype(np.int32))
    batch = {"input_ids": ids * mask, "attention_mask": mask, "loss_mask": mask * (jnp.arange(50) >= 5)}
    gdef, params = nnx.split(model)

    def run(chunk):
        g = nnx.graphdef(LlamaForCausalLM(dataclasses.replace(cfg, loss_chunk_size=chunk), rngs=nnx.Rngs(0)))
        return jax.jit(jax.value_and_grad(lambda p: lm_loss(nnx.merge(g, p), batch)[0]))(params)
    (dense_loss, dense_g), (chunk_loss, chunk_g) = run(0), run(16)
    # the dense form written out: logits of positions 0..T-2 against tokens 1..T-1
    logits = nnx.jit(lambda m: m(ids * mask, mask))(model)[:, :-1]
    w = (batch["loss_mask"] * mask)[:, 1:]
    manual = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, (ids * mask)[:, 1:]) * w)
    np.testing.assert_allclose(float(dense_loss), float(manual), rtol=1e-6)
    np.testing.assert_allclose(float(chunk_loss), float(dense_loss), rtol=1e-6)
    for a, r in zip(jax.tree.leaves(chunk_g), jax.tree.leaves(dense_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-6, rtol=1e-5)


def test_chunk_size_is_a_config_key():
    assert config_lib.load(LlamaConfig, "biomedgpt_lm_7b").loss_chunk_size == 512
    assert config_lib.load(LlamaConfig, "biomedgpt_lm_7b", ["loss_chunk_size=1024"]).loss_chunk_size == 1024
    with pytest.raises(ValueError, match="loss_chunk_size=-1 must be >= 0"):
        LlamaConfig(loss_chunk_size=-1)

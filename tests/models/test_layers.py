"""Shared layers: the blockwise attention path equals plain softmax attention, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmgpt_jax.models import layers


def naive(q, k, v, mask):
    """Plain numpy-style attention, float64, with GQA by repeating kv heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.broadcast_to(np.asarray(mask), s.shape), s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_equals_naive_with_gqa_padding_and_odd_length(causal):
    rs = np.random.RandomState(0)
    b, t, h, kv, d = 3, 300, 4, 2, 8          # 300 keys: blockwise (> 2 x 128), not a block multiple
    assert t > 2 * layers.ATTENTION_BLOCK
    q = rs.randn(b, t, h, d).astype(np.float32)
    k, v = (rs.randn(b, t, kv, d).astype(np.float32) for _ in range(2))
    valid = np.arange(t)[None] < np.array([300, 170, 40])[:, None]
    mask = valid[:, None, None, :] & (np.tril(np.ones((t, t), bool))[None, None] if causal else True)
    out = np.asarray(layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
    ref = naive(q, k, v, mask)
    rows = valid if causal else np.ones_like(valid)   # causal: padded query rows see real keys too
    assert np.abs(out - ref)[rows].max() < 1e-5


def test_blockwise_gradients_equal_dense():
    rs = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rs.randn(2, 288, 2, 8).astype(np.float32)) for _ in range(3))
    mask = jnp.asarray(np.tril(np.ones((288, 288), bool))[None, None])

    def dense(q, k, v):
        s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        return jnp.sum(jnp.sin(jnp.einsum("bhts,bshd->bthd", p, v)))

    def blockwise(q, k, v):
        return jnp.sum(jnp.sin(layers.attention(q, k, v, mask)))

    for a, b in zip(jax.grad(dense, (0, 1, 2))(q, k, v), jax.grad(blockwise, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def test_fully_masked_rows_stay_finite():
    q, k, v = (jnp.ones((1, 400, 2, 4)) for _ in range(3))
    out = layers.attention(q, k, v, jnp.zeros((1, 1, 1, 400), bool))
    assert np.isfinite(np.asarray(out)).all()

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_repvideo.models.attention import attention


def _qkv(q_len=37, k_len=53, heads=3, dim=8, batch=2):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, dim))
    k = jax.random.normal(keys[1], (batch, k_len, heads, dim))
    v = jax.random.normal(keys[2], (batch, k_len, heads, dim))
    return q, k, v


def test_xla_matches_jax_reference():
    q, k, v = _qkv()
    ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(attention(q, k, v, backend="xla"), ref, rtol=1e-5, atol=1e-6)


def test_chunked_equals_dense_with_ragged_blocks():
    q, k, v = _qkv()
    dense = attention(q, k, v, backend="xla")
    chunked = attention(q, k, v, backend="chunked", q_chunk=16, kv_chunk=10)
    err = float(jnp.abs(chunked - dense).max() / jnp.abs(dense).max())
    assert err < 1e-5


def test_bias_is_applied():
    q, k, v = _qkv(q_len=5, k_len=5)
    mask = jnp.tril(jnp.ones((5, 5), bool))
    bias = jnp.where(mask, 0.0, -jnp.inf)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(attention(q, k, v, bias=bias, backend="xla"), ref, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="bf16"):
        attention(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match="no bias"):
        attention(q, k, v, bias=jnp.zeros((1, 1, 37, 53)), backend="chunked")

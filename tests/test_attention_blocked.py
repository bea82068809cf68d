"""The CPU ``blocked`` attention path equals the dense reference (odd lengths, query and head padding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_repvideo.models import attention as attn


@pytest.mark.parametrize("block_bytes, q_chunk", [
    (4 << 20, 16),  # query blocks of 16 rows (37 → 48 padded), all 6 heads in one step
    (4 * 53 * 37 * 4, 1024),  # whole heads, 4 per step: 6 heads padded to 8
])
def test_blocked_equals_dense_with_padding(monkeypatch, block_bytes, q_chunk):
    monkeypatch.setattr(attn, "BLOCK_BYTES", block_bytes)
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 37, 3, 8))
    k = jax.random.normal(kk, (2, 53, 3, 8))
    v = jax.random.normal(kv, (2, 53, 3, 8))
    dense = attn.attention(q, k, v, backend="xla")
    blocked = attn.attention(q, k, v, backend="blocked", q_chunk=q_chunk)
    np.testing.assert_allclose(blocked, dense, rtol=1e-5, atol=1e-6)


def test_blocked_rejects_bias_and_auto_picks_it_on_cpu_for_mid_length():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="blocked"):
        attn.attention(q, q, q, bias=jnp.zeros((1, 1, 8, 8)), backend="blocked")
    mid = jnp.zeros((1, attn.BLOCKED_MIN_TOKENS, 2, 4))
    expected = "blocked" if jax.default_backend() == "cpu" else "xla"
    assert attn._resolve("auto", mid, mid, None) == expected
    assert attn._resolve("auto", q, q, None) == "xla"


def test_auto_picks_cudnn_on_gpu_for_long_half_precision_only(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    spatial = jnp.zeros((1, 2560, 5, 64), jnp.bfloat16)  # VC2 level-1 spatial attention (40×64 tokens)
    temporal = jnp.zeros((1, 16, 5, 64), jnp.bfloat16)
    assert attn._resolve("auto", spatial, spatial, None) == "cudnn"
    assert attn._resolve("auto", temporal, temporal, None) == "xla"
    assert attn._resolve("auto", spatial.astype(jnp.float32), spatial.astype(jnp.float32), None) == "xla"
    assert attn._resolve("auto", spatial, spatial, jnp.zeros((1, 1, 2560, 2560))) == "xla"

"""The one attention entry point of the project.

``attention(q, k, v)`` takes ``(B, L, heads, head_dim)`` arrays (jax.nn.dot_product_attention's
layout) and returns ``(B, Lq, heads, head_dim)``. Backends:

* ``xla``: einsum scores with a float32 softmax. The reference; materialises ``(B, H, Lq, Lk)``.
* ``chunked``: online-softmax (flash-style) over query and key blocks in plain JAX; never holds
  more than one ``(B, H, q_chunk, kv_chunk)`` score block. Any platform.
* ``blocked``: exact softmax over all keys for a few whole heads (or one query block) at a time, in a
  sequential ``lax.map``: the score block stays in the CPU cache (faster than ``xla`` on CPU for
  ~600-4000 tokens; ``benchmarks/NOTES.md``). Any platform, no bias.
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``; bf16/fp16 only.
* ``auto``: cudnn on GPU for half precision from 256 keys on, chunked for long sequences otherwise,
  blocked on CPU for mid-length ones, xla otherwise (short ones such as 16-frame temporal attention).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jax_repvideo.models.logical import ANY, constrain

BACKENDS = ("auto", "xla", "chunked", "cudnn", "blocked")
# Sequences longer than this never use the dense xla path under "auto".
DENSE_MAX_TOKENS = 4096
# On CPU, "auto" uses the blocked path from this many keys on (shorter ones fit the cache anyway).
BLOCKED_MIN_TOKENS = 512
# On GPU, "auto" uses cuDNN flash attention (half precision) from this many keys on: the DiT's joint
# attention and the U-Net's spatial attention; the U-Net's 16-frame temporal attention stays xla.
CUDNN_MIN_TOKENS = 256
# The blocked path's float32 score block per step (benchmarks/NOTES.md).
BLOCK_BYTES = 4 << 20


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    scale: float | None = None,
    backend: str = "auto",
    q_chunk: int = 1024,
    kv_chunk: int = 1024,
) -> jax.Array:
    """Scaled dot-product attention; ``bias`` broadcasts to ``(B, H, Lq, Lk)`` (xla only)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if q.ndim != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects (B, L, H, D) q/k/v, got {q.shape}, {k.shape}, {v.shape}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # Under a sharding context: queries split over tokens, keys/values gathered whole (context
    # parallelism by all-gather of K/V), heads split over tensor. Identity otherwise.
    q = constrain(q, (ANY, "seq", "act_heads", None))
    k = constrain(k, (ANY, None, "act_heads", None))
    v = constrain(v, (ANY, None, "act_heads", None))
    backend = _resolve(backend, q, k, bias)
    if backend == "xla":
        return _dense(q, k, v, bias, scale)
    if backend == "chunked":
        if bias is not None:
            raise ValueError("the chunked attention backend takes no bias; use backend='xla'")
        return _chunked(q, k, v, scale, q_chunk, kv_chunk)
    if backend == "blocked":
        if bias is not None:
            raise ValueError("the blocked attention backend takes no bias; use backend='xla'")
        return _blocked(q, k, v, scale, q_chunk)
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError("the cudnn attention backend needs bf16/fp16 inputs; use 'xla' or 'chunked'")
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="cudnn")


def _resolve(backend: str, q: jax.Array, k: jax.Array, bias: jax.Array | None) -> str:
    if backend != "auto":
        return backend
    long = max(q.shape[1], k.shape[1]) > DENSE_MAX_TOKENS
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    fused_ok = half and bias is None and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
    if fused_ok and jax.default_backend() == "gpu" and k.shape[1] >= CUDNN_MIN_TOKENS:
        return "cudnn"
    if long and bias is None:
        return "chunked"
    if jax.default_backend() == "cpu" and bias is None and k.shape[1] >= BLOCKED_MIN_TOKENS:
        return "blocked"
    return "xla"


def _dense(q, k, v, bias, scale):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _blocked(q, k, v, scale, q_chunk):
    """Exact softmax over all keys for a few whole heads (or, for long keys, one query block) per step.

    A step's ``(heads, rows, Lk)`` float32 score block is kept near ``BLOCK_BYTES``: small enough for
    the CPU cache, large enough that the two matmuls are not tiny (2 heads × 664² at the cpu-medium size).
    """
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    rows = max(1, min(q_chunk, q_len, BLOCK_BYTES // (4 * k_len)))
    group = max(1, min(batch * heads, BLOCK_BYTES // (4 * k_len * rows)))

    def per_head(x):  # (B, L, H, D) → (B·H padded to a multiple of group, L, D)
        return _pad_to(x.transpose(0, 2, 1, 3).reshape(batch * heads, x.shape[1], dim), group, 0)

    q_steps = _pad_to(per_head(q * jnp.asarray(scale, q.dtype)), rows, 1)
    q_steps = q_steps.reshape(-1, group, q_steps.shape[1] // rows, rows, dim).swapaxes(1, 2)
    k_groups, v_groups = (per_head(x).reshape(-1, group, k_len, dim) for x in (k, v))

    def one_group(args):
        q_group, k_group, v_group = args  # (n_rows, G, rows, D), (G, Lk, D), (G, Lk, D)

        def one_block(q_block):  # (G, rows, D) against every key of these heads
            scores = jnp.einsum("gqd,gkd->gqk", q_block, k_group, preferred_element_type=jnp.float32)
            probs = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
            out = jnp.einsum("gqk,gkd->gqd", probs.astype(v_group.dtype), v_group,
                             preferred_element_type=jnp.float32)
            return (out / probs.sum(axis=-1, keepdims=True)).astype(q.dtype)

        return jax.lax.map(one_block, q_group)

    out = jax.lax.map(one_group, (q_steps, k_groups, v_groups))  # (n_groups, n_rows, G, rows, D)
    out = out.swapaxes(1, 2).reshape(-1, out.shape[1] * rows, dim)[:batch * heads, :q_len]
    return out.reshape(batch, heads, q_len, dim).transpose(0, 2, 1, 3)


def _pad_to(x: jax.Array, multiple: int, axis: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _chunked(q, k, v, scale, q_chunk, kv_chunk):
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    q_chunk, kv_chunk = min(q_chunk, q_len), min(kv_chunk, k_len)
    q_blocks = _pad_to(q, q_chunk, 1).reshape(batch, -1, q_chunk, heads, dim).swapaxes(0, 1)
    k_blocks = _pad_to(k, kv_chunk, 1).reshape(batch, -1, kv_chunk, heads, dim).swapaxes(0, 1)
    v_blocks = _pad_to(v, kv_chunk, 1).reshape(batch, -1, kv_chunk, heads, dim).swapaxes(0, 1)
    key_valid = (jnp.arange(k_blocks.shape[0] * kv_chunk) < k_len).reshape(-1, kv_chunk)
    attend = functools.partial(_attend_one_query_block, k_blocks=k_blocks, v_blocks=v_blocks,
                               key_valid=key_valid, scale=scale)
    out = jax.lax.map(attend, q_blocks)  # (nq, B, q_chunk, H, D)
    return out.swapaxes(0, 1).reshape(batch, -1, heads, dim)[:, :q_len]


def _attend_one_query_block(q_block, *, k_blocks, v_blocks, key_valid, scale):
    batch, q_chunk, heads, dim = q_block.shape
    init = (
        jnp.full((batch, heads, q_chunk), -jnp.inf, jnp.float32),  # running max
        jnp.zeros((batch, heads, q_chunk), jnp.float32),  # running denominator
        jnp.zeros((batch, heads, q_chunk, dim), jnp.float32),  # running numerator
    )

    def step(carry, block):
        running_max, denom, numer = carry
        k_block, v_block, valid = block
        scores = jnp.einsum("bqhd,bkhd->bhqk", q_block, k_block, preferred_element_type=jnp.float32)
        scores = jnp.where(valid, scores * scale, -jnp.inf)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[..., None])
        denom = denom * correction + probs.sum(axis=-1)
        update = jnp.einsum("bhqk,bkhd->bhqd", probs.astype(v_block.dtype), v_block,
                            preferred_element_type=jnp.float32)
        numer = numer * correction[..., None] + update
        return (new_max, denom, numer), None

    # Under autodiff, keep only the carry per key block (recompute the scores in the backward
    # pass) instead of every (q_chunk, kv_chunk) probability block, i.e. the full score matrix.
    step = jax.checkpoint(step, prevent_cse=False)
    (_, denom, numer), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, key_valid))
    out = numer / denom[..., None]
    return out.transpose(0, 2, 1, 3).astype(q_block.dtype)

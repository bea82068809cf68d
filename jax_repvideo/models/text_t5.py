"""The T5 v1.1 encoder (transformers ``T5EncoderModel``), as CogVideoX calls it.

Pre-norm blocks with RMS norm (no mean, no bias), self-attention without the 1/√d scale plus a
relative-position bias (bidirectional buckets, computed once and shared by every layer), and a
gated-GELU (tanh) feed-forward. The pipeline calls it without an attention mask, so pad tokens
are encoded and attended; so does this port.

The layer params are stacked along a leading layer axis and run under ``lax.scan``, so the
24-layer XXL compiles one block. Input ``(B, L)`` int ids → ``last_hidden_state`` ``(B, L, d_model)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_repvideo.models.attention import attention


@dataclasses.dataclass(frozen=True)
class T5Config:
    """transformers ``T5Config`` fields used by the encoder (defaults: google/t5-v1_1-xxl)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    param_dtype: str = "float32"
    dtype: str = "float32"


def config_from_transformers(data: Mapping[str, Any], **overrides) -> T5Config:
    """Our config from a transformers ``config.json`` dict; anything but T5 v1.1's gated GELU raises."""
    proj = data.get("feed_forward_proj", "gated-gelu")
    if proj != "gated-gelu":
        raise ValueError(f"T5 config: feed_forward_proj={proj!r} is not supported (T5 v1.1 uses 'gated-gelu')")
    # The checkpoint's storage dtype (transformers' "dtype") is not a compute choice: pass dtype= to pick one.
    fields = {f.name for f in dataclasses.fields(T5Config)} - {"dtype", "param_dtype"}
    values = {k: v for k, v in data.items() if k in fields}
    values.update(overrides)
    return T5Config(**values)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """``(L, L)`` bucket ids of ``key − query`` offsets, bidirectional (transformers' float32 arithmetic)."""
    offset = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (offset > 0).astype(np.int64) * half
    distance = np.abs(offset)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.minimum(max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64), half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)
    return (h * weight.astype(jnp.float32)).astype(x.dtype)


class T5Layers(nnx.Module):
    """All encoder blocks' weights, stacked along a leading layer axis (Linear weights as ``(in, out)``)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        n, d, inner, ff = cfg.num_layers, cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
        dtype = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)

        def weight(*shape):
            return nnx.Param(init(rngs.params(), (n, *shape), dtype))

        self.attn_norm = nnx.Param(jnp.ones((n, d), dtype))
        self.q, self.k, self.v = weight(d, inner), weight(d, inner), weight(d, inner)
        self.o = weight(inner, d)
        self.ff_norm = nnx.Param(jnp.ones((n, d), dtype))
        self.wi_0, self.wi_1 = weight(d, ff), weight(d, ff)
        self.wo = weight(ff, d)


def _block(cfg: T5Config, h: jax.Array, p: dict, bias: jax.Array) -> jax.Array:
    dtype = jnp.dtype(cfg.dtype)
    b, length, _ = h.shape

    def dense(x, w):
        return x @ w.astype(dtype)

    x = rms_norm(h, p["attn_norm"], cfg.layer_norm_epsilon)
    q, k, v = (dense(x, p[n]).reshape(b, length, cfg.num_heads, cfg.d_kv) for n in ("q", "k", "v"))
    out = attention(q, k, v, bias=bias, scale=1.0, backend="xla")
    h = h + dense(out.reshape(b, length, -1), p["o"])
    x = rms_norm(h, p["ff_norm"], cfg.layer_norm_epsilon)
    gated = jax.nn.gelu(dense(x, p["wi_0"]), approximate=True) * dense(x, p["wi_1"])
    return h + dense(gated, p["wo"])


class T5Encoder(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = jnp.dtype(config.param_dtype)
        self.shared = nnx.Embed(config.vocab_size, config.d_model, param_dtype=param_dtype, rngs=rngs)
        self.relative_attention_bias = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (config.relative_attention_num_buckets, config.num_heads),
                                          param_dtype))
        self.layers = T5Layers(config, rngs=rngs)
        self.final_layer_norm = nnx.Param(jnp.ones((config.d_model,), param_dtype))

    def position_bias(self, length: int) -> jax.Array:
        """``(1, heads, L, L)`` float32 bias added to the attention logits of every layer."""
        cfg = self.config
        buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        bias = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), buckets, axis=0)
        return jnp.transpose(bias, (2, 0, 1))[None]

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        h = self.shared(input_ids).astype(jnp.dtype(cfg.dtype))
        bias = self.position_bias(input_ids.shape[1])
        stacked = {name: var[...] for name, var in vars(self.layers).items() if isinstance(var, nnx.Param)}

        def body(carry, params):
            return _block(cfg, carry, params, bias), None

        h, _ = jax.lax.scan(body, h, stacked)
        return rms_norm(h, self.final_layer_norm[...], cfg.layer_norm_epsilon)


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(graphdef, state, input_ids):
    return nnx.merge(graphdef, state)(input_ids)


def encode(model: T5Encoder, input_ids) -> jax.Array:
    """``(B, L)`` token ids → ``last_hidden_state`` ``(B, L, d_model)`` in one jit."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"T5 encode: input_ids must be a (B, L) integer array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= model.config.vocab_size):
        raise ValueError(f"T5 encode: token ids must lie in [0, {model.config.vocab_size}), "
                         f"got [{ids.min()}, {ids.max()}]")
    graphdef, state = nnx.split(model)
    return _encode_jit(graphdef, state, jnp.asarray(ids, jnp.int32))

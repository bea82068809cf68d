"""Small pieces shared by the models: mixed-precision Linear/Conv, float32-statistics norms and
sinusoidal embeddings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def linear(cin: int, cout: int, *, use_bias: bool = True, dtype, param_dtype, rngs) -> nnx.Linear:
    """``nnx.Linear`` that multiplies in ``dtype`` and returns float32.

    Under bf16 compute the operands are bf16 but the accumulation *and the result* are float32, so the
    activations between layers (and the residual stream) are never rounded to bf16. That halves the
    bf16 error of the U-Net (2.5e-2 → 1.5e-2 on the tiny fixture; benchmarks/NOTES.md). A no-op in float32.
    """
    return nnx.Linear(cin, cout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      preferred_element_type=jnp.float32, rngs=rngs)


def conv(cin: int, cout: int, kernel: tuple[int, ...], *, stride=1, padding, use_bias: bool = True,
         dtype, param_dtype, rngs) -> nnx.Conv:
    """``nnx.Conv`` with the same precision contract as :func:`linear`, kept as written on small maps."""
    return nnx.Conv(cin, cout, kernel, strides=stride, padding=padding, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, preferred_element_type=jnp.float32,
                    conv_general_dilated=conv_general_dilated_unswapped, rngs=rngs)


def conv_general_dilated_unswapped(lhs, rhs, window_strides, padding, **kwargs):
    """``lax.conv_general_dilated`` for channels-last input that XLA cannot turn inside out.

    XLA's simplifier swaps the operands of a convolution whose kernel window covers more positions
    than the input has (a 3×3 conv on the 2×2 map of the U-Net's deepest level at small latents) and
    XLA:CPU then runs it in a generic loop, 25× slower (benchmarks/NOTES.md). Padding such an input
    explicitly behind an optimization barrier keeps the swap from applying. Larger inputs pass through.
    """
    spatial_in, spatial_kernel = lhs.shape[1:-1], rhs.shape[:-2]
    dilated_input = any(d != 1 for d in kwargs.get("lhs_dilation") or ())
    if dilated_input or math.prod(spatial_in) >= math.prod(spatial_kernel):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    if isinstance(padding, str):
        dilation = kwargs.get("rhs_dilation") or (1,) * len(spatial_kernel)
        window = [(k - 1) * d + 1 for k, d in zip(spatial_kernel, dilation)]
        padding = jax.lax.padtype_to_pads(spatial_in, window, window_strides, padding)
    padded = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    return jax.lax.conv_general_dilated(jax.lax.optimization_barrier(padded), rhs, window_strides, "VALID",
                                        **kwargs)


class GroupNorm(nnx.Module):
    """GroupNorm over channels-last input ``(N, ..., C)`` with float32 statistics.

    Statistics pool every axis but the first and the channel group, so the caller decides what a
    "sample" is: LVDM normalises ``(B, T, H, W, C)`` video features over T, H and W together, but
    spatial transformers normalise each frame on its own (reshape to ``(B*T, H, W, C)`` first).
    """

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        grouped = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
        mean = grouped.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with float32 statistics; optional affine parameters."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, use_scale: bool = True,
                 use_bias: bool = True, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype)) if use_scale else None
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = h.mean(axis=-1, keepdims=True)
        var = jnp.square(h - mean).mean(axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            h = h * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            h = h + self.bias[...].astype(jnp.float32)
        return h.astype(x.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, *, max_period: float = 10000.0,
                       cos_first: bool = True, freq_shift: float = 0.0) -> jax.Array:
    """Sinusoidal embedding of ``timesteps`` (any shape) → ``(*shape, dim)`` in float32.

    Frequencies are ``exp(-ln(max_period) * i / (dim/2 - freq_shift))``. LVDM and CogVideoX both
    put the cosine half first (``cos_first=True``, ``freq_shift=0``).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[..., None] * jnp.exp(exponent)
    parts = (jnp.cos(args), jnp.sin(args)) if cos_first else (jnp.sin(args), jnp.cos(args))
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb

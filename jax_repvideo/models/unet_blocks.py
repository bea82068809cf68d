"""The building blocks of the VideoCrafter2 (LVDM) 3D U-Net, channels-last (spec §2.6–2.9).

Frame-wise layers see ``(N, H, W, C)`` with ``N = B·T``; temporal layers see ``(B, T, H, W, C)``.
Attribute names follow the role of each tensor; ``convert/videocrafter2.py`` maps the PyTorch
names (``in_layers.0``, ``temopral_conv.conv1.2``, …) onto them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_repvideo.models.attention import attention
from jax_repvideo.models.layers import GroupNorm, LayerNorm, conv, linear


class KeySource:
    """Hands out init keys like ``rngs.params()`` from a Python counter.

    ``nnx.Rngs`` keeps its counter in a Variable; updating it under ``nnx.eval_shape`` costs time
    proportional to the trace so far (flax 0.12 / jax 0.10), which made abstract init quadratic.
    """

    def __init__(self, key: jax.Array):
        self.key, self.count = key, 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def _conv(cin, cout, kernel, *, stride=1, dtype, param_dtype, rngs):
    padding = tuple((k // 2, k // 2) for k in kernel)
    return conv(cin, cout, kernel, stride=stride, padding=padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class TemporalConvBlock(nnx.Module):
    """Four GroupNorm → SiLU → Conv3d stages over time (kernel (3,1,1)) plus the identity.

    ``spatial_aware`` (LVDM ``tempspatial_aware``) alternates (3,3,1) and (3,1,3) kernels.
    """

    def __init__(self, channels: int, *, spatial_aware: bool, dtype, param_dtype, rngs):
        kernels = [(3, 3, 1), (3, 1, 3)] * 2 if spatial_aware else [(3, 1, 1)] * 4
        for i, kernel in enumerate(kernels, start=1):
            setattr(self, f"norm{i}", GroupNorm(32, channels, eps=1e-5, param_dtype=param_dtype))
            setattr(self, f"conv{i}", _conv(channels, channels, kernel, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, T, H, W, C); norms pool over T, H, W
        h = x
        for i in range(1, 5):
            h = getattr(self, f"conv{i}")(nnx.silu(getattr(self, f"norm{i}")(h)))
        return x + h


class ResBlock(nnx.Module):
    """LVDM ResBlock: two 3×3 convs, the time embedding added in between, temporal conv after."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, *, temporal_conv: bool,
                 spatial_aware: bool, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_norm = GroupNorm(32, channels, eps=1e-5, param_dtype=param_dtype)
        self.in_conv = _conv(channels, out_channels, (3, 3), **kw)
        self.emb_proj = linear(emb_channels, out_channels, **kw)
        self.out_norm = GroupNorm(32, out_channels, eps=1e-5, param_dtype=param_dtype)
        self.out_conv = _conv(out_channels, out_channels, (3, 3), **kw)
        self.skip = _conv(channels, out_channels, (1, 1), **kw) if channels != out_channels else None
        self.temporal_conv = (TemporalConvBlock(out_channels, spatial_aware=spatial_aware, **kw)
                              if temporal_conv else None)

    def __call__(self, x: jax.Array, emb: jax.Array, batch: int) -> jax.Array:
        h = self.in_conv(nnx.silu(self.in_norm(x)))
        h = h + self.emb_proj(nnx.silu(emb))[:, None, None, :].astype(h.dtype)
        h = self.out_conv(nnx.silu(self.out_norm(h)))
        h = (x if self.skip is None else self.skip(x)) + h
        if self.temporal_conv is not None:
            h = self.temporal_conv(h.reshape(batch, -1, *h.shape[1:])).reshape(h.shape)
        return h


class Downsample(nnx.Module):
    def __init__(self, channels: int, *, dtype, param_dtype, rngs):
        self.op = _conv(channels, channels, (3, 3), stride=2, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.op(x)


class Upsample(nnx.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs):
        self.conv = _conv(channels, channels, (3, 3), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Attention(nnx.Module):
    """LVDM CrossAttention: bias-free q/k/v projections, scale ``dim_head**-0.5``, output Linear.

    ``relative_length`` > 0 adds LVDM's learnable relative-position tables (distance k − q clipped
    to ±relative_length) to the logits and to the output, as the einsum path of the original does.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, *,
                 relative_length: int = 0, backend: str, dtype, param_dtype, rngs):
        inner = heads * dim_head
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.dim_head, self.backend = heads, dim_head, backend
        self.to_q = linear(query_dim, inner, use_bias=False, **kw)
        self.to_k = linear(context_dim, inner, use_bias=False, **kw)
        self.to_v = linear(context_dim, inner, use_bias=False, **kw)
        self.to_out = linear(inner, query_dim, **kw)
        self.relative_length = relative_length
        if relative_length:
            shape = (2 * relative_length + 1, dim_head)
            self.relative_position_k = nnx.Param(jnp.zeros(shape, param_dtype))
            self.relative_position_v = nnx.Param(jnp.zeros(shape, param_dtype))

    def __call__(self, x, context=None, *, query=None, causal: bool = False):
        """``query``: an already projected (and possibly Q-cache-blended) query, pre-head-split."""
        context = x if context is None else context
        q = self.to_q(x) if query is None else query
        split = lambda a: a.reshape(*a.shape[:-1], self.heads, self.dim_head)  # noqa: E731
        # Linear results are float32 (layers.linear); attention itself runs in the compute dtype.
        q, k, v = (split(a).astype(self.to_out.dtype) for a in (q, self.to_k(context), self.to_v(context)))
        if self.relative_length:
            out = self._relative(q, k, v, causal)
        else:
            bias = _causal_bias(q.shape[1], k.shape[1]) if causal else None
            out = attention(q, k, v, bias=bias, backend=self.backend)
        return self.to_out(out.reshape(*out.shape[:-2], -1))

    def _relative(self, q, k, v, causal):
        lq, lk = q.shape[1], k.shape[1]
        distance = jnp.clip(jnp.arange(lk)[None, :] - jnp.arange(lq)[:, None],
                            -self.relative_length, self.relative_length) + self.relative_length
        rel_k = self.relative_position_k[...][distance].astype(jnp.float32)  # (Lq, Lk, D)
        rel_v = self.relative_position_v[...][distance].astype(v.dtype)
        scale = self.dim_head ** -0.5
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores + jnp.einsum("bqhd,qkd->bhqk", q.astype(jnp.float32), rel_k)
        scores = scores * scale
        if causal:
            scores = scores + _causal_bias(lq, lk)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v) + jnp.einsum("bhqk,qkd->bqhd", weights, rel_v)


def _causal_bias(lq: int, lk: int) -> jax.Array:
    keep = jnp.tril(jnp.ones((lq, lk), bool))
    return jnp.where(keep, 0.0, -jnp.inf).astype(jnp.float32)


class FeedForward(nnx.Module):
    """GEGLU: Linear(C → 2·4C), value · GELU(gate) (exact erf GELU), Linear(4C → C)."""

    def __init__(self, dim: int, *, mult: int = 4, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_in = linear(dim, 2 * mult * dim, **kw)
        self.proj_out = linear(mult * dim, dim, **kw)

    def __call__(self, x):
        value, gate = jnp.split(self.proj_in(x), 2, axis=-1)
        return self.proj_out(value * jax.nn.gelu(gate, approximate=False))


class TransformerBlock(nnx.Module):
    """LVDM BasicTransformerBlock: self-attention, cross- (or second self-) attention, GEGLU FF."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, *,
                 relative_length: int = 0, backend: str, dtype, param_dtype, rngs):
        kw = dict(backend=backend, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn1 = Attention(dim, dim, heads, dim_head, relative_length=relative_length, **kw)
        self.attn2 = Attention(dim, context_dim or dim, heads, dim_head, relative_length=relative_length, **kw)
        self.ff = FeedForward(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, eps=1e-5, param_dtype=param_dtype)
        self.norm2 = LayerNorm(dim, eps=1e-5, param_dtype=param_dtype)
        self.norm3 = LayerNorm(dim, eps=1e-5, param_dtype=param_dtype)

    def __call__(self, x, context=None, *, causal=False, query_fn=None):
        """``query_fn(q) -> q``, if given, sees (and may replace) the attn1 query."""
        h = self.norm1(x)
        query = self.attn1.to_q(h)
        if query_fn is not None:
            query = query_fn(query)
        x = self.attn1(h, query=query, causal=causal) + x
        x = self.attn2(self.norm2(x), context, causal=causal) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nnx.Module):
    """Per-frame transformer over the H·W tokens with cross-attention to the text context."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, *,
                 backend: str, dtype, param_dtype, rngs):
        inner = heads * dim_head
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(32, channels, eps=1e-6, param_dtype=param_dtype)
        self.proj_in = linear(channels, inner, **kw)
        self.transformer_blocks = nnx.List([
            TransformerBlock(inner, heads, dim_head, context_dim, backend=backend, **kw) for _ in range(depth)])
        self.proj_out = linear(inner, channels, **kw)

    def __call__(self, x, context):  # x (N, H, W, C), context (N, L, D)
        n, hgt, wid, c = x.shape
        h = self.proj_in(self.norm(x).reshape(n, hgt * wid, c))
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).reshape(n, hgt, wid, c)


class TemporalTransformer(nnx.Module):
    """Self-attention over the T frames of each pixel; attn2 is a second temporal self-attention.

    ``__call__`` returns ``(out, query)``: ``query`` is the first block's attn1 query, pre-head-split,
    ``(B·H·W, T, inner)`` with rows ordered (b, h, w). With ``q_source`` and per-frame ``v`` (B, T),
    that query becomes ``(1 − v)·query + v·q_source`` (the Q-cache).
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, *, causal: bool,
                 relative_length: int, backend: str, dtype, param_dtype, rngs):
        inner = heads * dim_head
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.causal = causal
        self.norm = GroupNorm(32, channels, eps=1e-6, param_dtype=param_dtype)
        self.proj_in = linear(channels, inner, **kw)
        self.transformer_blocks = nnx.List([
            TransformerBlock(inner, heads, dim_head, None, relative_length=relative_length,
                             backend=backend, **kw) for _ in range(depth)])
        self.proj_out = linear(inner, channels, **kw)

    def __call__(self, x, *, q_source=None, v=None):  # x (B, T, H, W, C)
        b, t, hgt, wid, c = x.shape
        h = jnp.moveaxis(self.norm(x), 1, 3).reshape(b * hgt * wid, t, c)
        h = self.proj_in(h)
        captured = []

        def query_fn(q):
            captured.append(q)
            if q_source is None:
                return q
            w = v.astype(q.dtype)[:, None, :, None]  # (B, 1, T, 1) against (B, H·W, T, inner)
            mixed = (1 - w) * q.reshape(b, hgt * wid, t, -1) + w * q_source.reshape(b, hgt * wid, t, -1)
            return mixed.reshape(q.shape)

        for i, block in enumerate(self.transformer_blocks):
            h = block(h, causal=self.causal, query_fn=query_fn if i == 0 else None)
        h = self.proj_out(h).reshape(b, hgt, wid, t, c)
        return x + jnp.moveaxis(h, 3, 1), captured[0]

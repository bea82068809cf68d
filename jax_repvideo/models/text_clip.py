"""The OpenCLIP text tower as VideoCrafter2's ``FrozenOpenCLIPEmbedder(layer="penultimate")`` runs it.

``tokens (b, context_length) → token_embedding + positional_embedding → resblocks → ln_final``, output
``(b, context_length, width)``. With ``layer="penultimate"`` the last resblock is skipped; there is no
pooling and no ``text_projection``. Blocks are pre-LN with a causal mask (padding is not masked),
a fused ``in_proj`` (q | k | v rows) and exact (erf) GELU. The blocks' params are stacked on a
leading layer axis and run under ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jax_repvideo.config import ConfigError, from_dict
from jax_repvideo.models.attention import attention
from jax_repvideo.models.layers import LayerNorm


@dataclasses.dataclass(frozen=True)
class OpenCLIPTextConfig:
    """open_clip ``CLIPTextCfg`` names plus VideoCrafter's ``layer``. Defaults: ViT-H-14's text tower."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_ratio: float = 4.0
    layer: Literal["last", "penultimate"] = "penultimate"
    layer_norm_eps: float = 1e-5
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.width % self.heads:
            raise ConfigError(f"OpenCLIPTextConfig: width {self.width} does not split into {self.heads} heads")
        if self.layers < 2:
            raise ConfigError(f"OpenCLIPTextConfig.layers must be ≥ 2, got {self.layers}")

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


# Full-size ViT-H-14 text tower, penultimate layer, as in VideoCrafter2.
VIDEOCRAFTER2_TEXT = OpenCLIPTextConfig()


def from_embedder_config(data: dict) -> OpenCLIPTextConfig:
    """The config from a FrozenOpenCLIPEmbedder description: ``{open_clip_model_cfg: {text_cfg}, layer, ...}``."""
    fields = {f.name for f in dataclasses.fields(OpenCLIPTextConfig)}
    text_cfg = dict(data.get("open_clip_model_cfg", {}).get("text_cfg", {}))
    text_cfg.update({k: v for k, v in data.items() if k in fields})
    return from_dict(OpenCLIPTextConfig, text_cfg)

def _linear(cin, cout, cfg, rngs):
    return nnx.Linear(cin, cout, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def _layer_norm(cfg):
    return LayerNorm(cfg.width, eps=cfg.layer_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))


class Attention(nnx.Module):
    """``nn.MultiheadAttention`` with its packed ``in_proj`` and ``out_proj``."""

    def __init__(self, cfg: OpenCLIPTextConfig, rngs):
        self.heads = cfg.heads
        self.in_proj = _linear(cfg.width, 3 * cfg.width, cfg, rngs)
        self.out_proj = _linear(cfg.width, cfg.width, cfg, rngs)

    def __call__(self, x, bias):
        b, length, width = x.shape
        q, k, v = jnp.split(self.in_proj(x).reshape(b, length, 3 * self.heads, width // self.heads), 3, axis=2)
        out = attention(q, k, v, bias=bias, backend="xla")
        return self.out_proj(out.reshape(b, length, width))


class Mlp(nnx.Module):
    def __init__(self, cfg: OpenCLIPTextConfig, rngs):
        self.c_fc = _linear(cfg.width, cfg.mlp_width, cfg, rngs)
        self.c_proj = _linear(cfg.mlp_width, cfg.width, cfg, rngs)

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=False))


class ResidualAttentionBlock(nnx.Module):
    def __init__(self, cfg: OpenCLIPTextConfig, rngs):
        self.ln_1 = _layer_norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.ln_2 = _layer_norm(cfg)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x, bias):
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTextEncoder(nnx.Module):
    def __init__(self, cfg: OpenCLIPTextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.width, dtype=jnp.dtype(cfg.dtype),
                                         param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.positional_embedding = nnx.Param(
            0.01 * jax.random.normal(rngs.params(), (cfg.context_length, cfg.width), jnp.dtype(cfg.param_dtype)))

        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return ResidualAttentionBlock(cfg, rngs)

        self.resblocks = make_blocks(rngs)  # params stacked on a leading (layers,) axis
        self.ln_final = _layer_norm(cfg)

    def __call__(self, tokens: jax.Array, *, layer: str | None = None) -> jax.Array:
        """``tokens`` int ``(b, context_length)`` → ``(b, context_length, width)``."""
        layer = layer or self.cfg.layer
        if layer not in ("last", "penultimate"):
            raise ValueError(f"OpenCLIPTextEncoder: layer must be 'last' or 'penultimate', got {layer!r}")
        count = self.cfg.layers - (1 if layer == "penultimate" else 0)
        x, _ = self.run_blocks(self.embed(tokens), count)
        return self.ln_final(x)

    def embed(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] != self.cfg.context_length:
            raise ValueError(f"OpenCLIPTextEncoder: tokens must be (batch, {self.cfg.context_length}), "
                             f"got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"OpenCLIPTextEncoder: tokens must be integer ids, got dtype {tokens.dtype}")
        return self.token_embedding(tokens) + self.positional_embedding[...].astype(jnp.dtype(self.cfg.dtype))

    def run_blocks(self, x: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
        """The first ``count`` resblocks → (final hidden state, every block's output ``(count, b, L, w)``)."""
        length = x.shape[1]
        causal = jnp.where(jnp.tril(jnp.ones((length, length), bool)), 0.0, -jnp.inf).astype(jnp.float32)
        graphdef, params = nnx.split(self.resblocks)
        params = jax.tree.map(lambda a: a[:count], params)

        def step(h, layer_params):
            h = nnx.merge(graphdef, layer_params)(h, causal)
            return h, h

        return jax.lax.scan(step, x, params)

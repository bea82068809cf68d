"""The LDM / Stable Diffusion KL autoencoder (VideoCrafter2's first stage), applied frame by frame.

A port of ``lvdm.models.autoencoder.AutoencoderKL`` with ``lvdm.modules.networks.ae_modules``'
``Encoder`` / ``Decoder``. Module and parameter names follow the PyTorch state dict
(``encoder.down.0.block.1.conv2`` …), so the converter is a short table. Images are channels-last
``(N, H, W, C)``, video ``(B, T, H, W, C)``.

* ``encode(x)`` → posterior ``(mean, logvar)``, logvar clamped to [-30, 20];
  ``decode(z)`` → ``decoder(post_quant_conv(z))`` (AutoencoderKL's own, unscaled latents).
* ``encode_latents`` / ``decode_latents``: the diffusion-side latents, ``z = scale_factor · mean``
  (the posterior mode; LatentDiffusion's ``get_first_stage_encoding``) and
  ``decode(z / scale_factor)`` (``decode_first_stage``).
* ``encode_video`` / ``decode_video``: the same over ``(B, T, ...)`` frame by frame, as
  ``decode_first_stage_2DAE`` does, in chunks of ``frame_chunk`` frames under ``lax.map`` so only one
  chunk's activations are live at a time.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_repvideo.config import ConfigError, from_dict
from jax_repvideo.models.attention import DENSE_MAX_TOKENS, attention
from jax_repvideo.models.layers import GroupNorm

NORM_GROUPS = 32
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """LVDM ``ddconfig`` fields plus ``embed_dim`` and LatentDiffusion's ``scale_factor``.

    Defaults are the released VideoCrafter2 first stage (SD's KL-f8 autoencoder).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    double_z: bool = True
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 512  # only fed a print and attn_resolutions in the original
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    scale_factor: float = 0.18215
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.attn_resolutions:
            raise ConfigError("AutoencoderKLConfig.attn_resolutions: only [] (mid-block attention only, as in "
                             f"VideoCrafter2 / SD) is supported, got {list(self.attn_resolutions)}")
        if not self.double_z:
            raise ConfigError("AutoencoderKLConfig.double_z must be true: the KL posterior needs mean and logvar")
        if self.ch % NORM_GROUPS:
            raise ConfigError(f"AutoencoderKLConfig.ch={self.ch} must be a multiple of {NORM_GROUPS} (GroupNorm groups)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# Full-size VideoCrafter2 / SD first stage.
VIDEOCRAFTER2_VAE = AutoencoderKLConfig()


def from_ldm_config(data: dict) -> AutoencoderKLConfig:
    """The config from LVDM's yaml/json layout: ``{ddconfig: {...}, embed_dim, scale_factor?}``."""
    flat = dict(data.get("ddconfig", {}))
    for key in ("embed_dim", "scale_factor"):
        if key in data:
            flat[key] = data[key]
    return from_dict(AutoencoderKLConfig, flat)


def _conv(cin, cout, k, cfg, rngs, stride=1, padding=None):
    pad = k // 2 if padding is None else padding
    return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                    dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


def _norm(channels, cfg):
    return GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, param_dtype=jnp.dtype(cfg.param_dtype))


class ResnetBlock(nnx.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``, with a 1×1 shortcut when widths differ."""

    def __init__(self, cin, cout, cfg, rngs):
        self.norm1 = _norm(cin, cfg)
        self.conv1 = _conv(cin, cout, 3, cfg, rngs)
        self.norm2 = _norm(cout, cfg)
        self.conv2 = _conv(cout, cout, 3, cfg, rngs)
        self.nin_shortcut = _conv(cin, cout, 1, cfg, rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all positions, head width = channels, 1×1 conv projections."""

    def __init__(self, channels, cfg, rngs):
        self.norm = _norm(channels, cfg)
        self.q = _conv(channels, channels, 1, cfg, rngs)
        self.k = _conv(channels, channels, 1, cfg, rngs)
        self.v = _conv(channels, channels, 1, cfg, rngs)
        self.proj_out = _conv(channels, channels, 1, cfg, rngs)

    def __call__(self, x):
        n, h, w, c = x.shape
        hn = self.norm(x)
        q, k, v = (proj(hn).reshape(n, h * w, 1, c) for proj in (self.q, self.k, self.v))
        # Never "auto": its cudnn choice cannot take this head width (= channels, 512 at full size).
        backend = "xla" if h * w <= DENSE_MAX_TOKENS else "chunked"
        out = attention(q, k, v, backend=backend).reshape(n, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Zero-pad right and bottom by one, then a 3×3 stride-2 conv without padding."""

    def __init__(self, channels, cfg, rngs):
        self.conv = _conv(channels, channels, 3, cfg, rngs, stride=2, padding=0)

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels, cfg, rngs):
        self.conv = _conv(channels, channels, 3, cfg, rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution level: ``block`` list plus an optional ``downsample`` / ``upsample``."""

    def __init__(self, widths, cfg, rngs, *, down=False, up=False):
        self.block = nnx.List([ResnetBlock(cin, cout, cfg, rngs) for cin, cout in zip(widths[:-1], widths[1:])])
        self.downsample = Downsample(widths[-1], cfg, rngs) if down else None
        self.upsample = Upsample(widths[-1], cfg, rngs) if up else None

    def __call__(self, x):
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Mid(nnx.Module):
    def __init__(self, channels, cfg, rngs):
        self.block_1 = ResnetBlock(channels, channels, cfg, rngs)
        self.attn_1 = AttnBlock(channels, cfg, rngs)
        self.block_2 = ResnetBlock(channels, channels, cfg, rngs)

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, rngs):
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, cfg, rngs)
        levels, cin = [], cfg.ch
        for i, width in enumerate(widths):
            levels.append(Level([cin] + [width] * cfg.num_res_blocks, cfg, rngs, down=i != last))
            cin = width
        self.down = nnx.List(levels)
        self.mid = Mid(cin, cfg, rngs)
        self.norm_out = _norm(cin, cfg)
        self.conv_out = _conv(cin, 2 * cfg.z_channels, 3, cfg, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """``up`` is indexed by level as in PyTorch: ``up[0]`` is full resolution and runs last."""

    def __init__(self, cfg: AutoencoderKLConfig, rngs):
        widths = [cfg.ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = _conv(cfg.z_channels, cin, 3, cfg, rngs)
        self.mid = Mid(cin, cfg, rngs)
        levels = [None] * len(widths)
        for i in reversed(range(len(widths))):
            levels[i] = Level([cin] + [widths[i]] * (cfg.num_res_blocks + 1), cfg, rngs, up=i != 0)
            cin = widths[i]
        self.up = nnx.List(levels)
        self.norm_out = _norm(cin, cfg)
        self.conv_out = _conv(cin, cfg.out_ch, 3, cfg, rngs)

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)
        self.quant_conv = _conv(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, cfg, rngs)
        self.post_quant_conv = _conv(cfg.embed_dim, cfg.z_channels, 1, cfg, rngs)

    # ------------------------------------------------------------ images (N, H, W, C)
    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images ``(N, H, W, in_channels)`` in [-1, 1] → posterior ``(mean, logvar)``, ``(N, h, w, embed_dim)``."""
        self._check(x, 4, self.cfg.in_channels, "image")
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Posterior latents (unscaled) ``(N, h, w, embed_dim)`` → images ``(N, H, W, out_ch)``; no clamp."""
        self._check(z, 4, self.cfg.embed_dim, "latent")
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(self, x: jax.Array) -> jax.Array:
        """Diffusion latents: ``scale_factor ·`` the posterior mode."""
        return self.encode(x)[0] * self.cfg.scale_factor

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """Diffusion latents → images: ``decode(z / scale_factor)``."""
        self._check(z, 4, self.cfg.embed_dim, "latent")
        return self.decode(z / self.cfg.scale_factor)

    # ------------------------------------------------------------ video (B, T, H, W, C), frame by frame
    def decode_video(self, z: jax.Array, *, frame_chunk: int = 4) -> jax.Array:
        """Diffusion latents ``(B, T, h, w, embed_dim)`` → frames ``(B, T, H, W, out_ch)``."""
        self._check(z, 5, self.cfg.embed_dim, "video latent")
        return _framewise(self.decode_latents, z, frame_chunk)

    def encode_video(self, x: jax.Array, *, frame_chunk: int = 4) -> jax.Array:
        """Frames ``(B, T, H, W, in_channels)`` → diffusion latents ``(B, T, h, w, embed_dim)`` (mode)."""
        self._check(x, 5, self.cfg.in_channels, "video")
        return _framewise(self.encode_latents, x, frame_chunk)

    @staticmethod
    def _check(x, ndim, channels, what):
        if x.ndim != ndim or x.shape[-1] != channels:
            layout = "(N, H, W, C)" if ndim == 4 else "(B, T, H, W, C)"
            raise ValueError(f"AutoencoderKL: {what} input must be channels-last {layout} with C={channels}, "
                             f"got shape {tuple(x.shape)}")


def _framewise(fn, video: jax.Array, frame_chunk: int) -> jax.Array:
    """Applies the per-image ``fn`` to every frame, ``frame_chunk`` frames at a time under ``lax.map``."""
    if frame_chunk < 1:
        raise ValueError(f"frame_chunk must be ≥ 1, got {frame_chunk}")
    b, t = video.shape[:2]
    frames = video.reshape(b * t, *video.shape[2:])
    chunk = min(frame_chunk, b * t)
    count = math.ceil(b * t / chunk)
    pad = count * chunk - b * t  # zero frames, decoded and dropped: one compiled chunk shape
    frames = jnp.pad(frames, ((0, pad),) + ((0, 0),) * (frames.ndim - 1))
    out = jax.lax.map(fn, frames.reshape(count, chunk, *frames.shape[1:]))
    out = out.reshape(count * chunk, *out.shape[2:])[: b * t]
    return out.reshape(b, t, *out.shape[1:])

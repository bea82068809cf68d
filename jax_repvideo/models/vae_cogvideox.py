"""The CogVideoX causal 3D VAE (diffusers ``AutoencoderKLCogVideoX``), channels-last.

Video is ``(B, T, H, W, C)``. Module and parameter names follow the diffusers state dict
(``decoder.up_blocks.0.resnets.1.norm1.conv_y.conv``), so the converter is a short table.

* Causal convs prepend ``k_t − 1 = 2`` frames in time: copies of the first frame when there is no
  cache, else the last two input frames of the previous chunk (the *conv cache*).
* Temporal down/upsampling keeps the first frame apart when the frame count is odd
  (49 → 1 + 24 → 1 + 12 = 13 latent frames and back).
* The decoder normalises with SpatialNorm3D: ``GroupNorm(f) · conv_y(z↑) + conv_b(z↑)``.
* Like diffusers, the model runs on *chunks* of frames with the conv cache carried between them:
  8 video frames per chunk when encoding, 2 latent frames when decoding, the first chunk taking
  the remainder (13 latent frames → [0:3], [3:5], …, [11:13] → 9 + 5·8 = 49 frames). GroupNorm
  statistics are per chunk, so this chunking is part of the model's definition: a single pass over
  all 13 frames would give different frames (diffusers itself always chunks).

Runtime entry points (all functional, the conv cache is an explicit pytree):

* ``decode(model, z)``: one jit; the first chunk, then ``lax.scan`` over the 2-frame chunks.
* ``decode_stream(model, z, chunks_per_call)``: the same chunks, ``chunks_per_call`` at a time, the
  cache carried between calls and each block of frames handed to the host, so device memory does
  not grow with the number of frames. ``decode_start`` / ``decode_continue`` are its two steps, for
  callers that produce latents as they go (a FIFO generator carrying the cache in its state).
* ``decode_tiled(model, z, tiling)``: spatial tiles decoded as above and cross-faded (diffusers'
  ``enable_tiling``).
* ``encode(model, x)`` → ``(mean, logvar)``; ``scale_latents`` / ``unscale_latents`` apply the
  diffusion-side ``scaling_factor``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_repvideo.models.layers import GroupNorm

LOGVAR_RANGE = (-30.0, 20.0)
DECODE_CHUNK = 2   # latent frames per decoder call (diffusers' num_latent_frames_batch_size)
ENCODE_CHUNK = 8   # video frames per encoder call (num_sample_frames_batch_size)

Cache = Any  # nested dict of (B, 2, H, W, C) arrays, or None before the first chunk


@dataclasses.dataclass(frozen=True)
class CogVideoXVAEConfig:
    """``AutoencoderKLCogVideoX`` config fields (defaults: THUDM/CogVideoX-2b ``vae/config.json``)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        levels = int(round(math.log2(self.temporal_compression_ratio)))
        if 2 ** levels != self.temporal_compression_ratio or levels >= len(self.block_out_channels):
            raise ValueError(f"CogVideoXVAEConfig.temporal_compression_ratio: {self.temporal_compression_ratio} must "
                             f"be a power of 2 below 2**{len(self.block_out_channels)}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def time_levels(self) -> int:
        return int(round(math.log2(self.temporal_compression_ratio)))


# Diffusers config keys that must hold these values for this port to be exact.
_FIXED_DIFFUSERS_KEYS = {"act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False,
                         "shift_factor": None, "latents_mean": None, "latents_std": None,
                         "invert_scale_latents": False}


def config_from_diffusers(data: Mapping[str, Any], **overrides) -> CogVideoXVAEConfig:
    """Our config from a diffusers ``vae/config.json`` dict; unsupported settings raise."""
    for key, want in _FIXED_DIFFUSERS_KEYS.items():
        if key in data and data[key] != want:
            raise ValueError(f"vae config: {key}={data[key]!r} is not supported (only {want!r})")
    for key in ("down_block_types", "up_block_types"):
        kinds = set(data.get(key, ()))
        if kinds - {"CogVideoXDownBlock3D", "CogVideoXUpBlock3D"}:
            raise ValueError(f"vae config: {key}={data[key]!r} is not supported")
    fields = {f.name for f in dataclasses.fields(CogVideoXVAEConfig)} - {"dtype", "param_dtype"}
    values = {k: v for k, v in data.items() if k in fields}
    values["block_out_channels"] = tuple(values.get("block_out_channels", CogVideoXVAEConfig.block_out_channels))
    if "temporal_compression_ratio" in values:
        values["temporal_compression_ratio"] = int(values["temporal_compression_ratio"])
    values.update(overrides)
    return CogVideoXVAEConfig(**values)


# ---------------------------------------------------------------- building blocks
def _sub(cache: Cache, name: str | int) -> Cache:
    return None if cache is None else cache[name]


class CausalConv3d(nnx.Module):
    """3D conv, zero padding in space, causal in time (first-frame copies or the conv cache)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.time_pad = kernel - 1
        pad = kernel // 2
        self.conv = nnx.Conv(cin, cout, (kernel,) * 3, padding=((0, 0), (pad, pad), (pad, pad)),
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        if not self.time_pad:
            return self.conv(x), None
        before = cache if cache is not None else jnp.repeat(x[:, :1], self.time_pad, axis=1)
        x = jnp.concatenate([before.astype(x.dtype), x], axis=1)
        return self.conv(x), x[:, -self.time_pad:]


def _resize_latent(z: jax.Array, size: tuple[int, int, int]) -> jax.Array:
    """Nearest resize of ``z`` to ``(T, H, W)``; for odd ``T > 1`` the first frame maps apart."""
    (zt, zh, zw), (t, h, w) = z.shape[1:4], size
    if t > 1 and t % 2 == 1:
        t_index = np.concatenate([[0], 1 + np.arange(t - 1) * (zt - 1) // (t - 1)])
    else:
        t_index = np.arange(t) * zt // t
    z = jnp.take(z, t_index, axis=1)
    z = jnp.take(z, np.arange(h) * zh // h, axis=2)
    return jnp.take(z, np.arange(w) * zw // w, axis=3)


class SpatialNorm3D(nnx.Module):
    def __init__(self, channels: int, zq_channels: int, groups: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.norm_layer = GroupNorm(groups, channels, eps=1e-6, param_dtype=param_dtype)
        self.conv_y = CausalConv3d(zq_channels, channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_b = CausalConv3d(zq_channels, channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
        zq = _resize_latent(zq, f.shape[1:4]).astype(f.dtype)
        return self.norm_layer(f) * self.conv_y(zq)[0] + self.conv_b(zq)[0]


class ResnetBlock3D(nnx.Module):
    """GroupNorm (or SpatialNorm3D when ``zq_channels``) → SiLU → causal conv, twice, plus a shortcut."""

    def __init__(self, cin: int, cout: int, *, groups: int, eps: float, zq_channels: int | None,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if zq_channels is None:
            self.norm1 = GroupNorm(groups, cin, eps=eps, param_dtype=param_dtype)
            self.norm2 = GroupNorm(groups, cout, eps=eps, param_dtype=param_dtype)
        else:
            self.norm1 = SpatialNorm3D(cin, zq_channels, groups, **kw)
            self.norm2 = SpatialNorm3D(cout, zq_channels, groups, **kw)
        self.conv1 = CausalConv3d(cin, cout, 3, **kw)
        self.conv2 = CausalConv3d(cout, cout, 3, **kw)
        self.conv_shortcut = nnx.Conv(cin, cout, (1, 1, 1), **kw) if cin != cout else None

    def _norm(self, norm, x, zq):
        return norm(x) if zq is None else norm(x, zq)

    def __call__(self, x: jax.Array, zq: jax.Array | None, cache: Cache) -> tuple[jax.Array, Cache]:
        h = jax.nn.silu(self._norm(self.norm1, x, zq))
        h, c1 = self.conv1(h, _sub(cache, "conv1"))
        h = jax.nn.silu(self._norm(self.norm2, h, zq))
        h, c2 = self.conv2(h, _sub(cache, "conv2"))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x, {"conv1": c1, "conv2": c2}


def _per_frame(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    b, t = x.shape[:2]
    y = conv(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class Downsample3D(nnx.Module):
    """Optional 2× average pool in time (first frame apart when odd), then a stride-2 3×3 conv per frame."""

    def __init__(self, channels: int, compress_time: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.compress_time = compress_time
        # diffusers pads (right 1, bottom 1) then convolves unpadded with stride 2.
        self.conv = nnx.Conv(channels, channels, (3, 3), strides=2, padding=((0, 1), (0, 1)),
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.compress_time:
            first, rest = (x[:, :1], x[:, 1:]) if x.shape[1] % 2 else (x[:, :0], x)
            if rest.shape[1]:
                b, t, h, w, c = rest.shape
                rest = rest.reshape(b, t // 2, 2, h, w, c).mean(axis=2)
            x = jnp.concatenate([first, rest], axis=1)
        return _per_frame(self.conv, x)


class Upsample3D(nnx.Module):
    """Nearest 2× in space (and in time when ``compress_time``, first frame apart when odd), then a 3×3 conv."""

    def __init__(self, channels: int, compress_time: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.compress_time = compress_time
        self.conv = nnx.Conv(channels, channels, (3, 3), padding=((1, 1), (1, 1)),
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        t = x.shape[1]
        if self.compress_time and t > 1:
            first, rest = (x[:, :1], x[:, 1:]) if t % 2 else (x[:, :0], x)
            x = jnp.concatenate([first, jnp.repeat(rest, 2, axis=1)], axis=1)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return _per_frame(self.conv, x)


class _Stage(nnx.Module):
    """A run of resnets with an optional down- or upsampler after them (diffusers' Down/Up/MidBlock3D)."""

    def __init__(self, cin: int, cout: int, num_layers: int, *, zq_channels, sampler, groups, eps,
                 dtype, param_dtype, rngs):
        self.resnets = nnx.List([
            ResnetBlock3D(cin if i == 0 else cout, cout, groups=groups, eps=eps, zq_channels=zq_channels,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for i in range(num_layers)])
        if sampler is not None:
            name, compress_time = sampler
            cls = Downsample3D if name == "down" else Upsample3D
            setattr(self, f"{name}samplers", nnx.List([
                cls(cout, compress_time, dtype=dtype, param_dtype=param_dtype, rngs=rngs)]))

    def __call__(self, x, zq, cache):
        new = {}
        for i, resnet in enumerate(self.resnets):
            x, new[i] = resnet(x, zq, _sub(cache, i))
        for name in ("downsamplers", "upsamplers"):
            if hasattr(self, name):
                x = getattr(self, name)[0](x)
        return x, new


class Encoder3D(nnx.Module):
    def __init__(self, cfg: CogVideoXVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chans = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0], 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            _Stage(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, zq_channels=None,
                   sampler=None if i == len(chans) - 1 else ("down", i < cfg.time_levels), **kw)
            for i in range(len(chans))])
        self.mid_block = _Stage(chans[-1], chans[-1], 2, zq_channels=None, sampler=None, **kw)
        self.norm_out = GroupNorm(cfg.norm_num_groups, chans[-1], eps=1e-6, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(chans[-1], 2 * cfg.latent_channels, 3,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        new = {}
        h, new["conv_in"] = self.conv_in(x, _sub(cache, "conv_in"))
        for i, block in enumerate(self.down_blocks):
            h, new[f"down_{i}"] = block(h, None, _sub(cache, f"down_{i}"))
        h, new["mid"] = self.mid_block(h, None, _sub(cache, "mid"))
        h, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(h)), _sub(cache, "conv_out"))
        return h, new


class Decoder3D(nnx.Module):
    def __init__(self, cfg: CogVideoXVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        zq = cfg.latent_channels
        kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chans = tuple(reversed(cfg.block_out_channels))
        self.conv_in = CausalConv3d(zq, chans[0], 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mid_block = _Stage(chans[0], chans[0], 2, zq_channels=zq, sampler=None, **kw)
        self.up_blocks = nnx.List([
            _Stage(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1, zq_channels=zq,
                   sampler=None if i == len(chans) - 1 else ("up", i < cfg.time_levels), **kw)
            for i in range(len(chans))])
        self.norm_out = SpatialNorm3D(chans[-1], zq, cfg.norm_num_groups,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = CausalConv3d(chans[-1], cfg.out_channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, z: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        new = {}
        h, new["conv_in"] = self.conv_in(z, _sub(cache, "conv_in"))
        h, new["mid"] = self.mid_block(h, z, _sub(cache, "mid"))
        for i, block in enumerate(self.up_blocks):
            h, new[f"up_{i}"] = block(h, z, _sub(cache, f"up_{i}"))
        h = jax.nn.silu(self.norm_out(h, z))
        h, new["conv_out"] = self.conv_out(h, _sub(cache, "conv_out"))
        return h, new


class CogVideoXVAE(nnx.Module):
    def __init__(self, config: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.encoder = Encoder3D(config, **kw)
        self.decoder = Decoder3D(config, **kw)


# ---------------------------------------------------------------- chunking
def first_chunk_length(num_frames: int, chunk: int) -> int:
    """diffusers' rule: ``max(T // chunk, 1)`` chunks, the first one taking the remainder."""
    return num_frames - chunk * (max(num_frames // chunk, 1) - 1)


def decoded_frames(num_latent_frames: int, temporal_compression_ratio: int = 4) -> int:
    """Video frames that ``num_latent_frames`` decode to, chunk by chunk (13 → 49)."""
    def one(t):
        return t if t == 1 else (1 + (t - 1) * temporal_compression_ratio if t % 2 else t * temporal_compression_ratio)
    first = first_chunk_length(num_latent_frames, DECODE_CHUNK)
    return one(first) + (num_latent_frames - first) // DECODE_CHUNK * one(DECODE_CHUNK)


def _check_latents(model: CogVideoXVAE, z) -> None:
    channels = model.config.latent_channels
    if getattr(z, "ndim", 0) != 5:
        raise ValueError(f"CogVideoX VAE decode: latents must be (B, T, h, w, {channels}), got shape "
                         f"{getattr(z, 'shape', None)}")
    if z.shape[-1] != channels:
        raise ValueError(f"CogVideoX VAE decode: latents have {z.shape[-1]} channels in the last axis, the VAE "
                         f"takes {channels} (layout (B, T, h, w, C); transpose (B, C, T, h, w) latents first)")


def _scan_chunks(step, cache, x: jax.Array, chunk: int):
    """``lax.scan`` of ``step(x_chunk, cache) → (y, cache)`` over equal time chunks of ``x``."""
    b, t = x.shape[:2]
    xs = jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)

    def body(carry, xc):
        y, carry = step(xc, carry)
        return carry, y

    cache, ys = jax.lax.scan(body, cache, xs)
    ys = jnp.swapaxes(ys, 0, 1)
    return ys.reshape(b, -1, *ys.shape[3:]), cache


def _run_chunked(step, x: jax.Array, chunk: int):
    first = first_chunk_length(x.shape[1], chunk)
    y, cache = step(x[:, :first], None)
    if x.shape[1] > first:
        rest, cache = _scan_chunks(step, cache, x[:, first:], chunk)
        y = jnp.concatenate([y, rest], axis=1)
    return y, cache


@functools.partial(jax.jit, static_argnums=0)
def _decode_jit(graphdef, state, z):
    model = nnx.merge(graphdef, state)
    return _run_chunked(model.decoder, z.astype(model.config.dtype), DECODE_CHUNK)[0]


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(graphdef, state, x):
    model = nnx.merge(graphdef, state)
    moments = _run_chunked(model.encoder, x.astype(model.config.dtype), ENCODE_CHUNK)[0]
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


@functools.partial(jax.jit, static_argnums=0)
def _decode_first_jit(graphdef, state, z):
    model = nnx.merge(graphdef, state)
    return model.decoder(z.astype(model.config.dtype), None)


@functools.partial(jax.jit, static_argnums=0)
def _decode_segment_jit(graphdef, state, cache, z):
    model = nnx.merge(graphdef, state)
    return _scan_chunks(model.decoder, cache, z.astype(model.config.dtype), DECODE_CHUNK)


def decode(model: CogVideoXVAE, z: jax.Array) -> jax.Array:
    """VAE latents ``(B, T, h, w, C)`` (unscaled) → frames ``(B, T', H, W, 3)`` in [-1, 1], one jit."""
    _check_latents(model, z)
    graphdef, state = nnx.split(model)
    return _decode_jit(graphdef, state, jnp.asarray(z))


def decode_start(model: CogVideoXVAE, z) -> tuple[jax.Array, Cache]:
    """Decodes the first chunk (1 to 3 latent frames, no cache) → ``(frames, conv cache)``."""
    _check_latents(model, z)
    graphdef, state = nnx.split(model)
    return _decode_first_jit(graphdef, state, jnp.asarray(z))


def decode_continue(model: CogVideoXVAE, cache: Cache, z) -> tuple[jax.Array, Cache]:
    """Decodes the next latent frames (an even count, 2 per chunk) after ``cache`` → ``(frames, cache)``."""
    _check_latents(model, z)
    if z.shape[1] % DECODE_CHUNK:
        raise ValueError(f"CogVideoX VAE decode_continue: {z.shape[1]} latent frames; after the first chunk "
                         f"frames come in chunks of {DECODE_CHUNK}")
    graphdef, state = nnx.split(model)
    return _decode_segment_jit(graphdef, state, cache, jnp.asarray(z))


def decode_stream(model: CogVideoXVAE, z, chunks_per_call: int = 4) -> Iterator[np.ndarray]:
    """Yields the frames of ``decode(model, z)`` block by block as host arrays.

    Each call decodes ``chunks_per_call`` 2-frame latent chunks under ``lax.scan`` and carries the
    conv cache to the next call; a short last block is padded with repeats (the conv is causal, so
    padding after the end changes nothing before it) and trimmed, so there are two compiles in all.
    """
    _check_latents(model, z)
    if chunks_per_call < 1:
        raise ValueError(f"decode_stream: chunks_per_call must be ≥ 1, got {chunks_per_call}")
    z = np.asarray(z)
    first = first_chunk_length(z.shape[1], DECODE_CHUNK)
    frames, cache = decode_start(model, z[:, :first])
    yield np.asarray(frames)
    per_chunk = decoded_frames(DECODE_CHUNK, model.config.temporal_compression_ratio)
    step = DECODE_CHUNK * chunks_per_call
    for start in range(first, z.shape[1], step):
        block = z[:, start:start + step]
        valid = block.shape[1] // DECODE_CHUNK
        if block.shape[1] < step:
            pad = np.repeat(block[:, -1:], step - block.shape[1], axis=1)
            block = np.concatenate([block, pad], axis=1)
        frames, cache = decode_continue(model, cache, block)
        yield np.asarray(frames[:, :valid * per_chunk])


def encode(model: CogVideoXVAE, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Frames ``(B, T, H, W, 3)`` in [-1, 1] → posterior ``(mean, logvar)`` (unscaled VAE latents)."""
    if getattr(x, "ndim", 0) != 5 or x.shape[-1] != model.config.in_channels:
        raise ValueError(f"CogVideoX VAE encode: frames must be (B, T, H, W, {model.config.in_channels}), "
                         f"got shape {getattr(x, 'shape', None)}")
    factor = model.config.spatial_factor
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(f"CogVideoX VAE encode: height and width must be multiples of {factor}, got {x.shape[2:4]}")
    graphdef, state = nnx.split(model)
    return _encode_jit(graphdef, state, jnp.asarray(x))


def scale_latents(model: CogVideoXVAE, z: jax.Array) -> jax.Array:
    """VAE latents → the diffusion model's latents (``× scaling_factor``)."""
    return z * model.config.scaling_factor


def unscale_latents(model: CogVideoXVAE, z: jax.Array) -> jax.Array:
    """The diffusion model's latents → VAE latents for ``decode`` (``/ scaling_factor``)."""
    return z / model.config.scaling_factor


# ---------------------------------------------------------------- spatial tiling
@dataclasses.dataclass(frozen=True)
class Tiling:
    """diffusers ``enable_tiling`` settings; the defaults are those of a 480×720 VAE."""

    tile_sample_min_height: int = 240
    tile_sample_min_width: int = 360
    tile_overlap_factor_height: float = 1 / 6
    tile_overlap_factor_width: float = 1 / 5


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> np.ndarray:
    """Linear cross-fade of the last ``extent`` rows of ``a`` into the first of ``b`` along ``axis``."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    weight = (np.arange(extent, dtype=np.float32) / extent).reshape([-1 if d == axis else 1 for d in range(b.ndim)])
    b = b.copy()
    head = [slice(None)] * b.ndim
    head[axis] = slice(0, extent)
    tail = [slice(None)] * b.ndim
    tail[axis] = slice(a.shape[axis] - extent, a.shape[axis])
    b[tuple(head)] = a[tuple(tail)] * (1 - weight) + b[tuple(head)] * weight
    return b


def decode_tiled(model: CogVideoXVAE, z, tiling: Tiling = Tiling()) -> np.ndarray:
    """``decode`` over overlapping spatial tiles, blended as diffusers' ``tiled_decode`` does."""
    _check_latents(model, z)
    factor = model.config.spatial_factor
    tile_h = int(tiling.tile_sample_min_height / factor)
    tile_w = int(tiling.tile_sample_min_width / factor)
    z = np.asarray(z)
    height, width = z.shape[2:4]
    if height <= tile_h and width <= tile_w:
        return np.asarray(decode(model, z))
    stride_h = int(tile_h * (1 - tiling.tile_overlap_factor_height))
    stride_w = int(tile_w * (1 - tiling.tile_overlap_factor_width))
    blend_h = int(tiling.tile_sample_min_height * tiling.tile_overlap_factor_height)
    blend_w = int(tiling.tile_sample_min_width * tiling.tile_overlap_factor_width)
    keep_h = tiling.tile_sample_min_height - blend_h
    keep_w = tiling.tile_sample_min_width - blend_w
    rows = [[np.asarray(decode(model, z[:, :, i:i + tile_h, j:j + tile_w])) for j in range(0, width, stride_w)]
            for i in range(0, height, stride_h)]
    # Each tile is blended with its (already blended) upper and left neighbours, then cropped.
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend(rows[i - 1][j], row[j], blend_h, axis=2)
            if j > 0:
                row[j] = _blend(row[j - 1], row[j], blend_w, axis=3)
    return np.concatenate([np.concatenate([t[:, :, :keep_h, :keep_w] for t in row], axis=3) for row in rows], axis=2)

"""The VideoCrafter2 t2v-512 v2.0 3D U-Net (LVDM ``openaimodel3d.UNetModel``) in Flax NNX.

Spec: ``specs/fifo_videocrafter2_qcache.md`` §2.3–2.10 and §3. Differences from the original, all
deliberate: channels-last ``(B, T, H, W, C)`` video, timesteps always per frame ``(B, T)`` for any
batch (the FIFO fork handles only B = 1), optionally a per-frame text context ``(B, T, L, D)``,
and the Q-cache capture/apply points in the temporal transformers.

The module tree mirrors the PyTorch one (``input_blocks.<i>.<j>``, ``init_attn.0``,
``middle_block.<j>``, ``output_blocks.<i>.<j>``), so Q-cache maps and intermediates use the
original module paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_repvideo import caches
from jax_repvideo.caches import QCacheConfig
from jax_repvideo.models.layers import GroupNorm, linear, timestep_embedding
from jax_repvideo.models.unet_blocks import (Downsample, KeySource, ResBlock, SpatialTransformer, TemporalTransformer,
                                             Upsample, _conv)


@dataclass(frozen=True)
class UNet3DConfig:
    """Constructor arguments of LVDM ``UNetModel`` (defaults = VideoCrafter2 t2v 512 v2.0).

    ``use_checkpoint`` (gradient checkpointing) and ``dropout`` (identity in eval mode) do not change
    values. ``temporal_transformer_depth`` is accepted but unused, exactly as in the original
    constructor (temporal transformers take ``transformer_depth``).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    use_linear: bool = True
    use_checkpoint: bool = True
    temporal_conv: bool = True
    temporal_attention: bool = True
    temporal_selfatt_only: bool = True
    use_relative_position: bool = False
    use_causal_attention: bool = False
    temporal_length: int | None = 16
    addition_attention: bool = True
    fps_cond: bool = True
    dropout: float = 0.0
    conv_resample: bool = True
    dims: int = 2
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    num_heads: int = -1
    tempspatial_aware: bool = False
    use_fp16: bool = False
    use_image_attention: bool = False
    temporal_transformer_depth: int = 1


# ------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class LayerSpec:
    """One sub-module of a U-Net block: ``kind`` in conv_in/res/spatial/temporal/down/up."""

    kind: str
    channels: int  # output channels (= input channels except for res and conv_in)
    in_channels: int
    ds: int  # downsampling factor of the feature map this layer works on
    heads: int = 0
    dim_head: int = 0


def _heads(cfg: UNet3DConfig, channels: int) -> tuple[int, int]:
    if cfg.num_head_channels == -1:
        return cfg.num_heads, channels // cfg.num_heads
    return channels // cfg.num_head_channels, cfg.num_head_channels


def _attention_layers(cfg: UNet3DConfig, ch: int, ds: int) -> list[LayerSpec]:
    heads, dim_head = _heads(cfg, ch)
    layers = [LayerSpec("spatial", ch, ch, ds, heads, dim_head)]
    if cfg.temporal_attention:
        layers.append(LayerSpec("temporal", ch, ch, ds, heads, dim_head))
    return layers


def unet_layout(cfg: UNet3DConfig) -> dict[str, list[list[LayerSpec]]]:
    """The block structure the original constructor builds (spec §2.5), as data."""
    mc = cfg.model_channels
    inputs = [[LayerSpec("conv_in", mc, cfg.in_channels, 1)]]
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            block = [LayerSpec("res", mult * mc, ch, ds)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                block += _attention_layers(cfg, ch, ds)
            inputs.append(block)
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            inputs.append([LayerSpec("down", ch, ch, ds)])
            chans.append(ch)
            ds *= 2
    middle = [LayerSpec("res", ch, ch, ds), *_attention_layers(cfg, ch, ds), LayerSpec("res", ch, ch, ds)]
    outputs = []
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
        for i in range(cfg.num_res_blocks + 1):
            block = [LayerSpec("res", mult * mc, ch + chans.pop(), ds)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                block += _attention_layers(cfg, ch, ds)
            if level and i == cfg.num_res_blocks:
                block.append(LayerSpec("up", ch, ch, ds))
                ds //= 2
            outputs.append(block)
    init = [LayerSpec("temporal", mc, mc, 1, 8, cfg.num_head_channels)] if cfg.addition_attention else []
    return {"input_blocks": inputs, "init_attn": [init] if init else [], "middle_block": [middle],
            "output_blocks": outputs}


def temporal_transformers(cfg: UNet3DConfig) -> dict[str, LayerSpec]:
    """Path → spec of every TemporalTransformer, in execution order."""
    layout = unet_layout(cfg)
    out = {}
    for group in ("input_blocks", "init_attn", "middle_block", "output_blocks"):
        for i, block in enumerate(layout[group]):
            for j, spec in enumerate(block):
                if spec.kind == "temporal":
                    name = group if group in ("init_attn", "middle_block") else f"{group}.{i}"
                    out[f"{name}.{j}"] = spec
    return dict(sorted(out.items(), key=lambda kv: _execution_rank(kv[0])))


def _execution_rank(path: str) -> tuple[int, int]:
    # init_attn runs right after input_blocks.0, which holds no temporal transformer
    group, index = path.split(".")[:2]
    rank = {"init_attn": 0, "input_blocks": 1, "middle_block": 2, "output_blocks": 3}[group]
    return (rank, int(index) if group in ("input_blocks", "output_blocks") else 0)


# -------------------------------------------------------------------------------------- validation
def validate_config(cfg: UNet3DConfig) -> None:
    """Refuses options this port does not implement, naming them (no silent fallback)."""
    refused = {
        "dims": (cfg.dims != 2, "only dims=2 (2-D spatial convs, as in every LVDM video model)"),
        "use_scale_shift_norm": (cfg.use_scale_shift_norm, "scale-shift ResBlocks are not implemented"),
        "resblock_updown": (cfg.resblock_updown, "ResBlock up/down-sampling is not implemented"),
        "conv_resample": (not cfg.conv_resample, "only conv_resample=true (conv down/upsampling)"),
        "use_image_attention": (cfg.use_image_attention, "image cross-attention (I2V) is not implemented"),
        "temporal_selfatt_only": (not cfg.temporal_selfatt_only,
                                  "temporal cross-attention to text is not implemented"),
        "use_fp16": (cfg.use_fp16, "use the dtype / param_dtype arguments instead of use_fp16"),
    }
    bad = [f"{name} ({why})" for name, (is_bad, why) in refused.items() if is_bad]
    if bad:
        raise ValueError("UNet3DConfig: unsupported option(s): " + "; ".join(bad))
    if cfg.num_head_channels == -1 and cfg.num_heads <= 0:
        raise ValueError("UNet3DConfig: set num_head_channels or num_heads")
    if cfg.addition_attention and cfg.num_head_channels <= 0:
        raise ValueError("UNet3DConfig: addition_attention (init_attn) needs num_head_channels > 0")
    if (cfg.use_causal_attention or cfg.use_relative_position) and not cfg.temporal_length:
        raise ValueError("UNet3DConfig: use_causal_attention / use_relative_position need temporal_length")
    for mult in cfg.channel_mult:
        if (mult * cfg.model_channels) % 32:
            raise ValueError(f"UNet3DConfig: {mult}×model_channels is not divisible by 32 (GroupNorm groups)")
        heads, dim_head = _heads(cfg, mult * cfg.model_channels)
        if heads * dim_head != mult * cfg.model_channels:
            raise ValueError(f"UNet3DConfig: {mult * cfg.model_channels} channels do not split into heads")


def validate_qcache(cfg: UNet3DConfig, qcache: QCacheConfig) -> None:
    """Every map entry: target and source are temporal transformers, the source runs earlier, and
    both have the same query width and feature-map size."""
    tts = temporal_transformers(cfg)
    order = list(tts)
    for target, source in qcache.map.items():
        for path in (target, source):
            if path not in tts:
                raise ValueError(f"Q-cache map: {path!r} is not a temporal transformer of this U-Net "
                                 f"(those are {', '.join(order)})")
        if order.index(source) >= order.index(target):
            raise ValueError(f"Q-cache map: source {source} must run before target {target}")
        s, t = tts[source], tts[target]
        if (s.heads * s.dim_head, s.ds) != (t.heads * t.dim_head, t.ds):
            raise ValueError(f"Q-cache map: {source} (width {s.heads * s.dim_head}, ds {s.ds}) does not "
                             f"match {target} (width {t.heads * t.dim_head}, ds {t.ds})")


def validate_inputs(cfg: UNet3DConfig, x_shape, t_shape, context_shape, *, timesteps: Any = None) -> None:
    """Raises ValueError for inputs the U-Net cannot take, before anything compiles.

    ``x`` is ``(B, T, H, W, in_channels)``; ``timesteps`` is ``(B, T)`` (or ``(B,)`` / scalar for
    one timestep per video); ``context`` is ``(B, L, context_dim)`` or per frame
    ``(B, T, L, context_dim)``. Concrete timestep values must lie in [0, 999].
    """
    if len(x_shape) != 5 or x_shape[-1] != cfg.in_channels:
        raise ValueError(f"x must be (B, T, H, W, {cfg.in_channels}) channels-last, got {tuple(x_shape)}")
    b, t, h, w, _ = x_shape
    factor = 2 ** (len(cfg.channel_mult) - 1)
    if h % factor or w % factor:
        raise ValueError(f"latent H×W = {h}×{w} must be divisible by 2^(levels-1) = {factor}")
    if tuple(t_shape) not in ((b, t), (b,), ()):
        raise ValueError(f"timesteps must have shape (B, T) = {(b, t)} (or (B,) / scalar), got {tuple(t_shape)}")
    ctx = tuple(context_shape)
    if ctx[:1] != (b,) or len(ctx) not in (3, 4) or (len(ctx) == 4 and ctx[1] != t):
        raise ValueError(f"context must be (B, L, D) or per frame (B, T, L, D) with B={b}, T={t}; got {ctx}")
    if ctx[-1] != cfg.context_dim:
        raise ValueError(f"context width {ctx[-1]} does not match context_dim {cfg.context_dim}")
    if cfg.use_causal_attention and t > cfg.temporal_length:
        raise ValueError(f"causal temporal attention covers at most temporal_length={cfg.temporal_length} "
                         f"frames, got T={t}")
    values = _concrete(timesteps)
    if values is not None and values.size:
        if values.min() < 0 or values.max() > 999:
            raise ValueError(f"timesteps must lie in [0, 999], got min {values.min()} max {values.max()}")


def _concrete(x) -> np.ndarray | None:
    """``x`` as numpy when its values are known (not inside a trace); else None."""
    if x is None:
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


# ------------------------------------------------------------------------------------------- model
def frame_context(context: jax.Array, frames: int) -> jax.Array:
    """``(B, L, D)`` (one prompt per video) or ``(B, T, L, D)`` (one per frame) → ``(B·T, L, D)``,
    rows ordered (b, t) like the frame-wise features."""
    if context.ndim == 3:
        context = jnp.repeat(context, frames, axis=0)
    return context.reshape(-1, *context.shape[-2:])


class _EmbedMLP(nnx.Module):
    def __init__(self, cin, cout, *, dtype, param_dtype, rngs):
        self.linear_1 = linear(cin, cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = linear(cout, cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(nnx.silu(self.linear_1(x)))


class UNet3D(nnx.Module):
    """VideoCrafter2 3D U-Net on channels-last latents with per-frame timesteps and the Q-cache."""

    def __init__(self, config: UNet3DConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_backend: str = "auto"):
        validate_config(config)
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=KeySource(rngs.params()))
        mc, emb_dim = config.model_channels, 4 * config.model_channels
        self.time_embed = _EmbedMLP(mc, emb_dim, **kw)
        self.fps_embedding = _EmbedMLP(mc, emb_dim, **kw) if config.fps_cond else None

        def make(spec: LayerSpec):
            if spec.kind == "conv_in":
                return _conv(spec.in_channels, spec.channels, (3, 3), **kw)
            if spec.kind == "res":
                return ResBlock(spec.in_channels, emb_dim, spec.channels, temporal_conv=config.temporal_conv,
                                spatial_aware=config.tempspatial_aware, **kw)
            if spec.kind == "spatial":
                return SpatialTransformer(spec.channels, spec.heads, spec.dim_head, config.transformer_depth,
                                          config.context_dim, backend=attention_backend, **kw)
            if spec.kind == "temporal":
                relative = config.temporal_length if config.use_relative_position else 0
                return TemporalTransformer(spec.channels, spec.heads, spec.dim_head, config.transformer_depth,
                                           causal=config.use_causal_attention, relative_length=relative,
                                           backend=attention_backend, **kw)
            return (Downsample if spec.kind == "down" else Upsample)(spec.channels, **kw)

        layout = unet_layout(config)
        blocks = {g: nnx.List([nnx.List([make(s) for s in block]) for block in layout[g]]) for g in layout}
        self.input_blocks = blocks["input_blocks"]
        self.init_attn = blocks["init_attn"][0] if layout["init_attn"] else None
        self.middle_block = blocks["middle_block"][0]
        self.output_blocks = blocks["output_blocks"]
        self.out_norm = GroupNorm(32, mc, eps=1e-5, param_dtype=param_dtype)
        self.out_conv = _conv(mc, config.out_channels, (3, 3), **kw)

    def __call__(self, x, timesteps, context, fps, qcache: QCacheConfig | None = None, return_qcache: bool = False,
                 *, qcache_weights: jax.Array | None = None, return_intermediates: bool = False):
        """ε prediction ``(B, T, H, W, out_channels)`` for latents ``x`` ``(B, T, H, W, in_channels)``.

        ``timesteps`` (B, T) per frame; ``context`` (B, L, D) or (B, T, L, D); ``fps`` (B,) or scalar.
        ``qcache`` enables the Q-cache; ``qcache_weights`` (B, T) overrides its v(t) schedule.
        Returns ``out``, then the captured encoder queries ``{path: (B·H·W, T, C)}`` if
        ``return_qcache``, then a dict of intermediate activations if ``return_intermediates``.
        """
        cfg = self.config
        validate_inputs(cfg, x.shape, jnp.shape(timesteps), jnp.shape(context), timesteps=timesteps)
        b, t, hgt, wid, _ = x.shape
        steps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (b, -1) if jnp.ndim(timesteps) else (1, 1)),
                                 (b, t))
        inter: dict[str, jax.Array] = {}
        emb = self._embedding(steps, fps, b, inter).reshape(b * t, -1)
        context = frame_context(context, t).astype(self.dtype)

        mix = None
        if qcache is not None and qcache.enabled:
            validate_qcache(cfg, qcache)
            v = caches.qcache_weights(qcache, steps) if qcache_weights is None else qcache_weights
            mix = (qcache.map, jnp.broadcast_to(jnp.asarray(v, jnp.float32), (b, t)))
        run = _BlockRunner(b, emb, context, mix)

        h = x.astype(self.dtype).reshape(b * t, hgt, wid, -1)
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = inter[f"h_in_{i}"] = run(f"input_blocks.{i}", block, h)
            if i == 0 and self.init_attn is not None:
                h = inter["h_init_attn"] = run("init_attn", self.init_attn, h)
            skips.append(h)
        h = inter["h_mid"] = run("middle_block", self.middle_block, h)
        for i, block in enumerate(self.output_blocks):
            h = inter[f"h_out_{i}"] = run(f"output_blocks.{i}", block, jnp.concatenate([h, skips.pop()], -1))
        out = self.out_conv(nnx.silu(self.out_norm(h))).reshape(b, t, hgt, wid, -1).astype(x.dtype)

        results = [out]
        if return_qcache:
            results.append({k: q for k, q in run.queries.items() if not k.startswith("output_blocks")})
        if return_intermediates:
            inter.update({f"q/{k}.transformer_blocks.0.attn1.to_q": q for k, q in run.queries.items()})
            results.append(inter)
        return results[0] if len(results) == 1 else tuple(results)

    def _embedding(self, steps, fps, b, inter):
        mc = self.config.model_channels
        emb = self.time_embed(timestep_embedding(steps, mc).astype(self.dtype))  # (B, T, E)
        inter["time_embed_out"] = emb
        if self.fps_embedding is not None:
            if fps is None or jnp.shape(fps) not in ((), (b,)):
                got = None if fps is None else jnp.shape(fps)
                raise ValueError(f"fps must be a scalar or of shape ({b},) when fps_cond is set, got {got}")
            fps = jnp.broadcast_to(jnp.asarray(fps), (b,))
            fps_emb = self.fps_embedding(timestep_embedding(fps, mc).astype(self.dtype))  # (B, E)
            inter["fps_embedding_out"] = fps_emb
            emb = emb + fps_emb[:, None, :]
        return emb


class _BlockRunner:
    """Runs one block (a list of layers) the way LVDM's TimestepEmbedSequential does, recording
    every temporal transformer's attn1 query and applying the Q-cache map."""

    def __init__(self, batch, emb, context, mix):
        self.batch, self.emb, self.context, self.mix = batch, emb, context, mix
        self.queries: dict[str, jax.Array] = {}

    def __call__(self, name, block, h):
        for j, layer in enumerate(block):
            if isinstance(layer, ResBlock):
                h = layer(h, self.emb, self.batch)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, self.context)
            elif isinstance(layer, TemporalTransformer):
                h = self._temporal(f"{name}.{j}", layer, h)
            else:
                h = layer(h)
        return h

    def _temporal(self, path, layer, h):
        q_source = v = None
        if self.mix is not None and path in self.mix[0]:
            q_source, v = self.queries[self.mix[0][path]], self.mix[1]
        out, self.queries[path] = layer(h.reshape(self.batch, -1, *h.shape[1:]), q_source=q_source, v=v)
        return out.reshape(h.shape)

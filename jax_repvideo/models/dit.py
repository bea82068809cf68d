"""CogVideoX-2B video DiT with RepVideo's cross-layer feature cache (spec §1.2, §2.3-2.4).

Text and video tokens form one joint sequence ``[text; video]``. Every block applies adaLN-zero
modulation (separate for video and text), joint attention with q/k LayerNorm, and a GELU-tanh
feed-forward on the concatenation. Layers are stacked (leading layer axis) and run by ``lax.scan``
over the split NNX state.

RepVideo's feature cache is the scan carry ``(h, window_sum, window_count)`` over the full joint
sequence. Block ``i`` gets ``g_i·(window_sum/window_count) + (1−g_i)·h``; after block ``i`` the
window restarts at ``[o_i]`` when ``i % 6 == 0`` and grows by ``o_i`` otherwise. With
``repvideo=False`` (or all gates 0) this is stock CogVideoX.

Timesteps are per frame, ``(B, T)``: the video tokens of frame ``j`` are modulated by frame ``j``'s
time embedding. Text tokens (and only they) need one embedding per sample; ``text_timestep =
"frame_mean"`` gives them the mean of the frames' time embeddings, which is exactly the shared
embedding when the row is uniform.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jax_repvideo.config import ConfigError
from jax_repvideo.models.attention import attention
from jax_repvideo.models.layers import LayerNorm, conv, linear, timestep_embedding
from jax_repvideo.models.pos_embed_3d import video_pos_embed


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """``CogVideoXTransformer3DModel`` constructor arguments (defaults = CogVideoX-2B), plus ours."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0  # inference only: accepted, never applied
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True
    # ---- not in diffusers
    final_norm_eps: float | None = None  # eps of norm_out's LayerNorm; None = norm_eps (diffusers), SAT 1e-6
    qk_norm_eps: float = 1e-6
    repvideo: bool = False  # adds the (num_layers,) gates and the feature cache
    repvideo_window: int = 6  # hard-coded in RepVideo's code
    text_timestep: Literal["frame_mean"] = "frame_mean"  # time embedding used for the text tokens

    def __post_init__(self):
        unsupported = {
            "ofs_embed_dim": self.ofs_embed_dim is not None,
            "patch_size_t": self.patch_size_t is not None,
            "use_rotary_positional_embeddings": self.use_rotary_positional_embeddings,
            "use_learned_positional_embeddings": self.use_learned_positional_embeddings,
            "activation_fn": self.activation_fn != "gelu-approximate",
            "timestep_activation_fn": self.timestep_activation_fn != "silu",
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConfigError(f"DiTConfig: {', '.join(bad)}: only the CogVideoX-2B architecture "
                              f"(sin-cos positions, no 1.5/5B features) is implemented")
        if self.inner_dim % 16:
            raise ConfigError(f"DiTConfig: num_attention_heads·attention_head_dim = {self.inner_dim} "
                              "must be divisible by 16 (3D sin-cos table)")
        if self.repvideo_window < 1:
            raise ConfigError("DiTConfig.repvideo_window must be >= 1")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def out_norm_eps(self) -> float:
        return self.norm_eps if self.final_norm_eps is None else self.final_norm_eps


# ``remat`` names → what a block keeps for the backward pass ("full": only its inputs).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def load_dit_config(path, overrides=()) -> DiTConfig:
    """A ``DiTConfig`` from a YAML preset: a run preset's ``cogvideox.transformer`` section, or the
    whole file (an architecture-only preset such as ``configs/tiny_dit.yaml``)."""
    from jax_repvideo.config import load

    return load(DiTConfig, path, overrides, section="cogvideox.transformer")


def _chunks(x: jax.Array, n: int) -> list[jax.Array]:
    return jnp.split(x, n, axis=-1)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


def frame_mean(temb: jax.Array) -> jax.Array:
    """``(B, T, E)`` → ``(B, E)``; returns frame 0 bit-exactly when all frames are equal."""
    uniform = jnp.all(temb == temb[:, :1], axis=(1, 2), keepdims=True)[:, 0]
    return jnp.where(uniform, temb[:, 0], temb.mean(axis=1))


class AdaLayerNormZero(nnx.Module):
    """diffusers' ``CogVideoXLayerNormZero``: one LayerNorm, separate video/text modulation + gates."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.inner_dim
        self.linear = linear(cfg.time_embed_dim, 6 * d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(d, eps=cfg.norm_eps, use_scale=cfg.norm_elementwise_affine,
                              use_bias=cfg.norm_elementwise_affine, param_dtype=param_dtype)

    def __call__(self, h, temb_video, temb_text, text_len: int):
        """Modulated joint sequence and its per-token gate, both ``(B, L+N, D)``, for ``h = [text; video]``.

        Text tokens take the text modulation (``c_*``, from ``temb_text`` ``(B, E)``), the video tokens of
        frame t that of ``temb_video[:, t]``. Building the modulation per token lets XLA fuse it into the
        norm; splitting and re-joining the sequence (as diffusers does) would copy it twice per block.
        """
        shift, scale, gate, _, _, _ = _chunks(self.linear(jax.nn.silu(temb_video)), 6)
        _, _, _, c_shift, c_scale, c_gate = _chunks(self.linear(jax.nn.silu(temb_text)), 6)
        per_token = functools.partial(_per_token, length=h.shape[1], text_len=text_len)
        return (_modulate(self.norm(h), per_token(c_shift, shift), per_token(c_scale, scale)),
                per_token(c_gate, gate))


def _per_token(text_vector, frame_vectors, *, length: int, text_len: int) -> jax.Array:
    """``(B, D)`` text and ``(B, T, D)`` per-frame vectors → ``(B, length, D)``, one row per token."""
    b, frames, d = frame_vectors.shape
    text = jnp.broadcast_to(text_vector[:, None], (b, text_len, d))
    video = jnp.broadcast_to(frame_vectors[:, :, None], (b, frames, (length - text_len) // frames, d))
    return jnp.concatenate([text, video.reshape(b, -1, d)], axis=1)


class JointAttention(nnx.Module):
    """Self-attention over ``[text; video]`` with per-head q/k LayerNorm (shared over heads)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype, param_dtype, backend: str, chunk: int):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.backend, self.chunk = cfg.num_attention_heads, backend, chunk
        self.to_q = linear(d, d, use_bias=cfg.attention_bias, **kw)
        self.to_k = linear(d, d, use_bias=cfg.attention_bias, **kw)
        self.to_v = linear(d, d, use_bias=cfg.attention_bias, **kw)
        self.norm_q = LayerNorm(hd, eps=cfg.qk_norm_eps, param_dtype=param_dtype)
        self.norm_k = LayerNorm(hd, eps=cfg.qk_norm_eps, param_dtype=param_dtype)
        self.to_out = linear(d, d, **kw)

    def __call__(self, s: jax.Array) -> jax.Array:
        b, length, d = s.shape
        split = lambda t: t.reshape(b, length, self.heads, d // self.heads)  # noqa: E731
        # Linear results are float32 (layers.linear); attention itself runs in the compute dtype.
        dtype = self.to_out.dtype
        q = self.norm_q(split(self.to_q(s))).astype(dtype)
        k = self.norm_k(split(self.to_k(s))).astype(dtype)
        v = split(self.to_v(s)).astype(dtype)
        out = attention(q, k, v, backend=self.backend, q_chunk=self.chunk, kv_chunk=self.chunk)
        return self.to_out(out.reshape(b, length, d))


class FeedForward(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.inner_dim
        self.proj_in = linear(d, 4 * d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_out = linear(4 * d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=True))


class DiTBlock(nnx.Module):
    """One CogVideoX block on the joint sequence ``h = [text; video]`` of shape ``(B, L+N, D)``."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype, param_dtype, backend: str, chunk: int):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = AdaLayerNormZero(cfg, **kw)
        self.attn1 = JointAttention(cfg, backend=backend, chunk=chunk, **kw)
        self.norm2 = AdaLayerNormZero(cfg, **kw)
        self.ff = FeedForward(cfg, **kw)

    def __call__(self, h, temb_video, temb_text, text_len: int):
        h_mod, gate = self.norm1(h, temb_video, temb_text, text_len)
        h = h + gate * self.attn1(h_mod)
        h_mod, gate = self.norm2(h, temb_video, temb_text, text_len)
        return h + gate * self.ff(h_mod)


class PatchEmbed(nnx.Module):
    """Per-frame ``p×p`` patch conv for video, a Linear for text; tokens frame-major, row, column."""

    def __init__(self, cfg: DiTConfig, *, rngs, dtype, param_dtype):
        d, p = cfg.inner_dim, cfg.patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = conv(cfg.in_channels, d, (p, p), stride=(p, p), padding="VALID", use_bias=cfg.patch_bias, **kw)
        self.text_proj = linear(cfg.text_embed_dim, d, **kw)

    def __call__(self, latents, text):
        b, t, hgt, wid, ch = latents.shape
        video = self.proj(latents.reshape(b * t, hgt, wid, ch))
        return self.text_proj(text), video.reshape(b, -1, video.shape[-1])


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, *, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = linear(in_dim, out_dim, **kw)
        self.linear_2 = linear(out_dim, out_dim, **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class AdaLayerNorm(nnx.Module):
    """diffusers' ``AdaLayerNorm`` (chunk order shift, scale) used as ``norm_out``."""

    def __init__(self, cfg: DiTConfig, *, rngs, dtype, param_dtype):
        d, affine = cfg.inner_dim, cfg.norm_elementwise_affine
        self.linear = linear(cfg.time_embed_dim, 2 * d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(d, eps=cfg.out_norm_eps, use_scale=affine, use_bias=affine, param_dtype=param_dtype)

    def __call__(self, x, temb_video):
        """x ``(B, T, P, D)``, temb ``(B, T, E)``."""
        shift, scale = _chunks(self.linear(jax.nn.silu(temb_video))[:, :, None], 2)
        return _modulate(self.norm(x), shift, scale)


class CogVideoXDiT(nnx.Module):
    """The CogVideoX-2B transformer, optionally with RepVideo's feature cache.

    ``model(latents (B,T,H,W,C), timesteps (B,T) or (B,), encoder_hidden_states (B,L,D_text))`` →
    ``(B, T, H, W, C_out)``; with ``return_trace=True`` also a dict of per-block hidden states.
    ``attention_backend`` goes to ``models.attention`` ("auto" never builds the dense score matrix
    for long sequences). ``scan_layers=True`` stacks the blocks' params along a leading layer axis and
    runs them in a ``lax.scan`` (one compiled block; the layout of checkpoints and pipelines).
    ``scan_layers=False`` keeps one param set per block and unrolls the loop: longer compiles for deep
    models, but no per-layer weight slice is copied out of the stack (1–9% faster on CPU,
    depending on load; benchmarks/NOTES.md). ``convert.cogvideox.model_from_params`` fills either layout.
    """

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_backend: str = "auto", attention_chunk: int = 1024, scan_layers: bool = True,
                 remat: str = "none"):
        cfg = self.config = config
        self.dtype, self.scan_layers = dtype, scan_layers
        if remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        self.remat = remat  # activation checkpointing of each block (training)
        d, p = cfg.inner_dim, cfg.patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.time_embedding = TimestepEmbedding(d, cfg.time_embed_dim, **kw)

        def new_block(block_rngs):
            return DiTBlock(cfg, rngs=block_rngs, dtype=dtype, param_dtype=param_dtype,
                            backend=attention_backend, chunk=attention_chunk)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(block_rngs):
            return new_block(block_rngs)

        if scan_layers:
            self.blocks = stacked_blocks(rngs)
        else:
            self.blocks = nnx.List([new_block(rngs) for _ in range(cfg.num_layers)])
        self.gates = nnx.Param(jnp.full((cfg.num_layers,), 0.5, param_dtype)) if cfg.repvideo else None
        affine = cfg.norm_elementwise_affine
        self.norm_final = LayerNorm(d, eps=cfg.norm_eps, use_scale=affine, use_bias=affine,
                                    param_dtype=param_dtype)
        self.norm_out = AdaLayerNorm(cfg, **kw)
        self.proj_out = linear(d, p * p * cfg.output_channels, **kw)

    # ------------------------------------------------------------------ checks (before any compile)
    def check_inputs(self, latents, timesteps, encoder_hidden_states) -> None:
        cfg = self.config
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, T, H, W, C) channels-last, got shape {latents.shape}")
        b, t, hgt, wid, ch = latents.shape
        if ch != cfg.in_channels:
            raise ValueError(f"latents have {ch} channels (last axis), the model takes {cfg.in_channels}")
        if hgt % cfg.patch_size or wid % cfg.patch_size:
            raise ValueError(f"latent size {hgt}x{wid} is not divisible by patch_size {cfg.patch_size}")
        if tuple(timesteps.shape) not in ((b, t), (b,)):
            raise ValueError(f"timesteps must be (B, T) = {(b, t)} per frame (or (B,)), got {timesteps.shape}")
        want = (b, cfg.max_text_seq_length, cfg.text_embed_dim)
        if tuple(encoder_hidden_states.shape) != want:
            raise ValueError(f"encoder_hidden_states must be (B, max_text_seq_length, text_embed_dim) = "
                             f"{want}, got {tuple(encoder_hidden_states.shape)}")

    # ------------------------------------------------------------------ forward
    def __call__(self, latents, timesteps, encoder_hidden_states, *, return_trace: bool = False):
        self.check_inputs(latents, timesteps, encoder_hidden_states)
        cfg, dtype = self.config, self.dtype
        b, frames, hgt, wid, _ = latents.shape
        p, d = cfg.patch_size, cfg.inner_dim
        rows, cols = hgt // p, wid // p
        text_len = cfg.max_text_seq_length

        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(b, -1), (b, frames))
        time_proj = timestep_embedding(timesteps, d, cos_first=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        temb = self.time_embedding(time_proj.astype(dtype))  # (B, T, E)
        temb_text = frame_mean(temb)

        text, video = self.patch_embed(latents.astype(dtype), encoder_hidden_states.astype(dtype))
        pos = video_pos_embed(frames, rows, cols, d, spatial_scale=cfg.spatial_interpolation_scale,
                              temporal_scale=cfg.temporal_interpolation_scale)
        h = jnp.concatenate([text, video + pos], axis=1)
        embeddings = h

        h, layer_trace = self._run_blocks(h, temb, temb_text, text_len, return_trace)

        x = self.norm_final(h[:, text_len:]).reshape(b, frames, rows * cols, d)
        x = self.proj_out(self.norm_out(x, temb))  # (B, T, P, p·p·C_out)
        out = self._unpatchify(x, rows, cols).astype(latents.dtype)
        if not return_trace:
            return out
        trace = dict(time_proj=time_proj, temb=temb, temb_text=temb_text, embeddings=embeddings,
                     final_layernorm_out=self.norm_final(h), **layer_trace)
        return out, trace

    def _unpatchify(self, x, rows, cols):
        b, frames = x.shape[:2]
        p, c = self.config.patch_size, self.config.output_channels
        x = x.reshape(b, frames, rows, cols, c, p, p).transpose(0, 1, 2, 5, 3, 6, 4)
        return x.reshape(b, frames, rows * p, cols * p, c)

    def _run_blocks(self, h, temb, temb_text, text_len: int, return_trace: bool):
        """The layer loop; the carry is ``(h, window_sum, window_count)`` (the last two only for RepVideo)."""
        cfg = self.config
        if self.scan_layers:
            graphdef, params = nnx.split(self.blocks)
        else:
            graphdef, params = nnx.graphdef(self.blocks[0]), [nnx.state(block) for block in self.blocks]
        gates = (self.gates[...] if cfg.repvideo else jnp.zeros((cfg.num_layers,))).astype(h.dtype)

        def step(carry, layer):
            h, window_sum, window_count = carry
            layer_params, gate, index = layer
            if cfg.repvideo:
                cache_mean = window_sum / window_count
                block_in = gate * cache_mean + (1 - gate) * h
            else:
                cache_mean = block_in = h
            out = nnx.merge(graphdef, layer_params)(block_in, temb, temb_text, text_len)
            if cfg.repvideo:
                restart = index % cfg.repvideo_window == 0
                window_sum = jnp.where(restart, out, window_sum + out)
                window_count = jnp.where(restart, 1, window_count + 1).astype(window_count.dtype)
            trace = dict(cache_mean=cache_mean, input_gated=block_in, output=out) if return_trace else None
            return (out, window_sum, window_count), trace

        carry = (h, h, jnp.ones((), h.dtype)) if cfg.repvideo else (h, None, None)
        if self.remat != "none":
            step = jax.checkpoint(step, policy=REMAT_POLICIES[self.remat])
        if self.scan_layers:
            (h, _, _), trace = jax.lax.scan(step, carry, (params, gates, jnp.arange(cfg.num_layers)))
        else:
            traces = []
            for i in range(cfg.num_layers):
                carry, layer_trace = step(carry, (params[i], gates[i], jnp.asarray(i)))
                traces.append(layer_trace)
            h = carry[0]
            trace = jax.tree.map(lambda *a: jnp.stack(a), *traces) if return_trace else None
        return h, (trace or {})


def jit_forward(model: CogVideoXDiT, *, return_trace: bool = False):
    """``(fn, state)`` with ``fn(state, latents, timesteps, text)`` jitted over the split model."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, latents, timesteps, encoder_hidden_states):
        return nnx.merge(graphdef, state)(latents, timesteps, encoder_hidden_states, return_trace=return_trace)

    return forward, state

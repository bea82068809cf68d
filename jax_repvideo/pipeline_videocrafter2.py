"""VideoCrafter2 prompt → video: OpenCLIP text tower, 3D U-Net (FIFO or plain DDIM), frame-wise KL VAE.

The three models live in one NNX module whose parameter tree is the converted checkpoint's:
``unet.*``, ``vae.*``, ``text.*`` (``jax-repvideo convert videocrafter2 model.ckpt DIR``).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_repvideo import checkpoint, fifo, sharding
from jax_repvideo.caches import QCacheConfig
from jax_repvideo.config import from_dict
from jax_repvideo.models.text_clip import OpenCLIPTextConfig, OpenCLIPTextEncoder
from jax_repvideo.models.tokenizer_clip import ClipTokenizer
from jax_repvideo.models.unet3d import UNet3D, UNet3DConfig
from jax_repvideo.models.vae_kl import VIDEOCRAFTER2_VAE, AutoencoderKL, AutoencoderKLConfig
from jax_repvideo.schedulers import ddim
from jax_repvideo.video import to_uint8


@dataclasses.dataclass(frozen=True)
class VideoCrafter2Arch:
    """Architecture of the three models (defaults: the released VideoCrafter2 t2v 512 v2.0)."""

    unet: UNet3DConfig = UNet3DConfig()
    vae: AutoencoderKLConfig = VIDEOCRAFTER2_VAE
    text: OpenCLIPTextConfig = OpenCLIPTextConfig()


class VideoCrafter2Models(nnx.Module):
    def __init__(self, arch: VideoCrafter2Arch, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if arch.text.width != arch.unet.context_dim:
            raise ValueError(f"text width {arch.text.width} ≠ U-Net context_dim {arch.unet.context_dim}")
        if arch.vae.embed_dim != arch.unet.in_channels:
            raise ValueError(f"VAE latent channels {arch.vae.embed_dim} ≠ U-Net in_channels {arch.unet.in_channels}")
        self.unet = UNet3D(arch.unet, rngs=rngs, dtype=dtype)
        self.vae = AutoencoderKL(arch.vae, rngs=rngs)
        self.text = OpenCLIPTextEncoder(arch.text, rngs=rngs)


class VideoCrafter2Pipeline:
    family = "videocrafter2"

    def __init__(self, models: VideoCrafter2Models, arch: VideoCrafter2Arch, tokenizer: ClipTokenizer | None = None):
        self.arch = arch
        self.tokenizer = tokenizer or ClipTokenizer(context_length=arch.text.context_length)
        self.unet_graph, self.unet_params = nnx.split(models.unet)
        self._vae = nnx.split(models.vae)
        self._text = nnx.split(models.text)

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, arch: VideoCrafter2Arch, seed: int = 0, dtype=jnp.float32) -> "VideoCrafter2Pipeline":
        """Randomly initialised weights (the embedded demo and tests)."""
        return cls(sharding.init_model(lambda: VideoCrafter2Models(arch, rngs=nnx.Rngs(seed), dtype=dtype)), arch)

    @classmethod
    def from_pretrained(cls, directory: str | Path, arch: VideoCrafter2Arch | None = None,
                        dtype=jnp.float32) -> "VideoCrafter2Pipeline":
        """Loads a directory written by ``jax-repvideo convert videocrafter2``."""
        saved = checkpoint.read_config(directory)
        if saved.get("kind") != "videocrafter2":
            raise ValueError(f"{directory} holds a {saved.get('kind')!r} checkpoint, not videocrafter2")
        missing = {"unet", "vae", "text"} - set(saved.get("groups", ["unet"]))
        if missing:
            raise ValueError(f"{directory} lacks the {sorted(missing)} weights: convert the full LVDM model.ckpt")
        arch = arch or VideoCrafter2Arch()
        saved_archs = {"unet": UNet3DConfig, "vae": AutoencoderKLConfig, "text": OpenCLIPTextConfig}
        arch = dataclasses.replace(arch, **{name: from_dict(cls_, saved[name])
                                            for name, cls_ in saved_archs.items() if name in saved})
        abstract = sharding.abstract_model(lambda: VideoCrafter2Models(arch, rngs=nnx.Rngs(0), dtype=dtype))
        return cls(checkpoint.restore_into(directory, abstract), arch)

    # ------------------------------------------------------------------ pieces
    @property
    def latent_channels(self) -> int:
        return self.arch.unet.in_channels

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.arch.vae.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}×{width}")
        return height // factor, width // factor

    def encode_text(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts → OpenCLIP embeddings ``(P, 77, D)`` (penultimate layer)."""
        graphdef, state = self._text
        return _jitted(graphdef, "__call__")(state, jnp.asarray(self.tokenizer(list(prompts))))

    def decode(self, latents) -> np.ndarray:
        """Latent frames ``(m, h, w, C)`` → uint8 frames ``(m, H, W, 3)``."""
        graphdef, state = self._vae
        return to_uint8(_jitted(graphdef, "decode_latents")(state, jnp.asarray(latents)))

    def stream_decoder(self, total: int | None = None) -> "FrameDecoder":
        """Frame-wise decode needs no state: every pushed latent block decodes on its own."""
        return FrameDecoder(self)

    def encode_frames(self, frames: np.ndarray) -> jax.Array:
        """uint8 frames ``(T, H, W, 3)`` → latent frames ``(T, h, w, C)`` (posterior mode, scaled)."""
        images = jnp.asarray(frames, jnp.float32) / 127.5 - 1.0
        graphdef, state = self._vae
        return _jitted(graphdef, "encode_latents")(state, images)

    def fifo_sampler(self, config: fifo.FifoConfig, fps: int, qcache: QCacheConfig | None = None) -> fifo.FifoSampler:
        denoise = sharding.shard_denoiser(fifo.unet_denoiser(self.unet_graph, int(fps), qcache))
        return fifo.FifoSampler(denoise, self.unet_params, config)

    def sample_ddim(self, context, uncond, latent_hw, *, frames: int, steps: int, eta: float, guidance_scale: float,
                    fps: int, seed: int, qcache: QCacheConfig | None = None) -> jax.Array:
        """Plain DDIM (VideoCrafter's grid and use_scale) of one ``frames``-frame clip → latents (T, h, w, C)."""
        schedule = ddim.videocrafter2_schedule(steps, eta=eta, grid="videocrafter")
        shape = (1, frames, *latent_hw, self.latent_channels)
        k_x, k_steps = jax.random.split(jax.random.PRNGKey(seed))
        x_T = jax.random.normal(k_x, shape)
        noise = jax.random.normal(k_steps, (steps, *shape))
        denoise = sharding.shard_denoiser(fifo.unet_denoiser(self.unet_graph, int(fps), qcache))
        cond = {"context": jnp.broadcast_to(context, (1, frames, *context.shape))}
        uncond = {"context": jnp.broadcast_to(uncond, (1, frames, *uncond.shape))}
        scale = guidance_scale if guidance_scale != 1.0 else None
        x0, _ = _ddim(denoise, scale)(self.unet_params, schedule, x_T, cond, uncond, noise)
        return x0[0]


@functools.lru_cache(maxsize=None)
def _jitted(graphdef, method: str):
    """``jit(state, x) -> model.method(x)`` with the graphdef closed over (DESIGN §2)."""
    return jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))


@functools.lru_cache(maxsize=None)
def _ddim(denoise, guidance_scale):
    def run(params, schedule, x_T, cond, uncond, noise):
        return ddim.ddim_sample(denoise, params, schedule, x_T, cond, uncond, noise,
                                guidance_scale=guidance_scale, use_scale=True)

    return jax.jit(run)


class FrameDecoder:
    def __init__(self, pipeline: VideoCrafter2Pipeline):
        self.pipeline = pipeline

    def push(self, latents) -> list[np.ndarray]:
        return [self.pipeline.decode(latents)]

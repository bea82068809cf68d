"""CogVideoX-2B / RepVideo prompt → video: T5 text, the DiT (DDIM, DPM++2M-SDE or FIFO), causal 3D VAE.

A converted model directory holds one converted checkpoint per model plus the tokenizer:

    DIR/transformer/    jax-repvideo convert cogvideox CogVideoX-2b DIR/transformer
                        (or: jax-repvideo convert repvideo mp_rank_00_model_states.pt DIR/transformer)
    DIR/vae/            jax-repvideo convert cogvideox-vae CogVideoX-2b/vae DIR/vae
    DIR/text_encoder/   jax-repvideo convert t5 CogVideoX-2b/text_encoder DIR/text_encoder
    DIR/tokenizer/spiece.model   copied from CogVideoX-2b/tokenizer/
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_repvideo import checkpoint, fifo, fifo_dit, sharding
from jax_repvideo.config import from_dict
from jax_repvideo.models import vae_cogvideox
from jax_repvideo.models.dit import CogVideoXDiT, DiTConfig
from jax_repvideo.models.text_t5 import T5Config, T5Encoder
from jax_repvideo.models.tokenizer_t5 import T5Tokenizer
from jax_repvideo.models.vae_cogvideox import CogVideoXVAE, CogVideoXVAEConfig
from jax_repvideo.schedulers import cogvideox as cog
from jax_repvideo.schedulers import guidance
from jax_repvideo.video import to_uint8

PARTS = {"transformer": (DiTConfig, ("cogvideox", "repvideo")), "vae": (CogVideoXVAEConfig, ("cogvideox-vae",)),
         "text_encoder": (T5Config, ("t5",))}


class CogVideoXModels(nnx.Module):
    def __init__(self, transformer: DiTConfig, vae: CogVideoXVAEConfig, text: T5Config, *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        if text.d_model != transformer.text_embed_dim:
            raise ValueError(f"T5 width {text.d_model} ≠ transformer text_embed_dim {transformer.text_embed_dim}")
        if vae.latent_channels != transformer.in_channels:
            raise ValueError(f"VAE latent channels {vae.latent_channels} ≠ transformer in_channels "
                             f"{transformer.in_channels}")
        self.transformer = CogVideoXDiT(transformer, rngs=rngs, dtype=dtype)
        self.vae = CogVideoXVAE(vae, rngs=rngs)
        self.text_encoder = T5Encoder(text, rngs=rngs)


class CogVideoXPipeline:
    family = "cogvideox"

    def __init__(self, models: CogVideoXModels, tokenizer: T5Tokenizer):
        self.models = models
        self.config = models.transformer.config
        self.tokenizer = tokenizer
        self.dit_graph, self.dit_params = nnx.split(models.transformer)

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, transformer: DiTConfig, vae: CogVideoXVAEConfig, text: T5Config, tokenizer: str | Path,
               seed: int = 0, dtype=jnp.float32) -> "CogVideoXPipeline":
        models = sharding.init_model(lambda: CogVideoXModels(transformer, vae, text, rngs=nnx.Rngs(seed), dtype=dtype))
        return cls(models, T5Tokenizer(tokenizer, max_length=transformer.max_text_seq_length))

    @classmethod
    def from_pretrained(cls, directory: str | Path, tokenizer: str | Path | None = None,
                        dtype=jnp.float32) -> "CogVideoXPipeline":
        directory = Path(directory)
        configs = {part: _read_part(directory, part) for part in PARTS}
        abstract = sharding.abstract_model(lambda: CogVideoXModels(configs["transformer"], configs["vae"],
                                                          configs["text_encoder"], rngs=nnx.Rngs(0), dtype=dtype))
        for part in PARTS:
            setattr(abstract, part, checkpoint.restore_into(directory / part, getattr(abstract, part)))
        length = configs["transformer"].max_text_seq_length
        tok = T5Tokenizer(tokenizer, length) if tokenizer else T5Tokenizer.from_model_folder(directory, length)
        return cls(abstract, tok)

    # ------------------------------------------------------------------ pieces
    @property
    def latent_channels(self) -> int:
        return self.config.in_channels

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.models.vae.config.spatial_factor
        if height % (factor * self.config.patch_size) or width % (factor * self.config.patch_size):
            raise ValueError(f"height and width must be multiples of {factor * self.config.patch_size}, "
                             f"got {height}×{width}")
        return height // factor, width // factor

    def latent_frames(self, num_frames: int) -> int:
        ratio = self.models.vae.config.temporal_compression_ratio
        latents = (num_frames - 1) // ratio + 1
        # The VAE decodes in 2-latent chunks with the remainder first: an even latent count decodes to
        # 4·L frames, so only odd counts give the 4k+1 frames asked for (49 = 13 latents).
        if num_frames < 1 or vae_cogvideox.decoded_frames(latents, ratio) != num_frames:
            raise ValueError(f"num_frames={num_frames}: the CogVideoX VAE decodes to 1, 9, 17, …, 49, … frames "
                             f"({2 * ratio}k+1); choose one of those")
        return latents

    def encode_text(self, prompts) -> jax.Array:
        """Prompts → T5 embeddings ``(P, L, D)``."""
        from jax_repvideo.models.text_t5 import encode

        return encode(self.models.text_encoder, self.tokenizer(list(prompts)))

    def unconditional(self, cond: jax.Array, guidance_cfg: guidance.GuidanceConfig, negative_prompt: str):
        negative = self.encode_text([negative_prompt]) if guidance_cfg.unconditional == "negative_prompt" else None
        return guidance.unconditional_embedding(guidance_cfg, cond, negative)

    def sample_clip(self, cond, uncond, latent_frames: int, latent_hw, *, steps: int, kind: str,
                    guidance_cfg: guidance.GuidanceConfig, seed: int) -> jax.Array:
        """Plain DDIM / DPM++2M-SDE sampling of one clip → model-space latents ``(T, h, w, C)``."""
        schedule = cog.make_schedule(steps)
        table = guidance.guidance_scale_table(guidance_cfg, np.asarray(schedule.timesteps))
        key_x, key_noise = jax.random.split(jax.random.PRNGKey(seed))
        shape = (1, latent_frames, *latent_hw, self.latent_channels)
        x_T = jax.random.normal(key_x, shape)
        noise = jax.random.normal(key_noise, (steps, *shape)) if kind == "dpm" else jnp.zeros((steps, 1))
        run = _clip_sampler(self.dit_graph, kind)
        return run(self.dit_params, schedule, table, x_T, cond[None], uncond[None], noise)[0]

    def decode_stream(self, latents, chunks_per_call: int = 4) -> Iterator[np.ndarray]:
        """Model-space latents ``(T, h, w, C)`` → uint8 frames, block by block with the conv cache."""
        vae = self.models.vae
        z = vae_cogvideox.unscale_latents(vae, jnp.asarray(latents)[None])
        for frames in vae_cogvideox.decode_stream(vae, z, chunks_per_call):
            yield to_uint8(frames[0])

    def stream_decoder(self, total: int) -> "StreamDecoder":
        """A decoder that turns latent frames into uint8 frames as they arrive (FIFO)."""
        return StreamDecoder(self.models.vae, total)

    def encode_frames(self, frames: np.ndarray) -> jax.Array:
        """uint8 frames ``(T, H, W, 3)`` → model-space latents ``(T', h, w, C)`` (posterior mean)."""
        vae = self.models.vae
        mean, _ = vae_cogvideox.encode(vae, jnp.asarray(frames, jnp.float32)[None] / 127.5 - 1.0)
        return vae_cogvideox.scale_latents(vae, mean)[0]

    def fifo_sampler(self, config: fifo.FifoConfig,
                     guidance_cfg: guidance.GuidanceConfig | None = None) -> fifo.FifoSampler:
        """FIFO on the DiT; ``guidance_cfg.dynamic`` guides each frame at its own noise level."""
        denoise = sharding.shard_denoiser(fifo_dit.dit_denoiser(self.dit_graph))  # windows × CFG on data
        schedule = fifo_dit.fifo_schedule(fifo.make_plan(config).steps, solver=config.solver)
        table = fifo_dit.guidance_table(guidance_cfg, schedule) if guidance_cfg is not None else None
        return fifo.FifoSampler(denoise, self.dit_params, config, schedule=schedule, guidance_table=table)


class StreamDecoder:
    """Incremental causal-VAE decode: ``push`` latent frames, get the frames they complete.

    ``total`` latent frames are expected: the first decode chunk takes the remainder, as in
    diffusers, then every 2 latent frames decode as soon as they are there, with the conv cache
    carried between calls (same result as the one-shot decode).
    """

    def __init__(self, vae: CogVideoXVAE, total: int):
        self.vae = vae
        self.graphdef, self.state = nnx.split(vae)
        self.first = vae_cogvideox.first_chunk_length(total, vae_cogvideox.DECODE_CHUNK)
        self.pending: np.ndarray | None = None
        self.cache = None

    def push(self, latents: np.ndarray) -> list[np.ndarray]:
        latents = np.asarray(latents)
        self.pending = latents if self.pending is None else np.concatenate([self.pending, latents])
        out = []
        while len(self.pending) >= (self.first if self.cache is None else vae_cogvideox.DECODE_CHUNK):
            size = self.first if self.cache is None else vae_cogvideox.DECODE_CHUNK
            z = vae_cogvideox.unscale_latents(self.vae, jnp.asarray(self.pending[:size])[None])
            if self.cache is None:
                frames, self.cache = vae_cogvideox._decode_first_jit(self.graphdef, self.state, z)
            else:
                frames, self.cache = vae_cogvideox._decode_segment_jit(self.graphdef, self.state, self.cache, z)
            self.pending = self.pending[size:]
            out.append(to_uint8(np.asarray(frames[0])))
        return out


def _read_part(directory: Path, part: str):
    config_cls, kinds = PARTS[part]
    folder = directory / part
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: a CogVideoX model directory holds transformer/, vae/, "
                                f"text_encoder/ and tokenizer/ (see `jax-repvideo convert --help` and the README)")
    saved = checkpoint.read_config(folder)
    if saved.get("kind") not in kinds:
        raise ValueError(f"{folder} holds a {saved.get('kind')!r} checkpoint, expected one of {kinds}")
    return from_dict(config_cls, saved["model"])


@functools.lru_cache(maxsize=None)
def _clip_sampler(graphdef, kind: str):
    """The whole S-step sampling loop as one ``lax.scan`` (CFG batched: [cond; uncond])."""
    if kind not in ("ddim", "dpm"):
        raise ValueError(f"CogVideoX sampler must be 'ddim' or 'dpm', got {kind!r}")

    def run(params, schedule, table, x_T, cond, uncond, noise):
        model = nnx.merge(graphdef, params)
        text = jnp.concatenate([cond, uncond])

        def body(carry, step):
            x, old_x0 = carry
            i, z = step
            t = jnp.broadcast_to(cog.model_timesteps(schedule, i), (2, x.shape[1]))
            v = model(jnp.concatenate([x, x]), t, text).astype(jnp.float32)
            v_cond, v_uncond = jnp.split(v, 2)
            v = guidance.combine(v_uncond, v_cond, table[i])
            if kind == "ddim":
                x, x0 = cog.ddim_step(schedule, i, x, v)
            else:
                x, x0 = cog.dpm_step(schedule, i, x, v, old_x0, z)
            return (x, x0), None

        (x, _), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), (jnp.arange(schedule.num_steps), noise))
        return x

    return jax.jit(run)

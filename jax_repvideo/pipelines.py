"""Prompt → video for both families: the Python API behind ``jax-repvideo generate``.

    pipe = Pipeline.from_pretrained("checkpoints/videocrafter2", prompt="a red panda", num_frames=200)
    for frames in pipe.generate():          # uint8 (m, H, W, 3) blocks, streamed as FIFO emits them
        ...
    video = pipe.video()                     # or everything at once

``Pipeline.from_config("configs/tiny_fifo.yaml")`` builds from a preset (random weights when the preset
has no checkpoint). Settings are the fields of ``GenerateConfig``, passed as keyword arguments or
``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_repvideo import config as config_lib
from jax_repvideo import generate_config as gc
from jax_repvideo.fifo_stream import RunStore, fifo_stream
from jax_repvideo.pipeline_cogvideox import CogVideoXPipeline
from jax_repvideo.pipeline_videocrafter2 import VideoCrafter2Pipeline
from jax_repvideo.video import read_frames


class Pipeline:
    def __init__(self, config: gc.GenerateConfig, models=None):
        gc.validate(config)
        self.config = config
        self.models = models if models is not None else build_models(config)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, path: str | Path, overrides: Sequence[str] = (), **settings) -> "Pipeline":
        cfg = gc.load(path, overrides)
        return cls(_with(cfg, settings))

    @classmethod
    def from_pretrained(cls, directory: str | Path, **settings) -> "Pipeline":
        family = "cogvideox" if (Path(directory) / "transformer").is_dir() else "videocrafter2"
        base = gc.GenerateConfig(family=family, checkpoint=str(directory))
        if family == "cogvideox":  # CogVideoX's own sampling defaults (spec §2.5)
            base = dataclasses.replace(base, sampler=gc.SamplerConfig(kind="ddim"), num_frames=49, height=480,
                                       width=720, guidance=gc.GuidanceConfig(scale=6.0, dynamic=False,
                                                                             unconditional="negative_prompt"))
        return cls(_with(base, settings))

    def with_settings(self, **settings) -> "Pipeline":
        """The same loaded models with other run settings (prompt, num_frames, seed, …)."""
        return Pipeline(_with(self.config, settings), self.models)

    # ------------------------------------------------------------------ running
    def latents(self, *, store: RunStore | None = None) -> Iterator[np.ndarray]:
        """Model-space latent frames ``(m, h, w, C)`` in output order, streamed."""
        cfg = self.config
        if cfg.sampler.kind == "fifo":
            yield from (latents for _, latents in self._fifo(store))
        else:
            clip = np.asarray(self._clip())
            if not np.isfinite(clip).all():
                raise FloatingPointError("non-finite (NaN/Inf) latents after plain sampling; stopping. No NaN frame "
                                         "was written. Try dtype=float32 or a lower guidance scale.")
            yield clip

    def generate(self, *, store: RunStore | None = None) -> Iterator[np.ndarray]:
        """uint8 frames ``(m, H, W, 3)`` in output order, decoded as the latents arrive."""
        return self.decode(self.latents(store=store))

    def video(self) -> np.ndarray:
        """The whole video as uint8 ``(T, H, W, 3)``."""
        return np.concatenate(list(self.generate()))

    def decode(self, latent_blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        decoder = self.stream_decoder()
        for block in latent_blocks:
            yield from decoder.push(block)

    def stream_decoder(self):
        """``push(latents (m, h, w, C)) -> [uint8 frames …]``: frame-wise (VC2) or causal with a cache."""
        return self.models.stream_decoder(self._num_latent_frames())

    # ------------------------------------------------------------------ internals
    def _latent_hw(self):
        return self.models.latent_size(self.config.height, self.config.width)

    def _num_latent_frames(self) -> int:
        cfg = self.config
        if isinstance(self.models, CogVideoXPipeline):
            return self.models.latent_frames(cfg.num_frames)
        return cfg.num_frames

    def _clip(self):
        cfg, m = self.config, self.models
        if isinstance(m, VideoCrafter2Pipeline):
            context = m.encode_text([cfg.prompt])[0]
            uncond = m.encode_text([cfg.negative_prompt])[0]
            return m.sample_ddim(context, uncond, self._latent_hw(), frames=cfg.num_frames, steps=cfg.sampler.steps,
                                 eta=cfg.sampler.eta, guidance_scale=cfg.guidance.scale, fps=cfg.sampler.fps,
                                 seed=cfg.seed, qcache=cfg.qcache if cfg.qcache.enabled else None)
        cond = m.encode_text([cfg.prompt])
        uncond = m.unconditional(cond, cfg.guidance, cfg.negative_prompt)
        return m.sample_clip(cond[0], uncond[0], self._num_latent_frames(), self._latent_hw(),
                             steps=cfg.sampler.steps, kind=cfg.sampler.kind, guidance_cfg=cfg.guidance, seed=cfg.seed)

    def _fifo(self, store: RunStore | None):
        cfg, m = self.config, self.models
        fcfg = dataclasses.replace(gc.fifo_config(cfg), new_video_length=self._num_latent_frames())
        schedule = gc.prompt_schedule(cfg)
        texts = m.encode_text([p for p, _ in schedule])
        if isinstance(m, VideoCrafter2Pipeline):
            sampler = m.fifo_sampler(fcfg, cfg.sampler.fps, cfg.qcache if cfg.qcache.enabled else None)
            prompts, uncond = {"context": texts}, {"context": m.encode_text([cfg.negative_prompt])[0]}
        else:
            sampler = m.fifo_sampler(fcfg, cfg.guidance)
            prompts, uncond = {"text": texts}, {"text": m.unconditional(texts[:1], cfg.guidance, cfg.negative_prompt)[0]}
        counts = _latent_counts([n for _, n in schedule], fcfg.new_video_length)

        def base():
            if cfg.init_video:
                return _base_from_frames(m, read_frames(cfg.init_video), fcfg.video_length, cfg)
            hw = self._latent_hw()
            return sampler.base_video(prompts, uncond, (*hw, m.latent_channels), key=jax.random.PRNGKey(cfg.seed))[0]

        return fifo_stream(sampler, prompts, uncond, counts, fcfg.new_video_length, base, store=store,
                           resume=cfg.resume)


def build_models(cfg: gc.GenerateConfig):
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    if cfg.family == "videocrafter2":
        if cfg.checkpoint is None:
            return VideoCrafter2Pipeline.random(cfg.videocrafter2, cfg.random_init_seed, dtype)
        return VideoCrafter2Pipeline.from_pretrained(cfg.checkpoint, cfg.videocrafter2, dtype)
    arch = cfg.cogvideox
    if cfg.checkpoint is None:
        if arch.tokenizer is None:
            raise config_lib.ConfigError("cogvideox.tokenizer (a sentencepiece model) is needed without a checkpoint")
        return CogVideoXPipeline.random(arch.transformer, arch.vae, arch.text, _resolve(arch.tokenizer),
                                        cfg.random_init_seed, dtype)
    return CogVideoXPipeline.from_pretrained(cfg.checkpoint, _resolve(arch.tokenizer) if arch.tokenizer else None,
                                             dtype)


def _resolve(path: str) -> Path:
    """Relative asset paths in presets resolve against the package's assets when not found as given."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    packaged = Path(__file__).parent / "assets" / candidate.name
    return packaged if packaged.exists() else candidate


def _with(cfg: gc.GenerateConfig, settings: dict) -> gc.GenerateConfig:
    if not settings:
        return cfg
    data = config_lib.to_dict(cfg)
    data.update(settings)
    return config_lib.from_dict(gc.GenerateConfig, data)


def _latent_counts(frame_counts: list[int], latent_total: int) -> list[int]:
    """Prompt-schedule frame counts rescaled to latent frames (identity when they already match)."""
    total = sum(frame_counts)
    if total == latent_total:
        return frame_counts
    bounds = np.round(np.cumsum(frame_counts) * latent_total / total).astype(int)
    counts = np.diff(np.concatenate([[0], bounds])).tolist()
    if min(counts) < 1:
        raise ValueError(f"prompt schedule {frame_counts} is too fine for {latent_total} latent frames")
    return counts


def _base_from_frames(models, frames: np.ndarray, f: int, cfg: gc.GenerateConfig) -> jax.Array:
    """User frames → the f clean base latents that seed the queue (the last frame repeats if short)."""
    if frames.shape[1:3] != (cfg.height, cfg.width):
        raise ValueError(f"init_video frames are {frames.shape[2]}×{frames.shape[1]}, the run makes "
                         f"{cfg.width}×{cfg.height}: resize them or set width/height")
    if isinstance(models, VideoCrafter2Pipeline):
        frames = frames[np.minimum(np.arange(f), len(frames) - 1)]
        return models.encode_frames(frames)
    ratio = models.models.vae.config.temporal_compression_ratio
    wanted = (f - 1) * ratio + 1
    latents = models.encode_frames(frames[np.minimum(np.arange(wanted), len(frames) - 1)])
    return latents[:f]

"""The run config of ``jax-repvideo generate``: what to sample, with which models, written where.

Architecture sections (``videocrafter2``, ``cogvideox``) mirror the source checkpoints' own names and
are used when ``checkpoint`` is null (random weights: the embedded demo) or to complete a converted
checkpoint. Everything else is the run: sampler, FIFO, Q-cache, guidance, mesh and outputs.

Stable override names: ``prompt``, ``num_frames``, ``seed``, ``out``, ``save_latents``,
``state_dir``, ``resume`` and ``mesh.*``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Sequence

from jax_repvideo import config as config_lib
from jax_repvideo.caches import QCacheConfig
from jax_repvideo.config import ConfigError
from jax_repvideo.fifo import FifoConfig
from jax_repvideo.models.dit import DiTConfig
from jax_repvideo.models.text_t5 import T5Config
from jax_repvideo.models.vae_cogvideox import CogVideoXVAEConfig
from jax_repvideo.pipeline_videocrafter2 import VideoCrafter2Arch
from jax_repvideo.schedulers.guidance import GuidanceConfig
from jax_repvideo.sharding import MeshConfig

# FIFO fields that come from the top level of the run config, never from the fifo section.
_FIFO_FROM_TOP = {"new_video_length": "num_frames", "seed": "seed", "guidance_scale": "guidance.scale",
                  "eta": "sampler.eta"}


@dataclasses.dataclass(frozen=True)
class CogVideoXArch:
    """Architecture of the CogVideoX / RepVideo models (defaults: CogVideoX-2B)."""

    transformer: DiTConfig = DiTConfig()
    vae: CogVideoXVAEConfig = CogVideoXVAEConfig()
    text: T5Config = T5Config()
    # sentencepiece model; null: ``<checkpoint>/tokenizer/spiece.model``
    tokenizer: str | None = None


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    # fifo: FIFO-Diffusion long video; ddim: plain DDIM clip; dpm: CogVideoX DPM++2M-SDE clip.
    kind: Literal["fifo", "ddim", "dpm"] = "fifo"
    steps: int = 50  # plain sampling only; FIFO uses S = f·n
    eta: float = 1.0  # VideoCrafter2 DDIM η (CogVideoX DDIM is deterministic)
    fps: int = 8  # VideoCrafter2 fps conditioning


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    family: Literal["videocrafter2", "cogvideox"] = "videocrafter2"
    # converted directory (``jax-repvideo convert …``); null: random weights from the arch sections
    checkpoint: str | None = None
    videocrafter2: VideoCrafter2Arch = VideoCrafter2Arch()
    cogvideox: CogVideoXArch = CogVideoXArch()
    prompt: str = "A cat playing the piano on a stage, cinematic lighting"
    negative_prompt: str = ""
    # multi-prompt FIFO: [[prompt, frames], …]; frames must sum to num_frames; empty: ``prompt`` only
    prompt_schedule: tuple[tuple[str, int], ...] = ()
    num_frames: int = 100  # output video frames (FIFO); plain sampling makes one clip
    height: int = 320
    width: int = 512
    seed: int = 321
    sampler: SamplerConfig = SamplerConfig()
    fifo: FifoConfig = FifoConfig()
    qcache: QCacheConfig = QCacheConfig()
    guidance: GuidanceConfig = GuidanceConfig(scale=12.0, dynamic=False, unconditional="negative_prompt")
    # start from user frames: a video or image encoded into the base latents that seed the FIFO queue
    init_video: str | None = None
    out: str = "outputs/video.mp4"
    output_fps: float = 10.0
    save_latents: str | None = None  # PATH.npz: the emitted latents, array ``latents`` (frames, h, w, C)
    state_dir: str | None = None  # FIFO state checkpointed every chunk
    resume: bool = False  # continue from state_dir (a larger num_frames extends a finished run)
    mesh: MeshConfig = MeshConfig()
    dtype: Literal["float32", "bfloat16"] = "float32"
    random_init_seed: int = 0  # weights of a random (checkpoint: null) model


def load(path: str | Path, overrides: Sequence[str] = (), *, check_paths: bool = True) -> GenerateConfig:
    """A validated config from a preset plus ``key=value`` overrides; errors name the key.

    ``check_paths=False`` skips the existence check of the checkpoint directory (``plan``)."""
    data = config_lib.apply_overrides(config_lib.load_yaml(path), overrides)
    for field, top in _FIFO_FROM_TOP.items():
        if field in (data.get("fifo") or {}):
            raise ConfigError(f"fifo.{field} is set from {top}; set {top} instead")
    cfg = config_lib.from_dict(GenerateConfig, data)
    validate(cfg, check_paths=check_paths)
    return cfg


def fifo_config(cfg: GenerateConfig) -> FifoConfig:
    return dataclasses.replace(cfg.fifo, new_video_length=cfg.num_frames, seed=cfg.seed,
                               guidance_scale=cfg.guidance.scale, eta=cfg.sampler.eta)


def prompt_schedule(cfg: GenerateConfig) -> list[tuple[str, int]]:
    return [tuple(p) for p in cfg.prompt_schedule] if cfg.prompt_schedule else [(cfg.prompt, cfg.num_frames)]


def validate(cfg: GenerateConfig, *, check_paths: bool = True) -> None:
    """Everything checkable from the config alone, before any model is built or compiled."""
    from jax_repvideo import fifo

    if cfg.num_frames < 1:
        raise ConfigError(f"num_frames must be ≥ 1, got {cfg.num_frames}")
    if cfg.sampler.kind == "fifo":
        fifo.validate(fifo_config(cfg))
    if cfg.family == "videocrafter2":
        if cfg.sampler.kind == "dpm":
            raise ConfigError("sampler.kind=dpm is CogVideoX's sampler; VideoCrafter2 takes fifo or ddim")
        if cfg.sampler.kind == "fifo" and cfg.fifo.solver != "ddim":
            raise ConfigError(f"fifo.solver={cfg.fifo.solver} is CogVideoX's sampler; VideoCrafter2's FIFO runs ddim")
        if cfg.sampler.kind == "ddim":
            _check_videocrafter_grid(cfg.sampler.steps)
        if cfg.guidance.dynamic or cfg.guidance.unconditional != "negative_prompt":
            raise ConfigError("VideoCrafter2 uses plain CFG with the encoded negative prompt: set "
                              "guidance.dynamic=false and guidance.unconditional=negative_prompt")
    if cfg.family == "cogvideox":
        from jax_repvideo.models.vae_cogvideox import decoded_frames

        ratio = cfg.cogvideox.vae.temporal_compression_ratio
        if decoded_frames((cfg.num_frames - 1) // ratio + 1, ratio) != cfg.num_frames:
            raise ConfigError(f"num_frames={cfg.num_frames}: the CogVideoX VAE decodes to 1, 9, 17, …, 49, … "
                              f"frames ({2 * ratio}k+1); choose one of those")
    if cfg.prompt_schedule:
        frames = [n for _, n in cfg.prompt_schedule]
        if any(n < 1 for n in frames) or sum(frames) != cfg.num_frames:
            raise ConfigError(f"prompt_schedule frame counts {frames} must be ≥ 1 and sum to num_frames="
                              f"{cfg.num_frames} (they sum to {sum(frames)})")
        if cfg.sampler.kind != "fifo":
            raise ConfigError("prompt_schedule needs sampler.kind=fifo")
    if cfg.resume and not cfg.state_dir:
        raise ConfigError("resume=true needs state_dir=DIR (where the interrupted run saved its state)")
    if check_paths and cfg.checkpoint is not None and not Path(cfg.checkpoint).is_dir():
        raise ConfigError(f"checkpoint directory {cfg.checkpoint} does not exist; make it with: "
                          f"{convert_command(cfg)}")


def _check_videocrafter_grid(steps: int) -> None:
    from jax_repvideo.schedulers import ddim

    try:
        ddim.videocrafter_timesteps(steps)
        ddim.make_schedule(ddim.videocrafter_timesteps(steps))
    except ValueError as err:
        raise ConfigError(f"sampler.steps={steps} does not fit VideoCrafter's DDIM grid range(0, 1000, 1000//S)+1 "
                          f"({err}); use e.g. 25 or 50") from None


def convert_command(cfg: GenerateConfig) -> str:
    """The command(s) that make ``cfg.checkpoint``."""
    dst = cfg.checkpoint
    if cfg.family == "videocrafter2":
        return f"jax-repvideo convert videocrafter2 /path/to/VideoCrafter2/model.ckpt {dst}"
    if cfg.cogvideox.transformer.repvideo:
        transformer = f"jax-repvideo convert repvideo /path/to/RepVideo/mp_rank_00_model_states.pt {dst}/transformer"
    else:
        transformer = f"jax-repvideo convert cogvideox /path/to/CogVideoX-2b {dst}/transformer"
    return "; ".join([transformer,
                      f"jax-repvideo convert cogvideox-vae /path/to/CogVideoX-2b/vae {dst}/vae",
                      f"jax-repvideo convert t5 /path/to/CogVideoX-2b/text_encoder {dst}/text_encoder",
                      f"cp -r /path/to/CogVideoX-2b/tokenizer {dst}/"])

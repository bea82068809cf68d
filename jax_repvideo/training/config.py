"""The typed fine-tuning config (``configs/train_*.yaml``), loaded with ``jax_repvideo.config.load``.

``data_dir``, ``steps`` and ``out_dir`` are the stable command-line overrides.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from jax_repvideo.config import ConfigError
from jax_repvideo.sharding import MeshConfig


class DataError(ValueError):
    """A data folder, caption file or dataset that cannot be used; the message names the culprit."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_dir: str = ""  # local video folder; or leave empty and set tfds_name
    tfds_name: str = ""  # a registered tfds video dataset (array_record)
    tfds_split: str = "train"
    tfds_data_dir: str = ""  # where tfds_name is prepared ("" → tfds default)
    video_field: str = "video"
    caption_field: str = "caption"
    cache_dir: str = ""  # where repvideo_clips is written ("" → <out_dir>/tfds)
    num_frames: int = 49  # 4k+1
    frame_stride: int = 1
    height: int = 480
    width: int = 720
    clips_per_video: int = 1  # non-overlapping clips taken from the start; 0 = as many as fit
    preprocess: bool = False  # store VAE latents + T5 embeddings instead of pixels + text
    batch_size: int = 1  # global batch, split evenly over hosts
    shuffle_seed: int = 0

    def __post_init__(self):
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise DataError(f"data.num_frames must be 4k+1 (1, 5, 9, …, 49), got {self.num_frames}")
        if self.frame_stride < 1 or self.clips_per_video < 0 or self.batch_size < 1:
            raise DataError("data.frame_stride and data.batch_size must be ≥ 1, data.clips_per_video ≥ 0")
        if self.height < 1 or self.width < 1:
            raise DataError(f"data.height/width must be positive, got {self.height}×{self.width}")

    @property
    def span(self) -> int:
        """Source frames covered by one clip."""
        return (self.num_frames - 1) * self.frame_stride + 1


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, after global-norm clipping."""

    learning_rate: float = 1e-5  # peak, for the backbone
    gate_learning_rate: float = 1e-4  # peak, for the RepVideo gates (new parameters)
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1  # cosine ends at ratio·peak
    weight_decay: float = 1e-4  # backbone only; gates are not decayed towards 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm over the trained parameters


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """A frozen VAE or T5: a converted checkpoint, or a YAML architecture preset with random weights."""

    checkpoint: str = ""  # converted checkpoint dir (convert's format)
    preset: str = ""  # architecture YAML, random init (tests, smoke runs)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data_dir: str = ""  # video folder (sets data.data_dir)
    steps: int = 1000
    out_dir: str = "runs/repvideo"  # checkpoints/, metrics.jsonl, export/, tfds/
    seed: int = 0

    # ---- model
    model_preset: str = ""  # DiT architecture YAML, random init ("" → CogVideoX-2B defaults); unused with init_checkpoint
    init_checkpoint: str = ""  # converted DiT/RepVideo checkpoint to fine-tune from
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # DiTConfig overrides, e.g. repvideo: true
    gate_init: float | None = None  # value for gates the init checkpoint lacks (None = model default)
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # master weights are always float32
    remat: Literal["none", "full", "dots"] = "full"  # activation checkpointing of each scanned block
    attention_backend: str = "auto"

    # ---- objective (spec §1.7)
    trainable: Literal["gates", "all"] = "all"  # gates only, or gates + the whole DiT
    gate_pattern: str = r"(^|\.)gates$"  # regex over dotted param paths selecting the gates
    text_dropout: float = 0.1  # prob. of zeroing a sample's text embedding (CFG)
    snr_shift_scale: float = 3.0

    # ---- frozen encoders (needed unless data.preprocess already stores latents)
    vae: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    text: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    tokenizer: str = ""  # T5 sentencepiece model (a CogVideoX folder's tokenizer/spiece.model)

    # ---- bookkeeping
    log_every: int = 10
    save_every: int = 500
    keep: int = 3
    progress: bool = True

    mesh: MeshConfig | None = None  # data / fsdp / context / tensor sizes (jax_repvideo.sharding)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def __post_init__(self):
        if self.steps < 1 or self.log_every < 1 or self.save_every < 1 or self.keep < 1:
            raise ConfigError("steps, log_every, save_every and keep must be ≥ 1")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ConfigError(f"text_dropout must be in [0, 1], got {self.text_dropout}")

    @property
    def data_config(self) -> DataConfig:
        """``data`` with the top-level ``data_dir`` override applied."""
        return dataclasses.replace(self.data, data_dir=self.data_dir or self.data.data_dir)

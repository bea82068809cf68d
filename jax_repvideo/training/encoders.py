"""The frozen CogVideoX VAE + T5 used to turn clips and captions into DiT inputs.

``FrozenEncoder`` implements ``data.Encoder``: the preprocessing pass stores its outputs in the
tfds dataset, and training on pixels calls it per batch, so both paths give the same numbers.
Videos are encoded to the posterior *mean* times ``scaling_factor`` (deterministic, so a stored
latent is reproducible); captions are tokenized to ``max_text_seq_length`` with the T5
sentencepiece tokenizer (EOS, pad, no attention mask, as CogVideoX) and encoded.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from jax_repvideo import checkpoint
from jax_repvideo.config import ConfigError, from_dict, load_yaml
from jax_repvideo.models import text_t5, vae_cogvideox
from jax_repvideo.models.dit import DiTConfig
from jax_repvideo.models.tokenizer_t5 import T5Tokenizer
from jax_repvideo.training.config import EncoderConfig, TrainConfig

class FrozenEncoder:
    """Built from factories: the models are created (or restored) on first use only, so a run whose
    latents are already in the tfds cache never loads the VAE or T5."""

    def __init__(self, make_vae: Callable[[], vae_cogvideox.CogVideoXVAE], vae_config: vae_cogvideox.CogVideoXVAEConfig,
                 make_t5: Callable[[], text_t5.T5Encoder], t5_config: text_t5.T5Config,
                 tokenize: Callable[[list[str]], np.ndarray], fingerprint: str):
        self._make_vae, self._make_t5 = make_vae, make_t5
        self.vae_config, self.t5_config = vae_config, t5_config
        self.tokenize, self.fingerprint = tokenize, fingerprint

    @functools.cached_property
    def vae(self) -> vae_cogvideox.CogVideoXVAE:
        return self._make_vae()

    @functools.cached_property
    def t5(self) -> text_t5.T5Encoder:
        return self._make_t5()

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        abstract = nnx.eval_shape(lambda: vae_cogvideox.CogVideoXVAE(self.vae_config, rngs=nnx.Rngs(0)))
        frames = jax.ShapeDtypeStruct((1, num_frames, height, width, 3), np.float32)
        mean = jax.eval_shape(lambda x: vae_cogvideox.encode(abstract, x)[0], frames)
        return tuple(mean.shape[1:])

    def text_shape(self) -> tuple[int, int]:
        return (self.tokenize([""]).shape[1], self.t5_config.d_model)

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        x = np.asarray(frames, np.float32) / 127.5 - 1.0
        mean, _ = vae_cogvideox.encode(self.vae, x)
        return np.asarray(vae_cogvideox.scale_latents(self.vae, mean), np.float32)

    def encode_text(self, captions: list[str]) -> np.ndarray:
        return np.asarray(text_t5.encode(self.t5, self.tokenize(list(captions))), np.float32)


def _load(enc: EncoderConfig, config_cls, model_cls, what: str):
    """``(config, factory, fingerprint)`` of a frozen model; the factory restores or random-inits it."""
    if enc.checkpoint:
        saved = checkpoint.read_config(enc.checkpoint)
        cfg = from_dict(config_cls, saved.get("model", saved), f"{what}.checkpoint")

        def make():
            abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
            return checkpoint.restore_into(enc.checkpoint, abstract)

        return cfg, make, f"{what}:{Path(enc.checkpoint).absolute()}"
    if enc.preset:
        data = load_yaml(enc.preset)
        cfg = from_dict(config_cls, data.get("model", data), what)
        digest = hashlib.sha256(repr(cfg).encode()).hexdigest()[:8]
        # rbg keys: eager threefry init compiles a large program per parameter shape
        return (cfg, lambda: model_cls(cfg, rngs=nnx.Rngs(jax.random.key(enc.seed, impl="rbg"))),
                f"{what}:random:{enc.seed}:{digest}")
    raise ConfigError(f"{what}: set {what}.checkpoint (converted weights) or {what}.preset (random init)")


def build_encoder(cfg: TrainConfig, dit: DiTConfig) -> FrozenEncoder:
    """The VAE and T5 named by ``cfg.vae`` / ``cfg.text``, checked against the DiT's input sizes."""
    vae_cfg, make_vae, vae_id = _load(cfg.vae, vae_cogvideox.CogVideoXVAEConfig, vae_cogvideox.CogVideoXVAE, "vae")
    t5_cfg, make_t5, t5_id = _load(cfg.text, text_t5.T5Config, text_t5.T5Encoder, "text")
    if vae_cfg.latent_channels != dit.in_channels:
        raise ConfigError(f"vae.latent_channels {vae_cfg.latent_channels} != model.in_channels {dit.in_channels}")
    if t5_cfg.d_model != dit.text_embed_dim:
        raise ConfigError(f"text d_model {t5_cfg.d_model} != model.text_embed_dim {dit.text_embed_dim}")
    if not cfg.tokenizer:
        raise ConfigError("tokenizer: set the T5 sentencepiece model (a model folder's tokenizer/spiece.model)")
    tokenize = T5Tokenizer(cfg.tokenizer, dit.max_text_seq_length)
    fingerprint = f"{vae_id}|{t5_id}|{Path(cfg.tokenizer).absolute()}:{dit.max_text_seq_length}"
    return FrozenEncoder(make_vae, vae_cfg, make_t5, t5_cfg, tokenize, fingerprint)

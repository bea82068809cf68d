"""A diffusers ``AutoencoderKLCogVideoX`` folder (``vae/``) → ``jax_repvideo.models.vae_cogvideox``.

The Flax module tree uses the diffusers names, so the table only renames leaves: GroupNorm
``weight`` → ``scale``; conv ``weight`` → ``kernel`` (Conv3d OIDHW → DHWIO, the per-frame
down/upsampler Conv2d OIHW → HWIO). Every key of the folder has a place; none is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from convert.common import (Rule, conv2d, conv3d, convert_state_dict, fill_params, load_safetensors_folder,
                            model_folder)
from jax_repvideo import checkpoint
from jax_repvideo.config import to_dict
from jax_repvideo.models.vae_cogvideox import CogVideoXVAE, CogVideoXVAEConfig, config_from_diffusers

_NORM = r"(.*\.(?:norm1|norm2|norm_out|norm_layer))"


def _conv(w: np.ndarray) -> np.ndarray:
    return conv3d(w) if w.ndim == 5 else conv2d(w)


RULES = [
    Rule(_NORM + r"\.weight", r"\1.scale"),
    Rule(_NORM + r"\.bias", r"\1.bias"),
    Rule(r"(.*)\.weight", r"\1.kernel", _conv),
    Rule(r"(.*)\.bias", r"\1.bias"),
]


def abstract_vae(cfg: CogVideoXVAEConfig) -> CogVideoXVAE:
    """The model with shapes only (``nnx.eval_shape``): nothing is allocated."""
    return nnx.eval_shape(lambda: CogVideoXVAE(cfg, rngs=nnx.Rngs(0)))


def convert_vae(state: Mapping[str, Any], cfg: CogVideoXVAEConfig) -> dict:
    """diffusers VAE tensors → flat ``{dotted path: array}``; raises ``CheckpointError`` on any key problem."""
    abstract = nnx.state(abstract_vae(cfg), nnx.Param)
    return convert_state_dict(state, RULES, abstract, what="CogVideoX VAE (diffusers vae/)")


def vae_folder(src: str | Path) -> Path:
    """``src`` itself when it holds the VAE's ``config.json``, else ``src/vae``."""
    return model_folder(src, "vae", "diffusers VAE")


def load_vae(src: str | Path, **config_overrides) -> tuple[CogVideoXVAEConfig, dict]:
    """Reads a diffusers VAE folder → (our config, flat params)."""
    folder = vae_folder(src)
    cfg = config_from_diffusers(json.loads((folder / "config.json").read_text()), **config_overrides)
    return cfg, convert_vae(load_safetensors_folder(folder), cfg)


def load_model(src: str | Path, **config_overrides) -> CogVideoXVAE:
    """A ready ``CogVideoXVAE`` from a diffusers folder (params placed on the default device)."""
    cfg, flat = load_vae(src, **config_overrides)
    return fill_params(abstract_vae(cfg), flat)


def main(src: str, dst: str) -> None:
    cfg, flat = load_vae(src)
    checkpoint.save(dst, flat, {"kind": "cogvideox-vae", "model": to_dict(cfg)})
    print(f"wrote {len(flat)} CogVideoX VAE arrays to {dst}")

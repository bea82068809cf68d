"""LVDM ``first_stage_model.*`` (SD KL autoencoder) → ``jax_repvideo.models.vae_kl.AutoencoderKL``.

The Flax module tree uses the PyTorch names, so the table only renames the leaves: GroupNorm
``weight`` → ``scale``, conv ``weight`` → ``kernel`` (OIHW → HWIO). Every key of the released
checkpoint's ``first_stage_model.*`` group has a place; none is ignored.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from convert.common import Rule, conv2d, convert_state_dict
from jax_repvideo.models.vae_kl import VIDEOCRAFTER2_VAE, AutoencoderKL, AutoencoderKLConfig

PREFIX = "first_stage_model."

_SIDE = r"(?:encoder|decoder)"
_NORM = rf"({_SIDE}\.(?:.*\.(?:norm1|norm2|norm)|norm_out))"
_CONV = (rf"({_SIDE}\.(?:conv_in|conv_out|.*\.(?:conv1|conv2|nin_shortcut|conv|q|k|v|proj_out))"
         r"|quant_conv|post_quant_conv)")

DEFAULT_CONFIG = VIDEOCRAFTER2_VAE  # the released VideoCrafter2 model

RULES = [
    Rule(_NORM + r"\.weight", r"\1.scale"),
    Rule(_NORM + r"\.bias", r"\1.bias"),
    Rule(_CONV + r"\.weight", r"\1.kernel", conv2d),
    Rule(_CONV + r"\.bias", r"\1.bias"),
]


def abstract_vae(cfg: AutoencoderKLConfig | None = None) -> AutoencoderKL:
    """The model with shapes only (``nnx.eval_shape``): nothing is allocated."""
    cfg = cfg or DEFAULT_CONFIG
    return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))


def convert_vae(state: Mapping[str, Any], cfg: AutoencoderKLConfig | None = None) -> dict:
    """``first_stage_model.*`` tensors with the prefix removed → flat ``{dotted path: array}``.

    Raises ``CheckpointError`` naming any unexpected, missing or mis-shaped key.
    """
    abstract = nnx.state(abstract_vae(cfg), nnx.Param)
    return convert_state_dict(state, RULES, abstract, what="VideoCrafter2 VAE (first_stage_model)")

"""LVDM ``cond_stage_model.model.*`` (OpenCLIP text tower) → ``models.text_clip.OpenCLIPTextEncoder``.

Resblock tensors fill one slice of the stacked (layer-axis) params. The fused ``attn.in_proj``
stays fused. ``text_projection`` and ``logit_scale`` are **ignored on purpose**: they are real keys of
the released checkpoint (so refusing them would refuse every VideoCrafter2 checkpoint), and the
penultimate-layer output that VideoCrafter2 conditions on never reads them (no pooling, no
projection). Any other key without a place raises ``CheckpointError``.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from convert.common import Rule, convert_state_dict, identity, linear
from jax_repvideo.models.text_clip import VIDEOCRAFTER2_TEXT, OpenCLIPTextConfig, OpenCLIPTextEncoder

PREFIX = "cond_stage_model.model."
IGNORED = (r"text_projection", r"logit_scale")

_BLOCK = r"transformer\.resblocks\.(\d+)\."
DEFAULT_CONFIG = VIDEOCRAFTER2_TEXT  # the released VideoCrafter2 model

RULES = [
    Rule(r"token_embedding\.weight", "token_embedding.embedding"),
    Rule(r"positional_embedding", "positional_embedding"),
    Rule(r"ln_final\.weight", "ln_final.scale"),
    Rule(r"ln_final\.bias", "ln_final.bias"),
    Rule(_BLOCK + r"(ln_1|ln_2)\.weight", r"resblocks.\2.scale[\1]"),
    Rule(_BLOCK + r"(ln_1|ln_2)\.bias", r"resblocks.\2.bias[\1]"),
    Rule(_BLOCK + r"attn\.in_proj_weight", r"resblocks.attn.in_proj.kernel[\1]", linear),
    Rule(_BLOCK + r"attn\.in_proj_bias", r"resblocks.attn.in_proj.bias[\1]", identity),
    Rule(_BLOCK + r"attn\.out_proj\.weight", r"resblocks.attn.out_proj.kernel[\1]", linear),
    Rule(_BLOCK + r"attn\.out_proj\.bias", r"resblocks.attn.out_proj.bias[\1]"),
    Rule(_BLOCK + r"mlp\.(c_fc|c_proj)\.weight", r"resblocks.mlp.\2.kernel[\1]", linear),
    Rule(_BLOCK + r"mlp\.(c_fc|c_proj)\.bias", r"resblocks.mlp.\2.bias[\1]"),
]


def abstract_text(cfg: OpenCLIPTextConfig | None = None) -> OpenCLIPTextEncoder:
    """The model with shapes only (``nnx.eval_shape``): nothing is allocated."""
    cfg = cfg or DEFAULT_CONFIG
    return nnx.eval_shape(lambda: OpenCLIPTextEncoder(cfg, rngs=nnx.Rngs(0)))


def convert_text(state: Mapping[str, Any], cfg: OpenCLIPTextConfig | None = None) -> dict:
    """``cond_stage_model.model.*`` tensors with the prefix removed → flat ``{dotted path: array}``.

    Raises ``CheckpointError`` naming any unexpected, missing or mis-shaped key.
    """
    abstract = nnx.state(abstract_text(cfg), nnx.Param)
    return convert_state_dict(state, RULES, abstract, ignore=IGNORED,
                              what="VideoCrafter2 text encoder (cond_stage_model.model)")

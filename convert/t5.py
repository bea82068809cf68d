"""A transformers ``T5EncoderModel`` folder (CogVideoX's ``text_encoder/``) → ``jax_repvideo.models.text_t5``.

Sharded safetensors are read through their index; bf16/fp16 tensors are widened to float32 on
read and then cast to the model's ``param_dtype``. Per-layer tensors fill slices of the stacked
layer params. The token embedding may appear as ``shared.weight``, ``encoder.embed_tokens.weight``
or both (they are tied); one of them fills ``shared.embedding``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from flax import nnx

from convert.common import (CheckpointError, Rule, check_keys_only, convert_state_dict, fill_params, linear,
                            load_safetensors_folder, model_folder)
from jax_repvideo import checkpoint
from jax_repvideo.config import to_dict
from jax_repvideo.models.text_t5 import T5Config, T5Encoder, config_from_transformers

_BLOCK = r"encoder\.block\.(\d+)\.layer"

RULES = [
    Rule(r"shared\.weight", "shared.embedding"),
    Rule(r"encoder\.embed_tokens\.weight", "shared.embedding"),
    Rule(_BLOCK + r"\.0\.SelfAttention\.relative_attention_bias\.weight", "relative_attention_bias"),
    Rule(_BLOCK + r"\.0\.layer_norm\.weight", r"layers.attn_norm[\1]"),
    Rule(_BLOCK + r"\.0\.SelfAttention\.(q|k|v|o)\.weight", r"layers.\2[\1]", linear),
    Rule(_BLOCK + r"\.1\.layer_norm\.weight", r"layers.ff_norm[\1]"),
    Rule(_BLOCK + r"\.1\.DenseReluDense\.(wi_0|wi_1|wo)\.weight", r"layers.\2[\1]", linear),
    Rule(r"encoder\.final_layer_norm\.weight", "final_layer_norm"),
]


def _ignored(keys) -> list[str]:
    """The tied duplicate of the embedding, when both names are present."""
    return [r"encoder\.embed_tokens\.weight"] if "shared.weight" in keys else []


def _check_single_bias(keys) -> None:
    extra = [k for k in keys if "relative_attention_bias" in k and not k.startswith("encoder.block.0.")]
    if extra:
        raise CheckpointError(f"T5: relative_attention_bias is expected in block 0 only, also found: {extra}")


def abstract_t5(cfg: T5Config) -> T5Encoder:
    return nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))


def convert_t5(state: Mapping[str, Any], cfg: T5Config) -> dict:
    """transformers T5 encoder tensors → flat ``{dotted path: array}``; strict on every key."""
    _check_single_bias(state)
    abstract = nnx.state(abstract_t5(cfg), nnx.Param)
    return convert_state_dict(state, RULES, abstract, ignore=_ignored(state), what="T5 encoder (text_encoder/)")


def check_manifest(keys_and_shapes: Mapping[str, Any], cfg: T5Config) -> None:
    """The strict key/shape check for a key → shape manifest, allocating nothing."""
    _check_single_bias(keys_and_shapes)
    abstract = nnx.state(abstract_t5(cfg), nnx.Param)
    check_keys_only(keys_and_shapes, RULES, abstract, ignore=_ignored(keys_and_shapes), what="T5 encoder manifest")


def text_encoder_folder(src: str | Path) -> Path:
    """``src`` itself when it holds a T5 ``config.json``, else ``src/text_encoder``."""
    return model_folder(src, "text_encoder", "transformers T5")


def load_t5(src: str | Path, **config_overrides) -> tuple[T5Config, dict]:
    folder = text_encoder_folder(src)
    cfg = config_from_transformers(json.loads((folder / "config.json").read_text()), **config_overrides)
    return cfg, convert_t5(load_safetensors_folder(folder), cfg)


def load_model(src: str | Path, **config_overrides) -> T5Encoder:
    """A ready ``T5Encoder`` from a transformers folder."""
    cfg, flat = load_t5(src, **config_overrides)
    return fill_params(abstract_t5(cfg), flat)


def main(src: str, dst: str) -> None:
    cfg, flat = load_t5(src)
    checkpoint.save(dst, flat, {"kind": "t5", "model": to_dict(cfg)})
    print(f"wrote {len(flat)} T5 encoder arrays to {dst}")

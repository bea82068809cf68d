"""diffusers ``CogVideoXTransformer3DModel`` folder → ``CogVideoXDiT`` params (orbax + config).

``SRC`` is a diffusers pipeline folder holding ``transformer/`` or the ``transformer/`` folder itself
(``config.json`` plus one or several sharded ``*.safetensors``). Layers land in the stacked
(scanned) parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.common import (CheckpointError, Rule, check_keys_only, conv2d, convert_state_dict, linear,
                            load_safetensors_folder, to_numpy)
from jax_repvideo import checkpoint
from jax_repvideo.config import from_dict, to_dict
from jax_repvideo.models.dit import CogVideoXDiT, DiTConfig

BLOCK = r"transformer_blocks\.(\d+)\."


def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".kernel", linear), Rule(src + r"\.bias", dst + ".bias")]


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".scale"), Rule(src + r"\.bias", dst + ".bias")]


def _stacked(rules: list[Rule]) -> list[Rule]:
    """Per-block rules: the target fills slice ``[layer]`` of the stacked parameter."""
    return [Rule(BLOCK + r.pattern, "blocks." + r.target + r"[\1]", r.transform) for r in rules]


RULES: list[Rule] = [
    Rule(r"patch_embed\.proj\.weight", "patch_embed.proj.kernel", conv2d),
    Rule(r"patch_embed\.proj\.bias", "patch_embed.proj.bias"),
    *_linear(r"patch_embed\.text_proj", "patch_embed.text_proj"),
    *_linear(r"time_embedding\.linear_1", "time_embedding.linear_1"),
    *_linear(r"time_embedding\.linear_2", "time_embedding.linear_2"),
    *_stacked([
        *_linear(r"norm1\.linear", "norm1.linear"),
        *_norm(r"norm1\.norm", "norm1.norm"),
        *_linear(r"attn1\.to_q", "attn1.to_q"),
        *_linear(r"attn1\.to_k", "attn1.to_k"),
        *_linear(r"attn1\.to_v", "attn1.to_v"),
        *_linear(r"attn1\.to_out\.0", "attn1.to_out"),
        *_norm(r"attn1\.norm_q", "attn1.norm_q"),
        *_norm(r"attn1\.norm_k", "attn1.norm_k"),
        *_linear(r"norm2\.linear", "norm2.linear"),
        *_norm(r"norm2\.norm", "norm2.norm"),
        *_linear(r"ff\.net\.0\.proj", "ff.proj_in"),
        *_linear(r"ff\.net\.2", "ff.proj_out"),
    ]),
    *_norm(r"norm_final", "norm_final"),
    *_linear(r"norm_out\.linear", "norm_out.linear"),
    *_norm(r"norm_out\.norm", "norm_out.norm"),
    *_linear(r"proj_out", "proj_out"),
]


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the diffusers model for ``cfg``, with its PyTorch shape."""
    d, e, hd, p = cfg.inner_dim, cfg.time_embed_dim, cfg.attention_head_dim, cfg.patch_size
    out: dict[str, tuple[int, ...]] = {}

    def lin(name, n_out, n_in, bias=True):
        out[f"{name}.weight"] = (n_out, n_in)
        if bias:
            out[f"{name}.bias"] = (n_out,)

    def norm(name, n, affine=cfg.norm_elementwise_affine):
        if affine:
            out[f"{name}.weight"] = out[f"{name}.bias"] = (n,)

    out["patch_embed.proj.weight"] = (d, cfg.in_channels, p, p)
    if cfg.patch_bias:
        out["patch_embed.proj.bias"] = (d,)
    lin("patch_embed.text_proj", d, cfg.text_embed_dim)
    lin("time_embedding.linear_1", e, d)
    lin("time_embedding.linear_2", e, e)
    for i in range(cfg.num_layers):
        blk = f"transformer_blocks.{i}"
        for n in ("norm1", "norm2"):
            lin(f"{blk}.{n}.linear", 6 * d, e)
            norm(f"{blk}.{n}.norm", d)
        for n in ("to_q", "to_k", "to_v"):
            lin(f"{blk}.attn1.{n}", d, d, cfg.attention_bias)
        lin(f"{blk}.attn1.to_out.0", d, d)
        norm(f"{blk}.attn1.norm_q", hd, True)
        norm(f"{blk}.attn1.norm_k", hd, True)
        lin(f"{blk}.ff.net.0.proj", 4 * d, d)
        lin(f"{blk}.ff.net.2", d, 4 * d)
    norm("norm_final", d)
    lin("norm_out.linear", 2 * d, e)
    norm("norm_out.norm", d)
    lin("proj_out", p * p * cfg.output_channels, d)
    return out


def check_source_keys(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                      what: str) -> None:
    """Names missing, unexpected and mis-shaped source keys (in the checkpoint's own names)."""
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = sorted(f"{k} {tuple(shapes[k])} (expected {tuple(expected[k])})"
                   for k in set(shapes) & set(expected) if tuple(shapes[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing))
    if extra:
        problems.append(f"{len(extra)} unexpected key(s): " + ", ".join(extra))
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped key(s): " + ", ".join(wrong))
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def abstract_model(cfg: DiTConfig, **kwargs) -> CogVideoXDiT:
    return nnx.eval_shape(lambda: CogVideoXDiT(cfg, rngs=nnx.Rngs(0), **kwargs))


def convert_diffusers_state(state: Mapping[str, Any], cfg: DiTConfig, what: str = "diffusers transformer"
                            ) -> dict[str, np.ndarray]:
    """diffusers state dict (name → tensor/array/lazy) → flat dotted params of ``CogVideoXDiT``."""
    if cfg.repvideo:
        raise CheckpointError(f"{what}: a diffusers CogVideoX checkpoint has no RepVideo gates; use repvideo=false")
    check_source_keys({k: source_shape(v) for k, v in state.items()}, expected_shapes(cfg), what)
    return convert_state_dict(state, RULES, nnx.state(abstract_model(cfg), nnx.Param), what=what)


def check_manifest(keys_and_shapes: Mapping[str, Any], cfg: DiTConfig, what: str = "diffusers manifest") -> None:
    """The strict conversion check for a key → shape manifest, without allocating any weights."""
    check_source_keys({k: tuple(s) for k, s in keys_and_shapes.items()}, expected_shapes(cfg), what)
    check_keys_only(keys_and_shapes, RULES, nnx.state(abstract_model(cfg), nnx.Param), what=what)


def source_shape(value: Any) -> tuple[int, ...]:
    if hasattr(value, "shape"):
        return tuple(value.shape)
    if hasattr(value, "path"):  # lazy safetensors entry: read the header only
        from safetensors import safe_open

        with safe_open(value.path, framework="np") as f:
            return tuple(f.get_slice(value.key).get_shape())
    return tuple(to_numpy(value).shape)


def config_from_diffusers(data: Mapping[str, Any]) -> DiTConfig:
    """The diffusers ``config.json`` (``_class_name`` etc. dropped) as a strict ``DiTConfig``."""
    return from_dict(DiTConfig, {k: v for k, v in data.items() if not k.startswith("_")})


def transformer_folder(src: str | Path) -> Path:
    src = Path(src)
    folder = src / "transformer" if (src / "transformer" / "config.json").is_file() else src
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{src}: no transformer/config.json or config.json (diffusers folder expected)")
    return folder


def load_diffusers(src: str | Path) -> tuple[DiTConfig, dict[str, np.ndarray]]:
    folder = transformer_folder(src)
    cfg = config_from_diffusers(json.loads((folder / "config.json").read_text()))
    return cfg, convert_diffusers_state(load_safetensors_folder(folder), cfg, what=str(folder))


def model_from_params(cfg: DiTConfig, flat: Mapping[str, np.ndarray], **kwargs) -> CogVideoXDiT:
    """A concrete ``CogVideoXDiT`` holding ``flat`` (dotted path → array, blocks stacked along a
    leading layer axis, as converted) as its params; ``scan_layers=False`` takes one slice per block."""
    graphdef, state = nnx.split(abstract_model(cfg, **kwargs))
    pure = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, _fill(pure, flat, ""))
    return nnx.merge(graphdef, state)


def _fill(tree, flat, prefix):
    if isinstance(tree, Mapping):
        return {k: _fill(v, flat, f"{prefix}{k}.") for k, v in tree.items()}
    path = prefix[:-1]
    if path not in flat and path.startswith("blocks."):  # per-block layout: "blocks.<i>.<rest>"
        _, layer, rest = path.split(".", 2)
        return jnp.asarray(flat[f"blocks.{rest}"][int(layer)], tree.dtype)
    return jnp.asarray(flat[path], tree.dtype)


def main(src: str, dst: str) -> None:
    cfg, flat = load_diffusers(src)
    checkpoint.save(dst, flat, {"kind": "cogvideox", "model": to_dict(cfg)})
    print(f"converted {len(flat)} parameter arrays from {src} → {dst}")

"""RepVideo's SAT checkpoint → ``CogVideoXDiT(repvideo=True)`` params (orbax + config).

The released checkpoint is a SAT torch file (``<iteration>/mp_rank_00_model_states.pt``, the state dict
under ``module``, keys prefixed ``model.diffusion_model.``); unprefixed SAT names (the fixture's
``weights.safetensors``) are accepted too. Per spec §1.5:

* ``attention.query_key_value`` is fused: rows q | k | v;
* ``adaLN_modulations.{i}.1`` holds 12 chunks (shift, scale, gate) × (attn, mlp) × (video, text):
  ``norm1.linear`` = chunks 0,1,2,6,7,8 and ``norm2.linear`` = chunks 3,4,5,9,10,11;
* ``transformer.learnable_gating`` is the ``(num_layers,)`` gate vector;
* ``mixins.pos_embed.pos_embedding`` is a fixed sin-cos buffer that the model recomputes: dropped.

``SRC`` may be that ``.pt`` file, a RepVideo folder (with ``latest``), a ``.safetensors``/``.npz`` file,
or a folder with ``weights.safetensors`` and a ``config.json`` holding ``sat_network_config``. Without
such a config the full-size RepVideo-2B architecture (``configs/repvideo_2b.yaml``) is assumed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from convert.cogvideox import abstract_model, check_source_keys, source_shape
from convert.common import (CheckpointError, Rule, check_keys_only, conv2d, convert_state_dict, linear, load_safetensors,
                            load_torch_state_dict)
from jax_repvideo import checkpoint
from jax_repvideo.config import to_dict
from jax_repvideo.models.dit import DiTConfig

PREFIX = "model.diffusion_model."
POS_TABLE = r"mixins\.pos_embed\.pos_embedding"
LAYER = r"transformer\.layers\.(\d+)\."
ADALN = r"mixins\.adaln_layer\."
REPVIDEO_2B = DiTConfig(repvideo=True, final_norm_eps=1e-6)


def split_qkv(w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Fused ``(3D, ...)`` rows q | k | v → three arrays, Linear weights transposed to ``(in, out)``."""
    parts = np.split(w, 3, axis=0)
    return tuple(linear(p) if p.ndim == 2 else p for p in parts)


def split_adaln(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 chunks ``(video, text) × (attn, mlp) × (shift, scale, gate)`` → norm1, norm2 (transposed).

    Pure reshapes and basic slices, so a zero-strided shape-only array stays free.
    """
    chunk = w.shape[0] // 12
    grouped = w.reshape(2, 2, 3 * chunk, *w.shape[1:])  # (modality, attn|mlp, rows)
    norm1 = grouped[:, 0].reshape(6 * chunk, *w.shape[1:])
    norm2 = grouped[:, 1].reshape(6 * chunk, *w.shape[1:])
    return (linear(norm1), linear(norm2)) if w.ndim == 2 else (norm1, norm2)


def _linear(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".kernel", linear), Rule(src + r"\.bias", dst + ".bias")]


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + ".scale"), Rule(src + r"\.bias", dst + ".bias")]


def _layer(pattern_prefix: str, rules: list[Rule]) -> list[Rule]:
    def target(t):
        return "blocks." + t + r"[\1]"

    return [Rule(pattern_prefix + r.pattern,
                 target(r.target) if isinstance(r.target, str) else tuple(target(t) for t in r.target),
                 r.transform) for r in rules]


RULES: list[Rule] = [
    Rule(r"mixins\.patch_embed\.proj\.weight", "patch_embed.proj.kernel", conv2d),
    Rule(r"mixins\.patch_embed\.proj\.bias", "patch_embed.proj.bias"),
    *_linear(r"mixins\.patch_embed\.text_proj", "patch_embed.text_proj"),
    *_linear(r"time_embed\.0", "time_embedding.linear_1"),
    *_linear(r"time_embed\.2", "time_embedding.linear_2"),
    Rule(r"transformer\.learnable_gating", "gates"),
    *_layer(LAYER, [
        *_norm(r"input_layernorm", "norm1.norm"),
        *[Rule(r"attention\.query_key_value\." + n, tuple(f"attn1.{q}.{t}" for q in ("to_q", "to_k", "to_v")),
               split_qkv) for n, t in (("weight", "kernel"), ("bias", "bias"))],
        *_linear(r"attention\.dense", "attn1.to_out"),
        *_norm(r"post_attention_layernorm", "norm2.norm"),
        *_linear(r"mlp\.dense_h_to_4h", "ff.proj_in"),
        *_linear(r"mlp\.dense_4h_to_h", "ff.proj_out"),
    ]),
    *_layer(ADALN + r"adaLN_modulations\.(\d+)\.1\.", [
        Rule("weight", ("norm1.linear.kernel", "norm2.linear.kernel"), split_adaln),
        Rule("bias", ("norm1.linear.bias", "norm2.linear.bias"), split_adaln),
    ]),
    *_layer(ADALN + r"query_layernorm_list\.(\d+)", _norm("", "attn1.norm_q")),
    *_layer(ADALN + r"key_layernorm_list\.(\d+)", _norm("", "attn1.norm_k")),
    *_norm(r"transformer\.final_layernorm", "norm_final"),
    *_norm(r"mixins\.final_layer\.norm_final", "norm_out.norm"),
    *_linear(r"mixins\.final_layer\.adaLN_modulation\.1", "norm_out.linear"),
    *_linear(r"mixins\.final_layer\.linear", "proj_out"),
]


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every (unprefixed) SAT key of RepVideo's DiT for ``cfg`` except the pos table, with its shape."""
    d, e, hd, p = cfg.inner_dim, cfg.time_embed_dim, cfg.attention_head_dim, cfg.patch_size
    out: dict[str, tuple[int, ...]] = {}

    def lin(name, n_out, n_in):
        out[f"{name}.weight"], out[f"{name}.bias"] = (n_out, n_in), (n_out,)

    def norm(name, n):
        out[f"{name}.weight"] = out[f"{name}.bias"] = (n,)

    out["mixins.patch_embed.proj.weight"] = (d, cfg.in_channels, p, p)
    out["mixins.patch_embed.proj.bias"] = (d,)
    lin("mixins.patch_embed.text_proj", d, cfg.text_embed_dim)
    lin("time_embed.0", e, d)
    lin("time_embed.2", e, e)
    out["transformer.learnable_gating"] = (cfg.num_layers,)
    for i in range(cfg.num_layers):
        layer = f"transformer.layers.{i}"
        norm(f"{layer}.input_layernorm", d)
        lin(f"{layer}.attention.query_key_value", 3 * d, d)
        lin(f"{layer}.attention.dense", d, d)
        norm(f"{layer}.post_attention_layernorm", d)
        lin(f"{layer}.mlp.dense_h_to_4h", 4 * d, d)
        lin(f"{layer}.mlp.dense_4h_to_h", d, 4 * d)
        lin(f"mixins.adaln_layer.adaLN_modulations.{i}.1", 12 * d, e)
        norm(f"mixins.adaln_layer.query_layernorm_list.{i}", hd)
        norm(f"mixins.adaln_layer.key_layernorm_list.{i}", hd)
    norm("transformer.final_layernorm", d)
    norm("mixins.final_layer.norm_final", d)
    lin("mixins.final_layer.adaLN_modulation.1", 2 * d, e)
    lin("mixins.final_layer.linear", p * p * cfg.output_channels, d)
    return out


def sat_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drops the ``model.diffusion_model.`` prefix where present; other checkpoint parts are errors."""
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def convert_sat_state(state: Mapping[str, Any], cfg: DiTConfig, what: str = "RepVideo SAT checkpoint"
                      ) -> dict[str, np.ndarray]:
    """SAT state dict (prefixed or not) → flat dotted params of ``CogVideoXDiT(repvideo=True)``."""
    if not cfg.repvideo:
        raise CheckpointError(f"{what}: the RepVideo converter needs a config with repvideo=true")
    state = sat_keys(state)
    shapes = {k: source_shape(v) for k, v in state.items() if not re.fullmatch(POS_TABLE, k)}
    check_source_keys(shapes, expected_shapes(cfg), what)
    return convert_state_dict(state, RULES, nnx.state(abstract_model(cfg), nnx.Param), ignore=[POS_TABLE],
                              what=what)


def check_manifest(keys_and_shapes: Mapping[str, Any], cfg: DiTConfig = REPVIDEO_2B,
                   what: str = "RepVideo SAT manifest") -> None:
    """The strict conversion check for a key → shape manifest (prefixed or not), allocating nothing."""
    shapes = {k: tuple(s) for k, s in sat_keys(keys_and_shapes).items()}
    check_source_keys({k: s for k, s in shapes.items() if not re.fullmatch(POS_TABLE, k)},
                      expected_shapes(cfg), what)
    check_keys_only(shapes, RULES, nnx.state(abstract_model(cfg), nnx.Param), ignore=[POS_TABLE], what=what)


def config_from_sat(network_config: Mapping[str, Any]) -> DiTConfig:
    """RepVideo's ``model.network_config`` (``sat/configs/cogvideox_2b.yaml``) as a ``DiTConfig``."""
    params = network_config.get("params", network_config)
    modules = params.get("modules", {})
    pos = modules.get("pos_embed_config", {}).get("params", {})
    patch = modules.get("patch_embed_config", {}).get("params", {})
    if pos.get("height_interpolation", 1.875) != pos.get("width_interpolation", 1.875):
        raise CheckpointError("SAT config: height_interpolation != width_interpolation is not supported")
    heads, hidden = params["num_attention_heads"], params["hidden_size"]
    return DiTConfig(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=params["in_channels"],
        out_channels=params["out_channels"],
        time_embed_dim=params.get("time_embed_dim", hidden),
        text_embed_dim=patch.get("text_hidden_size", 4096),
        num_layers=params["num_layers"],
        sample_width=params["latent_width"],
        sample_height=params["latent_height"],
        sample_frames=params["num_frames"],
        patch_size=params["patch_size"],
        temporal_compression_ratio=params.get("time_compressed_rate", 4),
        max_text_seq_length=pos.get("text_length", 226),
        norm_elementwise_affine=params.get("elementwise_affine", True),
        spatial_interpolation_scale=float(pos.get("height_interpolation", 1.875)),
        temporal_interpolation_scale=float(pos.get("time_interpolation", 1.0)),
        norm_eps=1e-5,  # SAT layernorm_epsilon default
        final_norm_eps=1e-6,  # SAT FinalLayerMixin
        repvideo=True,
    )


def weights_file(src: str | Path) -> Path:
    src = Path(src)
    if src.is_file():
        return src
    if (src / "latest").is_file():  # SAT save folder: latest → <iteration>/mp_rank_00_model_states.pt
        src = src / (src / "latest").read_text().strip()
    for name in ("mp_rank_00_model_states.pt", "weights.safetensors", "weights.npz"):
        if (src / name).is_file():
            return src / name
    raise CheckpointError(f"{src}: no mp_rank_00_model_states.pt, weights.safetensors or weights.npz found")


def load_sat_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors([path])
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    return load_torch_state_dict(path)


def read_config(src: str | Path) -> DiTConfig:
    """The architecture from ``SRC/config.json`` (``sat_network_config``) or the RepVideo-2B default."""
    src = Path(src)
    config_file = (src if src.is_dir() else src.parent) / "config.json"
    if config_file.is_file():
        data = json.loads(config_file.read_text())
        if "sat_network_config" in data:
            return config_from_sat(data["sat_network_config"])
    return REPVIDEO_2B


def load_repvideo(src: str | Path) -> tuple[DiTConfig, dict[str, np.ndarray]]:
    cfg, path = read_config(src), weights_file(src)
    return cfg, convert_sat_state(load_sat_state(path), cfg, what=str(path))


def main(src: str, dst: str) -> None:
    cfg, flat = load_repvideo(src)
    checkpoint.save(dst, flat, {"kind": "repvideo", "model": to_dict(cfg)})
    print(f"converted {len(flat)} parameter arrays from {src} → {dst}")

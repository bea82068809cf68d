"""LVDM / VideoCrafter2 ``.ckpt`` → orbax + config (``jax-repvideo convert videocrafter2 SRC DST``).

The checkpoint's ``state_dict`` splits by prefix (spec §2.10):

* ``model.diffusion_model.*``  → the U-Net, through the key table ``unet_rules``;
* ``first_stage_model.*``      → ``convert.videocrafter2_vae.convert_vae``;
* ``cond_stage_model.model.*`` → ``convert.videocrafter2_text.convert_text``;
* the 13 schedule buffers      → checked against the scaled-linear schedule, not stored.

Anything else is an error that names the keys. The output holds one parameter tree
``{"unet": ..., "vae": ..., "text": ...}`` (the groups the checkpoint has) and ``config.json``
``{"kind": "videocrafter2", "unet": <UNet3DConfig>, "schedule": ..., "groups": [...]}``.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from convert.common import (CheckpointError, Rule, conv1x1_as_linear, conv2d, conv3d, convert_state_dict, identity,
                            linear, load_torch_state_dict, strip_prefix, to_numpy)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."

# VideoCrafter2's LatentDiffusion schedule (spec §2.1-2.2).
SCHEDULE = {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012, "use_scale": True,
            "scale_a": 1.0, "scale_b": 0.7, "mid_step": 400}


def _affine(src: str, dst: str, transform=identity, weight_name: str = "kernel") -> list[Rule]:
    """``src.weight`` → ``dst.<weight_name>`` (transformed) and ``src.bias`` → ``dst.bias``."""
    return [Rule(src + r"\.weight", dst + "." + weight_name, transform), Rule(src + r"\.bias", dst + ".bias")]


def _norm(src: str, dst: str) -> list[Rule]:
    return _affine(src, dst, identity, "scale")


def unet_rules(cfg) -> list[Rule]:
    """PyTorch key → Flax path for every U-Net tensor. Block paths are shared by both trees, so each
    rule keeps the prefix ``(.*)`` and renames the leaf module."""
    # Transformer proj_in/out: Linear with use_linear, else 1×1 convs; init_attn always has Conv1d.
    proj = linear if cfg.use_linear else conv1x1_as_linear
    tb = r"(.*\.transformer_blocks\.\d+)"
    return [
        *_affine(r"(time_embed|fps_embedding)\.0", r"\1.linear_1", linear),
        *_affine(r"(time_embed|fps_embedding)\.2", r"\1.linear_2", linear),
        *_affine(r"input_blocks\.0\.0", "input_blocks.0.0", conv2d),
        *_norm(r"out\.0", "out_norm"),
        *_affine(r"out\.2", "out_conv", conv2d),
        # ResBlock
        *_norm(r"(.*)\.in_layers\.0", r"\1.in_norm"),
        *_affine(r"(.*)\.in_layers\.2", r"\1.in_conv", conv2d),
        *_affine(r"(.*)\.emb_layers\.1", r"\1.emb_proj", linear),
        *_norm(r"(.*)\.out_layers\.0", r"\1.out_norm"),
        *_affine(r"(.*)\.out_layers\.3", r"\1.out_conv", conv2d),
        *_affine(r"(.*)\.skip_connection", r"\1.skip", conv2d),
        *_norm(r"(.*)\.temopral_conv\.conv([1-4])\.0", r"\1.temporal_conv.norm\2"),
        *_affine(r"(.*)\.temopral_conv\.conv(1)\.2", r"\1.temporal_conv.conv\2", conv3d),
        *_affine(r"(.*)\.temopral_conv\.conv([2-4])\.3", r"\1.temporal_conv.conv\2", conv3d),
        # Down / Upsample
        *_affine(r"(.*)\.op", r"\1.op", conv2d),
        *_affine(r"(.*)\.conv", r"\1.conv", conv2d),
        # Spatial / Temporal transformers
        *_affine(r"(init_attn\.0)\.proj_(in|out)", r"\1.proj_\2", conv1x1_as_linear),
        *_affine(r"(.*)\.proj_(in|out)", r"\1.proj_\2", proj),
        *_norm(r"(.*)\.norm", r"\1.norm"),
        Rule(tb + r"\.(attn[12])\.to_([qkv])\.weight", r"\1.\2.to_\3.kernel", linear),
        *_affine(tb + r"\.(attn[12])\.to_out\.0", r"\1.\2.to_out", linear),
        Rule(tb + r"\.(attn[12])\.relative_position_([kv])\.embeddings_table", r"\1.\2.relative_position_\3"),
        *_affine(tb + r"\.ff\.net\.0\.proj", r"\1.ff.proj_in", linear),
        *_affine(tb + r"\.ff\.net\.2", r"\1.ff.proj_out", linear),
        *_norm(tb + r"\.(norm[123])", r"\1.\2"),
    ]


def _wb(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias"]


def _transformer_keys(path: str, cfg, temporal: bool) -> list[str]:
    keys = _wb(f"{path}.norm") + _wb(f"{path}.proj_in") + _wb(f"{path}.proj_out")
    for d in range(cfg.transformer_depth):
        block = f"{path}.transformer_blocks.{d}"
        for attn in ("attn1", "attn2"):
            keys += [f"{block}.{attn}.to_{n}.weight" for n in "qkv"] + _wb(f"{block}.{attn}.to_out.0")
            if temporal and cfg.use_relative_position:
                keys += [f"{block}.{attn}.relative_position_{n}.embeddings_table" for n in "kv"]
        keys += _wb(f"{block}.ff.net.0.proj") + _wb(f"{block}.ff.net.2")
        keys += [k for n in (1, 2, 3) for k in _wb(f"{block}.norm{n}")]
    return keys


def _layer_keys(path: str, spec, cfg) -> list[str]:
    if spec.kind in ("conv_in", "down", "up"):
        return _wb({"conv_in": path, "down": f"{path}.op", "up": f"{path}.conv"}[spec.kind])
    if spec.kind in ("spatial", "temporal"):
        return _transformer_keys(path, cfg, spec.kind == "temporal")
    keys = [k for sub in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3")
            for k in _wb(f"{path}.{sub}")]
    if spec.in_channels != spec.channels:
        keys += _wb(f"{path}.skip_connection")
    if cfg.temporal_conv:
        keys += [k for sub in ("conv1.0", "conv1.2", "conv2.0", "conv2.3", "conv3.0", "conv3.3", "conv4.0", "conv4.3")
                 for k in _wb(f"{path}.temopral_conv.{sub}")]
    return keys


def unet_state_dict_keys(cfg) -> list[str]:
    """Every LVDM ``UNetModel`` state_dict key (no prefix) the config implies, in module order."""
    from jax_repvideo.models.unet3d import unet_layout

    keys = _wb("time_embed.0") + _wb("time_embed.2")
    if cfg.fps_cond:
        keys += _wb("fps_embedding.0") + _wb("fps_embedding.2")
    for group, blocks in unet_layout(cfg).items():
        for i, block in enumerate(blocks):
            name = group if group in ("init_attn", "middle_block") else f"{group}.{i}"
            for j, spec in enumerate(block):
                keys += _layer_keys(f"{name}.{j}", spec, cfg)
    return keys + _wb("out.0") + _wb("out.2")


@functools.lru_cache(maxsize=4)
def abstract_unet(cfg):
    """The U-Net with shapes only (``nnx.eval_shape``): no weights allocated."""
    from flax import nnx

    from jax_repvideo.models.unet3d import UNet3D

    return nnx.eval_shape(lambda: UNet3D(cfg, rngs=nnx.Rngs(0)))


def check_unet_keys(keys, cfg) -> None:
    """Names, in LVDM terms, every key missing from or unexpected in a U-Net state_dict."""
    expected = unet_state_dict_keys(cfg)
    missing = [k for k in expected if k not in set(keys)]
    unexpected = sorted(set(keys) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} key(s) missing: " + ", ".join(UNET_PREFIX + k for k in missing))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(UNET_PREFIX + k for k in unexpected))
    if problems:
        raise CheckpointError("VideoCrafter2 U-Net: " + "; ".join(problems))


def convert_unet(state_dict: Mapping[str, Any], cfg) -> dict[str, np.ndarray]:
    """U-Net tensors (``model.diffusion_model.`` already stripped) → flat dotted Flax params."""
    from flax import nnx

    check_unet_keys(list(state_dict), cfg)
    abstract = nnx.state(abstract_unet(cfg), nnx.Param)
    return convert_state_dict(state_dict, unet_rules(cfg), abstract, what="VideoCrafter2 U-Net")


def load_unet(flat_params: Mapping[str, np.ndarray], cfg, *, dtype=None, param_dtype=None, **kwargs):
    """A concrete ``UNet3D`` holding ``flat_params`` (as returned by ``convert_unet``)."""
    import jax.numpy as jnp
    from flax import nnx

    from jax_repvideo.checkpoint import nest
    from jax_repvideo.models.unet3d import UNet3D

    dtype, param_dtype = dtype or jnp.float32, param_dtype or jnp.float32
    abstract = nnx.eval_shape(lambda: UNet3D(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, **kwargs))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, nest({k: jnp.asarray(v, param_dtype) for k, v in flat_params.items()}))
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------- schedule buffers
def schedule_buffers(timesteps=1000, linear_start=0.00085, linear_end=0.012, scale_a=1.0, scale_b=0.7,
                     mid_step=400, **_) -> dict[str, np.ndarray]:
    """The 13 buffers LatentDiffusion registers, in float64 (spec §2.2)."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        "scale_arr": np.concatenate([np.linspace(scale_a, scale_b, mid_step), np.full(timesteps, scale_b)]),
    }


def validate_schedule(buffers: Mapping[str, Any], rtol: float = 1e-4) -> None:
    """Checks the checkpoint's schedule buffers against VideoCrafter2's scaled-linear schedule."""
    expected = schedule_buffers(**SCHEDULE)
    problems = []
    for key, value in buffers.items():
        got, want = to_numpy(value).astype(np.float64), expected[key]
        if got.shape != want.shape:
            problems.append(f"{key}: shape {got.shape}, expected {want.shape}")
        elif not np.allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max()):
            problems.append(f"{key}: max deviation {np.abs(got - want).max():.3g} from the scaled-linear "
                            f"schedule ({SCHEDULE['linear_start']}→{SCHEDULE['linear_end']})")
    if problems:
        raise CheckpointError("schedule buffers do not match VideoCrafter2's: " + "; ".join(problems))


# ------------------------------------------------------------------------------------ entry point
def split_checkpoint(state: Mapping[str, Any]) -> dict[str, dict]:
    """Groups a LatentDiffusion state_dict by prefix; unknown keys are an error naming them."""
    schedule_keys = set(schedule_buffers())
    groups = {"unet": strip_prefix(state, UNET_PREFIX), "vae": strip_prefix(state, VAE_PREFIX),
              "text": strip_prefix(state, TEXT_PREFIX), "schedule": {k: v for k, v in state.items()
                                                                   if k in schedule_keys}}
    known = sum(len(g) for g in groups.values())
    if known != len(state):
        stray = sorted(k for k in state if not k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX))
                       and k not in schedule_keys)
        raise CheckpointError(f"{len(stray)} checkpoint key(s) belong to no known group: {', '.join(stray)}")
    if not groups["unet"]:
        raise CheckpointError(f"no '{UNET_PREFIX}*' keys: not a VideoCrafter2 checkpoint")
    return groups


def _convert_group(module_name: str, function: str, sub_state: dict, prefix: str, group_cfg=None):
    """(flat params, the architecture config used: ``group_cfg`` or the module's ``DEFAULT_CONFIG``)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise CheckpointError(f"the checkpoint holds {len(sub_state)} '{prefix}*' tensors (e.g. "
                              f"{prefix}{next(iter(sub_state))}), but {module_name}.{function} does not exist "
                              f"yet; refusing to drop them") from None
    group_cfg = group_cfg or module.DEFAULT_CONFIG
    return getattr(module, function)(sub_state, group_cfg), group_cfg


def convert_checkpoint(state: Mapping[str, Any], cfg, vae_cfg=None,
                       text_cfg=None) -> tuple[dict[str, np.ndarray], dict]:
    """Whole LatentDiffusion state_dict → (flat params ``{"unet.…", "vae.…", "text.…"}``, config).

    ``vae_cfg`` / ``text_cfg`` default to the full-size VideoCrafter2 VAE and OpenCLIP ViT-H-14 text tower.
    """
    from jax_repvideo.config import to_dict

    groups = split_checkpoint(state)
    validate_schedule(groups["schedule"])
    flat = {f"unet.{k}": v for k, v in convert_unet(groups["unet"], cfg).items()}
    present, group_configs = ["unet"], {}
    for group, module, function, prefix, group_cfg in (
            ("vae", "convert.videocrafter2_vae", "convert_vae", VAE_PREFIX, vae_cfg),
            ("text", "convert.videocrafter2_text", "convert_text", TEXT_PREFIX, text_cfg)):
        if groups[group]:
            params, used_cfg = _convert_group(module, function, groups[group], prefix, group_cfg)
            flat.update({f"{group}.{k}": v for k, v in params.items()})
            present.append(group)
            group_configs[group] = to_dict(used_cfg)
    config = {"kind": "videocrafter2", "unet": to_dict(cfg), **group_configs, "schedule": dict(SCHEDULE),
              "groups": present, "schedule_buffers_checked": sorted(groups["schedule"])}
    return flat, config


def load_unet_config(path: str | Path | None):
    """A ``UNet3DConfig`` from a YAML/JSON file of constructor arguments (default: VideoCrafter2 512)."""
    from jax_repvideo.config import from_dict, load_yaml
    from jax_repvideo.models.unet3d import UNet3DConfig

    if path is None:
        return UNet3DConfig()
    path = Path(path)
    data = json.loads(path.read_text()) if path.suffix == ".json" else load_yaml(path)
    return from_dict(UNet3DConfig, data.get("unet", data))


def load_group_configs(path: str | Path | None) -> tuple[Any, Any]:
    """(VAE, text) configs from the ``vae`` / ``text`` sections of a config file; None where absent."""
    from jax_repvideo.config import from_dict, load_yaml
    from jax_repvideo.models.text_clip import OpenCLIPTextConfig
    from jax_repvideo.models.vae_kl import AutoencoderKLConfig

    if path is None:
        return None, None
    path = Path(path)
    data = json.loads(path.read_text()) if path.suffix == ".json" else load_yaml(path)
    return (from_dict(AutoencoderKLConfig, data["vae"], "vae") if "vae" in data else None,
            from_dict(OpenCLIPTextConfig, data["text"], "text") if "text" in data else None)


def main(src, dst, config: str | Path | None = None) -> Path:
    """Converts ``src`` (LVDM ``.ckpt``) into ``dst``; ``config`` overrides the architectures
    (its ``unet`` section, or the whole file, for the U-Net; optional ``vae`` and ``text`` sections)."""
    from jax_repvideo import checkpoint

    cfg = load_unet_config(config)
    vae_cfg, text_cfg = load_group_configs(config)
    flat, config_dict = convert_checkpoint(load_torch_state_dict(src), cfg, vae_cfg, text_cfg)
    out = checkpoint.save(dst, flat, config_dict)
    print(f"wrote {len(flat)} tensors ({', '.join(config_dict['groups'])}) to {out}")
    return out

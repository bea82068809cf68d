"""``verify videocrafter2-vae DIR``: the KL autoencoder against the LVDM reference dump.

``DIR`` has the layout of ``shared/fixtures/vc2_vae_text``: ``vae_config.json`` (LVDM
``{ddconfig, embed_dim, scale_factor}``), ``vae.ckpt`` (``first_stage_model.*`` keys) and ``vae_io.npz``
(NCHW images, ``(b, C, t, h, w)`` video). The weights go through the project's converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_repvideo.checkpoint import nest
from jax_repvideo.verify import check

TOLERANCE = 1e-4
# Smaller than the fixture's b·t = 4 video frames, so the chunked path and its padding both run.
VIDEO_FRAME_CHUNK = 3


def load_model(directory: Path):
    from convert.common import load_torch_state_dict, strip_prefix
    from convert.videocrafter2_vae import PREFIX, abstract_vae, convert_vae
    from jax_repvideo.models.vae_kl import from_ldm_config

    cfg = from_ldm_config(json.loads((directory / "vae_config.json").read_text()))
    flat = convert_vae(strip_prefix(load_torch_state_dict(directory / "vae.ckpt"), PREFIX), cfg)
    graphdef, state = nnx.split(abstract_vae(cfg))
    nnx.replace_by_pure_dict(state, nest({k: jnp.asarray(v) for k, v in flat.items()}))
    return nnx.merge(graphdef, state)


def _nhwc(x):
    return jnp.asarray(np.moveaxis(x, 1, -1))


def _nchw(x):
    return np.moveaxis(np.asarray(x), -1, 1)


def _forward(model, io):
    cfg = model.cfg
    mean, logvar = model.encode(io["encode_x"])
    encoder_out = model.encoder(io["encode_x"])
    return {
        "encode_encoder_out": encoder_out,
        "encode_moments": model.quant_conv(encoder_out),
        "encode_mean": mean,
        "encode_logvar": logvar,
        "encode_z": model.encode_latents(io["encode_x"]),
        "encode_mid_attn_out_b0": model.encoder.mid.attn_1(io["encode_mid_attn_in_b0"]),
        "decode_x": model.decode_latents(io["decode_z"]),
        "decode_conv_in_out_b0": model.decoder.conv_in(model.post_quant_conv(io["decode_z"][:1] / cfg.scale_factor)),
        "decode_mid_attn_out_b0": model.decoder.mid.attn_1(io["decode_mid_attn_in_b0"]),
        "video_decode_x": model.decode_video(io["video_decode_z"], frame_chunk=VIDEO_FRAME_CHUNK),
        "ae_forward_mode_xrec": model.decode(mean),
    }


def run(directory: Path) -> bool:
    model = load_model(directory)
    data = np.load(directory / "vae_io.npz")
    names = ("encode_x", "encode_mid_attn_in_b0", "decode_z", "decode_mid_attn_in_b0")
    io = {name: _nhwc(data[name]) for name in names}
    io["video_decode_z"] = jnp.asarray(np.transpose(data["video_decode_z"], (0, 2, 3, 4, 1)))
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("float32"):
        outputs = jax.jit(lambda s, x: _forward(nnx.merge(graphdef, s), x))(state, io)
    ok = True
    for name, ours in outputs.items():
        ours = np.transpose(np.asarray(ours), (0, 4, 1, 2, 3)) if name.startswith("video") else _nchw(ours)
        ok &= check(f"vae {name}", ours, data[name], TOLERANCE)
    return bool(ok)

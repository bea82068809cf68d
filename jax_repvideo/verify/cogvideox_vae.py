"""``jax-repvideo verify cogvideox-vae DIR``: our causal 3D VAE decode against diffusers.

``DIR/vae/`` is an ``AutoencoderKLCogVideoX.save_pretrained`` folder; ``DIR/io.npz`` holds
``num_cases`` and, per case k, ``case{k}.latents`` ``(B, C, T, h, w)`` and ``case{k}.frames``
``(B, 3, T', H, W)`` as ``vae.decode(latents)`` returns them (no scaling factor applied).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from convert.cogvideox_vae import load_model
from jax_repvideo.models.vae_cogvideox import decode
from jax_repvideo.verify import check

TOLERANCE = 1e-4


def case_indices(io) -> list[int]:
    if "num_cases" in io:
        return list(range(int(io["num_cases"])))
    return sorted(int(k[4:].split(".")[0]) for k in io.files if k.endswith(".latents"))


def run(directory: Path) -> bool:
    io_path = directory / "io.npz"
    if not io_path.is_file():
        raise SystemExit(f"verify cogvideox-vae: {io_path} not found")
    model = load_model(directory / "vae")
    io = np.load(io_path)
    ok = True
    with jax.default_matmul_precision("float32"):
        for k in case_indices(io):
            latents = io[f"case{k}.latents"].astype(np.float32)
            frames = np.asarray(decode(model, latents.transpose(0, 2, 3, 4, 1))).transpose(0, 4, 1, 2, 3)
            name = f"case{k} decode {latents.shape[2]}→{frames.shape[2]} frames"
            ok &= check(name, frames, io[f"case{k}.frames"], TOLERANCE)
    return ok

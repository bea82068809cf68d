"""``jax-repvideo verify cogvideox DIR``: our CogVideoX DiT against diffusers' outputs.

DIR holds ``transformer/`` (a diffusers ``CogVideoXTransformer3DModel.save_pretrained`` folder) and
``io.npz`` with ``num_cases`` and ``case{k}.hidden_states`` ``(B, T, C, H, W)``,
``.encoder_hidden_states``, ``.timestep`` ``(B,)`` and ``.output`` ``(B, T, C, H, W)``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from convert.cogvideox import load_diffusers, model_from_params
from jax_repvideo.models.dit import jit_forward
from jax_repvideo.verify.repvideo import run_cases


def run(directory: Path) -> bool:
    with jax.default_matmul_precision("float32"):
        cfg, flat = load_diffusers(directory)
        forward, state = jit_forward(model_from_params(cfg, flat))
        return run_cases(forward, state, dict(np.load(directory / "io.npz")), "output", "cogvideox")

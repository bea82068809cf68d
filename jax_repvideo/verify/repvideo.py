"""``jax-repvideo verify repvideo DIR``: the RepVideo DiT against the original SAT code's outputs.

DIR has the layout of ``../shared/fixtures/repvideo``: ``config.json`` (``sat_network_config``),
``weights.safetensors`` (SAT names; or a SAT ``.pt`` / ``weights.npz``) and ``io.npz`` with
``case{k}.output`` (learned gates) and ``case{k}.output_gates_zero`` (gates 0 = plain CogVideoX), in
the layout ``(B, T, C, H, W)``. When ``baseline_io.npz`` and ``weights_diffusers.safetensors`` are
there too, the stock diffusers outputs are checked through the diffusers converter as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from convert.cogvideox import config_from_diffusers, convert_diffusers_state, model_from_params
from convert.common import load_safetensors
from convert.repvideo import load_repvideo
from jax_repvideo.models.dit import jit_forward
from jax_repvideo.verify import check

TOLERANCE = 1e-4


def run_cases(forward, state, io, output_key: str, label: str) -> bool:
    """Runs every case of ``io`` that has ``output_key`` and checks it; diffusers layout in and out."""
    ok = True
    for k in range(int(io["num_cases"])):
        if f"case{k}.{output_key}" not in io:
            continue
        latents = io[f"case{k}.hidden_states"].transpose(0, 1, 3, 4, 2)  # → (B, T, H, W, C)
        timesteps = np.broadcast_to(io[f"case{k}.timestep"].reshape(-1, 1), latents.shape[:2])
        out = forward(state, latents, timesteps, io[f"case{k}.encoder_hidden_states"])
        ours = np.asarray(out).transpose(0, 1, 4, 2, 3)
        ok &= check(f"{label} case{k} {output_key}", ours, io[f"case{k}.{output_key}"], TOLERANCE)
    return ok


def run(directory: Path) -> bool:
    with jax.default_matmul_precision("float32"):
        cfg, flat = load_repvideo(directory)
        io = dict(np.load(directory / "io.npz"))
        forward, state = jit_forward(model_from_params(cfg, flat))
        ok = run_cases(forward, state, io, "output", "repvideo")
        _, zero_state = jit_forward(model_from_params(cfg, {**flat, "gates": np.zeros_like(flat["gates"])}))
        ok &= run_cases(forward, zero_state, io, "output_gates_zero", "repvideo")
        baseline, diffusers_weights = directory / "baseline_io.npz", directory / "weights_diffusers.safetensors"
        if baseline.is_file() and diffusers_weights.is_file():
            config = json.loads((directory / "config.json").read_text())["diffusers_baseline_config"]
            base_cfg = config_from_diffusers(config)
            base_flat = convert_diffusers_state(load_safetensors([diffusers_weights]), base_cfg)
            forward, state = jit_forward(model_from_params(base_cfg, base_flat))
            ok &= run_cases(forward, state, dict(np.load(baseline)), "output", "diffusers")
    return ok

"""``jax-repvideo verify videocrafter2-unet DIR``: the Flax U-Net against a recorded LVDM run.

``DIR`` holds ``unet_config.json`` (``UNetModel`` kwargs), ``unet.ckpt`` (LVDM keys under
``model.diffusion_model.``) and ``unet_io.npz`` (``<case>/x``, ``timesteps``, ``context``, ``fps``,
``out``, PyTorch layout). The weights go through the project's converter; every case runs in
float32 and its max relative error max|ours − ref| / max|ref| must be ≤ 1e-4.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

TOLERANCE = 1e-4


def load_model(directory: str | Path):
    """(UNet3D with the converted fixture weights, UNet3DConfig)."""
    from convert.common import load_torch_state_dict, strip_prefix
    from convert.videocrafter2 import UNET_PREFIX, convert_unet, load_unet
    from jax_repvideo.config import from_dict
    from jax_repvideo.models.unet3d import UNet3DConfig

    directory = Path(directory)
    cfg = from_dict(UNet3DConfig, json.loads((directory / "unet_config.json").read_text()))
    state = strip_prefix(load_torch_state_dict(directory / "unet.ckpt"), UNET_PREFIX)
    return load_unet(convert_unet(state, cfg), cfg), cfg


def load_cases(directory: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``{case: {name: array}}`` from ``unet_io.npz``, untouched (PyTorch layouts)."""
    cases: dict[str, dict[str, np.ndarray]] = {}
    with np.load(Path(directory) / "unet_io.npz") as data:
        for key in data.files:
            case, name = key.split("/", 1)
            cases.setdefault(case, {})[name] = data[key]
    return dict(sorted(cases.items()))


def case_inputs(case: dict[str, np.ndarray]):
    """PyTorch-layout case → (x (B,T,H,W,C), timesteps (B,T), context, fps) for ``UNet3D``.

    As in the FIFO fork, the timesteps are per frame exactly when their length differs from B.
    """
    x = np.moveaxis(case["x"], 1, -1)  # (B, C, T, H, W) → (B, T, H, W, C)
    b, t = x.shape[:2]
    steps = case["timesteps"]
    steps = np.broadcast_to(steps[None, :], (b, t)) if steps.shape[0] != b else np.repeat(steps[:, None], t, 1)
    return x, steps.astype(np.int32), case["context"], case["fps"].astype(np.int32)


def to_torch_layout(out: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(out), -1, 1)


def activation_to_torch_layout(h: np.ndarray) -> np.ndarray:
    """(B·T, H, W, C) → (B·T, C, H, W); other ranks unchanged."""
    h = np.asarray(h)
    return np.moveaxis(h, -1, 1) if h.ndim == 4 else h


@functools.partial(jax.jit, static_argnums=0)
def apply(graphdef, state, x, timesteps, context, fps):
    """One jitted forward returning (out, intermediates); shared by the CLI and the tests."""
    model = nnx.merge(graphdef, state)
    return model(x, timesteps, context, fps, return_intermediates=True)


def run_case(model, case):
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("float32"):
        out, inter = apply(graphdef, state, *case_inputs(case))
    return to_torch_layout(out), inter


def run(directory: Path) -> bool:
    from jax_repvideo.verify import check

    model, _ = load_model(directory)
    ok = True
    for name, case in load_cases(directory).items():
        out, _ = run_case(model, case)
        ok &= check(f"videocrafter2-unet {name}", out, case["out"], TOLERANCE)
    return ok

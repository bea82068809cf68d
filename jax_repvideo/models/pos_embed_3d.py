"""CogVideoX's fixed 3D sin-cos position table (spec §2.4), for any latent size.

The video token at latent frame ``t``, patch row ``r`` and patch column ``c`` gets
``[E_{D/4}(t / s_t) | E_{3D/8}(c / s_s) | E_{3D/8}(r / s_s)]``, each 1-D block laid out as all sines then
all cosines. The column block comes before the row block (the original meshgrid puts w first). Text
tokens get zeros, so the model adds nothing to them.

Frequencies and products are computed in float64 on the host, as the originals do, and only the three
small 1-D tables become constants; the ``(T, H', W', D)`` table is broadcast from them on device, so a
full-size (17,550-token) table is never baked into the program.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
    """``[sin(p·ω_k) | cos(p·ω_k)]`` with ``ω_k = 10000^(-k/(dim/2))``, float64, shape ``(len(p), dim)``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def _grid(size: int, scale: float) -> np.ndarray:
    # The originals divide a float32 arange by the scale in float32 before going to float64.
    return np.arange(size, dtype=np.float32) / np.float32(scale)


def video_pos_embed(frames: int, rows: int, cols: int, dim: int, *, spatial_scale: float,
                    temporal_scale: float) -> jnp.ndarray:
    """The video rows of the joint table, ``(frames·rows·cols, dim)`` float32, frame-major then row, col."""
    if dim % 16:
        raise ValueError(f"the 3D sin-cos table needs a width divisible by 16, got {dim}")
    temporal = sincos_1d(_grid(frames, temporal_scale), dim // 4).astype(np.float32)
    spatial_dim = 3 * dim // 8
    col = sincos_1d(_grid(cols, spatial_scale), spatial_dim).astype(np.float32)
    row = sincos_1d(_grid(rows, spatial_scale), spatial_dim).astype(np.float32)
    shape = (frames, rows, cols)
    table = jnp.concatenate([
        jnp.broadcast_to(jnp.asarray(temporal)[:, None, None, :], (*shape, dim // 4)),
        jnp.broadcast_to(jnp.asarray(col)[None, None, :, :], (*shape, spatial_dim)),
        jnp.broadcast_to(jnp.asarray(row)[None, :, None, :], (*shape, spatial_dim)),
    ], axis=-1)
    return table.reshape(frames * rows * cols, dim)

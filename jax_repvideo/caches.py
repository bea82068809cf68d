"""Per-forward-pass caches: the VideoCrafter2 Q-cache settings and their v(t) schedules.

Q-cache (spec §3): the encoder temporal transformers emit their ``attn1`` queries (pre-head-split,
``(B·H·W, T, C)``); every decoder temporal transformer named in ``map`` replaces its own query by
``Q* = (1 − v)·Q_dec + v·Q_enc`` before the head split, with ``v`` a per-frame weight taken from a
schedule over that frame's own timestep. K and V stay the decoder's own. Nothing persists between
forward passes: the cache lives inside one U-Net call and can be returned for inspection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import jax
import jax.numpy as jnp

# Spec §3.4: decoder temporal transformer → encoder temporal transformer whose attn1 query it takes
# (same channel count, heads and spatial size; agrees with the YCmove fork's ``out2in``).
DEFAULT_QCACHE_MAP: dict[str, str] = {
    "output_blocks.3.2": "input_blocks.8.2",
    "output_blocks.4.2": "input_blocks.7.2",
    "output_blocks.5.2": "input_blocks.7.2",
    "output_blocks.6.2": "input_blocks.5.2",
    "output_blocks.7.2": "input_blocks.4.2",
    "output_blocks.8.2": "input_blocks.4.2",
    "output_blocks.9.2": "input_blocks.2.2",
    "output_blocks.10.2": "input_blocks.1.2",
    "output_blocks.11.2": "input_blocks.1.2",
}


@dataclass(frozen=True)
class QCacheConfig:
    """Q-cache settings.

    * ``schedule="constant"``: ``v = values[0]`` for every frame (the blog's 0.9).
    * ``schedule="linear"``: ``v`` goes from ``values[0]`` at timestep ``timestep_range[0]`` to
      ``values[1]`` at ``timestep_range[1]``, linearly in the frame's timestep, clamped outside
      (``values=(0.9, 0.8)``, ``timestep_range=(999, 0)``: 0.9 on pure noise, 0.8 near clean).
    """

    enabled: bool = False
    map: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_QCACHE_MAP))
    schedule: Literal["constant", "linear"] = "constant"
    values: tuple[float, ...] = (0.9,)
    timestep_range: tuple[float, float] = (999.0, 0.0)

    def __post_init__(self):
        wanted = {"constant": 1, "linear": 2}[self.schedule]
        if len(self.values) != wanted:
            raise ValueError(f"QCacheConfig: schedule {self.schedule!r} takes {wanted} value(s), got {self.values}")
        if not all(0.0 <= v <= 1.0 for v in self.values):
            raise ValueError(f"QCacheConfig.values must lie in [0, 1], got {self.values}")
        if self.schedule == "linear" and self.timestep_range[0] == self.timestep_range[1]:
            raise ValueError("QCacheConfig.timestep_range must span a non-empty range")

    def __hash__(self):  # usable as a static jit argument despite the dict field
        return hash((self.enabled, tuple(sorted(self.map.items())), self.schedule, self.values,
                     self.timestep_range))

    def replace(self, **changes) -> "QCacheConfig":
        return dataclasses.replace(self, **changes)


def qcache_weights(config: QCacheConfig, timesteps: jax.Array) -> jax.Array:
    """Per-frame blend weights ``v`` (float32, the shape of ``timesteps``, e.g. ``(B, T)``)."""
    t = jnp.asarray(timesteps, jnp.float32)
    if config.schedule == "constant":
        return jnp.full(t.shape, config.values[0], jnp.float32)
    (t0, t1), (v0, v1) = config.timestep_range, config.values
    frac = jnp.clip((t - t0) / (t1 - t0), 0.0, 1.0)
    return v0 + frac * (v1 - v0)

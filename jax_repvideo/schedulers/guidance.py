"""Classifier-free guidance for CogVideoX: the combine rule, dynamic CFG and the unconditional branch.

Dynamic CFG (``use_dynamic_cfg`` in diffusers, ``DynamicCFG`` in SAT) sets, at each step,
``w_t = 1 + w·(1 − cos(π·((N − x)/N)^p))/2`` with N the number of steps and p = 5.

* ``schedule="quirk"`` (default, faithful): x is the integer *timestep* t (999, 979, …), as both
  diffusers and SAT actually compute it. ((N − t)/N)^p is then a large negative number, so w_t is
  a pseudo-random value in [1, 1 + w] (2.29, 2.54, 6.97, 6.42, … for w = 6, N = 50).
* ``schedule="monotone"``: x is the step index i (0, 1, …, N−1), the evidently intended schedule,
  which decays from 1 + w at the first step to ≈1 at the last.

The cosine of arguments near 10^7 needs float64, so the per-step scales are computed on the host
into a float32 table of length N and gathered with the (per-frame) step index inside jit.

The unconditional branch is a config choice: RepVideo/SAT feeds an all-zero text embedding
(``"zeros"``); the diffusers pipeline feeds T5 of the negative prompt "" (``"negative_prompt"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jax_repvideo.schedulers.cogvideox import per_frame


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """CFG settings. Defaults are RepVideo's (spec §1.6); the diffusers pipeline's defaults are
    ``dynamic=False, unconditional="negative_prompt"``."""

    scale: float = 6.0
    dynamic: bool = True
    schedule: Literal["quirk", "monotone"] = "quirk"
    exponent: float = 5.0
    unconditional: Literal["zeros", "negative_prompt"] = "zeros"


def guidance_scale_table(config: GuidanceConfig, timesteps) -> jax.Array:
    """The guidance weight of each step of a grid ``timesteps`` (descending, length N), float32."""
    timesteps = np.asarray(timesteps)
    n = len(timesteps)
    if not config.dynamic:
        return jnp.full((n,), config.scale, jnp.float32)
    if config.schedule == "quirk":
        if config.exponent != int(config.exponent):  # a negative base needs an integer power
            raise ValueError(f"the 'quirk' schedule needs an integer exponent, got {config.exponent}")
        x = [int(t) for t in timesteps]
    elif config.schedule == "monotone":
        x = list(range(n))
    else:
        raise ValueError(f"unknown dynamic CFG schedule {config.schedule!r}; use 'quirk' or 'monotone'")
    scales = [1 + config.scale * (1 - math.cos(math.pi * ((n - xi) / n) ** config.exponent)) / 2
              for xi in x]
    return jnp.asarray(np.asarray(scales, np.float64), jnp.float32)


def combine(uncond: jax.Array, cond: jax.Array, scale) -> jax.Array:
    """ε̃ = uncond + w·(cond − uncond). ``scale`` is a scalar or per-frame, e.g. ``(B, T)``."""
    scale = jnp.asarray(scale, jnp.float32)
    scale = scale.reshape(scale.shape + (1,) * (cond.ndim - scale.ndim))
    uncond = uncond.astype(jnp.float32)
    return uncond + scale * (cond.astype(jnp.float32) - uncond)


def guided(table: jax.Array, step_index, uncond: jax.Array, cond: jax.Array) -> jax.Array:
    """CFG with the weight of each frame's own step index taken from ``guidance_scale_table``."""
    return combine(uncond, cond, per_frame(table, step_index, cond.ndim))


def unconditional_embedding(config: GuidanceConfig, cond: jax.Array,
                            negative: jax.Array | None = None) -> jax.Array:
    """The text embedding of the unconditional branch, shaped like ``cond`` ``(B, L, D)``.

    ``"zeros"``: all zeros (RepVideo). ``"negative_prompt"``: ``negative``, the T5 encoding of the
    negative prompt (diffusers uses ""); a batch of one is broadcast to ``cond``'s batch.
    """
    if config.unconditional == "zeros":
        return jnp.zeros_like(cond)
    if config.unconditional != "negative_prompt":
        raise ValueError(f"unknown unconditional branch {config.unconditional!r}; "
                         "use 'zeros' or 'negative_prompt'")
    if negative is None:
        raise ValueError("guidance.unconditional='negative_prompt' needs the negative prompt's T5 "
                         "embedding; pass it, or use 'zeros'")
    if negative.ndim != cond.ndim or negative.shape[1:] != cond.shape[1:] \
            or negative.shape[0] not in (1, cond.shape[0]):
        raise ValueError(f"negative prompt embedding {negative.shape} does not match the prompt "
                         f"embedding {cond.shape} (same length and width, batch 1 or {cond.shape[0]})")
    return jnp.broadcast_to(negative, cond.shape).astype(cond.dtype)

"""DDIM for VideoCrafter2 and FIFO-Diffusion (spec §1.2, §1.7, §1.8).

- ``scaled_linear_betas``: LDM's "linear" schedule, linear in sqrt(β) and squared.
- Two timestep grids: ``fifo_timesteps`` = round(linspace(0, T−1, S)) (FIFO's), and
  ``videocrafter_timesteps`` = range(0, T, T//S) + 1 (VideoCrafter's own sampler).
- ``DDIMSchedule``: per-DDIM-index tables. ``alphas_prev[0] = ᾱ[0]`` (training step 0), so on FIFO's grid
  (τ_0 = 0) index 0 is an identity step.
- ``DDIMSchedule.step``: one DDIM update with per-frame indices and η noise. ``use_scale`` applies
  VideoCrafter2's ``scale_arr`` signal scaling; the official base sampler uses it, FIFO's per-frame update
  does not (spec §1.2 quirk), so it is an argument of the step, off by default.
- Classifier-free guidance is one batched call: ``[cond; uncond]`` stacked on the batch axis.

The schedule is a pytree (tables are leaves, the prediction type is static), so it can be a jit argument
and a new η or grid does not recompile.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PREDICTIONS = ("eps", "v")


def scaled_linear_betas(start: float = 0.00085, end: float = 0.012, num_train_timesteps: int = 1000) -> np.ndarray:
    """β_t = (√start + (√end − √start)·t/(T−1))², float64."""
    return np.linspace(start**0.5, end**0.5, num_train_timesteps, dtype=np.float64) ** 2


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t}(1 − β_s) in float64, rounded to float32 as the original buffers are."""
    return np.cumprod(1.0 - np.asarray(betas, np.float64)).astype(np.float32)


def scale_arr(scale_a: float = 1.0, scale_b: float = 0.7, mid_step: int = 400, num_train_timesteps: int = 1000):
    """VideoCrafter2's signal scale per training timestep: linear a→b over ``mid_step`` steps, then b."""
    ramp = np.linspace(scale_a, scale_b, mid_step)
    return np.concatenate([ramp, np.full(num_train_timesteps, scale_b)]).astype(np.float32)


def fifo_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """FIFO-Diffusion's grid: round(linspace(0, T−1, S)), ascending, no +1 offset."""
    _check_steps(num_steps, num_train_timesteps)
    return np.round(np.linspace(0, num_train_timesteps - 1, num_steps)).astype(np.int64)


def videocrafter_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """VideoCrafter's "uniform" grid: range(0, T, T//S) + 1 (e.g. 1, 21, …, 981 for S = 50)."""
    _check_steps(num_steps, num_train_timesteps)
    return np.arange(0, num_train_timesteps, num_train_timesteps // num_steps, dtype=np.int64) + 1


def _check_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"number of DDIM steps must be in [1, {num_train_timesteps}], got {num_steps}")


@struct.dataclass
class DDIMSchedule:
    """Tables indexed by DDIM index k (ascending noise): τ_k, a_k, a_prev,k, σ_k and the VC2 scales."""

    timesteps: jax.Array  # (S,) int32, τ_k
    alphas: jax.Array  # (S,) a_k = ᾱ[τ_k]
    alphas_prev: jax.Array  # (S,) ᾱ[τ_{k−1}], and ᾱ[0] for k = 0
    sigmas: jax.Array  # (S,) η·√((1−a_prev)/(1−a)·(1−a/a_prev))
    scales: jax.Array  # (S,) scale_arr[τ_k] (ones without use_scale data)
    scales_prev: jax.Array  # (S,) scale_arr[τ_{k−1}], and scale_arr[0] for k = 0
    prediction: str = struct.field(pytree_node=False, default="eps")

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def step(self, x, model_out, index, noise, *, use_scale: bool = False, history=None):
        """One DDIM update x_t → x_prev, every frame with its own DDIM index.

        ``x``, ``model_out``, ``noise``: (..., H, W, C); ``index``: int array broadcastable to the leading
        axes of ``x`` (e.g. (B, T) per frame, or a scalar). Returns ``(x_prev, pred_x0)``. ``history`` (the
        previous step's x̂0, which multistep solvers take) is unused: DDIM is one-step.
        """
        del history
        coef = lambda table: _expand(table[index], x.ndim)  # noqa: E731
        a, a_prev, sigma = coef(self.alphas), coef(self.alphas_prev), coef(self.sigmas)
        sqrt_a, sqrt_one_minus_a = jnp.sqrt(a), jnp.sqrt(1.0 - a)
        if self.prediction == "eps":
            eps = model_out
            pred_x0 = (x - sqrt_one_minus_a * eps) / sqrt_a
        else:  # v-prediction: x0 = √a·x − √(1−a)·v, ε = √a·v + √(1−a)·x
            pred_x0 = sqrt_a * x - sqrt_one_minus_a * model_out
            eps = sqrt_a * model_out + sqrt_one_minus_a * x
        if use_scale:
            pred_x0 = pred_x0 / coef(self.scales)
            signal = jnp.sqrt(a_prev) * coef(self.scales_prev) * pred_x0
        else:
            signal = jnp.sqrt(a_prev) * pred_x0
        direction = jnp.sqrt(1.0 - a_prev - sigma**2) * eps
        return signal + direction + sigma * noise, pred_x0


def _expand(values, ndim: int):
    """Appends unit axes so per-frame coefficients broadcast over (H, W, C)."""
    values = jnp.asarray(values)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def make_schedule(
    timesteps,
    *,
    eta: float = 1.0,
    betas: np.ndarray | None = None,
    scales: np.ndarray | None = None,
    prediction: str = "eps",
) -> DDIMSchedule:
    """Builds the DDIM tables for an ascending timestep grid (spec §1.2).

    ``betas`` defaults to VC2's scaled-linear schedule; ``scales`` is a per-training-timestep signal
    scale (``scale_arr()`` for VC2's use_scale), ones when omitted.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    timesteps = np.asarray(timesteps, np.int64)
    if timesteps.ndim != 1 or np.any(np.diff(timesteps) <= 0):
        raise ValueError(f"timesteps must be a strictly ascending 1-D grid, got {timesteps}")
    acp = alphas_cumprod(scaled_linear_betas() if betas is None else betas)
    if timesteps[0] < 0 or timesteps[-1] >= len(acp):
        raise ValueError(f"timesteps must lie in [0, {len(acp) - 1}], got {timesteps[0]}…{timesteps[-1]}")
    a = acp[timesteps]
    a_prev = np.concatenate([acp[:1], acp[timesteps[:-1]]]).astype(np.float64)
    a64 = a.astype(np.float64)
    sigmas = eta * np.sqrt((1 - a_prev) / (1 - a64) * (1 - a64 / a_prev))
    scale_table = np.ones(len(acp), np.float32) if scales is None else np.asarray(scales, np.float32)
    s = scale_table[timesteps]
    s_prev = np.concatenate([scale_table[:1], scale_table[timesteps[:-1]]])
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float32))  # noqa: E731
    return DDIMSchedule(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alphas=f32(a),
        alphas_prev=f32(a_prev),
        sigmas=f32(sigmas),
        scales=f32(s),
        scales_prev=f32(s_prev),
        prediction=prediction,
    )


def videocrafter2_schedule(num_steps: int, *, eta: float = 1.0, grid: str = "fifo") -> DDIMSchedule:
    """VC2's DDIM schedule on FIFO's grid (``"fifo"``) or VideoCrafter's (``"videocrafter"``), with scale_arr."""
    grids = {"fifo": fifo_timesteps, "videocrafter": videocrafter_timesteps}
    if grid not in grids:
        raise ValueError(f"grid must be one of {sorted(grids)}, got {grid!r}")
    return make_schedule(grids[grid](num_steps), eta=eta, scales=scale_arr())


# ---- classifier-free guidance -------------------------------------------------------------------------


def stack_cfg(x):
    """[x; x]: the conditional half first, then the unconditional half, on the batch axis."""
    return jnp.concatenate([x, x], axis=0)


def combine_cfg(out, guidance_scale):
    """ε = ε_u + s·(ε_c − ε_u) from a batched [cond; uncond] model output."""
    cond, uncond = jnp.split(out, 2, axis=0)
    return uncond + guidance_scale * (cond - uncond)


# ---- plain DDIM sampling (the base video) ---------------------------------------------------------------


def ddim_sample(
    denoise: Callable,
    params,
    schedule: DDIMSchedule,
    x_T,
    cond,
    uncond,
    noise,
    *,
    guidance_scale=None,
    use_scale: bool = True,
):
    """Plain S-step DDIM of ``x_T`` (B, T, H, W, C) with uniform timesteps, as VideoCrafter's sampler.

    ``denoise(params, latents, timesteps (B, T), cond) -> model output``; ``cond``/``uncond`` are
    per-frame conditioning pytrees with leading axes (B, T). ``noise``: (S, B, T, H, W, C), the z of each
    step in sampling order (highest index first). ``guidance_scale``: a scalar, a weight per DDIM index
    (S,), or None for no CFG (one call).
    Returns the final latents and the per-step ``(model output, pred_x0, x_prev)``, stacked. Each step
    passes the previous x̂0 as ``history`` (zeros at the first), for schedules with a multistep solver.
    """
    batch, frames = x_T.shape[:2]
    guided = guidance_scale is not None
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond) if guided else cond

    def body(carry, step):
        x, history = carry
        index, z = step
        t = jnp.broadcast_to(schedule.timesteps[index], (batch, frames))
        if guided:
            scale = guidance_scale[index] if jnp.ndim(guidance_scale) else guidance_scale
            out = combine_cfg(denoise(params, stack_cfg(x), stack_cfg(t), both), scale)
        else:
            out = denoise(params, x, t, both)
        x_prev, pred_x0 = schedule.step(x, out, index, z, use_scale=use_scale, history=history)
        return (x_prev, pred_x0), (out, pred_x0, x_prev)

    indices = jnp.arange(schedule.num_steps - 1, -1, -1)
    (x, _), trace = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), (indices, noise))
    return x, trace

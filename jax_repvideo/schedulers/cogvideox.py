"""CogVideoX noise schedule and samplers: v-prediction DDIM and DPM-Solver++(2M) SDE.

The training schedule (spec §2.5) is scaled-linear betas, an SNR shift by ``snr_shift_scale`` and a
zero-terminal-SNR rescale, so ᾱ[999] = 0. Sampling uses the "trailing" grid of S timesteps,
``round(arange(1000, 0, -1000/S)) - 1`` = [999, 979, …, 19] for S = 50.

Everything that depends only on the step is computed once on the host in float64, exactly as
diffusers' ``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler`` compute their scalars, and stored
as float32 tables of length S (``CogVideoXSchedule``, a pytree). The step functions gather from the
tables with an integer *step index* ``i`` (0 = first, noisiest step; S−1 = last), which may be a
scalar or a per-frame array such as ``(B, T)``: each frame is then stepped at its own index, which
is what FIFO needs. Indices must lie in [0, S); out-of-range indices are clamped by the gather.

Two diffusers details are reproduced on purpose:
* the "previous" timestep of a step is ``t - num_train_timesteps // S`` (integer division), which
  is not always the next grid entry when S does not divide 1000;
* the DPM step is first order at i = 0 and whenever that previous timestep is negative, and its
  second-order correction uses the grid's previous entry ``timesteps[i - 1]`` as ``t_back``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class CogVideoXSchedulerConfig:
    """The CogVideoX-2b ``scheduler_config.json`` fields this port uses (2B defaults).

    Fixed by the port and therefore not fields: ``beta_schedule="scaled_linear"``,
    ``prediction_type="v_prediction"``, ``timestep_spacing="trailing"``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0  # CogVideoX-5B uses 1.0
    rescale_betas_zero_snr: bool = True
    set_alpha_to_one: bool = True


class CogVideoXSchedule(NamedTuple):
    """Per-step float32 tables for an S-step run; index with the step index i in [0, S)."""

    timesteps: jax.Array  # (S,) int32, the integer timestep t fed to the model
    sqrt_alpha: jax.Array  # √ᾱ_t
    sqrt_one_minus_alpha: jax.Array  # √(1−ᾱ_t)
    ddim_a: jax.Array  # x_prev = a·x_t + b·x̂0
    ddim_b: jax.Array
    dpm_mult1: jax.Array  # x_prev = mult1·x_t − mult2·D + noise_scale·z
    dpm_mult2: jax.Array
    dpm_mult3: jax.Array  # D = mult3·x̂0 − mult4·x̂0_old (1 and 0 on first-order steps)
    dpm_mult4: jax.Array
    dpm_noise_scale: jax.Array

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def alphas_cumprod(config: CogVideoXSchedulerConfig = CogVideoXSchedulerConfig()) -> np.ndarray:
    """ᾱ over the training timesteps, float64 (spec §2.5 steps 1–4)."""
    n = config.num_train_timesteps
    betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    alphas_bar = np.cumprod(1.0 - betas)
    s = config.snr_shift_scale
    alphas_bar = alphas_bar / (s + (1.0 - s) * alphas_bar)  # divides the SNR by s
    if config.rescale_betas_zero_snr:
        root = np.sqrt(alphas_bar)
        first, last = root[0], root[-1]
        alphas_bar = ((root - last) * (first / (first - last))) ** 2
    return alphas_bar


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The "trailing" grid, descending: [999, 979, …, 19] for 50 steps (int64)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1


def make_schedule(num_steps: int,
                  config: CogVideoXSchedulerConfig = CogVideoXSchedulerConfig()) -> CogVideoXSchedule:
    """Builds the per-step tables for an S-step run (host-side float64 maths, float32 tables)."""
    ac = alphas_cumprod(config)
    ts = trailing_timesteps(num_steps, config.num_train_timesteps)
    final = 1.0 if config.set_alpha_to_one else ac[0]
    prev_ts = ts - config.num_train_timesteps // num_steps
    a_t = ac[ts]
    a_prev = np.where(prev_ts >= 0, ac[np.maximum(prev_ts, 0)], final)
    second_order = (np.arange(num_steps) > 0) & (prev_ts >= 0)
    a_back = ac[np.concatenate([ts[:1], ts[:-1]])]  # timesteps[i-1]; unused at i = 0

    with np.errstate(divide="ignore", invalid="ignore"):  # ᾱ = 0 or 1 give ±inf λ, as in torch
        ddim_a = np.sqrt((1 - a_prev) / (1 - a_t))
        ddim_b = np.sqrt(a_prev) - np.sqrt(a_t) * ddim_a
        lam = np.log(np.sqrt(a_t / (1 - a_t)))
        lam_next = np.log(np.sqrt(a_prev / (1 - a_prev)))
        lam_back = np.log(np.sqrt(a_back / (1 - a_back)))
        h = lam_next - lam
        r = (lam - lam_back) / h
        mult1 = np.sqrt((1 - a_prev) / (1 - a_t)) * np.exp(-h)
        mult2 = np.expm1(-2 * h) * np.sqrt(a_prev)
        mult3 = np.where(second_order, 1 + 1 / (2 * r), 1.0)
        mult4 = np.where(second_order, 1 / (2 * r), 0.0)
        noise_scale = np.sqrt(1 - a_prev) * np.sqrt(1 - np.exp(-2 * h))

    def f32(x):
        return jnp.asarray(np.asarray(x, np.float64), jnp.float32)

    return CogVideoXSchedule(
        timesteps=jnp.asarray(ts, jnp.int32),
        sqrt_alpha=f32(np.sqrt(a_t)),
        sqrt_one_minus_alpha=f32(np.sqrt(1 - a_t)),
        ddim_a=f32(ddim_a), ddim_b=f32(ddim_b),
        dpm_mult1=f32(mult1), dpm_mult2=f32(mult2), dpm_mult3=f32(mult3), dpm_mult4=f32(mult4),
        dpm_noise_scale=f32(noise_scale),
    )


def per_frame(table: jax.Array, step_index, ndim: int) -> jax.Array:
    """``table[step_index]`` with trailing unit axes, to broadcast against an ``ndim``-rank sample.

    ``step_index`` is a scalar or an array that matches the leading axes of the sample, e.g.
    ``(B, T)`` for ``(B, T, H, W, C)`` latents.
    """
    value = table[jnp.asarray(step_index, jnp.int32)]
    if value.ndim > ndim:
        raise ValueError(f"step_index of rank {value.ndim} does not fit a sample of rank {ndim}")
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def model_timesteps(schedule: CogVideoXSchedule, step_index) -> jax.Array:
    """The integer timestep t of each step index (what the DiT's timestep embedding takes)."""
    return schedule.timesteps[jnp.asarray(step_index, jnp.int32)]


def predict_x0(schedule: CogVideoXSchedule, step_index, sample, v_pred) -> jax.Array:
    """x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v̂ (v-prediction)."""
    sqrt_a = per_frame(schedule.sqrt_alpha, step_index, sample.ndim)
    sqrt_1ma = per_frame(schedule.sqrt_one_minus_alpha, step_index, sample.ndim)
    return sqrt_a * sample - sqrt_1ma * v_pred


def add_noise(schedule: CogVideoXSchedule, step_index, x0, noise) -> jax.Array:
    """Forward noising to the grid timestep of ``step_index``: √ᾱ_t·x0 + √(1−ᾱ_t)·z."""
    sqrt_a = per_frame(schedule.sqrt_alpha, step_index, x0.ndim)
    sqrt_1ma = per_frame(schedule.sqrt_one_minus_alpha, step_index, x0.ndim)
    return sqrt_a * x0 + sqrt_1ma * noise


def ddim_step(schedule: CogVideoXSchedule, step_index, sample, v_pred) -> tuple[jax.Array, jax.Array]:
    """Deterministic CogVideoX DDIM step (η = 0). Returns ``(x_prev, x̂0)``."""
    x0 = predict_x0(schedule, step_index, sample, v_pred)
    a = per_frame(schedule.ddim_a, step_index, sample.ndim)
    b = per_frame(schedule.ddim_b, step_index, sample.ndim)
    return a * sample + b * x0, x0


def dpm_step(schedule: CogVideoXSchedule, step_index, sample, v_pred, old_x0, noise
             ) -> tuple[jax.Array, jax.Array]:
    """One DPM-Solver++(2M) SDE step with explicit noise ``z`` and explicit state ``old_x0``.

    ``old_x0`` is the x̂0 returned by the previous step of the same frame (any finite array, e.g.
    zeros, at step 0: first-order steps ignore it). Returns ``(x_prev, x̂0)``; thread x̂0 into the
    next call.
    """
    nd = sample.ndim
    x0 = predict_x0(schedule, step_index, sample, v_pred)
    denoised = per_frame(schedule.dpm_mult3, step_index, nd) * x0 \
        - per_frame(schedule.dpm_mult4, step_index, nd) * old_x0
    x_prev = (per_frame(schedule.dpm_mult1, step_index, nd) * sample
              - per_frame(schedule.dpm_mult2, step_index, nd) * denoised
              + per_frame(schedule.dpm_noise_scale, step_index, nd) * noise)
    return x_prev, x0

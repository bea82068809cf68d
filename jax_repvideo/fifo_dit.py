"""FIFO-Diffusion on the CogVideoX DiT: the denoiser adapter and the CogVideoX schedule in FIFO's indexing.

``fifo.py`` is generic: it takes ``denoise(params, latents (B, T, H, W, C), timesteps (B, T), cond)``
and a scheduler pytree with ascending DDIM indices k (k = S−1 is the noisiest step) that exposes
``timesteps``, ``alphas`` and ``step(x, model_out, index, noise)``. This module provides both for
CogVideoX:

* ``FifoCogVideoXSchedule`` — the v-prediction CogVideoX DDIM (η = 0, trailing grid, SNR shift,
  zero terminal SNR; ``schedulers/cogvideox.py``) with FIFO's index k = S−1−i, i the diffusers step
  index. The tail slot k = S−1 sits at t = 999 where ᾱ = 0, so the fresh N(0, I) that FIFO enqueues
  is exactly that slot's noise level; slot k = 0 (t = S-grid's smallest, 19 for 50 steps) steps to
  ᾱ = 1, i.e. every emitted latent is the final x̂0. The lookahead context slots also carry k = 0.
  ``solver="dpm"`` steps every frame with RepVideo's DPM-Solver++(2M) SDE instead: its second-order
  term takes the x̂0 the same latent got one step earlier, which ``FifoState.x0`` carries along the queue.
* ``dit_denoiser`` — merges a split ``CogVideoXDiT`` inside the trace and calls it on a batch of
  windows. ``cond = {"text": (B, T, L, D)}`` is per frame, as FIFO gathers it; the DiT attends to a
  single text sequence per window, so each window uses the embedding of its middle frame (frame
  T // 2, the first frame of the write range with lookahead). With one prompt all frames agree.
* ``dit_fifo_sampler`` — a ``FifoSampler`` wired with the two; ``text_conditioning`` builds the
  prompt table and the unconditional branch (zeros as RepVideo, or a negative-prompt embedding).

* ``guidance_table`` — CogVideoX's CFG weights in FIFO's index order: with dynamic CFG every frame of
  every window is guided with the weight of its own noise level (the weight a plain sampler would use
  at that timestep); None for a constant scale.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jax_repvideo import fifo
from jax_repvideo.schedulers import cogvideox as cog
from jax_repvideo.schedulers import guidance


@struct.dataclass
class FifoCogVideoXSchedule:
    """CogVideoX DDIM tables in FIFO's ascending index k (``timesteps[k]`` = t, ``alphas[k]`` = ᾱ_t)."""

    schedule: cog.CogVideoXSchedule  # diffusers order, step index i = S−1−k
    timesteps: jax.Array  # (S,) int32 ascending, e.g. 19, 39, …, 999
    alphas: jax.Array  # (S,) float32 ᾱ at those timesteps (used by FIFO's queue initialisation)
    solver: str = struct.field(pytree_node=False, default="ddim")  # "ddim" | "dpm"

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def step(self, x, model_out, index, noise=None, *, use_scale: bool = False, history=None):
        """One step of every frame at its own FIFO index k → ``(x_prev, x̂0)``.

        DDIM (η = 0) ignores ``noise`` and ``history``. DPM takes the step's Gaussian ``noise`` and
        ``history``, the x̂0 each frame got at its previous step (unused at a frame's first step).
        ``use_scale`` (VideoCrafter2's signal scaling) has no CogVideoX counterpart and is ignored.
        """
        del use_scale
        i = self.num_steps - 1 - jnp.asarray(index, jnp.int32)
        if self.solver == "dpm":
            return cog.dpm_step(self.schedule, i, x, model_out, history, noise)
        return cog.ddim_step(self.schedule, i, x, model_out)


def fifo_schedule(num_steps: int, config: cog.CogVideoXSchedulerConfig = cog.CogVideoXSchedulerConfig(),
                  solver: str = "ddim") -> FifoCogVideoXSchedule:
    """The S-step CogVideoX schedule in FIFO's indexing, stepped with ``solver`` ("ddim" or "dpm")."""
    if solver not in fifo.SOLVERS:
        raise ValueError(f"unknown FIFO solver {solver!r}; choose one of {fifo.SOLVERS}")
    schedule = cog.make_schedule(num_steps, config)
    grid = cog.trailing_timesteps(num_steps, config.num_train_timesteps)[::-1]
    alphas = cog.alphas_cumprod(config)[grid]
    return FifoCogVideoXSchedule(schedule=schedule, timesteps=jnp.asarray(grid.copy(), jnp.int32),
                                 alphas=jnp.asarray(alphas, jnp.float32), solver=solver)


def guidance_table(config: guidance.GuidanceConfig, schedule: FifoCogVideoXSchedule) -> jax.Array | None:
    """``guidance_scale_table`` over the S-step grid, reordered to FIFO's ascending index k."""
    if not config.dynamic:
        return None
    return guidance.guidance_scale_table(config, np.asarray(schedule.timesteps)[::-1])[::-1]


@functools.lru_cache(maxsize=None)
def dit_denoiser(graphdef) -> Callable:
    """``denoise(params, latents, timesteps, {"text": (B, T, L, D)})`` for an ``nnx.split`` DiT."""

    def denoise(params, latents, timesteps, cond):
        model = nnx.merge(graphdef, params)
        text = cond["text"][:, latents.shape[1] // 2]
        return model(latents, timesteps, text).astype(jnp.float32)

    return denoise


def text_conditioning(prompt_embeds: Sequence[jax.Array], config: guidance.GuidanceConfig,
                      negative: jax.Array | None = None):
    """``(prompts, uncond)`` for ``FifoSampler``: prompts ``{"text": (P, L, D)}``, uncond ``{"text": (L, D)}``.

    ``prompt_embeds``: one ``(L, D)`` T5 embedding per prompt; the unconditional branch follows
    ``config.unconditional`` (``negative``: the ``(L, D)`` embedding of the negative prompt).
    """
    prompts = jnp.stack([jnp.asarray(p) for p in prompt_embeds])
    negative = None if negative is None else jnp.asarray(negative)[None]
    uncond = guidance.unconditional_embedding(config, prompts[:1], negative)[0]
    return {"text": prompts}, {"text": uncond}


def dit_fifo_sampler(model, config: fifo.FifoConfig,
                     scheduler_config: cog.CogVideoXSchedulerConfig = cog.CogVideoXSchedulerConfig()
                     ) -> fifo.FifoSampler:
    """A ``FifoSampler`` running ``model`` (a ``CogVideoXDiT``) with the CogVideoX schedule and
    ``config.solver``."""
    graphdef, params = nnx.split(model)
    plan = fifo.make_plan(config)
    return fifo.FifoSampler(dit_denoiser(graphdef), params, config,
                            schedule=fifo_schedule(plan.steps, scheduler_config, config.solver))

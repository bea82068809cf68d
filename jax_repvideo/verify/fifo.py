"""``jax-repvideo verify fifo DIR``: the base DDIM run and both FIFO runs of ``DIR/fifo_run.npz``.

DIR holds the tiny U-Net (``unet.ckpt`` + ``unet_config.json``) and ``fifo_run.npz`` (see the fixture
README). The recorded random draws replace the RNG (mapped to the loop's order), the stored contexts and
fps condition every call. Checks, relative to each array's max-abs:

- end to end (≤ 1e-3): ``base_out``, then per run the queue after init, every dequeued latent and the
  output latents, our base output feeding the queue;
- teacher-forced (≤ 1e-4): each iteration's recorded ``call_in`` windows → guided ε (``call_eps``) and
  the per-frame DDIM update (``call_out``), as one batched call per iteration.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_repvideo import fifo
from jax_repvideo.schedulers import ddim
from jax_repvideo.verify import check

END_TO_END_TOL = 1e-3
TEACHER_FORCED_TOL = 1e-4
RUNS = (("nola", False), ("la", True))


def to_frames(video):
    """(…, C, T, H, W) PyTorch layout → (…, T, H, W, C)."""
    return np.moveaxis(np.asarray(video), -4, -1)


def draws(data, run: str) -> list[np.ndarray]:
    """The recorded random draws of a run, in draw order."""
    flat, offsets = data[f"{run}_randn_flat"], data[f"{run}_randn_offsets"]
    shapes, ndims = data[f"{run}_randn_shapes"], data[f"{run}_randn_ndim"]
    return [flat[offsets[i] : offsets[i + 1]].reshape(shapes[i, : ndims[i]]) for i in range(len(ndims))]


def injected_noise(data, run: str, plan: fifo.Plan) -> fifo.InjectedNoise:
    """Maps the official draw order (queue init; per iteration R·f step draws, then the tail) to ours."""
    sites, z = data[f"{run}_randn_site"], draws(data, run)
    init = [to_frames(x)[0, 0] for x, s in zip(z, sites) if s == "prepare_latents"]
    step = [to_frames(x)[0, 0] for x, s in zip(z, sites) if s == "ddim_step"]
    tail = [np.moveaxis(x[0], 0, -1) for x, s in zip(z, sites) if s == "shift_latents"]
    windows = len(plan.starts)
    if len(init) != plan.queue_length or len(step) != len(tail) * windows * plan.f:
        raise ValueError(f"{run}: draw counts do not match the queue (Q={plan.queue_length}, R={windows}, f={plan.f})")
    steps = np.stack(step).reshape((len(tail), windows, plan.f) + step[0].shape)
    return fifo.InjectedNoise(np.stack(init), steps, np.stack(tail))


def fifo_config(data, lookahead: bool, chunk_size: int = 4) -> fifo.FifoConfig:
    return fifo.FifoConfig(
        video_length=int(data["video_length"]),
        num_partitions=int(data["num_partitions"]),
        num_inference_steps=int(data["num_inference_steps"]),
        lookahead=lookahead,
        new_video_length=int(data["new_video_length"]),
        eta=float(data["eta"]),
        guidance_scale=float(data["guidance_scale"]),
        chunk_size=chunk_size,
    )


def conditioning(data):
    """Prompt table ({"context": (1, L, D)}) and uncond ({"context": (L, D)})."""
    return {"context": jnp.asarray(data["cond_context"])}, {"context": jnp.asarray(data["uncond_context"][0])}


def run(directory: Path) -> bool:
    data = np.load(Path(directory) / "fifo_run.npz")
    from flax import nnx

    from jax_repvideo.verify.videocrafter2_unet import load_model

    graphdef, params = nnx.split(load_model(directory)[0])
    with jax.default_matmul_precision("float32"):
        return verify(data, fifo.unet_denoiser(graphdef, int(data["fps"][0])), params)


def verify(data, denoise, params) -> bool:
    """All checks for one denoiser (the fixture's U-Net) on the fixture data."""
    ok = True
    prompts, uncond = conditioning(data)
    sampler = fifo.FifoSampler(denoise, params, fifo_config(data, lookahead=False))
    base, trace = sampler.base_video(
        prompts,
        uncond,
        None,
        x_T=jnp.asarray(to_frames(data["base_x_T"])),
        noise=jnp.asarray(to_frames(data["base_step_noise"])),
    )
    ok &= check("base_step_eps", trace[0][:, 0], to_frames(data["base_step_eps"])[:, 0], END_TO_END_TOL)
    ok &= check("base_out", base, to_frames(data["base_out"])[0], END_TO_END_TOL)
    for run_name, lookahead in RUNS:
        ok &= verify_run(data, run_name, lookahead, denoise, params, base, prompts, uncond)
    return bool(ok & teacher_forced(data, sampler, prompts, uncond))


def verify_run(data, run: str, lookahead: bool, denoise, params, base, prompts, uncond) -> bool:
    sampler = fifo.FifoSampler(denoise, params, fifo_config(data, lookahead))
    plan = sampler.plan
    noise = injected_noise(data, run, plan)
    ok = check(f"{run}_call_start_idx == plan", plan.starts, data[f"{run}_call_start_idx"], 0.0)
    timesteps = np.asarray(sampler.schedule.timesteps)[data[f"{run}_call_indices"]]
    ok &= check(f"{run}_call_timesteps", timesteps, data[f"{run}_call_timesteps"], 0.0)
    state = sampler.init(base, prompts, uncond, noise=noise.init)
    ok &= check(f"{run}_queue_init", state.queue, to_frames(data[f"{run}_queue_init"])[0], END_TO_END_TOL)
    frames = []
    sampler.run(state, prompts, uncond, noise=noise, include_warmup=True, consumer=lambda i, x: frames.append(x))
    dequeued = np.concatenate(frames)
    ok &= check(f"{run}_dequeued", dequeued, to_frames(data[f"{run}_dequeued"])[0], END_TO_END_TOL)
    kept = dequeued[plan.steps - plan.f :]
    return ok & check(f"{run}_output_latents", kept, to_frames(data[f"{run}_output_latents"])[0], END_TO_END_TOL)


def teacher_forced(data, sampler: fifo.FifoSampler, prompts, uncond) -> bool:
    """Recorded call_in → guided ε and the DDIM update with the recorded draws, for every call of both
    runs at once: all windows × CFG in one batched call (one compile)."""
    inputs = sampler.inputs(prompts, uncond, None, int(data["new_video_length"]))
    windows, indices, draws_, sizes = [], [], [], []
    for run, lookahead in RUNS:
        x = to_frames(data[f"{run}_call_in"])[:, :, 0]  # (K, R, f, H, W, C)
        noise = injected_noise(data, run, fifo.make_plan(fifo_config(data, lookahead)))
        windows.append(x.reshape((-1,) + x.shape[2:]))
        indices.append(data[f"{run}_call_indices"].reshape(-1, x.shape[2]))
        draws_.append(noise.steps.reshape(windows[-1].shape))
        sizes.append(x.shape[:2])

    calls = _teacher_forced_calls(sampler.denoise, sampler.plan)
    eps, out = calls(sampler.params, inputs, *(jnp.asarray(np.concatenate(a)) for a in (windows, indices, draws_)))
    ok, first = True, 0
    for (run, _), (k, r) in zip(RUNS, sizes):
        part = slice(first, first + k * r)
        first += k * r
        for name, ours in (("eps", eps), ("out", out)):
            ref = to_frames(data[f"{run}_call_{name}"])[:, :, 0]
            ours = np.asarray(ours[part]).reshape(ref.shape)
            ok &= check(f"{run}_call_{name} (teacher-forced)", ours, ref, TEACHER_FORCED_TOL)
    return ok


@functools.lru_cache(maxsize=None)
def _teacher_forced_calls(denoise, plan: fifo.Plan):
    @jax.jit
    def calls(params, inputs, x, idx, z):
        eps = fifo.denoise_windows(denoise, plan, params, inputs, x, idx, jnp.zeros(idx.shape, jnp.int32))
        return eps, inputs.schedule.step(x, eps, idx, z)[0]

    return calls

"""CogVideoX schedulers and guidance against diffusers' schedulers and pipeline formula (spec §2.5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from diffusers.schedulers import scheduling_dpm_cogvideox

from jax_repvideo.schedulers import cogvideox as cog
from jax_repvideo.schedulers import guidance

# THUDM/CogVideoX-2b scheduler/scheduler_config.json, as written out in spec §2.1.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", snr_shift_scale=3.0, rescale_betas_zero_snr=True,
    timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, steps_offset=0,
)
SHAPE = (2, 3, 4, 5, 6)  # (B, T, H, W, C); the schedulers are elementwise

ddim_step = jax.jit(cog.ddim_step)
dpm_step = jax.jit(cog.dpm_step)


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


def reference(cls, num_steps):
    scheduler = cls(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_steps)
    return scheduler


class InjectedNoise:
    """Stands in for diffusers' ``randn_tensor`` so the DPM reference draws our noise."""

    def __init__(self):
        self.value = None

    def __call__(self, shape, **kwargs):
        assert tuple(shape) == tuple(self.value.shape)
        return self.value.clone()


@pytest.fixture
def injected_noise(monkeypatch):
    noise = InjectedNoise()
    monkeypatch.setattr(scheduling_dpm_cogvideox, "randn_tensor", noise)
    return noise


@pytest.mark.parametrize("num_steps", [50, 30, 7])
def test_alphas_cumprod_and_timestep_grid(num_steps):
    ref = reference(CogVideoXDDIMScheduler, num_steps)
    ours = cog.alphas_cumprod(cog.CogVideoXSchedulerConfig())
    # numpy's and torch's float64 linspace differ in the last bit for a few betas.
    np.testing.assert_allclose(ours, ref.alphas_cumprod.numpy(), rtol=1e-14, atol=1e-16)
    assert ours[-1] == 0.0
    np.testing.assert_array_equal(cog.trailing_timesteps(num_steps), ref.timesteps.numpy())
    schedule = cog.make_schedule(num_steps)
    assert schedule.num_steps == num_steps
    np.testing.assert_array_equal(schedule.timesteps, ref.timesteps.numpy())


def test_grid_rejects_bad_step_count():
    with pytest.raises(ValueError, match="num_steps"):
        cog.trailing_timesteps(0)
    with pytest.raises(ValueError, match="num_steps"):
        cog.make_schedule(1001)


@pytest.mark.parametrize("num_steps", [50, 7])
def test_ddim_trajectory_matches_diffusers(num_steps):
    ref_scheduler = reference(CogVideoXDDIMScheduler, num_steps)
    schedule = cog.make_schedule(num_steps)
    rng = np.random.default_rng(0)
    x_ref = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
    x = jnp.asarray(x_ref.numpy())
    worst = 0.0
    for i, t in enumerate(ref_scheduler.timesteps):
        v = rng.standard_normal(SHAPE, dtype=np.float32)
        x_ref, x0_ref = ref_scheduler.step(torch.from_numpy(v), t, x_ref, return_dict=False)
        x, x0 = ddim_step(schedule, jnp.int32(i), x, jnp.asarray(v))
        worst = max(worst, rel(x, x_ref), rel(x0, x0_ref))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("num_steps", [50, 7])
def test_dpm_trajectory_matches_diffusers_with_injected_noise(num_steps, injected_noise):
    ref_scheduler = reference(CogVideoXDPMScheduler, num_steps)
    schedule = cog.make_schedule(num_steps)
    rng = np.random.default_rng(1)
    x_ref = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
    x, old_x0, old_ref = jnp.asarray(x_ref.numpy()), jnp.zeros(SHAPE), None
    timesteps = ref_scheduler.timesteps
    worst = 0.0
    for i, t in enumerate(timesteps):
        v = rng.standard_normal(SHAPE, dtype=np.float32)
        z = rng.standard_normal(SHAPE, dtype=np.float32)
        injected_noise.value = torch.from_numpy(z)
        back = timesteps[i - 1] if i > 0 else None  # as the pipeline passes it
        x_ref, old_ref = ref_scheduler.step(torch.from_numpy(v), old_ref, t, back, x_ref, return_dict=False)
        x, old_x0 = dpm_step(schedule, jnp.int32(i), x, jnp.asarray(v), old_x0, jnp.asarray(z))
        worst = max(worst, rel(x, x_ref), rel(old_x0, old_ref))
    assert worst <= 1e-5, worst


def test_per_frame_step_indices_match_diffusers_frame_by_frame(injected_noise):
    """Each frame of a (B, T) index array is stepped exactly as diffusers steps it alone."""
    num_steps = 30
    ddim_ref = reference(CogVideoXDDIMScheduler, num_steps)
    dpm_ref = reference(CogVideoXDPMScheduler, num_steps)
    timesteps = ddim_ref.timesteps
    schedule = cog.make_schedule(num_steps)
    rng = np.random.default_rng(2)
    x, v, old, z = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(4))
    index = np.array([[0, 1, 29], [17, 3, 28]], np.int32)  # first, second-order, last steps

    x_ddim, _ = ddim_step(schedule, jnp.asarray(index), jnp.asarray(x), jnp.asarray(v))
    x_dpm, x0_dpm = dpm_step(schedule, jnp.asarray(index), jnp.asarray(x), jnp.asarray(v),
                             jnp.asarray(old), jnp.asarray(z))
    np.testing.assert_array_equal(cog.model_timesteps(schedule, index), timesteps.numpy()[index])
    noised = cog.add_noise(schedule, jnp.asarray(index), jnp.asarray(x), jnp.asarray(z))

    for b, f in np.ndindex(index.shape):
        i = int(index[b, f])
        frame = [torch.from_numpy(a[b, f]) for a in (x, v, old, z)]
        ref, _ = ddim_ref.step(frame[1], timesteps[i], frame[0], return_dict=False)
        assert rel(x_ddim[b, f], ref) <= 1e-5
        injected_noise.value = frame[3]
        back, old_ref = (timesteps[i - 1], frame[2]) if i > 0 else (None, None)
        ref, ref_x0 = dpm_ref.step(frame[1], old_ref, timesteps[i], back, frame[0], return_dict=False)
        assert rel(x_dpm[b, f], ref) <= 1e-5 and rel(x0_dpm[b, f], ref_x0) <= 1e-5
        ref = ddim_ref.add_noise(frame[0], frame[3], timesteps[i:i + 1])
        assert rel(noised[b, f], ref) <= 1e-5


def test_step_index_rank_must_fit_the_sample():
    schedule = cog.make_schedule(10)
    with pytest.raises(ValueError, match="rank"):
        cog.ddim_step(schedule, jnp.zeros((2, 3, 4), jnp.int32), jnp.zeros((2, 3)), jnp.zeros((2, 3)))


# --- guidance ---------------------------------------------------------------------------------

def pipeline_dynamic_scale(guidance_scale, num_inference_steps, t):
    """The diffusers CogVideoXPipeline formula (spec §2.5), t the integer timestep."""
    return 1 + guidance_scale * (
        (1 - math.cos(math.pi * ((num_inference_steps - t) / num_inference_steps) ** 5.0)) / 2)


@pytest.mark.parametrize("num_steps", [50, 30])
def test_dynamic_cfg_quirk_matches_pipeline_formula(num_steps):
    timesteps = cog.trailing_timesteps(num_steps)
    table = guidance.guidance_scale_table(guidance.GuidanceConfig(scale=6.0), timesteps)
    ref = [pipeline_dynamic_scale(6.0, num_steps, int(t)) for t in timesteps]
    assert rel(table, ref) <= 1e-6
    if num_steps == 50:  # the values measured in spec §2.5
        np.testing.assert_allclose(np.asarray(table[:6]), [2.29, 2.54, 6.97, 6.42, 2.79, 4.27], atol=0.006)


def test_dynamic_cfg_monotone_decays_from_one_plus_w_to_one():
    num_steps, w = 50, 6.0
    timesteps = cog.trailing_timesteps(num_steps)
    config = guidance.GuidanceConfig(scale=w, schedule="monotone")
    table = np.asarray(guidance.guidance_scale_table(config, timesteps))
    # The pipeline formula with the step index in place of the timestep.
    ref = [pipeline_dynamic_scale(w, num_steps, i) for i in range(num_steps)]
    assert rel(table, ref) <= 1e-6
    assert table[0] == pytest.approx(1 + w) and table[-1] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(table) <= 0)


def test_static_cfg_and_per_frame_combine():
    timesteps = cog.trailing_timesteps(20)
    static = guidance.guidance_scale_table(guidance.GuidanceConfig(scale=4.5, dynamic=False), timesteps)
    np.testing.assert_array_equal(static, np.full(20, 4.5, np.float32))

    table = guidance.guidance_scale_table(guidance.GuidanceConfig(scale=6.0), timesteps)
    rng = np.random.default_rng(3)
    uncond, cond = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(2))
    index = np.array([[0, 5, 19], [2, 2, 11]])
    ours = jax.jit(guidance.guided)(table, jnp.asarray(index), jnp.asarray(uncond), jnp.asarray(cond))
    for b, f in np.ndindex(index.shape):
        w = pipeline_dynamic_scale(6.0, 20, int(timesteps[index[b, f]]))
        u, c = torch.from_numpy(uncond[b, f]), torch.from_numpy(cond[b, f])
        assert rel(ours[b, f], u + w * (c - u)) <= 1e-6


def test_unconditional_embedding_choice():
    cond = jnp.ones((2, 7, 8))
    zeros = guidance.unconditional_embedding(guidance.GuidanceConfig(unconditional="zeros"), cond)
    np.testing.assert_array_equal(zeros, np.zeros((2, 7, 8)))
    config = guidance.GuidanceConfig(unconditional="negative_prompt")
    negative = jnp.arange(56.0).reshape(1, 7, 8)
    np.testing.assert_array_equal(guidance.unconditional_embedding(config, cond, negative),
                                  np.broadcast_to(negative, (2, 7, 8)))
    with pytest.raises(ValueError, match="negative prompt"):
        guidance.unconditional_embedding(config, cond)
    with pytest.raises(ValueError, match="does not match"):
        guidance.unconditional_embedding(config, cond, jnp.zeros((1, 6, 8)))

"""VC2/FIFO DDIM against the official sampler's recorded tables and steps (fifo_run.npz)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_repvideo.schedulers import ddim


def frames(video):
    """(…, C, T, H, W) → (…, T, H, W, C)."""
    return np.moveaxis(video, -4, -1)


@pytest.fixture(scope="module")
def data(fixtures_dir):
    return dict(np.load(fixtures_dir / "videocrafter2" / "fifo_run.npz"))


def test_training_schedule_matches_official_buffers(data):
    betas = ddim.scaled_linear_betas(float(data["linear_start"]), float(data["linear_end"]))
    np.testing.assert_allclose(betas, data["model_betas"], rtol=1e-6)
    np.testing.assert_array_equal(ddim.alphas_cumprod(betas), data["model_alphas_cumprod"])
    scales = ddim.scale_arr(float(data["scale_a"]), float(data["scale_b"]), int(data["mid_step"]))
    np.testing.assert_array_equal(scales, data["model_scale_arr"])


def test_fifo_schedule_tables(data):
    s = ddim.videocrafter2_schedule(int(data["num_inference_steps"]), eta=float(data["eta"]))
    np.testing.assert_array_equal(s.timesteps, data["sched_ddim_timesteps"])
    np.testing.assert_array_equal(s.alphas, data["sched_ddim_alphas"])
    np.testing.assert_array_equal(s.alphas_prev, data["sched_ddim_alphas_prev"].astype(np.float32))
    np.testing.assert_allclose(s.sigmas, data["sched_ddim_sigmas"], atol=1e-7)
    np.testing.assert_array_equal(s.scales, data["sched_ddim_scale_arr"])
    np.testing.assert_array_equal(s.scales_prev, data["sched_ddim_scale_arr_prev"].astype(np.float32))


def test_grids_and_spec_values():
    np.testing.assert_array_equal(ddim.fifo_timesteps(64)[:8], [0, 16, 32, 48, 63, 79, 95, 111])
    assert ddim.fifo_timesteps(64)[-1] == 999
    vc = ddim.videocrafter_timesteps(50)
    assert (vc[0], vc[1], vc[-1], len(vc)) == (1, 21, 981, 50)
    s = ddim.videocrafter2_schedule(64)
    np.testing.assert_allclose(s.alphas[:5], [0.99915, 0.98501, 0.96985, 0.95367, 0.93759], atol=1e-5)
    np.testing.assert_allclose(s.sigmas[:5], [0, 0.02833, 0.08748, 0.10419, 0.11188], atol=1e-5)
    np.testing.assert_allclose(s.sigmas[-3:], [0.4077, 0.41226, 0.4168], atol=1e-4)
    vcs = ddim.videocrafter2_schedule(50, grid="videocrafter")
    acp = ddim.alphas_cumprod(ddim.scaled_linear_betas())
    assert vcs.alphas_prev[0] == acp[0] and vcs.alphas[0] == acp[1]  # A[0]_prev = ᾱ[0] on both grids
    assert s.alphas_prev[0] == s.alphas[0]  # on FIFO's grid τ_0 = 0: index 0 is an identity step
    with pytest.raises(ValueError, match="grid"):
        ddim.videocrafter2_schedule(8, grid="linspace")


def test_index_zero_is_identity():
    s = ddim.videocrafter2_schedule(8)
    x = jnp.linspace(-2, 2, 24).reshape(1, 2, 3, 4)
    eps, z = jnp.cos(x), jnp.sin(3 * x)
    out, _ = s.step(x, eps, 0, z)
    np.testing.assert_allclose(out, x, rtol=1e-6, atol=1e-6)


def test_base_run_steps_with_use_scale(data):
    """Recorded ε and z of the official base run → pred_x0 and x_prev of every step (use_scale on)."""
    s = ddim.videocrafter2_schedule(8)
    x = frames(data["base_x_T"])
    for i in range(8):
        idx = int(data["base_step_index"][i])
        assert s.timesteps[idx] == data["base_model_timesteps"][i]
        out, pred = s.step(x, frames(data["base_step_eps"][i]), idx, frames(data["base_step_noise"][i]), use_scale=True)
        np.testing.assert_allclose(pred, frames(data["base_step_pred_x0"][i]), atol=1e-4 * np.abs(pred).max())
        np.testing.assert_allclose(out, frames(data["base_step_out"][i]), atol=2e-5 * np.abs(out).max())
        x = frames(data["base_step_out"][i])


def test_fifo_per_frame_update_without_scale(data):
    """Recorded ε and draws → every FIFO window's update, per-frame indices, no scale (spec §1.2 quirk)."""
    from jax_repvideo import fifo
    from jax_repvideo.verify.fifo import fifo_config, injected_noise

    s = ddim.videocrafter2_schedule(8)
    for run, lookahead in (("nola", False), ("la", True)):
        noise = injected_noise(data, run, fifo.make_plan(fifo_config(data, lookahead)))
        x, eps = frames(data[f"{run}_call_in"])[:, :, 0], frames(data[f"{run}_call_eps"])[:, :, 0]
        out, _ = s.step(x, eps, data[f"{run}_call_indices"], noise.steps)
        ref = frames(data[f"{run}_call_out"])[:, :, 0]
        np.testing.assert_allclose(out, ref, atol=1e-6 * np.abs(ref).max())


def test_v_prediction_matches_eps_form():
    s_eps = ddim.videocrafter2_schedule(8)
    s_v = ddim.make_schedule(ddim.fifo_timesteps(8), scales=ddim.scale_arr(), prediction="v")
    x = jnp.linspace(-1, 1, 2 * 3 * 4 * 2).reshape(2, 3, 4, 2)
    idx = jnp.array([1, 3])
    x0, eps = jnp.cos(2 * x), jnp.sin(x)
    a = s_eps.alphas[idx][:, None, None, None]
    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
    v = jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
    z = jnp.cos(5 * x)
    np.testing.assert_allclose(s_v.step(xt, v, idx, z)[0], s_eps.step(xt, eps, idx, z)[0], atol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        ddim.make_schedule(ddim.fifo_timesteps(8), prediction="x0")


def test_cfg_is_one_stacked_batch():
    cond, uncond = jnp.full((2, 3), 2.0), jnp.full((2, 3), 0.5)
    out = ddim.combine_cfg(jnp.concatenate([cond, uncond]), 12.0)
    np.testing.assert_allclose(out, 0.5 + 12.0 * 1.5)
    assert ddim.stack_cfg(cond).shape == (4, 3)

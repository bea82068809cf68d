"""FIFO-Diffusion on a tiny random CogVideoX DiT (v-prediction, CogVideoX DDIM schedule).

The reference iteration is written here the way the official code runs FIFO: one window at a time,
noisiest first, separate cond and uncond model calls, in-place write-back of each write range.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_repvideo import fifo, fifo_dit
from jax_repvideo.models.dit import CogVideoXDiT, DiTConfig, jit_forward
from jax_repvideo.schedulers import cogvideox as cog
from jax_repvideo.schedulers import guidance

DIT = DiTConfig(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16,
                text_embed_dim=8, num_layers=2, max_text_seq_length=4, repvideo=True)
LATENT = (4, 6, 4)  # (H, W, C) per frame
WINDOW, TEXT_LEN = 4, DIT.max_text_seq_length


def config(lookahead, **overrides):
    settings = dict(video_length=WINDOW, num_partitions=2, lookahead=lookahead, guidance_scale=6.0,
                    new_video_length=3, chunk_size=4)
    return fifo.FifoConfig(**{**settings, **overrides})


def collect(into: dict):
    """A ``FifoSampler.run`` consumer that files every streamed latent under its frame index."""
    return lambda first, latents: into.update({first + j: np.asarray(x) for j, x in enumerate(latents)})


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def model():
    return CogVideoXDiT(DIT, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    """The DiT on one window, jitted once for the module."""
    fn, state = jit_forward(model)
    return functools.partial(fn, state)


@pytest.fixture(scope="module")
def conditioning():
    rng = np.random.default_rng(0)
    embeds = [rng.standard_normal((TEXT_LEN, DIT.text_embed_dim), dtype=np.float32) for _ in range(2)]
    return fifo_dit.text_conditioning(embeds, guidance.GuidanceConfig(unconditional="zeros"))


def test_schedule_in_fifo_indexing():
    num_steps = 8
    ours = fifo_dit.fifo_schedule(num_steps)
    grid = cog.trailing_timesteps(num_steps)
    np.testing.assert_array_equal(ours.timesteps, grid[::-1])
    np.testing.assert_array_equal(ours.alphas, cog.alphas_cumprod()[grid[::-1]].astype(np.float32))
    assert ours.alphas[-1] == 0.0  # the tail slot is pure noise, like FIFO's fresh N(0, I)
    x, v = jax.random.normal(jax.random.PRNGKey(0), (2, 2, num_steps) + LATENT)
    k = jnp.broadcast_to(jnp.arange(num_steps), (2, num_steps))
    got, _ = jax.jit(lambda s, *a: s.step(*a))(ours, x, v, k, None)
    want, _ = cog.ddim_step(cog.make_schedule(num_steps), num_steps - 1 - k, x, v)
    assert rel(got, want) <= 1e-6  # jit fuses differently from eager; same maths


def reference_iteration(forward, plan, schedule, inputs, state, tail, guidance_scale):
    """One FIFO iteration window by window (noisiest first), two batch-1 DiT calls per window."""
    queue, indices = np.array(state.queue), np.asarray(state.indices)
    text = inputs.table["text"]
    writes = np.zeros(plan.queue_length, int)
    for start in plan.starts:
        window = slice(start, start + plan.f)
        x, k = jnp.asarray(queue[window])[None], indices[window]
        t = jnp.asarray(np.asarray(schedule.timesteps)[k])[None]
        prompt = text[state.prompts[start + plan.f // 2]][None]
        cond, uncond = forward(x, t, prompt), forward(x, t, text[-1][None])
        v = uncond + guidance_scale * (cond - uncond)
        x_prev, _ = cog.ddim_step(schedule.schedule, plan.steps - 1 - k[None], x, v)
        queue[start + plan.write_offset:start + plan.f] = np.asarray(x_prev[0, plan.write_offset:])
        writes[start + plan.write_offset:start + plan.f] += 1
    emitted = queue[plan.context].copy()
    return np.concatenate([queue[1:], tail[None]]), emitted, writes


@pytest.mark.parametrize("lookahead", [True, False])
def test_batched_windows_equal_one_at_a_time_and_each_slot_updated_once(model, forward, conditioning, lookahead):
    sampler = fifo_dit.dit_fifo_sampler(model, config(lookahead))
    plan, prompts, uncond = sampler.plan, *conditioning
    base = jax.random.normal(jax.random.PRNGKey(1), (plan.f,) + LATENT)
    state = sampler.init(base, prompts, uncond, (2, 1))
    inputs = sampler.inputs(prompts, uncond, (2, 1), 3)
    noise = fifo.draw_noise(plan, jax.random.PRNGKey(2), LATENT)[1]

    iterate = jax.jit(functools.partial(fifo.fifo_iteration, sampler.denoise, plan))
    new_state, emitted = iterate(sampler.params, inputs, state, noise)
    ref_queue, ref_emitted, writes = reference_iteration(forward, plan, sampler.schedule, inputs, state,
                                                         np.asarray(noise[1]), 6.0)

    L = plan.context
    np.testing.assert_array_equal(writes, (np.arange(plan.queue_length) >= L).astype(int))
    print(f"batched vs one window at a time: queue {rel(new_state.queue, ref_queue):.2e}, "
          f"emitted {rel(emitted, ref_emitted):.2e}")
    assert rel(new_state.queue, ref_queue) <= 1e-5
    assert rel(emitted, ref_emitted) <= 1e-5
    old, new = np.asarray(state.queue), np.asarray(new_state.queue)
    np.testing.assert_array_equal(new[:L - 1] if L else new[:0], old[1:L])  # context slots untouched
    assert all(not np.allclose(new[p - 1], old[p]) for p in range(max(L, 1), plan.queue_length))
    np.testing.assert_array_equal(new_state.indices, state.indices)


def test_sampler_streams_every_frame(model, conditioning):
    sampler = fifo_dit.dit_fifo_sampler(model, config(True))
    prompts, uncond = conditioning
    base, _ = sampler.base_video(prompts, uncond, LATENT, key=jax.random.PRNGKey(3))
    assert base.shape == (WINDOW,) + LATENT and np.isfinite(np.asarray(base)).all()
    frames = {}
    state = sampler.init(base, prompts, uncond, (2, 1))
    state = sampler.run(state, prompts, uncond, (2, 1),
                        consumer=collect(frames))
    assert sorted(frames) == [0, 1, 2]
    assert int(state.iteration) == 3 + sampler.plan.steps - WINDOW
    assert np.isfinite(np.stack(list(frames.values()))).all()


def test_negative_prompt_conditioning():
    embeds = [np.ones((TEXT_LEN, 8), np.float32)]
    negative = np.full((TEXT_LEN, 8), 2.0, np.float32)
    prompts, uncond = fifo_dit.text_conditioning(
        embeds, guidance.GuidanceConfig(unconditional="negative_prompt"), negative)
    assert prompts["text"].shape == (1, TEXT_LEN, 8)
    np.testing.assert_array_equal(uncond["text"], negative)
    _, uncond = fifo_dit.text_conditioning(embeds, guidance.GuidanceConfig())
    np.testing.assert_array_equal(uncond["text"], np.zeros((TEXT_LEN, 8)))


def test_dynamic_guidance_table_in_fifo_order():
    """Dynamic CFG in FIFO: index k (ascending noise) takes the weight a plain sampler uses at that timestep."""
    schedule = fifo_dit.fifo_schedule(12)
    descending = np.asarray(schedule.timesteps)[::-1]
    for config in (guidance.GuidanceConfig(scale=6.0), guidance.GuidanceConfig(scale=6.0, schedule="monotone")):
        plain = np.asarray(guidance.guidance_scale_table(config, descending))
        table = np.asarray(fifo_dit.guidance_table(config, schedule))
        np.testing.assert_array_equal(table, plain[::-1])
    monotone = np.asarray(fifo_dit.guidance_table(guidance.GuidanceConfig(scale=6.0, schedule="monotone"), schedule))
    assert monotone[-1] == 7.0 and np.all(np.diff(monotone) >= 0)  # 1 + w at the noisiest level
    assert fifo_dit.guidance_table(guidance.GuidanceConfig(scale=6.0, dynamic=False), schedule) is None


# ---- the DPM-Solver++(2M) SDE per frame (fifo.solver=dpm): the history travels with each latent ------------


def frame_wise_toy(params, x, t, cond):
    """A denoiser with no cross-frame term: each latent's trajectory can be replayed on its own."""
    del params, cond
    scale = t.astype(jnp.float32)[..., None, None, None] / 1000.0
    return jnp.tanh(x) * scale + 0.1 * x


def test_dpm_fifo_steps_each_fresh_latent_along_the_plain_dpm_trajectory(conditioning):
    """A latent that enters the tail as fresh noise gets S DPM steps, one per iteration, at falling noise;
    each second-order step must use the x̂0 the same latent got one iteration earlier. Replayed alone with
    the plain DPM step and the same noise draws, it must end where FIFO emits it."""
    cfg = config(True, guidance_scale=1.0, solver="dpm", new_video_length=8)
    plan = fifo.make_plan(cfg)
    S, f, Q, w = plan.steps, plan.f, plan.queue_length, plan.write_offset
    sampler = fifo.FifoSampler(frame_wise_toy, None, cfg, schedule=fifo_dit.fifo_schedule(S, solver="dpm"))
    prompts, uncond = conditioning
    rng = np.random.default_rng(4)
    iterations = cfg.new_video_length + S - f
    noise = fifo.InjectedNoise(
        init=rng.standard_normal((Q,) + LATENT).astype(np.float32),
        steps=rng.standard_normal((iterations, len(plan.starts), f) + LATENT).astype(np.float32),
        tails=rng.standard_normal((iterations,) + LATENT).astype(np.float32))
    base = rng.standard_normal((f,) + LATENT).astype(np.float32)
    state = sampler.init(base, prompts, uncond, (4, 4), noise=jnp.asarray(noise.init))
    frames = {}
    sampler.run(state, prompts, uncond, (4, 4), noise=noise,
                consumer=collect(frames))

    schedule = cog.make_schedule(S)
    window_of = {int(p): (r, w + c) for (r, c), p in np.ndenumerate(plan.write_positions)}
    for entered in range(cfg.new_video_length - f):  # the latents that entered as tail noise
        x, history = jnp.asarray(noise.tails[entered])[None], jnp.zeros((1,) + LATENT)
        for i in range(S):  # diffusers step i at iteration entered + 1 + i, queue position Q − 1 − i
            r, j = window_of[Q - 1 - i]
            t = jnp.full((1, 1), schedule.timesteps[i])
            v = frame_wise_toy(None, x[:, None], t, None)[:, 0]
            x, history = cog.dpm_step(schedule, i, x, v, history, noise.steps[entered + 1 + i, r, j][None])
        error = rel(frames[entered + f], x[0])
        print(f"frame {entered + f}: FIFO vs its replayed DPM trajectory {error:.2e}")
        assert error <= 1e-5


def test_dpm_base_video_is_plain_dpm_sampling(model, conditioning):
    """The base clip that seeds a DPM FIFO queue is RepVideo's plain DPM sampling, step for step."""
    from jax_repvideo.pipeline_cogvideox import _clip_sampler

    sampler = fifo_dit.dit_fifo_sampler(model, config(True, solver="dpm"))
    prompts, uncond = conditioning
    steps, shape = sampler.plan.steps, (1, WINDOW) + LATENT
    x_T = jax.random.normal(jax.random.PRNGKey(5), shape)
    noise = jax.random.normal(jax.random.PRNGKey(6), (steps,) + shape)
    ours, _ = sampler.base_video(prompts, uncond, LATENT, x_T=x_T, noise=noise)
    graphdef, params = nnx.split(model)
    plain = _clip_sampler(graphdef, "dpm")(params, cog.make_schedule(steps), jnp.full((steps,), 6.0), x_T,
                                          prompts["text"][:1], uncond["text"][None], noise)[0]
    print(f"FIFO base vs plain DPM: {rel(ours, plain):.2e}")
    assert rel(ours, plain) <= 1e-5


def test_dpm_fifo_resumes_with_its_history(conditioning, tmp_path):
    """The x̂0 history is part of the saved state: a run cut after one chunk and restored from disk emits
    the same latents as an uninterrupted one."""
    cfg = config(True, guidance_scale=1.0, solver="dpm", new_video_length=8)
    sampler = fifo.FifoSampler(frame_wise_toy, None, cfg, schedule=fifo_dit.fifo_schedule(8, solver="dpm"))
    prompts, uncond = conditioning
    base = jax.random.normal(jax.random.PRNGKey(7), (WINDOW,) + LATENT)
    straight, cut = {}, {}
    start = sampler.init(base, prompts, uncond, (4, 4))
    sampler.run(start, prompts, uncond, (4, 4), consumer=collect(straight))
    first = sampler.run(start, prompts, uncond, (4, 4), consumer=collect(cut), max_chunks=1)
    fifo.save_state(tmp_path / "state", first)
    sampler.run(fifo.load_state(tmp_path / "state"), prompts, uncond, (4, 4), consumer=collect(cut))
    assert sorted(cut) == sorted(straight) == list(range(8))
    for i in straight:
        np.testing.assert_array_equal(cut[i], straight[i])


def test_the_solver_must_match_the_schedule():
    from jax_repvideo.config import ConfigError

    with pytest.raises(ConfigError, match="fifo.solver=dpm, but the FIFO schedule steps with ddim"):
        fifo.FifoSampler(frame_wise_toy, None, config(True, solver="dpm"))  # VideoCrafter2's DDIM schedule
    with pytest.raises(ConfigError, match="fifo.solver=ddim, but the FIFO schedule steps with dpm"):
        fifo.FifoSampler(frame_wise_toy, None, config(True), schedule=fifo_dit.fifo_schedule(8, solver="dpm"))

"""FIFO-Diffusion loop: equivalences (batched vs one window at a time, scan vs Python loop), queue
geometry, prompt schedule, single compile, resume/extend, errors, and the official run replayed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_repvideo import fifo
from jax_repvideo.config import ConfigError
from jax_repvideo.schedulers import ddim
from jax_repvideo.verify import fifo as verify_fifo

LATENT = (2, 3, 4)  # (H, W, C)
CONFIG = fifo.FifoConfig(video_length=4, num_partitions=2, new_video_length=6, chunk_size=3, guidance_scale=7.5)


def toy(params, x, t, cond):
    """A tiny ε-model that mixes frames, reads per-frame timesteps and per-frame conditioning."""
    mix = x.mean(axis=1, keepdims=True)
    temb = jnp.sin(t / 100.0)[..., None, None, None]
    return jnp.tanh(x @ params["w"] + 0.3 * mix + cond["c"][:, :, None, None, :] + temb)


PARAMS = {"w": 0.5 * jnp.eye(4) + 0.05 * jnp.arange(16.0).reshape(4, 4) / 16}
PROMPTS = {"c": jnp.array([[0.5, -0.2, 0.1, 0.0], [-0.4, 0.3, 0.0, 0.2]])}
UNCOND = {"c": jnp.zeros(4)}


@functools.lru_cache(maxsize=None)
def iteration_fn(plan, denoise=toy):
    """One jitted iteration per plan, shared by the tests (params, inputs, state, noise are arguments)."""
    return jax.jit(functools.partial(fifo.fifo_iteration, denoise, plan))


def drawn_step(plan, params, inputs, state):
    key, drawn = fifo.draw_noise(plan, state.key, LATENT)
    return iteration_fn(plan)(params, inputs, state._replace(key=key), drawn)


toy_jit = jax.jit(toy)


@pytest.fixture(scope="module")
def base():
    return jax.random.normal(jax.random.PRNGKey(1), (4,) + LATENT)


def sampler(**overrides):
    return fifo.FifoSampler(toy, PARAMS, fifo.dataclasses.replace(CONFIG, **overrides))


def generate(s, state, num_frames, frames=(3, 3), **kw):
    out = {}
    consumer = lambda i, x: out.update({i + j: f for j, f in enumerate(x)})  # noqa: E731
    state = s.run(state, PROMPTS, UNCOND, scaled(frames, num_frames), num_frames=num_frames, consumer=consumer, **kw)
    return state, np.stack([out[i] for i in sorted(out)])


def scaled(frames, num_frames):
    return (frames[0], num_frames - frames[0])


# ---- queue geometry ----------------------------------------------------------------------------------


def test_queue_timesteps_are_the_spec_diagonal():
    plan = fifo.make_plan(fifo.FifoConfig(video_length=16, num_partitions=4))
    tau = ddim.fifo_timesteps(64)
    np.testing.assert_array_equal(tau[plan.slot_indices], np.r_[[0] * 8, tau])
    t_windows = tau[plan.slot_indices[plan.window_positions]]
    assert list(plan.starts) == [56, 48, 40, 32, 24, 16, 8, 0]
    assert (t_windows[0, 0], t_windows[0, -1]) == (761, 999)  # rank 7
    assert (t_windows[1, 0], t_windows[1, -1]) == (634, 872)  # rank 6
    np.testing.assert_array_equal(t_windows[-1], [0] * 9 + [16, 32, 48, 63, 79, 95, 111])  # rank 0
    np.testing.assert_array_equal(t_windows[-2], tau[:16])  # rank 1: 0, 16, …, 238
    no_la = fifo.make_plan(fifo.FifoConfig(video_length=16, num_partitions=4, lookahead=False))
    assert list(no_la.starts) == [48, 32, 16, 0] and no_la.context == 0
    assert tau[no_la.slot_indices[no_la.window_positions]][0, 0] == 761


def test_queue_geometry_matches_the_official_run(fixtures_dir):
    data = np.load(fixtures_dir / "videocrafter2" / "fifo_run.npz")
    for run, lookahead in verify_fifo.RUNS:
        plan = fifo.make_plan(verify_fifo.fifo_config(data, lookahead))
        np.testing.assert_array_equal(plan.slot_indices, data[f"{run}_queue_indices"])
        np.testing.assert_array_equal(plan.starts, data[f"{run}_call_start_idx"])
        assert plan.context == data[f"{run}_first_frame_idx"]
        np.testing.assert_array_equal(plan.slot_indices[plan.window_positions], data[f"{run}_call_indices"][0])


@pytest.mark.parametrize("f,n,lookahead", [(4, 2, True), (4, 2, False), (16, 4, True), (6, 3, True), (5, 3, False)])
def test_each_position_written_exactly_once(f, n, lookahead):
    plan = fifo.make_plan(fifo.FifoConfig(video_length=f, num_partitions=n, lookahead=lookahead))
    counts = np.bincount(plan.write_positions.ravel(), minlength=plan.queue_length)
    np.testing.assert_array_equal(counts, [0] * plan.context + [1] * plan.steps)


def test_iteration_writes_every_non_context_position(base):
    """Dynamically: after one iteration every position ≥ L changed, the context (< L) did not."""
    s = sampler()
    state = s.init(base, PROMPTS, UNCOND, (3, 3))
    inputs = s.inputs(PROMPTS, UNCOND, (3, 3), 6)
    _, drawn = fifo.draw_noise(s.plan, state.key, LATENT)
    new, emitted = iteration_fn(s.plan)(PARAMS, inputs, state, drawn)
    before_shift = np.concatenate([np.asarray(state.queue[:1]), np.asarray(new.queue[:-1])])
    changed = np.any(before_shift != np.asarray(state.queue), axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, [False] * s.plan.context + [True] * s.plan.steps)
    np.testing.assert_array_equal(emitted, before_shift[s.plan.context])
    np.testing.assert_array_equal(new.queue[-1], drawn[1])


def test_uniform_latent_extension_map():
    plan = fifo.make_plan(fifo.FifoConfig(video_length=16, num_partitions=4))
    j = plan.slot_base_frames(uniform=True)[8:]
    np.testing.assert_array_equal(j, np.repeat(np.arange(16), 4))
    j_fifo = plan.slot_base_frames(uniform=False)[8:]
    assert j_fifo[48] == 0 and list(j_fifo[49:]) == list(range(1, 16))


# ---- equivalences --------------------------------------------------------------------------------------


def reference_iteration(s, queue, prompt_ids, step_noise, tail):
    """The official order, plain NumPy: windows one at a time, noisiest first, two CFG calls each, a
    per-frame Python loop for the DDIM update, written back in place."""
    plan, sch, g = s.plan, s.schedule, s.config.guidance_scale
    a, a_prev, sig = (np.asarray(v, np.float32) for v in (sch.alphas, sch.alphas_prev, sch.sigmas))
    q, idx = np.array(queue), plan.slot_indices
    for r, start in enumerate(plan.starts):
        window = slice(start, start + plan.f)
        x, k = q[window].copy(), idx[window]
        t = jnp.asarray(np.asarray(sch.timesteps)[k])[None]
        cond = {"c": PROMPTS["c"][prompt_ids[window]][None]}
        e_c = np.asarray(toy_jit(PARAMS, jnp.asarray(x)[None], t, cond))[0]
        e_u = np.asarray(toy_jit(PARAMS, jnp.asarray(x)[None], t, {"c": jnp.zeros((1, plan.f, 4))}))[0]
        eps = e_u + g * (e_c - e_u)
        for j in range(plan.f):
            x0 = (x[j] - np.sqrt(1 - a[k[j]]) * eps[j]) / np.sqrt(a[k[j]])
            direction = np.sqrt(1 - a_prev[k[j]] - sig[k[j]] ** 2) * eps[j]
            x[j] = np.sqrt(a_prev[k[j]]) * x0 + direction + sig[k[j]] * step_noise[r, j]
        w = plan.write_offset
        q[start + w : start + plan.f] = x[w:]
    head = q[plan.context].copy()
    return np.concatenate([q[1:], tail[None]]), head


@pytest.mark.parametrize("lookahead", [True, False])
def test_batched_windows_equal_one_window_at_a_time(base, lookahead):
    s = sampler(lookahead=lookahead)
    state = s.init(base, PROMPTS, UNCOND, (3, 3))
    inputs = s.inputs(PROMPTS, UNCOND, (3, 3), 6)
    queue = np.asarray(state.queue)
    for _ in range(3):
        _, drawn = fifo.draw_noise(s.plan, state.key, LATENT)
        ref_queue, ref_head = reference_iteration(s, queue, np.asarray(state.prompts), *map(np.asarray, drawn))
        state, emitted = iteration_fn(s.plan)(PARAMS, inputs, state, drawn)
        np.testing.assert_allclose(state.queue, ref_queue, rtol=1e-5, atol=1e-5 * np.abs(ref_queue).max())
        np.testing.assert_allclose(emitted, ref_head, rtol=1e-5, atol=1e-5 * np.abs(ref_head).max())
        queue = np.asarray(state.queue)
        state = state._replace(key=jax.random.split(state.key)[0])


def test_scan_chunk_equals_python_loop(base):
    s = sampler()
    state = s.init(base, PROMPTS, UNCOND, (3, 3))
    inputs = s.inputs(PROMPTS, UNCOND, (3, 3), 6)
    chunk = fifo.compiled_chunk(toy, s.plan, CONFIG.chunk_size)
    scanned, emitted = chunk(PARAMS, inputs, jax.tree.map(jnp.copy, state), None, jnp.int32(100))

    looped, heads = state, []
    for _ in range(CONFIG.chunk_size):
        looped, head = drawn_step(s.plan, PARAMS, inputs, looped)
        heads.append(head)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))
    np.testing.assert_allclose(emitted, np.stack(heads), rtol=1e-6, atol=1e-6 * float(np.abs(emitted).max()))
    assert int(scanned.iteration) == CONFIG.chunk_size


def test_chunk_donates_its_state_has_no_host_sync_but_run_keeps_the_callers(base):
    s = sampler()
    state = s.init(base, PROMPTS, UNCOND, (3, 3))
    inputs = s.inputs(PROMPTS, UNCOND, (3, 3), 6)
    donated = jax.tree.map(jnp.copy, state)
    chunk = fifo.compiled_chunk(toy, s.plan, CONFIG.chunk_size)
    args = (PARAMS, inputs, donated, None, jnp.int32(100))
    hlo = chunk.lower(*args).as_text()
    assert "callback" not in hlo and "feed" not in hlo  # no host round trip inside the chunk
    with jax.transfer_guard("disallow"):  # nor an implicit host<->device copy around it
        jax.block_until_ready(chunk(*args))
    assert donated.queue.is_deleted()  # the new queue reused the old buffer
    s.run(state, PROMPTS, UNCOND, (3, 3), max_chunks=1)
    assert not state.queue.is_deleted() and int(state.iteration) == 0


def test_a_guidance_table_weights_each_frame_at_its_own_noise_level(base):
    s = sampler()
    state = s.init(base, PROMPTS, UNCOND, (3, 3))
    inputs = s.inputs(PROMPTS, UNCOND, (3, 3), 6)
    positions = s.plan.window_positions
    x, idx, ids = state.queue[positions], state.indices[positions], state.prompts[positions]
    t = inputs.schedule.timesteps[idx]
    cond, uncond = (toy(PARAMS, x, t, {"c": inputs.table["c"][i]}) for i in (ids, jnp.full_like(ids, 2)))
    table = jnp.linspace(1.0, 9.0, s.plan.steps)
    expected = uncond + table[idx][..., None, None, None] * (cond - uncond)
    got = fifo.denoise_windows(toy, s.plan, PARAMS, inputs._replace(guidance_scale=table), x, idx, ids)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # A constant table is the scalar scale: same base video, same frames.
    constant = fifo.FifoSampler(toy, PARAMS, CONFIG, guidance_table=np.full(s.plan.steps, CONFIG.guidance_scale))
    np.testing.assert_array_equal(constant.base_video(PROMPTS, UNCOND, LATENT)[0], s.base_video(PROMPTS, UNCOND, LATENT)[0])
    np.testing.assert_array_equal(generate(constant, constant.init(base, PROMPTS, UNCOND, (3, 3)), 6)[1],
                                  generate(s, state, 6)[1])
    with pytest.raises(ConfigError, match="one weight per FIFO step"):
        fifo.FifoSampler(toy, PARAMS, CONFIG, guidance_table=np.ones(3))


# ---- prompt schedule -----------------------------------------------------------------------------------


def test_each_frame_leaves_the_queue_with_its_own_prompt(base):
    s = sampler(new_video_length=7)
    schedule = (2, 5)
    state = s.init(base, PROMPTS, UNCOND, schedule)
    inputs = s.inputs(PROMPTS, UNCOND, schedule, 7)
    warmup = s.plan.steps - s.plan.f
    for i in range(7 + warmup):
        frame = i - warmup
        expected = 0 if frame < 2 else 1
        assert int(state.prompts[s.plan.context]) == expected, (i, np.asarray(state.prompts))
        state = drawn_step(s.plan, PARAMS, inputs, state)[0]


def test_prompt_schedule_conditions_each_frame(base):
    s = sampler()
    _, two = generate(s, s.init(base, PROMPTS, UNCOND, (3, 3)), 6)
    same = {"c": jnp.stack([PROMPTS["c"][0]] * 2)}  # one prompt, same table shape (no new compile)
    single = []
    s.run(s.init(base, same, UNCOND, (3, 3)), same, UNCOND, (3, 3), consumer=lambda i, x: single.append(x))
    single = np.concatenate(single)
    assert not np.allclose(two[3:], single[3:])  # the second prompt reached the later frames


# ---- compile once, resume, extend ----------------------------------------------------------------------


def test_single_compile_across_video_lengths(base):
    traces = []

    def counting(params, x, t, cond):
        traces.append(x.shape)
        return toy(params, x, t, cond)

    s = fifo.FifoSampler(counting, PARAMS, CONFIG)
    lengths = []
    for n in (5, 11):
        state = s.init(base, PROMPTS, UNCOND, scaled((3, 3), n), num_frames=n)
        _, frames = generate(s, state, n)
        lengths.append(len(frames))
    assert lengths == [5, 11]
    assert len(traces) == 1, traces
    assert fifo.compiled_chunk(counting, s.plan, CONFIG.chunk_size)._cache_size() == 1


def test_resume_after_a_chunk_is_bit_identical(base, tmp_path):
    s = sampler()
    state0 = s.init(base, PROMPTS, UNCOND, (3, 3))
    _, whole = generate(s, state0, 6)
    collected = {}
    consumer = lambda i, x: collected.update({i + j: f for j, f in enumerate(x)})  # noqa: E731
    stopped = s.run(state0, PROMPTS, UNCOND, (3, 3), consumer=consumer, max_chunks=2)
    assert int(stopped.iteration) == 2 * CONFIG.chunk_size
    fifo.save_state(tmp_path / "fifo_state", stopped)
    restored = fifo.load_state(tmp_path / "fifo_state")
    for a, b in zip(restored, stopped):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    s.run(restored, PROMPTS, UNCOND, (3, 3), consumer=consumer)
    np.testing.assert_array_equal(np.stack([collected[i] for i in sorted(collected)]), whole)


def test_extending_a_finished_run_equals_one_longer_run(base):
    s = sampler()
    short, long_ = [], []
    state = s.init(base, PROMPTS, UNCOND, (3, 2), num_frames=5)
    finished = s.run(state, PROMPTS, UNCOND, (3, 2), num_frames=5, consumer=lambda i, x: short.append(x))
    assert int(finished.iteration) == 5 + s.plan.steps - s.plan.f
    # The slots already queued past frame 5 entered with the last prompt, as the longer schedule says.
    s.run(finished, PROMPTS, UNCOND, (3, 7), num_frames=10, consumer=lambda i, x: short.append(x))
    state = s.init(base, PROMPTS, UNCOND, (3, 7), num_frames=10)
    s.run(state, PROMPTS, UNCOND, (3, 7), num_frames=10, consumer=lambda i, x: long_.append(x))
    np.testing.assert_array_equal(np.concatenate(short), np.concatenate(long_))


# ---- errors before compile -----------------------------------------------------------------------------


def never_called(params, x, t, cond):
    raise AssertionError("the denoiser must not be traced for invalid input")


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"num_inference_steps": 12}, "num_inference_steps=12 must equal"),
        ({"video_length": 5}, "even with lookahead"),
        ({"new_video_length": 0}, "N=0"),
        ({"num_partitions": 0}, "must be ≥ 1"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        fifo.FifoSampler(never_called, PARAMS, fifo.dataclasses.replace(CONFIG, **overrides))


def test_run_errors(base):
    s = fifo.FifoSampler(never_called, PARAMS, CONFIG)
    state = s.init(base, PROMPTS, UNCOND, (3, 3))
    with pytest.raises(ConfigError, match=r"sum to the video length N=6 \(they sum to 5\)"):
        s.run(state, PROMPTS, UNCOND, (2, 3))
    with pytest.raises(ConfigError, match="2 frame counts for 1 prompts"):
        s.run(state, {"c": PROMPTS["c"][:1]}, UNCOND, (3, 3))
    with pytest.raises(ConfigError, match="N=0"):
        s.run(state, PROMPTS, UNCOND, (3, 3), num_frames=0)
    with pytest.raises(ValueError, match="base video must be"):
        s.init(base[:3], PROMPTS, UNCOND, (3, 3))
    fifo.FifoConfig(video_length=4, num_partitions=2, num_inference_steps=8)  # pinned and consistent: fine


# ---- the official run, replayed with its recorded ε ------------------------------------------------------


def replay(params, x, t, cond):
    """Returns the recorded guided ε (passed as ``params``) for both CFG halves."""
    return jnp.concatenate([params, params])


@pytest.mark.parametrize("run,lookahead", verify_fifo.RUNS)
def test_official_run_replayed_with_recorded_eps(fixtures_dir, run, lookahead):
    """Feeding the recorded guided ε of each iteration (in call order) and the recorded draws, the loop
    reproduces the official queue after every iteration and every dequeued latent (no U-Net needed)."""
    data = np.load(fixtures_dir / "videocrafter2" / "fifo_run.npz")
    s = fifo.FifoSampler(never_called, None, verify_fifo.fifo_config(data, lookahead))
    noise = verify_fifo.injected_noise(data, run, s.plan)
    prompts, uncond = verify_fifo.conditioning(data)
    state = s.init(verify_fifo.to_frames(data["base_out"])[0], prompts, uncond, noise=noise.init)
    inputs = s.inputs(prompts, uncond, None, int(data["new_video_length"]))
    eps = verify_fifo.to_frames(data[f"{run}_call_eps"])[:, :, 0]
    before_shift = verify_fifo.to_frames(data[f"{run}_queue_before_shift"])[:, 0]
    dequeued = verify_fifo.to_frames(data[f"{run}_dequeued"])[0]
    step = iteration_fn(s.plan, replay)
    for k in range(eps.shape[0]):
        state, head = step(eps[k], inputs, state, (noise.steps[k], noise.tails[k]))
        scale = np.abs(before_shift[k]).max()
        np.testing.assert_allclose(state.queue[:-1], before_shift[k][1:], atol=1e-5 * scale)
        np.testing.assert_allclose(head, dequeued[k], atol=1e-5 * scale)


# ---- jax-repvideo verify fifo (the tiny U-Net on the official run) -------------------------------------


def test_verify_fifo_cli_reproduces_the_official_runs(fixtures_dir, capsys):
    from jax_repvideo import cli

    assert cli.main(["verify", "fifo", str(fixtures_dir / "videocrafter2")]) == 0
    lines = capsys.readouterr().out.splitlines()
    results = [line for line in lines if "max rel err" in line]
    assert len(results) == 16 and all(line.endswith(" ok") for line in results), "\n".join(lines)


def test_verify_fifo_cli_fails_above_tolerance(fixtures_dir, tmp_path, capsys):
    """The same run against a reference moved by 1% of its max-abs exits non-zero (compiles are reused)."""
    from jax_repvideo import cli

    source = fixtures_dir / "videocrafter2"
    for name in ("unet.ckpt", "unet_config.json"):
        (tmp_path / name).symlink_to(source / name)
    data = dict(np.load(source / "fifo_run.npz"))
    data["la_output_latents"] = data["la_output_latents"] + 0.01 * np.abs(data["la_output_latents"]).max()
    np.savez(tmp_path / "fifo_run.npz", **data)
    assert cli.main(["verify", "fifo", str(tmp_path)]) == 1
    assert "la_output_latents" in next(line for line in capsys.readouterr().out.splitlines() if "FAIL" in line)


def test_unet_denoiser_passes_fps_and_qcache_to_the_whole_batch():
    from flax import nnx

    from jax_repvideo.caches import QCacheConfig

    seen = []

    class Stub(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.full((), 2.0))

        def __call__(self, x, t, context, fps, qcache=None):
            seen.append((x.shape, t.shape, context.shape, fps, qcache))
            return x * self.w[...]

    graphdef, params = nnx.split(Stub())
    qcache = QCacheConfig(enabled=True)
    denoise = fifo.unet_denoiser(graphdef, 8, qcache)
    assert denoise is fifo.unet_denoiser(graphdef, 8, QCacheConfig(enabled=True))  # shared compiles
    out = denoise(params, jnp.ones((6, 4, 2, 3, 4)), jnp.zeros((6, 4), jnp.int32), {"context": jnp.zeros((6, 4, 5, 7))})
    np.testing.assert_array_equal(out, 2.0)
    (x, t, context, fps, got), = seen
    assert (x, t, context) == ((6, 4, 2, 3, 4), (6, 4), (6, 4, 5, 7)) and got is qcache
    np.testing.assert_array_equal(fps, [8] * 6)


def test_stack_prompts_builds_the_table_and_counts():
    table, frames = fifo.stack_prompts([({"c": jnp.ones(4)}, 3), ({"c": jnp.zeros(4)}, 5)])
    assert table["c"].shape == (2, 4) and frames == (3, 5)
    np.testing.assert_array_equal(fifo.prompt_of_frame(jnp.arange(-2, 10), jnp.cumsum(jnp.array(frames))),
                                  [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ConfigError, match="empty"):
        fifo.stack_prompts([])

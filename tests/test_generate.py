"""`jax-repvideo generate` on the tiny presets, as a user runs it: both families, plain and FIFO,
prompt schedules, start-from-frames, resume and extend, and every error path with its message."""

from pathlib import Path

import numpy as np
import pytest

from jax_repvideo import cli, fifo_stream
from jax_repvideo.video import VideoWriter, read_frames

CONFIGS = Path(__file__).parents[1] / "configs"
# The demo preset, shrunk: windows of f=4, S=8 steps, 32×32 frames (8×8 latents), chunks of 4.
SMALL_FIFO = ["fifo.video_length=4", "fifo.num_partitions=2", "fifo.chunk_size=4", "height=32", "width=32"]


def generate(preset, tmp_path, *overrides, name="out"):
    out, latents = tmp_path / f"{name}.mp4", tmp_path / f"{name}.npz"
    code = cli.main(["generate", str(CONFIGS / preset), f"out={out}", f"save_latents={latents}", *overrides])
    return code, out, latents


def fifo_run(tmp_path, *overrides, name="out"):
    code, out, latents = generate("tiny_fifo.yaml", tmp_path, *SMALL_FIFO, *overrides, name=name)
    assert code == 0
    return read_frames(out), np.load(latents)["latents"]


def test_videocrafter2_fifo_writes_every_frame_and_its_latents(tmp_path):
    frames, latents = fifo_run(tmp_path, "num_frames=12")
    assert frames.shape == (12, 32, 32, 3)
    assert latents.shape == (12, 8, 8, 4)
    assert np.isfinite(latents).all()


def test_resume_after_an_interruption_gives_the_same_latents(tmp_path, monkeypatch):
    _, reference = fifo_run(tmp_path, "num_frames=12", "seed=5", name="ref")
    state_dir = tmp_path / "state"
    saves = []
    real_save = fifo_stream.RunStore.save

    def interrupt_in_chunk_three(self, state, latents):  # chunk 1 is warm-up; chunk 2 emits 4 frames
        real_save(self, state, latents)
        saves.append(int(state.iteration))
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(fifo_stream.RunStore, "save", interrupt_in_chunk_three)
    with pytest.raises(KeyboardInterrupt):
        fifo_run(tmp_path, "num_frames=12", "seed=5", f"state_dir={state_dir}", name="cut")
    assert read_frames(tmp_path / "cut.mp4").shape[0] == 4  # a valid file of the frames so far
    monkeypatch.setattr(fifo_stream.RunStore, "save", real_save)
    frames, resumed = fifo_run(tmp_path, "num_frames=12", "seed=5", f"state_dir={state_dir}", "resume=true",
                               name="resumed")
    np.testing.assert_array_equal(resumed, reference)
    assert frames.shape[0] == 12


def test_extending_48_to_96_frames_equals_a_96_frame_run(tmp_path):
    state_dir = tmp_path / "state"
    _, first = fifo_run(tmp_path, "num_frames=48", f"state_dir={state_dir}", name="a")
    frames, extended = fifo_run(tmp_path, "num_frames=96", f"state_dir={state_dir}", "resume=true", name="b")
    _, straight = fifo_run(tmp_path, "num_frames=96", name="c")
    np.testing.assert_array_equal(extended[:48], first)
    np.testing.assert_array_equal(extended, straight)
    assert frames.shape[0] == 96


def test_prompt_schedule_and_start_from_frames(tmp_path):
    _, plain = fifo_run(tmp_path, "num_frames=8", name="plain")
    _, scheduled = fifo_run(tmp_path, "num_frames=8", "prompt_schedule=[[a cat, 4], [a dog on a beach, 4]]",
                            name="sched")
    assert not np.allclose(plain[4:], scheduled[4:])
    clip = tmp_path / "start.mp4"
    with VideoWriter(clip, fps=8) as writer:
        writer.append(np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    _, started = fifo_run(tmp_path, "num_frames=8", f"init_video={clip}", name="started")
    assert np.isfinite(started).all() and not np.allclose(started, plain)


def test_videocrafter2_plain_ddim(tmp_path):
    code, out, latents = generate("tiny_fifo.yaml", tmp_path, "sampler.kind=ddim", "sampler.steps=4",
                                  "num_frames=4", "height=32", "width=32")
    assert code == 0
    assert read_frames(out).shape == (4, 32, 32, 3)
    assert np.load(latents)["latents"].shape == (4, 8, 8, 4)


def test_cogvideox_plain_dpm_and_repvideo_fifo_ddim_and_dpm(tmp_path):
    code, out, _ = generate("tiny_cogvideox.yaml", tmp_path, "sampler.kind=dpm", "sampler.steps=3", name="dpm")
    assert code == 0 and read_frames(out).shape == (9, 32, 32, 3)
    code, out, latents = generate("tiny_fifo_repvideo.yaml", tmp_path, "num_frames=17", name="fifo")
    assert code == 0
    assert read_frames(out).shape == (17, 32, 32, 3)  # 5 latent frames → 1 + 4·4 video frames
    assert np.load(latents)["latents"].shape == (5, 8, 8, 4)
    # RepVideo's dynamic CFG inside FIFO: each frame guided at its own noise level.
    code, _, dynamic = generate("tiny_fifo_repvideo.yaml", tmp_path, "num_frames=17", "guidance.dynamic=true",
                                name="dynamic")
    plain, dynamic = np.load(latents)["latents"], np.load(dynamic)["latents"]
    assert code == 0 and np.isfinite(dynamic).all() and np.abs(dynamic - plain).max() > 1e-3
    # RepVideo's own sampler per frame: DPM-Solver++(2M) SDE, its history carried along the queue.
    code, out, dpm = generate("tiny_fifo_repvideo.yaml", tmp_path, "num_frames=17", "fifo.solver=dpm", name="dpm_fifo")
    dpm = np.load(dpm)["latents"]
    assert code == 0 and read_frames(out).shape == (17, 32, 32, 3)
    assert np.isfinite(dpm).all() and np.abs(dpm - plain).max() > 1e-3


@pytest.mark.parametrize("overrides, message", [
    (["fifo.video_lenght=4"], "unknown config key(s) fifo.video_lenght"),
    (["num_frames=many"], "num_frames: expected int"),
    (["checkpoint=/no/such/dir"], "jax-repvideo convert videocrafter2"),
    (["num_frames=10", "prompt_schedule=[[a, 4], [b, 4]]"], "must be ≥ 1 and sum to num_frames=10"),
    (["fifo.video_length=5"], "must be even with lookahead"),
    (["out=/proc/no_such/video.mp4"], "output /proc/no_such/video.mp4"),
    (["out=video.avi"], "must end in"),
    (["resume=true"], "needs state_dir"),
    (["sampler.kind=ddim", "sampler.steps=3"], "does not fit VideoCrafter's DDIM grid"),
    (["mesh.data=3"], "mesh"),
    (["fifo.solver=dpm"], "VideoCrafter2's FIFO runs ddim"),
    (["fifo.solver=euler"], "fifo.solver"),
])
def test_errors_name_the_problem_before_anything_runs(tmp_path, capsys, overrides, message):
    code = cli.main(["generate", str(CONFIGS / "tiny_fifo.yaml"), *overrides])
    assert code == 2
    assert message in capsys.readouterr().err


def test_nan_stops_the_run_naming_the_iteration_and_writes_no_nan_frame(tmp_path, capsys, monkeypatch):
    from jax_repvideo import fifo

    real = fifo.unet_denoiser

    def poisoned(graphdef, fps, qcache=None):
        denoise = real(graphdef, fps, qcache)
        return lambda params, x, t, cond: denoise(params, x, t, cond) * np.nan

    monkeypatch.setattr(fifo, "unet_denoiser", poisoned)
    code, out, _ = generate("tiny_fifo.yaml", tmp_path, *SMALL_FIFO, "num_frames=4")
    err = capsys.readouterr().err
    assert code == 3
    assert "non-finite (NaN/Inf) latent emitted at FIFO iteration 4" in err
    assert not out.exists()

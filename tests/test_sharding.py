"""Scale-out: mesh errors in-process; 8 emulated CPU devices vs 1 device in a subprocess; ``generate``
as a two-host job.

The subprocess is this file run as a script with ``--xla_force_host_platform_device_count=8`` set
before jax is imported. It runs every 8-device check once and prints one JSON line of results. The
two-host job is two processes of 4 CPU devices each (``two_hosts.run_on_two_hosts``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


# ----------------------------------------------------------------------------- 8-device checks


def _rel(ours, ref) -> float:
    import numpy as np

    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def _host(state):
    """A numpy copy of a (sharded) state: the 1-device reference runs on the same weights."""
    import jax
    import numpy as np

    return jax.tree.map(np.asarray, state)


def _spec(array) -> list:
    return [list(p) if isinstance(p, tuple) else p for p in array.sharding.spec]


def _check_restore(layout, model, tmp: Path) -> dict:
    """A converted checkpoint restores straight into the sharded abstract model, and that model
    (weights over fsdp, frames over data) decodes as one device does."""
    import jax
    import numpy as np
    from flax import nnx

    from jax_repvideo import checkpoint
    from jax_repvideo.models.vae_kl import AutoencoderKL

    cfg = _tiny_vae_config()
    flat = {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    checkpoint.save(tmp / "vae", flat, {"kind": "vae"})
    abstract = layout.abstract_model(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    restored = checkpoint.restore_into(tmp / "vae", abstract)
    kernel = restored.decoder.conv_in.kernel.get_value() if hasattr(restored.decoder, "conv_in") else None
    errors = jax.tree.map(lambda a, b: _rel(a, b), nnx.state(restored, nnx.Param), nnx.state(model, nnx.Param))
    leaves = jax.tree.leaves(nnx.state(restored, nnx.Param))
    z = np.random.RandomState(0).randn(8, 8, 8, cfg.embed_dim).astype(np.float32)
    graphdef, state = nnx.split(restored)
    decode = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode_latents(z))
    with layout.activate():
        out = decode(state, layout.put(z, ("frames", None, None, None)))
    return {
        "restore_forward_error": _rel(out, decode(_host(nnx.state(model)), z)),
        "restore_error": max(jax.tree.leaves(errors)),
        "restore_sharded_leaves": sum(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
                                      for a in leaves),
        "restore_kernel_spec": _spec(kernel) if kernel is not None else None,
    }


def _tiny_vae_config():
    from jax_repvideo.models.vae_kl import AutoencoderKLConfig

    return AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)


def _check_vae(layout):
    """VAE decode with the frames split over ``data``."""
    import jax
    import numpy as np
    from flax import nnx

    from jax_repvideo.models.vae_kl import AutoencoderKL

    cfg = _tiny_vae_config()
    constructor = lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(1))  # noqa: E731
    z = np.random.RandomState(0).randn(8, 8, 8, cfg.embed_dim).astype(np.float32)
    model = layout.init_model(constructor)
    graphdef, sharded_state = nnx.split(model)

    def decode(state, z):
        return nnx.merge(graphdef, state).decode_latents(z)

    ref = jax.jit(decode)(_host(sharded_state), z)
    frames = ("frames", None, None, None)
    out = jax.jit(decode, out_shardings=layout.sharding(frames))(sharded_state, layout.put(z, frames))
    return {"vae_error": _rel(out, ref), "vae_out_spec": _spec(out)}, model


def _tiny_unet_config():
    from jax_repvideo.models.unet3d import UNet3DConfig

    return UNet3DConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,),
                        num_head_channels=16, context_dim=16, temporal_length=4, use_checkpoint=False)


def _tiny_unet(layout):
    """The tiny U-Net built straight into its shardings (one init compile, shared by two checks)."""
    from flax import nnx

    from jax_repvideo.models.unet3d import UNet3D

    return nnx.split(layout.init_model(lambda: UNet3D(_tiny_unet_config(), rngs=nnx.Rngs(2),
                                                      attention_backend="xla")))


def _check_unet(layout, graphdef, sharded_state) -> dict:
    """U-Net forward with the batch on ``data``."""
    import jax
    import numpy as np
    from flax import nnx

    cfg = _tiny_unet_config()
    rng = np.random.RandomState(1)
    x = rng.randn(8, 4, 8, 8, 4).astype(np.float32)
    t = rng.randint(0, 1000, (8, 4)).astype(np.int32)
    context = rng.randn(8, 4, 5, cfg.context_dim).astype(np.float32)

    def forward(state, x, t, context):
        return nnx.merge(graphdef, state)(x, t, context, 8)

    ref = jax.jit(forward)(_host(sharded_state), x, t, context)
    with layout.activate():
        args = [layout.put(a, ("batch",) + (None,) * (a.ndim - 1)) for a in (x, t, context)]
        out = jax.jit(forward)(sharded_state, *args)
    return {"unet_error": _rel(out, ref), "unet_out_spec": _spec(out)}


def _check_fifo(layout, graphdef, sharded_state) -> dict:
    """One FIFO chunk: windows × CFG on ``data``; the noise is drawn inside, from the same key."""
    import jax
    import numpy as np

    from jax_repvideo import fifo, sharding

    cfg = _tiny_unet_config()
    fifo_cfg = fifo.FifoConfig(video_length=4, num_partitions=2, lookahead=True, new_video_length=4,
                               chunk_size=2, guidance_scale=7.5)
    rng = np.random.RandomState(2)
    base = rng.randn(4, 8, 8, 4).astype(np.float32)
    prompts = {"context": rng.randn(1, 5, cfg.context_dim).astype(np.float32)}
    uncond = {"context": np.zeros((5, cfg.context_dim), np.float32)}

    def one_chunk(denoise, params):
        sampler = fifo.FifoSampler(denoise, params, fifo_cfg)
        assert 2 * len(sampler.plan.starts) == 8  # windows × CFG: one per device
        state = sampler.init(base, prompts, uncond, key=jax.random.PRNGKey(7))
        frames = []
        state = sampler.run(state, prompts, uncond, max_chunks=1, include_warmup=True,
                            consumer=lambda i, x: frames.append(x))
        return np.concatenate(frames), np.asarray(state.queue)

    ref_frames, ref_queue = one_chunk(fifo.unet_denoiser(graphdef, 8), _host(sharded_state))
    with layout.activate():
        assert sharding.active_layout() is layout
        frames, queue = one_chunk(sharding.shard_denoiser(fifo.unet_denoiser(graphdef, 8)), sharded_state)
    return {"fifo_error": max(_rel(frames, ref_frames), _rel(queue, ref_queue)), "fifo_frames": len(frames)}


def _tiny_dit_config():
    from jax_repvideo.models.dit import DiTConfig

    return DiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
                     text_embed_dim=16, num_layers=3, sample_width=8, sample_height=8, sample_frames=5,
                     max_text_seq_length=8, repvideo=True)


def _check_dit(layout) -> dict:
    """DiT forward with data=2, context=2, tensor=2; RepVideo gates random so the window sum matters."""
    import re

    import jax
    import numpy as np
    from flax import nnx

    from jax_repvideo.models.dit import CogVideoXDiT

    cfg = _tiny_dit_config()

    def constructor():
        model = CogVideoXDiT(cfg, rngs=nnx.Rngs(5), attention_backend="xla")
        model.gates[...] = jax.random.uniform(jax.random.PRNGKey(6), (cfg.num_layers,))
        return model

    rng = np.random.RandomState(3)
    latents = rng.randn(2, 2, 8, 8, 4).astype(np.float32)
    timesteps = np.array([[10.0, 20.0], [500.0, 600.0]], np.float32)
    text = rng.randn(2, 8, 16).astype(np.float32)
    graphdef, sharded_state = nnx.split(layout.init_model(constructor))

    def forward(state, latents, timesteps, text):
        return nnx.merge(graphdef, state)(latents, timesteps, text)

    ref = jax.jit(forward)(_host(sharded_state), latents, timesteps, text)
    with layout.activate():
        args = [layout.put(a, ("batch",) + (None,) * (a.ndim - 1)) for a in (latents, timesteps, text)]
        out = jax.jit(forward)(sharded_state, *args)
        hlo = jax.jit(forward).lower(sharded_state, *args).compile().as_text()
    # The layer-scan carry (h, window_sum, count): per device (B/data, tokens/context, D) = (1, 20, 32).
    loop_carry = re.search(r"while\((%[\w.]+)\)", hlo).group(1)
    carry_types = re.search(re.escape(loop_carry) + r" = \(([^)]*)\)", hlo).group(1)
    q_kernel = sharded_state["blocks"]["attn1"]["to_q"]["kernel"].get_value()
    return {"dit_error": _rel(out, ref), "dit_carry_hidden_shards": carry_types.count("f32[1,20,32]"),
            "dit_q_kernel_spec": _spec(q_kernel)}


def run_checks(tmp: Path) -> dict:
    import jax

    jax.config.update("jax_default_matmul_precision", "float32")
    from jax_repvideo import sharding

    assert jax.device_count() == 8, jax.devices()
    results: dict = {"devices": jax.device_count()}
    data8 = sharding.setup(sharding.MeshConfig(data=8))
    vae_results, vae = _check_vae(data8)
    results.update(vae_results)
    results.update(_check_restore(sharding.setup(sharding.MeshConfig(data=2, fsdp=4)), vae, tmp))
    unet = _tiny_unet(data8)
    results.update(_check_unet(data8, *unet))
    results.update(_check_fifo(data8, *unet))
    results.update(_check_dit(sharding.setup(sharding.MeshConfig(data=2, context=2, tensor=2))))
    return results


# The tiny FIFO preset, shrunk as in test_generate (4 windows × CFG = a batch of 8 on data=8).
GENERATE_ARGS = ["configs/tiny_fifo.yaml", "fifo.video_length=4", "fifo.num_partitions=2", "fifo.chunk_size=4",
                 "height=32", "width=32", "num_frames=4"]


# ----------------------------------------------------------------------------- pytest side

import pytest  # noqa: E402
from two_hosts import run_on_two_hosts  # noqa: E402


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    tmp = tmp_path_factory.mktemp("sharding8")
    proc = subprocess.run([sys.executable, __file__, str(tmp)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runs_on_eight_devices(eight_devices):
    assert eight_devices["devices"] == 8


def test_unet_batch_on_data(eight_devices):
    assert eight_devices["unet_out_spec"][0] == "data"
    assert eight_devices["unet_error"] <= TOLERANCE


def test_fifo_chunk_windows_on_data(eight_devices):
    assert eight_devices["fifo_frames"] == 2
    assert eight_devices["fifo_error"] <= TOLERANCE


def test_dit_data_context_tensor(eight_devices):
    assert eight_devices["dit_error"] <= TOLERANCE
    assert eight_devices["dit_q_kernel_spec"] == [None, None, "tensor"]  # stacked layers, heads on tensor
    assert eight_devices["dit_carry_hidden_shards"] == 2  # h and the RepVideo window sum, both split


def test_vae_decode_frames_on_data(eight_devices):
    assert eight_devices["vae_out_spec"][0] == "data"
    assert eight_devices["vae_error"] <= TOLERANCE


def test_checkpoint_restores_into_shardings(eight_devices):
    assert eight_devices["restore_error"] == 0.0
    assert eight_devices["restore_forward_error"] <= 1e-5
    assert eight_devices["restore_sharded_leaves"] > 0
    assert eight_devices["restore_kernel_spec"][-2] == "fsdp"  # conv input channels over fsdp


# in-process checks on the 1 CPU device


def test_generate_on_two_hosts_matches_one_device(tmp_path):
    """``generate`` as a two-host job (2 processes × 4 CPU devices, mesh.data=8, a state_dir): process 0
    alone writes the video and the latents, the FIFO state is saved collectively, and the latents match
    one device."""
    import numpy as np

    from jax_repvideo import cli

    state_dir, latents = tmp_path / "state", tmp_path / "generate8.npz"
    run_on_two_hosts(["-m", "jax_repvideo.cli", "generate", *GENERATE_ARGS, "mesh.data=8", f"state_dir={state_dir}",
                      f"out={tmp_path / 'generate8.mp4'}", f"save_latents={latents}"], tmp_path / "logs",
                     devices_each=4)
    assert (state_dir / "latest.json").is_file() and (tmp_path / "generate8.mp4").is_file()
    one = tmp_path / "generate1.npz"
    assert cli.main(["generate", *GENERATE_ARGS, f"out={tmp_path / 'g1.mp4'}", f"save_latents={one}"]) == 0
    assert _rel(np.load(latents)["latents"], np.load(one)["latents"]) <= 1e-5


def test_mesh_must_match_device_count():
    from jax_repvideo import sharding

    with pytest.raises(ValueError, match=r"has 8 devices but 1 are available.*product is 1"):
        sharding.make_mesh(sharding.MeshConfig(data=8))


def test_unknown_axis_names():
    from jax_repvideo import config, sharding

    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.setup(sharding.MeshConfig(rules={"heads": ("model",)}))
    with pytest.raises(config.ConfigError, match="mesh.pipeline"):
        config.from_dict(sharding.MeshConfig, {"pipeline": 2}, "mesh")
    layout = sharding.setup(sharding.MeshConfig())
    with pytest.raises(ValueError, match="unknown logical axis name 'sequence'"):
        layout.spec(("batch", "sequence"))
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        sharding.setup(sharding.MeshConfig(param_rules=((r"\.kernel$", ("hidden", None)),)))


def test_tensor_must_divide_heads():
    from jax_repvideo import sharding

    sharding.check_heads(30, sharding.MeshConfig(tensor=2))
    with pytest.raises(ValueError, match=r"mesh.tensor=4 does not divide the 30 attention heads.*\[1, 2, 3, 5"):
        sharding.check_heads(30, sharding.MeshConfig(tensor=4))


def test_param_rules_are_trailing_aligned():
    from jax_repvideo import sharding

    layout = sharding.setup(sharding.MeshConfig())
    assert layout.param_names("blocks.attn1.to_q.kernel", 3) == (None, "embed", "heads")  # stacked layers
    assert layout.param_names("blocks.attn1.to_q.bias", 1) == ("heads",)
    assert layout.param_names("down.0.conv1.kernel", 4) == (None, None, "conv_in", None)
    assert layout.param_names("norm.scale", 1) == (None,)


def test_shard_denoiser_is_identity_outside_a_layout():
    from jax_repvideo import sharding

    def denoise(params, latents, timesteps, cond):
        return latents

    assert sharding.active_layout() is None
    assert sharding.shard_denoiser(denoise) is denoise


def test_distributed_from_environment():
    from jax_repvideo import sharding

    auto = sharding.MeshConfig()
    assert not sharding.wants_distributed(auto, {})
    assert not sharding.wants_distributed(auto, {"TPU_WORKER_HOSTNAMES": "localhost"})
    assert sharding.wants_distributed(auto, {"TPU_WORKER_HOSTNAMES": "host-0,host-1"})
    assert sharding.wants_distributed(auto, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert sharding.wants_distributed(auto, {"SLURM_NTASKS": "4"})
    assert not sharding.wants_distributed(sharding.MeshConfig(distributed="off"), {"SLURM_NTASKS": "4"})
    assert sharding.is_primary()


def test_plan_prints_memory_per_device(capsys):
    from jax_repvideo import plan

    tiny_dit = str(ROOT / "configs" / "tiny_dit.yaml")
    assert plan.main(tiny_dit, ["mesh.fsdp=4", "mesh.data=2", "plan.batch=8"]) == 0
    fsdp = capsys.readouterr().out
    assert "data=2 × fsdp=4 × context=1 × tensor=1 = 8 devices" in fsdp
    assert plan.main(tiny_dit, ["plan.batch=8"]) == 0
    single = capsys.readouterr().out

    def per_device(text, what):
        line = next(l for l in text.splitlines() if l.strip().startswith(what))
        value, unit = line.split(" per device")[0].split()[-2:]
        return float(value) * (1024 if unit == "GiB" else 1)

    assert per_device(fsdp, "parameters") < per_device(single, "parameters") / 2  # weights split over fsdp
    assert per_device(fsdp, "activations") > 0


def test_plan_run_presets_fifo_batch(capsys):
    from jax_repvideo import plan

    assert plan.main(str(ROOT / "configs" / "tiny_fifo.yaml"), ["mesh.data=8", "fifo.num_partitions=4"]) == 0
    out = capsys.readouterr().out
    assert "batch 16 = 8 FIFO windows × 2 (CFG)" in out and "2 per device" in out
    assert plan.main(str(ROOT / "configs" / "tiny_fifo_repvideo.yaml"), ["mesh.data=8"]) == 0
    assert "4 FIFO windows × 2 (CFG); 4 latent frames of 8×8; 1 per device" in capsys.readouterr().out


def test_plan_errors():
    from jax_repvideo import plan

    dit = str(ROOT / "configs" / "tiny_dit.yaml")
    assert plan.main(dit, ["mesh.tensor=4"]) == 1  # 2 heads
    assert plan.main(dit, ["mesh.data=4"]) == 1  # CFG batch 2 over 4 devices
    assert plan.main(dit, ["mesh.pipeline=2"]) == 1


def test_peak_bytes_frees_after_last_use():
    import jax
    import jax.numpy as jnp

    from jax_repvideo.plan import peak_bytes

    def f(x):  # x: 4 KiB; each intermediate 4 KiB, one live at a time besides x
        for _ in range(5):
            x = jnp.sin(x) + 1
        return x

    jaxpr = jax.make_jaxpr(f)(jnp.zeros(1024, jnp.float32)).jaxpr
    assert peak_bytes(jaxpr) <= 4 * 4096


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run_checks(Path(sys.argv[1]))))

"""Seconds per output frame of FIFO-Diffusion with the VideoCrafter2 U-Net (random weights).

Full size (default): the VC2 512 U-Net in bf16, f=16, n=4, lookahead, CFG 12, 320×512 (40×64 latents):
every iteration is ONE batched U-Net call of 8 windows × 2 CFG branches × 16 frames, and one iteration
emits one frame (the official code makes 16 separate calls per frame). ``--tiny`` runs the fixture's
tiny U-Net on small latents as a CPU smoke test. Not part of CI.

    python benchmarks/fifo_speed.py [--tiny] [--chunks 3] [--chunk-size 4]
    python benchmarks/fifo_speed.py [--tiny] --serial [--repeats 5]

``--serial`` times one iteration's model work two ways on the same inputs, alternately: ours, ONE call of
every window × CFG branch, and the official loop's structure, one call per window and branch (16 at full
size), each a jitted call dispatched from Python. It checks that both give the same output.

The chunk (a ``lax.scan`` of ``chunk_size`` iterations) is compiled ahead of time, so compile time is
reported apart from run time. XLA's cost analysis counts a scan body once, so the chunk's FLOP count
is that of ONE iteration (one batched U-Net call plus the DDIM update) and MFU is per output frame.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import load_average, memory_line, mfu_line, total_flops  # noqa: E402

from jax_repvideo import compilation_cache  # noqa: E402
from jax_repvideo import config as config_lib
from jax_repvideo import fifo
from jax_repvideo.models.unet3d import UNet3D, UNet3DConfig

ROOT = Path(__file__).resolve().parents[1]


def build(tiny: bool, dtype):
    """(graphdef, params, fifo settings, latent shape, context shape) for the tiny or the full model."""
    if tiny:
        cfg = config_lib.load(UNet3DConfig, ROOT / "configs" / "tiny_unet.yaml")
        settings = dict(video_length=4, num_partitions=2)
        latent, context = (8, 16, 4), (8, cfg.context_dim)
    else:
        cfg = UNet3DConfig(use_checkpoint=False)
        settings = dict(video_length=16, num_partitions=4)
        latent, context = (40, 64, 4), (77, cfg.context_dim)
    model = UNet3D(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    graphdef, params = nnx.split(model)
    return graphdef, params, settings, latent, context


def sampler_for(tiny: bool, chunk_size: int, dtype):
    graphdef, params, settings, latent, context = build(tiny, dtype)
    cfg = fifo.FifoConfig(**settings, lookahead=True, guidance_scale=12.0, chunk_size=chunk_size, new_video_length=10**6)
    sampler = fifo.FifoSampler(fifo.unet_denoiser(graphdef, 8), params, cfg)
    key = jax.random.PRNGKey(0)
    prompts = {"context": jax.random.normal(key, (1,) + context, dtype)}
    uncond = {"context": jnp.zeros(context, dtype)}
    base = jax.random.normal(key, (sampler.plan.f,) + latent)
    return sampler, sampler.init(base, prompts, uncond), prompts, uncond


def model_call_inputs(sampler, inputs, state):
    """The (latents, timesteps, cond) of one iteration's batched model call: every window × CFG branch."""
    captured = {}

    def capture(params, latents, timesteps, cond):
        captured.update(latents=latents, timesteps=timesteps, cond=cond)
        return latents

    @jax.jit
    def batch(params, inputs, state):
        positions = sampler.plan.window_positions
        fifo.denoise_windows(capture, sampler.plan, params, inputs, state.queue[positions],
                             state.indices[positions], state.prompts[positions])
        return captured["latents"], captured["timesteps"], captured["cond"]

    return batch(sampler.params, inputs, state)


def serial_vs_batched(sampler, inputs, state, repeats: int) -> None:
    latents, timesteps, cond = model_call_inputs(sampler, inputs, state)
    calls = latents.shape[0]
    denoise = jax.jit(sampler.denoise)
    singles = [(latents[i:i + 1], timesteps[i:i + 1], jax.tree.map(lambda a, i=i: a[i:i + 1], cond))
               for i in range(calls)]

    def batched():
        return jax.block_until_ready(denoise(sampler.params, latents, timesteps, cond))

    def serial():  # dispatched one after another, as a Python loop over windows and branches does
        return jax.block_until_ready([denoise(sampler.params, *one) for one in singles])

    start = time.perf_counter()
    reference, pieces = batched(), serial()  # compiles: batch `calls`, then batch 1
    compile_s = time.perf_counter() - start
    diff = float(jnp.abs(jnp.concatenate(pieces) - reference).max() / jnp.abs(reference).max())
    times = {"batched": [], "serial": []}
    for _ in range(repeats):
        for name, fn in (("batched", batched), ("serial", serial)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    one, many = statistics.median(times["batched"]), statistics.median(times["serial"])
    device = jax.devices()[0]
    print(f"device        {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"dtype {latents.dtype.name}")
    print(f"model work    one output frame = {calls} windows x CFG branches of {latents.shape[1]} frames, "
          f"latent {tuple(latents.shape[2:])}")
    print(f"compile       {compile_s:.1f} s (both forms)")
    print(f"batched       {one:.3f} s (1 call; median of {repeats}: {', '.join(f'{t:.3f}' for t in times['batched'])})")
    print(f"serial        {many:.3f} s ({calls} calls; median of {repeats}: "
          f"{', '.join(f'{t:.3f}' for t in times['serial'])})")
    print(f"ratio         {many / one:.2f}x (serial / batched; >1 = one batched call is faster)")
    print(f"output diff   {diff:.2e} max|serial-batched|/max|batched|")
    print(load_average())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net, small latents (CPU smoke test)")
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks after the compile chunk")
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 full size, f32 tiny)")
    parser.add_argument("--serial", action="store_true", help="one batched model call vs the official serial calls")
    parser.add_argument("--repeats", type=int, default=5, help="alternated rounds of --serial")
    args = parser.parse_args()
    compilation_cache.enable()  # only when JAX_REPVIDEO_COMPILATION_CACHE is set
    dtype = jnp.dtype(args.dtype or ("float32" if args.tiny else "bfloat16"))
    sampler, state, prompts, uncond = sampler_for(args.tiny, args.chunk_size, dtype)
    plan = sampler.plan
    inputs = sampler.inputs(prompts, uncond, None, sampler.config.new_video_length)
    if args.serial:
        serial_vs_batched(sampler, inputs, state, args.repeats)
        return
    stop = jnp.int32(2**30)
    chunk = fifo.compiled_chunk(sampler.denoise, plan, args.chunk_size)

    start = time.perf_counter()
    compiled = chunk.lower(sampler.params, inputs, state, None, stop).compile()
    compile_s = time.perf_counter() - start

    def run_chunk(state):
        state, emitted = compiled(sampler.params, inputs, state, None, stop)
        np.asarray(emitted)  # the frames reach the host, as a consumer would see them
        return state

    start = time.perf_counter()
    state = run_chunk(state)  # warm-up
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(args.chunks):
        start = time.perf_counter()
        state = run_chunk(state)
        times.append(time.perf_counter() - start)
    per_frame = sum(times) / (args.chunks * args.chunk_size)
    device = jax.devices()[0]
    flops = total_flops(compiled)  # one iteration: XLA counts the scan body once
    print(f"device        {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, dtype {dtype.name}")
    print(f"plan          f={plan.f} n={plan.n} lookahead windows={len(plan.starts)} x CFG 2 -> batch "
          f"{2 * len(plan.starts)} x {plan.f} frames, latent {tuple(state.queue.shape[1:])}")
    print(f"compile       {compile_s:.1f} s (one chunk of {args.chunk_size} iterations, ahead of time)")
    print(f"first chunk   {warm_s:.2f} s (after compile)")
    print(f"per frame     {per_frame:.3f} s per output frame ({args.chunks} chunks: "
          f"{', '.join(f'{t:.2f}' for t in times)} s; 1 batched U-Net call per frame)")
    if flops:
        print(f"FLOPs         {flops / 1e12:.3f} TFLOP per iteration (XLA cost analysis), "
              f"{flops / per_frame / 1e12:.3f} TFLOP/s achieved")
    print(mfu_line(flops, per_frame, device, dtype == jnp.bfloat16))
    print(memory_line(compiled, device))
    print(load_average())


if __name__ == "__main__":
    main()

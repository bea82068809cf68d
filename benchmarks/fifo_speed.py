"""Seconds per output frame of FIFO-Diffusion with the VideoCrafter2 U-Net (random weights).

Full size (default): the VC2 512 U-Net in bf16, f=16, n=4, lookahead, CFG 12, 320×512 (40×64 latents):
every iteration is ONE batched U-Net call of 8 windows × 2 CFG branches × 16 frames, and one iteration
emits one frame (the official code makes 16 separate calls per frame). ``--tiny`` runs the fixture's
tiny U-Net on small latents as a CPU smoke test. Not part of CI.

    python benchmarks/fifo_speed.py [--tiny] [--chunks 3] [--chunk-size 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net, small latents (CPU smoke test)")
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks after the compile chunk")
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 full size, f32 tiny)")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype or ("float32" if args.tiny else "bfloat16"))
    sampler, state, prompts, uncond = sampler_for(args.tiny, args.chunk_size, dtype)
    plan = sampler.plan
    sink = []
    consume = lambda i, x: sink.append(float(np.abs(x).mean()))  # noqa: E731  (forces the transfer)

    start = time.perf_counter()
    state = sampler.run(state, prompts, uncond, consumer=consume, max_chunks=1, include_warmup=True)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    state = sampler.run(state, prompts, uncond, consumer=consume, max_chunks=args.chunks, include_warmup=True)
    elapsed = time.perf_counter() - start
    iterations = args.chunks * args.chunk_size
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, dtype {dtype.name}")
    print(f"f={plan.f} n={plan.n} lookahead windows={len(plan.starts)} × CFG 2 → batch {2 * len(plan.starts)} × {plan.f} frames, "
          f"latent {tuple(state.queue.shape[1:])}")
    print(f"first chunk (compile + run): {compile_s:.1f} s")
    print(f"{iterations} iterations in {elapsed:.2f} s → {elapsed / iterations:.3f} s per output frame "
          f"(1 batched U-Net call per frame)")


if __name__ == "__main__":
    main()

"""Times one jitted VideoCrafter2 U-Net forward with random weights.

Default: the full-size t2v-512 U-Net in bf16 on ``(2·16, 40, 64)`` latent frames (CFG × 16 frames of
a 320×512 video), on whatever device JAX finds. Prints compile time (separately), step time, XLA
cost-analysis FLOPs, MFU when the device's peak is known, and peak device memory (allocator stats on
GPU/TPU; XLA's own estimate everywhere). ``--tiny`` runs the fixture-size U-Net (CPU smoke
test). Not part of the test suite.

    python benchmarks/unet_step.py [--tiny] [--dtype bf16|f32] [--qcache] [--attention auto|xla|cudnn|chunked]
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
from perf import load_average, memory_line, mfu_line, peak_flops, total_flops  # noqa: E402,F401

from jax_repvideo import compilation_cache  # noqa: E402
from jax_repvideo.caches import QCacheConfig
from jax_repvideo.config import load
from jax_repvideo.models.unet3d import UNet3D, UNet3DConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

def random_state(abstract, seed: int = 0):
    """Random weights for an abstract state, drawn with numpy (a jitted init of ~1500 tensors
    takes minutes to compile on CPU): kernels ~ N(0, 1/fan_in), norm scales 1, biases 0."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = next(str(p.key) for p in reversed(path) if hasattr(p, "key"))
        if name == "scale":
            value = np.ones(leaf.shape, np.float32)
        elif name == "bias":
            value = np.zeros(leaf.shape, np.float32)
        else:
            fan_in = max(1, int(np.prod(leaf.shape[:-1])))
            value = rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="fixture-size U-Net and an (2·4, 8, 16) latent")
    parser.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    parser.add_argument("--batch", type=int, default=2, help="videos per call (2 = CFG)")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--qcache", action="store_true", help="Q-cache on (default map, v = 0.9)")
    parser.add_argument("--steps", type=int, default=5, help="timed calls after the warm-up")
    args = parser.parse_args(argv)
    compilation_cache.enable()  # only when JAX_REPVIDEO_COMPILATION_CACHE is set

    cfg = load(UNet3DConfig, CONFIGS / ("tiny_unet.yaml" if args.tiny else "videocrafter2_512.yaml"),
               section="videocrafter2.unet")
    frames = args.frames or (4 if args.tiny else 16)
    height, width = args.height or (8 if args.tiny else 40), args.width or (16 if args.tiny else 64)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32

    def make():
        return UNet3D(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, attention_backend=args.attention)

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    state = random_state(abstract)
    n_params = sum(x.size for x in jax.tree.leaves(state))
    qcache = QCacheConfig(enabled=True) if args.qcache else None

    @jax.jit
    def forward(state, x, timesteps, context, fps):
        return nnx.merge(graphdef, state)(x, timesteps, context, fps, qcache=qcache)

    keys = jax.random.split(jax.random.key(1), 3)
    b = args.batch
    x = jax.random.normal(keys[0], (b, frames, height, width, cfg.in_channels), dtype)
    timesteps = jax.random.randint(keys[1], (b, frames), 0, 1000)
    context = jax.random.normal(keys[2], (b, 77 if not args.tiny else 8, cfg.context_dim), dtype)
    fps = jnp.full((b,), 8)

    start = time.perf_counter()
    compiled = forward.lower(state, x, timesteps, context, fps).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(state, x, timesteps, context, fps))  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, x, timesteps, context, fps))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)

    device = jax.devices()[0]
    flops = total_flops(compiled)
    print(f"device        {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"model         {'tiny' if args.tiny else 'VideoCrafter2 512'} U-Net, {n_params / 1e6:.1f} M params, "
          f"{args.dtype}, attention={args.attention}, qcache={'on' if qcache else 'off'}")
    print(f"input         ({b}·{frames}, {height}, {width}) latent frames")
    print(f"compile       {compile_s:.2f} s")
    print(f"step          {step_s * 1e3:.1f} ms (median of {args.steps}; min {min(times) * 1e3:.1f} ms)")
    if flops:
        print(f"FLOPs         {flops / 1e12:.3f} TFLOP per call (XLA cost analysis), "
              f"{flops / step_s / 1e12:.3f} TFLOP/s achieved")
    print(mfu_line(flops, step_s, device, args.dtype == "bf16"))
    print(memory_line(compiled, device))
    print(load_average())


if __name__ == "__main__":
    main()

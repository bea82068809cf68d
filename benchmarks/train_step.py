"""Step time and peak memory of the RepVideo train step (not run in CI).

    python benchmarks/train_step.py                 # full-size 2B RepVideo DiT, 49×480×720 (latents 13×60×90), remat
    python benchmarks/train_step.py --tiny          # tiny DiT on CPU (smoke run)
    python benchmarks/train_step.py --compile-only  # lower + compile with abstract inputs, XLA memory analysis;
                                                    # allocates no weights, so it runs on any host

The step is the real one (``training.step``): v-prediction loss, grads, multi_transform AdamW over
float32 master weights, bf16 compute. Latents and text embeddings are random (the VAE and T5 are
frozen and run in the preprocessing pass, not in the step). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_repvideo.models.dit import CogVideoXDiT, DiTConfig, load_dit_config
from jax_repvideo.training.config import OptimConfig
from jax_repvideo.training.step import StepSpec, flat_params, make_optimizer, param_labels, schedule_table, train_step_fn

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny DiT (configs/tiny_dit.yaml), float32")
    p.add_argument("--compile-only", action="store_true", help="abstract compile + memory analysis, no run")
    p.add_argument("--frames", type=int, default=49, help="video frames (4k+1)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    p.add_argument("--trainable", default="all", choices=["all", "gates"])
    p.add_argument("--attention", default="auto", help="attention backend")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the compile step")
    return p.parse_args()


def main() -> None:
    args = parse()
    dit = load_dit_config(CONFIGS / ("tiny_dit.yaml" if args.tiny else "repvideo_2b.yaml"))
    if args.tiny:
        args.frames, args.height, args.width = 9, 8 * dit.sample_height, 8 * dit.sample_width
    latent = (args.batch, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8, dit.in_channels)
    text = (args.batch, dit.max_text_seq_length, dit.text_embed_dim)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16

    def make():
        return CogVideoXDiT(dit, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), dtype=dtype, param_dtype=jnp.float32,
                            attention_backend=args.attention, remat=args.remat)

    model = nnx.eval_shape(make) if args.compile_only else nnx.jit(make)()
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    params = flat_params(model)
    labels = param_labels(params, args.trainable, r"(^|\.)gates$")
    spec = StepSpec(OptimConfig(), tuple(sorted(labels.items())), 1000, 0.1)
    init = make_optimizer(spec).init
    opt_state = jax.eval_shape(init, params) if args.compile_only else jax.jit(init)(params)
    alphas = schedule_table(3.0)
    step = train_step_fn()
    result = {
        "model": "tiny_dit" if args.tiny else "repvideo_2b", "params": int(sum(np.prod(v.shape) for v in params.values())),
        "latents": list(latent), "text": list(text), "remat": args.remat, "trainable": args.trainable,
        "compute_dtype": jnp.dtype(dtype).name, "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
    }

    if args.compile_only:
        sds = jax.ShapeDtypeStruct
        start = time.perf_counter()
        compiled = step.lower(params, opt_state, rest, 0, sds(latent, jnp.float32), sds(text, jnp.float32), alphas, 0,
                              graphdef=graphdef, spec=spec).compile()
        result["compile_s"] = round(time.perf_counter() - start, 2)
        mem = compiled.memory_analysis()
        if mem is not None:
            for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes"):
                result[name.replace("_in_bytes", "_gib")] = round(getattr(mem, name) / 2**30, 3)
        print(json.dumps(result))
        return

    rng = np.random.default_rng(0)
    lat = jnp.asarray(rng.standard_normal(latent, np.float32))
    emb = jnp.asarray(rng.standard_normal(text, np.float32))
    start = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, rest, 0, lat, emb, alphas, 0, graphdef=graphdef, spec=spec)
    jax.block_until_ready(metrics)
    result["first_step_s"] = round(time.perf_counter() - start, 2)  # compile + one step
    times = []
    for i in range(1, args.steps + 1):
        start = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, rest, i, lat, emb, alphas, 0, graphdef=graphdef, spec=spec)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    result["step_s_median"] = round(statistics.median(times), 4)
    result["steps_per_s"] = round(1 / statistics.median(times), 3)
    result["loss"] = float(metrics["loss"])
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

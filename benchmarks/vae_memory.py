"""Peak memory of the CogVideoX VAE decode, 13 vs 130 latent frames, with a tiny random VAE.

Each measurement runs in a fresh subprocess and reports two numbers:

* ``xla``: the largest single jit call's buffers as XLA assigns them (arguments + outputs +
  temporaries − aliased), from ``compiled.memory_analysis()``: the device-side peak;
* ``rss``: the process's peak resident memory (``ru_maxrss``), which also counts the runtime,
  the compiler and the params.

``stream`` is ``decode_stream`` with the frames consumed as they come (a running checksum stands in
for a video writer); ``one_shot`` is ``decode``, one jit returning the whole video, for contrast.
Usage: ``python benchmarks/vae_memory.py [--latent-hw 32 32] [--chunks-per-call 4]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

FRAME_COUNTS = (13, 130)


def _tiny_vae(latent_channels: int = 4):
    from flax import nnx

    from jax_repvideo.models.vae_cogvideox import CogVideoXVAE, CogVideoXVAEConfig

    cfg = CogVideoXVAEConfig(block_out_channels=(16, 32, 32), latent_channels=latent_channels, layers_per_block=1,
                             norm_num_groups=8)
    return CogVideoXVAE(cfg, rngs=nnx.Rngs(0))


def _xla_bytes(jitted, *args) -> int:
    stats = jitted.lower(*args).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes)


def child(mode: str, frames: int, latent_hw: tuple[int, int], chunks_per_call: int) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jax_repvideo.models import vae_cogvideox as V

    model = _tiny_vae()
    z = np.random.default_rng(0).standard_normal((1, frames, *latent_hw, 4)).astype(np.float32)
    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    if mode == "stream":
        total, checksum = 0, 0.0
        for block in V.decode_stream(model, z, chunks_per_call=chunks_per_call):
            total += block.shape[1]
            checksum += float(block.sum())
        first = V.first_chunk_length(frames, V.DECODE_CHUNK)
        _, cache = V._decode_first_jit(graphdef, state, jnp.asarray(z[:, :first]))
        segment = jnp.asarray(z[:, first:first + V.DECODE_CHUNK * chunks_per_call])
        xla = max(_xla_bytes(V._decode_first_jit, graphdef, state, jnp.asarray(z[:, :first])),
                  _xla_bytes(V._decode_segment_jit, graphdef, state, cache, segment))
    else:
        video = np.asarray(V.decode(model, z))
        total, checksum = video.shape[1], float(video.sum())
        xla = _xla_bytes(V._decode_jit, graphdef, state, jnp.asarray(z))
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "latent_frames": frames, "video_frames": total, "xla_bytes": xla, "rss_bytes": rss,
            "seconds": seconds, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-hw", type=int, nargs=2, default=(32, 32))
    parser.add_argument("--chunks-per-call", type=int, default=4)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), tuple(args.latent_hw), args.chunks_per_call)))
        return
    results = {}
    for mode in ("stream", "one_shot"):
        for frames in FRAME_COUNTS:
            cmd = [sys.executable, __file__, "--child", mode, str(frames), "--latent-hw", *map(str, args.latent_hw),
                   "--chunks-per-call", str(args.chunks_per_call)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1])
            results[mode, frames] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[mode, frames]
            print(f"{mode:9s} {frames:4d} latent → {r['video_frames']:4d} frames: xla peak "
                  f"{r['xla_bytes'] / 2**20:8.1f} MiB, process peak RSS {r['rss_bytes'] / 2**20:8.1f} MiB, "
                  f"{r['seconds']:.1f} s", flush=True)
    for mode in ("stream", "one_shot"):
        small, large = results[mode, FRAME_COUNTS[0]], results[mode, FRAME_COUNTS[1]]
        print(f"{mode:9s} ratio {FRAME_COUNTS[1]}/{FRAME_COUNTS[0]}: xla {large['xla_bytes'] / small['xla_bytes']:.3f}×,"
              f" RSS {large['rss_bytes'] / small['rss_bytes']:.3f}×")
    stream_ratio = results["stream", FRAME_COUNTS[1]]["rss_bytes"] / results["stream", FRAME_COUNTS[0]]["rss_bytes"]
    sys.exit(0 if stream_ratio <= 1.2 else 1)


if __name__ == "__main__":
    main()

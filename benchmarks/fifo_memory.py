"""Peak host memory of a FIFO-Diffusion run does not grow with the video length.

Runs the tiny VideoCrafter2 U-Net (random weights, f=4, n=2, lookahead, CFG, 8×16 latents, chunks of
8 iterations) for 64 and for 640 output frames, each in a fresh process, streaming every frame to a
consumer that keeps only a running checksum (as a video writer would). Prints each peak RSS and the
ratio 640/64, and exits non-zero when the ratio exceeds 1.1.

    python benchmarks/fifo_memory.py [--frames 64 640]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

LIMIT = 1.1


def child(frames: int) -> None:
    import jax
    import numpy as np

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from fifo_speed import sampler_for

    sampler, state, prompts, uncond = sampler_for(tiny=True, chunk_size=8, dtype=np.float32)
    checksum, count = 0.0, 0

    def consume(first, latents):
        nonlocal checksum, count
        checksum += float(np.abs(latents).sum())
        count += len(latents)

    start = time.perf_counter()
    sampler.run(state, prompts, uncond, num_frames=frames, consumer=consume)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"frames": count, "peak_rss_mb": peak_mb, "seconds": time.perf_counter() - start,
                      "checksum": checksum, "backend": jax.default_backend()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs=2, default=(64, 640))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    results = []
    for frames in args.frames:
        out = subprocess.run([sys.executable, __file__, "--child", str(frames)], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{r['frames']:5d} frames: peak RSS {r['peak_rss_mb']:.1f} MiB ({r['seconds']:.0f} s, {r['backend']})", flush=True)
    ratio = results[1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    print(f"ratio {args.frames[1]}/{args.frames[0]} frames: {ratio:.3f} (limit {LIMIT})")
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())

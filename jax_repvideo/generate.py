"""``jax-repvideo generate CONFIG [key=value …]``: prompt → mp4/gif, streamed, resumable, NaN-guarded."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from jax_repvideo import config as config_lib
from jax_repvideo import generate_config as gc
from jax_repvideo import sharding
from jax_repvideo.fifo_stream import RunStore
from jax_repvideo.video import VideoWriter, check_writable

# Settings that may change between an interrupted run and its resume (or extension).
_RESUMABLE = ("num_frames", "resume", "out", "save_latents", "state_dir", "output_fps", "mesh")


def main(config_path: str, overrides: Sequence[str] = ()) -> int:
    try:
        cfg = gc.load(config_path, overrides)
        check_writable(cfg.out)
        if cfg.save_latents:
            if not cfg.save_latents.endswith(".npz"):
                raise ValueError(f"save_latents={cfg.save_latents}: the file name must end in .npz")
            check_writable(Path(cfg.save_latents).with_suffix(".mp4"))
        layout = sharding.setup(cfg.mesh)  # a mesh that doesn't fit the devices fails here
    except (config_lib.ConfigError, ValueError, OSError) as err:
        print(f"jax-repvideo generate: error: {err}", file=sys.stderr)
        return 2
    try:
        run(cfg, layout)
    except FloatingPointError as err:
        print(f"jax-repvideo generate: error: {err}", file=sys.stderr)
        return 3
    return 0


def run(cfg: gc.GenerateConfig, layout: sharding.Layout | None = None) -> Path | None:
    """Generates the video of ``cfg``; returns the written file (None on non-primary processes)."""
    from jax_repvideo.pipelines import Pipeline

    if cfg.checkpoint is None:
        print("jax-repvideo: no checkpoint configured — the weights are RANDOM; the video is noise-like "
              "and only shows that the whole path runs.", file=sys.stderr)
    started = time.perf_counter()
    with (layout or sharding.setup(cfg.mesh)).activate():
        pipe = Pipeline(cfg)
        store = RunStore(cfg.state_dir, fingerprint(cfg)) if cfg.state_dir else None
        primary = sharding.is_primary()
        kept = []
        bar = tqdm(total=cfg.num_frames, unit="frame", desc="generate", disable=not primary, dynamic_ncols=True)
        writer = VideoWriter(cfg.out, fps=cfg.output_fps) if primary else None
        decoder = pipe.stream_decoder()
        try:
            for latents in pipe.latents(store=store):
                if cfg.save_latents:
                    kept.append(latents)
                for frames in decoder.push(latents):
                    if writer is not None:
                        writer.append(frames)
                    bar.update(len(frames))
        finally:
            bar.close()
            path = writer.close() if writer is not None else None
    if primary and cfg.save_latents:
        _save_npz(cfg.save_latents, np.concatenate(kept) if kept else np.zeros((0,)))
    if primary and path is not None:
        print(f"wrote {path} ({writer.frames_written} frames) in {time.perf_counter() - started:.1f} s")
    return path


def fingerprint(cfg: gc.GenerateConfig) -> dict:
    data = config_lib.to_dict(cfg)
    return {k: v for k, v in data.items() if k not in _RESUMABLE}


def _save_npz(path: str, latents: np.ndarray) -> None:
    tmp = Path(path).with_name(f".{Path(path).stem}.partial.npz")
    np.savez(tmp, latents=latents)
    os.replace(tmp, path)

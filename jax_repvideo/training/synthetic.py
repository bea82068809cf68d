"""Synthetic video–caption folders (a bright square sliding over a gradient) for tests and smoke runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


def moving_square(num_frames: int, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    """``(num_frames, height, width, 3)`` uint8: an 8×8 square moving 1 px down and 2 px right per frame."""
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
    colour = rng.integers(128, 256, size=3)
    base = np.linspace(0, 60, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frame = base.copy()
        y, x = (y0 + t) % (height - 8), (x0 + 2 * t) % (width - 8)
        frame[y : y + 8, x : x + 8] = colour
        frames[t] = frame.astype(np.uint8)
    return frames


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), format="FFMPEG", fps=fps, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)


def write_folder(folder: str | Path, lengths: Sequence[int], captions: str = "jsonl",
                 height: int = 32, width: int = 48) -> Path:
    """Videos ``clip{i}.mp4`` of the given frame counts, captioned in ``captions.jsonl`` or sidecar ``.txt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, length in enumerate(lengths):
        write_video(folder / f"clip{i}.mp4", moving_square(length, height, width, seed=i))
        rows.append({"video": f"clip{i}.mp4", "caption": f"a square moving, clip {i}"})
        if captions == "sidecar":
            (folder / f"clip{i}.txt").write_text(rows[-1]["caption"] + "\n")
    if captions == "jsonl":
        (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder

"""Frames → mp4 / gif, written atomically.

``VideoWriter`` appends frames to a temporary file beside the target and renames it into place when
closed. If the run is interrupted, the frames written so far are finalised into a valid file; a run
that wrote no frame leaves no file at all. A half-written container never sits at the target path.
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

SUFFIXES = (".mp4", ".gif")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1] (any float dtype) → uint8 in [0, 255], as the official code does."""
    frames = np.clip(np.asarray(frames, np.float32), -1.0, 1.0)
    return np.round((frames + 1.0) * 127.5).astype(np.uint8)


def check_writable(path: str | Path) -> Path:
    """Fails early, before any compute, if ``path`` can't be written."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"output {path}: the file name must end in one of {SUFFIXES}")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"output {path}: cannot create folder {folder} ({err.strerror})") from None
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"output {path} is not writable")
    return path


class VideoWriter:
    """Streams uint8 ``(H, W, 3)`` frames (or batches ``(T, H, W, 3)``) into ``path``."""

    def __init__(self, path: str | Path, fps: float):
        self.path = check_writable(path)
        self.fps = fps
        self.frames_written = 0
        self._tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self._writer = None

    def append(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8:
            raise TypeError("VideoWriter takes uint8 frames; use to_uint8 first")
        if not np.isfinite(frames.astype(np.float32)).all():
            raise ValueError("refusing to write non-finite frames")
        for frame in frames:
            if self._writer is None:
                self._writer = self._open()
            self._writer.append_data(frame)
            self.frames_written += 1

    def _open(self):
        if self.path.suffix.lower() == ".gif":
            return imageio.get_writer(self._tmp, mode="I", duration=1000.0 / self.fps, loop=0)
        return imageio.get_writer(self._tmp, fps=self.fps, codec="libx264", quality=8,
                                  macro_block_size=2, ffmpeg_log_level="error")

    def close(self) -> Path | None:
        """Finalises the file and moves it into place; returns its path, or None if empty."""
        if self._writer is None:
            return None
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, self.path)
        return self.path

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_frames(path: str | Path) -> np.ndarray:
    """All frames of a video or image file as uint8 ``(T, H, W, 3)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        frames = np.asarray(imageio.imread(path))[None]
    else:
        frames = np.stack([np.asarray(f) for f in imageio.get_reader(path)])
    if frames.ndim == 3:  # grayscale
        frames = np.repeat(frames[..., None], 3, axis=-1)
    return frames[..., :3]

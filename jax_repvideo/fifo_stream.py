"""Streaming a FIFO run chunk by chunk, with a NaN guard and an on-disk state for resume / extend.

``fifo_stream`` yields ``(first_frame, latents)`` per compiled chunk. With a ``RunStore`` it saves the
FIFO state and every emitted latent after each chunk (each file replaced atomically), so an
interrupted run resumes to identical frames and a finished run extends to more frames.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from jax_repvideo import fifo, sharding

LATEST = "latest.json"
LATENTS = "latents.npy"
RUN = "run.json"


class RunStore:
    """A state directory: ``state-<iteration>/`` (orbax), ``latents.npy``, ``latest.json``, ``run.json``."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]):
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def exists(self) -> bool:
        return (self.directory / LATEST).is_file()

    def load(self) -> tuple[fifo.FifoState, np.ndarray]:
        """The saved state and the latents emitted so far; refuses a run with other settings."""
        saved = json.loads((self.directory / RUN).read_text())
        changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if changed:
            raise ValueError(f"state_dir {self.directory} holds a run with different settings ({', '.join(changed)}); "
                             "use another state_dir or the same settings")
        latest = json.loads((self.directory / LATEST).read_text())
        state = fifo.load_state(self.directory / latest["state"])
        latents = np.load(self.directory / LATENTS)[: latest["frames"]]
        return state, latents

    def save(self, state: fifo.FifoState, latents: np.ndarray) -> None:
        """Every process calls it (the orbax state save is collective); only process 0 writes files."""
        primary = sharding.is_primary()
        if primary:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.directory / RUN, json.dumps(self.fingerprint, indent=1, sort_keys=True))
        name = f"state-{int(state.iteration)}"
        fifo.save_state(self.directory / name, state)
        if not primary:
            return
        tmp = self.directory / f".{LATENTS}.tmp.npy"
        np.save(tmp, latents)
        os.replace(tmp, self.directory / LATENTS)
        _write_atomic(self.directory / LATEST, json.dumps({"state": name, "frames": int(latents.shape[0])}))
        for old in self.directory.glob("state-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fifo_stream(
    sampler: fifo.FifoSampler,
    prompts,
    uncond,
    frame_counts: Sequence[int],
    num_frames: int,
    base_latents: Callable[[], Any],
    *,
    store: RunStore | None = None,
    resume: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(first_frame_index, latents (m, h, w, C))`` until ``num_frames`` frames are out.

    On resume, the latents saved earlier come first (one item), then the run continues. A non-finite
    latent stops the run with a ``FloatingPointError`` naming the iteration; nothing of that chunk is
    yielded.
    """
    if resume and store is not None and store.exists():
        state, emitted = store.load()
        if emitted.shape[0] > num_frames:
            raise ValueError(f"the saved run already has {emitted.shape[0]} frames, more than num_frames={num_frames}")
        if emitted.shape[0]:
            yield 0, emitted
    else:
        state = sampler.init(base_latents(), prompts, uncond, frame_counts, num_frames=num_frames)
        emitted = None
    warmup = sampler.plan.steps - sampler.plan.f
    total = num_frames + warmup
    # Only a store keeps the emitted latents (a few KB a frame); without one memory stays flat.
    kept = np.zeros((0, *state.queue.shape[1:]), np.float32) if emitted is None else emitted
    while int(state.iteration) < total:
        chunk = []
        state = sampler.run(state, prompts, uncond, frame_counts, num_frames=num_frames, max_chunks=1,
                            consumer=lambda first, latents: chunk.append((first, latents)))
        for first, latents in chunk:
            _check_finite(latents, first + warmup)
        if store is not None:
            kept = np.concatenate([kept, *(latents for _, latents in chunk)])
            store.save(state, kept)
        yield from chunk


def _check_finite(latents: np.ndarray, first_iteration: int) -> None:
    bad = ~np.isfinite(latents).reshape(latents.shape[0], -1).all(axis=1)
    if bad.any():
        iteration = first_iteration + int(np.argmax(bad))
        raise FloatingPointError(f"non-finite (NaN/Inf) latent emitted at FIFO iteration {iteration}; stopping. "
                                 "No NaN frame was written. Try float32 (dtype=float32) or a lower guidance scale.")

"""``jax-repvideo verify KIND DIR``: run a port against a reference dump and report its error.

Each kind is a module in this package with ``run(directory: Path) -> bool`` that prints one line per
case and returns whether every case is within tolerance. Errors are max|ours − ref| / max|ref|.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

# kind → module in this package (imported only when asked for).
KINDS = {
    "videocrafter2-unet": "videocrafter2_unet",
    "fifo": "fifo",
    "repvideo": "repvideo",
    "cogvideox": "cogvideox",
    "videocrafter2-vae": "videocrafter2_vae",
    "videocrafter2-text": "videocrafter2_text",
    "cogvideox-vae": "cogvideox_vae",
    "t5": "t5",
}


def relative_error(ours, ref) -> float:
    """max|ours − ref| / max|ref| in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def check(name: str, ours, ref, tolerance: float) -> bool:
    """Prints one result line and returns whether it is within tolerance."""
    error = relative_error(ours, ref)
    ok = error <= tolerance
    print(f"{name:<40s} max rel err {error:.3e}  (tol {tolerance:.0e})  {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def run(kind: str, directory: str | Path) -> bool:
    if kind not in KINDS:
        raise SystemExit(f"unknown verify kind {kind!r}; choose one of {', '.join(KINDS)}")
    directory = Path(directory)
    if not directory.is_dir():
        raise SystemExit(f"verify {kind}: {directory} is not a directory")
    module = importlib.import_module(f"{__name__}.{KINDS[kind]}")
    return module.run(directory)

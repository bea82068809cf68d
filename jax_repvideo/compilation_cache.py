"""The JAX persistent compilation cache, switched on by a directory.

``enable(directory)`` (or ``enable()`` with ``JAX_REPVIDEO_COMPILATION_CACHE=DIR`` in the environment)
makes every later jit compile look in ``DIR`` first and store what it compiles there, so a second
process with the same shapes, code and jax version skips XLA's compile (minutes for the full-size
U-Net / DiT on a GPU). Call it before the first compile. Entries are keyed by the HLO, the jax/XLA
versions and the device, so a stale cache is never used, only missed. Off when neither is given.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "JAX_REPVIDEO_COMPILATION_CACHE"


def enable(directory: str | Path | None = None, *, min_compile_time_s: float = 0.0) -> Path | None:
    """Turns the cache on at ``directory`` (else ``$JAX_REPVIDEO_COMPILATION_CACHE``); returns it or None.

    ``min_compile_time_s``: compiles faster than this are not stored (0 stores every one).
    """
    directory = directory or os.environ.get(ENV)
    if not directory:
        return None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path

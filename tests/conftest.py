"""Shared test setup: float32 everywhere, CPU, the copied fixtures, one compilation cache per session."""

from pathlib import Path

import jax
import pytest

from jax_repvideo import compilation_cache

jax.config.update("jax_default_matmul_precision", "float32")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache(tmp_path_factory):
    """A fresh persistent compilation cache for this session: every program still compiles once, but the
    CLI runs that rebuild the same tiny models (``generate`` with other frame counts, resume, extend) load
    it instead of compiling it again. Compiles under 0.2 s are not worth a file."""
    return compilation_cache.enable(tmp_path_factory.mktemp("jax_cache"), min_compile_time_s=0.2)

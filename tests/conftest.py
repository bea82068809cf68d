"""Shared test setup: float32 everywhere, CPU, and the copied fixtures."""

from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "float32")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES

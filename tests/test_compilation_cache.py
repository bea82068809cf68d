"""compilation_cache.enable: off without a directory; with one, a compile is stored there."""

import subprocess
import sys

from jax_repvideo import compilation_cache

SCRIPT = """
import jax, jax.numpy as jnp
from jax_repvideo import compilation_cache
path = compilation_cache.enable()
print(path)
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
"""


def test_off_without_directory(monkeypatch):
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    assert compilation_cache.enable() is None


def test_env_directory_receives_the_compiled_executable(tmp_path):
    cache = tmp_path / "cache"
    env = {compilation_cache.ENV: str(cache), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(cache)
    assert any(cache.iterdir()), "no cache entry written"

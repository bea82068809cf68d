"""layers.conv keeps a small-input convolution as written (XLA would swap its operands)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_repvideo.models.layers import conv_general_dilated_unswapped

DIMS = ("NHWC", "HWIO", "NHWC")


CASES = [(size, strides, padding) for size in (1, 2, 4)
         for strides, padding in (((1, 1), ((1, 1), (1, 1))), ((2, 2), ((1, 1), (1, 1))), ((1, 1), "SAME"))]


@pytest.mark.parametrize("size, strides, padding", CASES + [(4, (1, 1), "VALID")])
def test_equals_the_plain_convolution(size, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, size, size + 1, 8), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 16), np.float32))
    with jax.default_matmul_precision("float32"):
        ref = jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMS)
        ours = conv_general_dilated_unswapped(x, w, strides, padding, dimension_numbers=DIMS)
    assert ours.shape == ref.shape
    assert float(jnp.abs(ours - ref).max() / jnp.abs(ref).max()) <= 1e-6


def test_a_3x3_conv_on_a_2x2_map_keeps_its_operands():
    x = jax.ShapeDtypeStruct((4, 2, 2, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)

    def compiled_text(fn):
        return jax.jit(lambda x, w: fn(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMS)).lower(
            x, w).compile().as_text()

    # XLA marks the operand swap with a reversed kernel window.
    assert "rhs_reversal" not in compiled_text(conv_general_dilated_unswapped)

"""bf16 compute (float32 params; bf16 matmul/conv operands with float32 results, norms and softmax
statistics) stays within 2e-2 of the float32 reference outputs on the tiny fixtures, so a speed setting
never silently costs fidelity. Inputs and outputs are bf16, as a bf16 caller would pass them.
One bf16 compile per model; the oracles are the fixtures' recorded PyTorch outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.cogvideox import model_from_params
from convert.repvideo import load_repvideo
from jax_repvideo.models.dit import jit_forward
from jax_repvideo.verify import relative_error
from jax_repvideo.verify import videocrafter2_unet as V

BF16_TOL = 2e-2


def _rel(ours, ref) -> float:
    return relative_error(np.asarray(jnp.asarray(ours, jnp.float32)), ref)


def test_dit_bf16_matches_reference(fixtures_dir):
    cfg, flat = load_repvideo(fixtures_dir / "repvideo")
    io = dict(np.load(fixtures_dir / "repvideo" / "io.npz"))
    forward, state = jit_forward(model_from_params(cfg, flat, dtype=jnp.bfloat16))
    errors = []
    for k in range(int(io["num_cases"])):
        latents = io[f"case{k}.hidden_states"].transpose(0, 1, 3, 4, 2)
        timesteps = np.broadcast_to(io[f"case{k}.timestep"][:, None], latents.shape[:2])
        out = forward(state, jnp.asarray(latents, jnp.bfloat16), timesteps,
                      jnp.asarray(io[f"case{k}.encoder_hidden_states"], jnp.bfloat16))
        assert out.dtype == jnp.bfloat16
        errors.append(_rel(np.asarray(out, np.float32).transpose(0, 1, 4, 2, 3), io[f"case{k}.output"]))
    print(f"DiT bf16 relative errors per case: {errors}")
    assert max(errors) <= BF16_TOL, errors


@pytest.mark.parametrize("case_name", ["case0"])
def test_unet_bf16_matches_reference(fixtures_dir, case_name):
    from convert.common import load_torch_state_dict, strip_prefix
    from convert.videocrafter2 import UNET_PREFIX, convert_unet, load_unet

    folder = fixtures_dir / "videocrafter2"
    _, cfg = V.load_model(folder)
    flat = convert_unet(strip_prefix(load_torch_state_dict(folder / "unet.ckpt"), UNET_PREFIX), cfg)
    graphdef, state = nnx.split(load_unet(flat, cfg, dtype=jnp.bfloat16))
    forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
    case = V.load_cases(folder)[case_name]
    x, timesteps, context, fps = V.case_inputs(case)
    out = forward(state, jnp.asarray(x, jnp.bfloat16), timesteps, jnp.asarray(context, jnp.bfloat16), fps)
    assert out.dtype == jnp.bfloat16
    error = _rel(V.to_torch_layout(np.asarray(out, np.float32)), case["out"])
    print(f"U-Net bf16 relative error {case_name}: {error}")
    assert error <= BF16_TOL

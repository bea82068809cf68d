"""CogVideoX DiT + RepVideo feature cache against the original SAT code (tests/fixtures/repvideo)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.cogvideox import model_from_params
from convert.repvideo import load_repvideo
from jax_repvideo import cli
from jax_repvideo.config import ConfigError
from jax_repvideo.models.dit import CogVideoXDiT, DiTConfig, frame_mean, jit_forward
from jax_repvideo.models.pos_embed_3d import video_pos_embed


@pytest.fixture(scope="module")
def fixture_dir(fixtures_dir):
    return fixtures_dir / "repvideo"


@pytest.fixture(scope="module")
def converted(fixture_dir):
    return load_repvideo(fixture_dir)


@pytest.fixture(scope="module")
def io(fixture_dir):
    return dict(np.load(fixture_dir / "io.npz"))


def case_inputs(io, k):
    latents = io[f"case{k}.hidden_states"].transpose(0, 1, 3, 4, 2)  # (B, T, C, H, W) → channels-last
    timesteps = np.broadcast_to(io[f"case{k}.timestep"][:, None], latents.shape[:2])
    return latents, timesteps, io[f"case{k}.encoder_hidden_states"]


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_verify_repvideo_cli(fixture_dir, capsys):
    assert cli.main(["verify", "repvideo", str(fixture_dir)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "max rel err" in line]
    assert sum("output_gates_zero" in line for line in lines) == 4
    assert sum("repvideo" in line and "output " in line + " " for line in lines) >= 4
    assert all(line.endswith("ok") for line in lines)


def test_per_block_trace_matches_sat(converted, io):
    """Locates a mismatch: embeddings, then every block's cache mean, gated input and output."""
    cfg, flat = converted
    forward, state = jit_forward(model_from_params(cfg, flat), return_trace=True)
    for k in range(int(io["num_cases"])):
        out, trace = forward(state, *case_inputs(io, k))
        pre = f"case{k}.trace."
        assert rel(trace["time_proj"][:, 0], io[pre + "time_proj"]) < 1e-6
        assert rel(trace["temb"][:, 0], io[pre + "temb"]) < 1e-5
        assert rel(trace["embeddings"], io[pre + "embeddings_out"]) < 1e-6
        for i in range(cfg.num_layers):
            layer = f"{pre}layer{i:02d}."
            assert float(io[layer + "gate"]) == float(flat["gates"][i])
            for ours, theirs in (("cache_mean", "cache_mean"), ("input_gated", "input_gated"), ("output", "output")):
                err = rel(trace[ours][i], io[layer + theirs])
                assert err < 1e-5, f"case{k} block {i} {theirs}: rel err {err:.2e}"
        assert rel(trace["final_layernorm_out"], io[pre + "final_layernorm_out"]) < 1e-5
        assert rel(np.asarray(out).transpose(0, 1, 4, 2, 3), io[f"case{k}.output"]) < 1e-5


def test_pos_table_equals_sat_buffer(fixture_dir):
    from safetensors.numpy import load_file

    table = load_file(fixture_dir / "weights.safetensors")["mixins.pos_embed.pos_embedding"][0]
    ours = np.asarray(video_pos_embed(3, 3, 4, 32, spatial_scale=1.875, temporal_scale=1.0))
    assert np.abs(table[:8]).max() == 0  # text rows
    np.testing.assert_allclose(ours, table[8:], rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def case1_reference(converted, io):
    cfg, flat = converted
    forward, state = jit_forward(model_from_params(cfg, flat))
    return np.asarray(forward(state, *case_inputs(io, 1)))


def test_scanned_equals_unscanned(converted, io):
    """The first 8 blocks (a window restart at 6 and active mixing), scan vs an unrolled Python loop."""
    cfg, flat = converted
    short = DiTConfig(**{**cfg.__dict__, "num_layers": 8})
    flat = {k: v[:8] if k.startswith("blocks.") or k == "gates" else v for k, v in flat.items()}
    inputs = case_inputs(io, 3)
    scanned, state = jit_forward(model_from_params(short, flat))
    unrolled, per_block_state = jit_forward(model_from_params(short, flat, scan_layers=False))
    # Same math; XLA may fuse the unrolled loop differently, so allow float32 rounding.
    assert rel(unrolled(per_block_state, *inputs), scanned(state, *inputs)) < 1e-6


def test_chunked_attention_equals_dense(converted, io, case1_reference):
    """S = 8 + 36 = 44 tokens in chunks of 16: three query and key blocks, the last one padded."""
    cfg, flat = converted
    forward, state = jit_forward(model_from_params(cfg, flat, attention_backend="chunked", attention_chunk=16))
    assert rel(forward(state, *case_inputs(io, 1)), case1_reference) < 1e-6


def test_repvideo_off_equals_gates_zero(converted, io):
    cfg, flat = converted
    stock_cfg = DiTConfig(**{**cfg.__dict__, "repvideo": False})
    stock_flat = {k: v for k, v in flat.items() if k != "gates"}
    stock, stock_state = jit_forward(model_from_params(stock_cfg, stock_flat))
    zero, zero_state = jit_forward(model_from_params(cfg, {**flat, "gates": np.zeros_like(flat["gates"])}))
    inputs = case_inputs(io, 0)
    assert rel(stock(stock_state, *inputs), zero(zero_state, *inputs)) < 1e-6
    assert rel(stock(stock_state, *inputs).transpose(0, 1, 4, 2, 3), io["case0.output_gates_zero"]) < 1e-5


def test_per_frame_timesteps(converted, io):
    """With attention's output projection zeroed, tokens never interact, so frame j of a run with
    per-frame timesteps must equal frame j of a uniform run at t_j (through every block, the cache
    and the final layer). Text tokens get the frame mean of the time embeddings."""
    cfg, flat = converted
    isolated = {**flat, "blocks.attn1.to_out.kernel": np.zeros_like(flat["blocks.attn1.to_out.kernel"])}
    forward, state = jit_forward(model_from_params(cfg, isolated), return_trace=True)
    latents, _, text = case_inputs(io, 0)  # batch 1, 3 frames
    steps = np.array([[999.0, 500.0, 3.0]], np.float32)
    out, trace = forward(state, latents, steps, text)
    for j, t in enumerate(steps[0]):
        uniform, uniform_trace = forward(state, latents, np.full_like(steps, t), text)
        np.testing.assert_allclose(out[:, j], uniform[:, j], rtol=0, atol=2e-6)
        np.testing.assert_array_equal(uniform_trace["temb_text"], uniform_trace["temb"][:, 0])
    np.testing.assert_allclose(trace["temb_text"], np.asarray(trace["temb"]).mean(axis=1), rtol=1e-6, atol=1e-7)
    # A (B,) timestep is the broadcast row.
    np.testing.assert_array_equal(forward(state, latents, steps[:, :1].reshape(1), text)[0],
                                  forward(state, latents, np.repeat(steps[:, :1], 3, axis=1), text)[0])


def test_frame_mean_uniform_is_exact():
    temb = jnp.broadcast_to(jnp.array([[0.1, 0.7, 1 / 3]]), (1, 7, 3))
    np.testing.assert_array_equal(frame_mean(temb), temb[:, 0])


@pytest.mark.parametrize("change, message", [
    (dict(text=(1, 5, 32)), "max_text_seq_length"),
    (dict(text=(1, 8, 16)), "text_embed_dim"),
    (dict(latents=(1, 3, 6, 7, 4)), "not divisible by patch_size"),
    (dict(latents=(1, 3, 6, 8, 3)), "channels"),
    (dict(timesteps=(1, 2)), "per frame"),
])
def test_bad_inputs_fail_before_compile(change, message):
    cfg = DiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                    time_embed_dim=32, text_embed_dim=32, num_layers=1, max_text_seq_length=8)
    model = nnx_abstract(cfg)
    shapes = {**dict(latents=(1, 3, 6, 8, 4), timesteps=(1, 3), text=(1, 8, 32)), **change}
    args = [jax.ShapeDtypeStruct(shapes[n], jnp.float32) for n in ("latents", "timesteps", "text")]
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda *a: model(*a), *args)


def nnx_abstract(cfg):
    from flax import nnx

    return nnx.eval_shape(lambda: CogVideoXDiT(cfg, rngs=nnx.Rngs(0)))


def test_unsupported_config_is_rejected():
    with pytest.raises(ConfigError, match="use_rotary_positional_embeddings"):
        DiTConfig(use_rotary_positional_embeddings=True)
    with pytest.raises(ConfigError, match="divisible by 16"):
        DiTConfig(num_attention_heads=3, attention_head_dim=10)


def _all_shapes(jaxpr, out):
    """Every intermediate shape of a jaxpr, nested jaxprs (scan, map, jit) included."""
    for eqn in jaxpr.eqns:
        out.extend(tuple(v.aval.shape) for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _all_shapes(inner, out)
    return out


@pytest.mark.parametrize("backend, dense", [("auto", False), ("xla", True)])
def test_full_size_never_builds_the_score_matrix(backend, dense):
    """Traces (no compile, no weights) the full-size RepVideo-2B at 13×60×90 latents: 17,776 tokens."""
    from flax import nnx

    from convert.cogvideox import abstract_model
    from jax_repvideo.models.dit import load_dit_config

    cfg = load_dit_config(__import__("pathlib").Path(__file__).parents[1] / "configs" / "repvideo_2b.yaml")
    graphdef, state = nnx.split(abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                               attention_backend=backend))
    args = (jax.ShapeDtypeStruct((1, 13, 60, 90, 16), jnp.bfloat16), jax.ShapeDtypeStruct((1, 13), jnp.float32),
            jax.ShapeDtypeStruct((1, 226, 4096), jnp.bfloat16))
    jaxpr = jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)
    square = [s for s in _all_shapes(jaxpr.jaxpr, []) if sum(d >= 17776 for d in s) >= 2]
    assert bool(square) == dense, square[:3]

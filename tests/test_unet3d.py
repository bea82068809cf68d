"""VideoCrafter2 3D U-Net: fixture parity (CLI and block by block), per-frame timesteps, Q-cache,
input and config validation. Three U-Net compiles in all (batch 1, batch 2, batch 1 with Q-cache)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_repvideo import cli
from jax_repvideo.caches import DEFAULT_QCACHE_MAP, QCacheConfig, qcache_weights
from jax_repvideo.config import ConfigError, load
from jax_repvideo.models.unet3d import UNet3DConfig, validate_config, validate_inputs, validate_qcache
from jax_repvideo.models.unet_blocks import Attention, KeySource
from jax_repvideo.verify import relative_error
from jax_repvideo.verify import videocrafter2_unet as V

TOL = 1e-4


@pytest.fixture(scope="module")
def fixture_dir(fixtures_dir):
    return fixtures_dir / "videocrafter2"


@pytest.fixture(scope="module")
def model(fixture_dir):
    return V.load_model(fixture_dir)[0]


@pytest.fixture(scope="module")
def cases(fixture_dir):
    return V.load_cases(fixture_dir)


@pytest.fixture(scope="module")
def results(model, cases):
    """Every case through the shared jitted forward (the CLI's; same graphdef ⇒ same compile)."""
    return {name: V.run_case(model, case) for name, case in cases.items()}


def test_cli_verify_passes(fixture_dir, capsys):
    assert cli.main(["verify", "videocrafter2-unet", str(fixture_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("ok" in line for line in lines) == 6, lines


@pytest.mark.parametrize("name", ["case0", "case1", "case2", "case3", "case4", "case5"])
def test_case_output(results, cases, name):
    assert relative_error(results[name][0], cases[name]["out"]) <= TOL


@pytest.mark.parametrize("name", ["case0", "case3"])
def test_blocks_match(results, cases, name):
    """Every recorded activation: h_in_*, h_init_attn, h_mid, h_out_*, embeddings, queries."""
    ours, ref = results[name][1], cases[name]
    recorded = [k for k in ref if k.startswith(("h_", "q/", "time_embed", "fps_embedding"))]
    assert len(recorded) >= 28
    errors = {}
    for key in recorded:
        mine = np.asarray(ours[key])
        if key == "time_embed_out":  # ours is per frame (B, T, E); uniform cases record (B, E)
            mine = mine[:, 0] if ref[key].shape[0] == mine.shape[0] else mine[0]
        errors[key] = relative_error(V.activation_to_torch_layout(mine) if key.startswith("h_") else mine, ref[key])
    bad = {k: e for k, e in errors.items() if e > TOL}
    assert not bad, f"blocks off: {bad}"


def test_uniform_equals_per_frame(results):
    """case4 (all frames at case0's timestep, per-frame mode) equals case0."""
    np.testing.assert_array_equal(results["case4"][0], results["case0"][0])


def test_batch2_per_frame_equals_two_batch1_calls(model, cases):
    c0, c2 = V.case_inputs(cases["case0"]), V.case_inputs(cases["case2"])
    steps = np.array([[428, 571, 714, 856], [80, 263, 864, 400]], np.int32)
    x = np.concatenate([c0[0], c2[0][1:]])
    ctx = np.concatenate([c0[2], c2[2][1:]])
    fps = np.array([8, 16], np.int32)
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("float32"):
        both = np.asarray(V.apply(graphdef, state, x, steps, ctx, fps)[0])
        for i in range(2):
            one = V.apply(graphdef, state, x[i:i + 1], steps[i:i + 1], ctx[i:i + 1], fps[i:i + 1])[0]
            assert relative_error(both[i:i + 1], one) <= 1e-6


# ---------------------------------------------------------------------------------------- Q-cache
@functools.partial(jax.jit, static_argnums=0)
def _qcache_apply(graphdef, state, x, timesteps, context, fps, v):
    model = nnx.merge(graphdef, state)
    return model(x, timesteps, context, fps, qcache=QCacheConfig(enabled=True), qcache_weights=v,
                 return_qcache=True)


def _run_qcache(model, inputs, v):
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("float32"):
        return _qcache_apply(graphdef, state, *inputs, jnp.full(inputs[1].shape, v, jnp.float32))


def test_qcache_v0_is_bit_identical_and_captures_fixture_queries(model, cases, results):
    out, cache = _run_qcache(model, V.case_inputs(cases["case0"]), 0.0)
    np.testing.assert_array_equal(V.to_torch_layout(out), results["case0"][0])
    for path in ("input_blocks.1.2", "input_blocks.2.2", "input_blocks.4.2", "input_blocks.5.2",
                 "input_blocks.7.2", "input_blocks.8.2", "init_attn.0", "middle_block.2"):
        ref = cases["case0"][f"q/{path}.transformer_blocks.0.attn1.to_q"]
        assert cache[path].shape == ref.shape  # (B·H·W, T, C), rows (b, h, w)
        assert relative_error(cache[path], ref) <= TOL, path


def test_qcache_v1_runs_decoder_on_encoder_queries(model, cases, results):
    """With v = 1 the mapped decoder queries are fully replaced: their to_q weights stop mattering."""
    inputs = V.case_inputs(cases["case0"])
    out_v1, _ = _run_qcache(model, inputs, 1.0)
    assert relative_error(V.to_torch_layout(out_v1), results["case0"][0]) > 1e-3  # the cache does act
    graphdef, state = nnx.split(model)
    perturbed = jax.tree.map(lambda a: a, state)
    for target in DEFAULT_QCACHE_MAP:
        block, j = target.rsplit(".", 1)
        group, i = block.split(".")
        kernel = perturbed[group][int(i)][int(j)]["transformer_blocks"][0]["attn1"]["to_q"]["kernel"]
        kernel.set_value(kernel[...] * 3.0 + 1.0)
    other = nnx.merge(graphdef, perturbed)
    out_other, _ = _run_qcache(other, inputs, 1.0)
    np.testing.assert_array_equal(out_other, out_v1)
    out_half, _ = _run_qcache(model, inputs, 0.5)
    out_half_other, _ = _run_qcache(other, inputs, 0.5)
    assert relative_error(out_half_other, out_half) > 1e-3  # at v = 0.5 the decoder query still counts


def test_qcache_schedules():
    steps = jnp.array([[0, 250, 500, 999]])
    np.testing.assert_allclose(qcache_weights(QCacheConfig(enabled=True), steps), [[0.9] * 4])
    linear = QCacheConfig(enabled=True, schedule="linear", values=(0.9, 0.8), timestep_range=(999.0, 0.0))
    np.testing.assert_allclose(qcache_weights(linear, steps), [[0.8, 0.8 + 0.1 * 250 / 999, 0.8 + 0.1 * 500 / 999,
                                                                 0.9]], rtol=1e-6)
    clamp = QCacheConfig(enabled=True, schedule="linear", values=(1.0, 0.0), timestep_range=(800.0, 200.0))
    np.testing.assert_allclose(qcache_weights(clamp, jnp.array([999, 800, 500, 200, 0])), [1, 1, 0.5, 0, 0])
    with pytest.raises(ValueError, match="takes 2"):
        QCacheConfig(schedule="linear", values=(0.9,))
    assert hash(QCacheConfig()) == hash(QCacheConfig())


def test_qcache_map_validation():
    cfg = load(UNet3DConfig, "configs/tiny_unet.yaml")
    validate_qcache(cfg, QCacheConfig(enabled=True))
    with pytest.raises(ValueError, match="does not match"):
        validate_qcache(cfg, QCacheConfig(enabled=True, map={"output_blocks.3.2": "input_blocks.1.2"}))
    with pytest.raises(ValueError, match="not a temporal transformer"):
        validate_qcache(cfg, QCacheConfig(enabled=True, map={"output_blocks.2.2": "input_blocks.8.2"}))
    with pytest.raises(ValueError, match="must run before"):
        validate_qcache(cfg, QCacheConfig(enabled=True, map={"input_blocks.8.2": "output_blocks.3.2"}))


# ------------------------------------------------------------------------------------- validation
def test_bad_inputs_fail_before_compile(model, cases):
    x, steps, ctx, fps = V.case_inputs(cases["case0"])
    cfg = model.config
    with pytest.raises(ValueError, match="divisible by 2"):
        validate_inputs(cfg, (1, 4, 12, 16, 4), (1, 4), ctx.shape)
    with pytest.raises(ValueError, match="context width"):
        model(x, steps, ctx[..., :16], fps)
    with pytest.raises(ValueError, match="timesteps must have shape"):
        model(x, steps[:, :3], ctx, fps)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        model(x, steps + 500, ctx, fps)
    with pytest.raises(ValueError, match="channels-last"):
        model(np.moveaxis(x, -1, 1), steps, ctx, fps)
    validate_inputs(cfg, x.shape, steps.shape, (1, 4, 8, 32))  # per-frame context is fine


def test_presets_match_fixture_and_manifest(fixture_dir):
    import json

    tiny = json.loads((fixture_dir / "unet_config.json").read_text())
    assert load(UNet3DConfig, "configs/tiny_unet.yaml") == UNet3DConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in tiny.items()})
    full = json.loads((fixture_dir / "checkpoint_manifest.json").read_text())["unet_config"]
    preset = load(UNet3DConfig, "configs/videocrafter2_512.yaml", section="videocrafter2.unet")
    assert preset == UNet3DConfig()
    for key, value in full.items():
        assert getattr(preset, key) == (tuple(value) if isinstance(value, list) else value), key
    with pytest.raises(ConfigError, match="model_chanels"):
        load(UNet3DConfig, "configs/tiny_unet.yaml", ["model_chanels=8"])


@pytest.mark.parametrize("option", ["use_scale_shift_norm=true", "resblock_updown=true", "dims=3",
                                    "use_image_attention=true", "temporal_selfatt_only=false"])
def test_unsupported_options_refused(option):
    cfg = load(UNet3DConfig, "configs/tiny_unet.yaml", [option])
    with pytest.raises(ValueError, match=option.split("=")[0]):
        validate_config(cfg)


# --------------------------------------------------------- causal / relative-position attention
def _attention(relative_length, seed=0):
    return Attention(32, 32, 2, 16, relative_length=relative_length, backend="xla", dtype=jnp.float32,
                     param_dtype=jnp.float32, rngs=KeySource(jax.random.key(seed)))


def test_causal_temporal_attention_sees_only_the_past():
    attn = _attention(0)
    x = jax.random.normal(jax.random.key(1), (3, 5, 32))
    changed = x.at[:, 3:].set(jax.random.normal(jax.random.key(2), (3, 2, 32)))  # new frames 3, 4
    causal, causal_changed = attn(x, causal=True), attn(changed, causal=True)
    np.testing.assert_array_equal(causal[:, :3], causal_changed[:, :3])  # frames 0-2 see only 0-2
    assert relative_error(causal_changed[:, 3:], causal[:, 3:]) > 1e-3
    assert relative_error(attn(changed)[:, :3], attn(x)[:, :3]) > 1e-3  # without the mask they would change
    np.testing.assert_allclose(causal[:, 0], attn(x[:, :1])[:, 0], rtol=1e-5, atol=1e-6)  # frame 0 attends to itself


def test_relative_position_attention():
    attn = _attention(2)
    x = jax.random.normal(jax.random.key(1), (3, 6, 32))
    np.testing.assert_allclose(attn(x), _attention(0)(x), rtol=1e-5, atol=1e-6)  # zero tables = plain
    table_k = jax.random.normal(jax.random.key(2), (5, 16))
    table_v = jax.random.normal(jax.random.key(3), (5, 16))
    attn.relative_position_k.set_value(table_k)
    attn.relative_position_v.set_value(table_v)
    # Reference straight from spec §2.8: logits q·k + q·r_k(k−q), output Σ p·(v + r_v(k−q)).
    q = attn.to_q(x).reshape(3, 6, 2, 16)
    k = attn.to_k(x).reshape(3, 6, 2, 16)
    v = attn.to_v(x).reshape(3, 6, 2, 16)
    idx = np.clip(np.arange(6)[None, :] - np.arange(6)[:, None], -2, 2) + 2
    rk, rv = np.asarray(table_k)[idx], np.asarray(table_v)[idx]
    logits = (np.einsum("bqhd,bkhd->bhqk", q, k) + np.einsum("bqhd,qkd->bhqk", q, rk)) / 4.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v) + np.einsum("bhqk,qkd->bqhd", p, rv)
    expected = attn.to_out(jnp.asarray(out.reshape(3, 6, 32)))
    np.testing.assert_allclose(attn(x), expected, rtol=1e-4, atol=1e-5)


def test_full_size_forward_shapes_with_default_qcache_map():
    """Abstract (traced, never compiled) full-size forward at (2·16, 40, 64): the default map fits
    the real U-Net and the captured queries have the spec's shapes."""
    from jax_repvideo.models.unet3d import UNet3D

    cfg = UNet3DConfig()
    abstract = nnx.eval_shape(lambda: UNet3D(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    graphdef, state = nnx.split(abstract)

    def forward(state, x, t, ctx, fps):
        return nnx.merge(graphdef, state)(x, t, ctx, fps, qcache=QCacheConfig(enabled=True), return_qcache=True)

    x = jax.ShapeDtypeStruct((2, 16, 40, 64, 4), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    ctx = jax.ShapeDtypeStruct((2, 77, 1024), jnp.bfloat16)
    out, cache = jax.eval_shape(forward, state, x, t, ctx, jax.ShapeDtypeStruct((2,), jnp.int32))
    assert out.shape == (2, 16, 40, 64, 4) and out.dtype == jnp.bfloat16
    assert cache["input_blocks.1.2"].shape == (2 * 40 * 64, 16, 320)  # 5 heads × 64 → (12800, 16, 64) per video
    assert cache["input_blocks.8.2"].shape == (2 * 10 * 16, 16, 1280)
    assert cache["init_attn.0"].shape == (2 * 40 * 64, 16, 512)


def test_frame_context_rows():
    from jax_repvideo.models.unet3d import frame_context

    shared = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # (B, L, D)
    rows = np.asarray(frame_context(shared, 4))
    assert rows.shape == (8, 3, 2)
    np.testing.assert_array_equal(rows[5], shared[1])  # row b·T + t
    per_frame = np.stack([shared + 100 * k for k in range(4)], axis=1)  # (B, T, L, D)
    np.testing.assert_array_equal(np.asarray(frame_context(per_frame, 4))[6], shared[1] + 200)

"""analysis.py: frame-similarity definitions, attention-map extraction, and `jax-repvideo analyze`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_repvideo import analysis, cli
from jax_repvideo.config import ConfigError
from jax_repvideo.models.dit import CogVideoXDiT, DiTConfig


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_similarity_variants_match_their_definitions():
    x = np.random.default_rng(0).normal(size=(4, 6, 5)).astype(np.float32)
    per_token = np.asarray(analysis.per_token_similarity(jnp.asarray(x)))
    flattened = np.asarray(analysis.flattened_similarity(jnp.asarray(x)))
    want_tok = [np.mean([_cos(x[j, p], x[j + 1, p]) for p in range(6)]) for j in range(3)]
    want_flat = [_cos(x[j].ravel(), x[j + 1].ravel()) for j in range(3)]
    np.testing.assert_allclose(per_token, want_tok, rtol=1e-5)
    np.testing.assert_allclose(flattened, want_flat, rtol=1e-5)
    same = jnp.broadcast_to(jnp.asarray(x[:1]), x.shape)
    np.testing.assert_allclose(analysis.frame_similarities(same), 1.0, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_dit():
    cfg = DiTConfig(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16,
                    text_embed_dim=8, num_layers=3, sample_width=4, sample_height=4, sample_frames=9,
                    max_text_seq_length=3, repvideo=True)
    model = CogVideoXDiT(cfg, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    latents = jax.random.normal(keys[0], (1, 3, 4, 4, 4))
    text = jax.random.normal(keys[1], (1, 3, 8))
    _, trace = model(latents, jnp.asarray([[500.0, 400.0, 300.0]]), text, return_trace=True)
    return model, trace


def test_attention_map_reproduces_the_block_attention(tiny_dit):
    model, trace = tiny_dit
    layer, text_len = 1, 3
    probs = analysis.attention_map(model, trace, layer)  # (heads, S, S)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    # probs @ V, through to_out, must equal the block's own attention output on the same input.
    block = analysis._block(model, layer)
    h, temb, temb_text = trace["input_gated"][layer], trace["temb"], trace["temb_text"]
    s, _ = block.norm1(h, temb, temb_text, text_len)
    v = block.attn1.to_v(s).reshape(s.shape[1], 2, -1)
    ours = block.attn1.to_out(jnp.einsum("hqk,khd->qhd", probs, v).reshape(1, s.shape[1], -1))
    ref = block.attn1(s)
    err = float(jnp.abs(ours - ref).max() / jnp.abs(ref).max())
    assert err < 1e-5, err
    # frame_attention condenses the same map: video queries of frame j → [text, frame 0, 1, 2].
    fa = analysis.frame_attention(model, trace, layer)
    per = 4  # (4/2)² tokens per frame
    rows = probs[:, text_len + per:text_len + 2 * per]  # queries of frame 1
    want = jnp.stack([rows[..., :text_len].sum(-1)] + [rows[..., text_len + k * per:text_len + (k + 1) * per].sum(-1)
                                                       for k in range(3)], -1).mean(1)
    np.testing.assert_allclose(fa[:, 1], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fa.sum(-1), 1.0, rtol=1e-5)


def test_zero_gates_leaves_the_original_params(tiny_dit):
    model, _ = tiny_dit
    _, state = nnx.split(model)
    zeroed = analysis.zero_gates(state)
    assert float(jnp.abs(zeroed["gates"][...]).max()) == 0.0
    assert float(state["gates"][...].min()) == 0.5


def test_analyze_repvideo_writes_plot_and_json(tmp_path):
    out = tmp_path / "rep"
    assert cli.main(["analyze", "configs/tiny_fifo_repvideo.yaml", "analysis.steps=2", f"analysis.out={out}"]) == 0
    assert (out / "similarity.png").stat().st_size > 1000
    data = json.loads((out / "similarity.json").read_text())
    assert data["family"] == "cogvideox" and data["frames"] == 4 and set(data["runs"]) == {"main", "gates 0"}
    main, base = data["runs"]["main"], data["runs"]["gates 0"]
    sims = np.asarray(main["per_token"])
    assert sims.shape == (2, 8, 3) and np.asarray(main["flattened"]).shape == (2, 8, 3)
    assert np.all(np.abs(sims) <= 1.0 + 1e-6)
    # Same noise; gates 0 and 1 are inert (spec §1.2): at the first step blocks 0 and 1 agree with the
    # gate-less baseline and block 2 does not (later steps follow different trajectories).
    base_sims = np.asarray(base["per_token"])
    np.testing.assert_allclose(sims[0, :2], base_sims[0, :2], rtol=1e-5)
    assert np.abs(sims[0, 2] - base_sims[0, 2]).max() > 1e-5
    fa = np.asarray(main["frame_attention"])
    assert main["attention_layer"] == 7 and fa.shape == (2, 4, 5)
    np.testing.assert_allclose(fa.sum(-1), 1.0, rtol=1e-5)


def test_analyze_unet_block_outputs(tmp_path):
    out = tmp_path / "vc2"
    assert cli.main(["analyze", "configs/tiny_fifo.yaml", "height=32", "width=32", "analysis.steps=2",
                     "analysis.frames=4", "analysis.compare=false", f"analysis.out={out}"]) == 0
    data = json.loads((out / "similarity.json").read_text())
    run = data["runs"]["main"]
    assert data["variant"] == "qcache on" and list(data["runs"]) == ["main"]
    assert run["layers"][0] == "input_blocks.0" and "middle_block" in run["layers"]
    assert np.asarray(run["per_token"]).shape == (2, len(run["layers"]), 3)
    assert np.isfinite(run["flattened"]).all()
    assert (out / "similarity.png").is_file()


def test_analysis_config_is_strict():
    with pytest.raises(ConfigError, match="analysis.bogus"):
        analysis.load("configs/tiny_cogvideox.yaml", ["analysis.bogus=1"])
    with pytest.raises(ConfigError, match="frames"):
        analysis.load("configs/tiny_cogvideox.yaml", ["analysis.frames=1"])
    cfg, acfg = analysis.load("configs/tiny_cogvideox.yaml", ["analysis.steps=3", "seed=5"])
    assert acfg.steps == 3 and cfg.seed == 5

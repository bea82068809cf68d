"""VideoCrafter2 KL autoencoder: fixture parity through the CLI, chunked video decode, key coverage, bad input."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.common import CheckpointError, check_keys_only, load_torch_state_dict, strip_prefix
from convert.videocrafter2_vae import PREFIX, RULES, abstract_vae, convert_vae
from jax_repvideo.cli import main
from jax_repvideo.config import load
from jax_repvideo.models.vae_kl import AutoencoderKLConfig, from_ldm_config

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "fixtures" / "videocrafter2" / "checkpoint_manifest.json"


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return fixtures_dir / "vc2_vae_text"


@pytest.fixture(scope="module")
def tiny_cfg():
    return load(AutoencoderKLConfig, ROOT / "configs" / "tiny_vae_kl.yaml")


@pytest.fixture(scope="module")
def state(fixture):
    return strip_prefix(load_torch_state_dict(fixture / "vae.ckpt"), PREFIX)


def test_verify_cli_passes(fixture, capsys):
    assert main(["verify", "videocrafter2-vae", str(fixture)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 11 and all(line.endswith("ok") for line in lines)


def test_verify_cli_fails_on_a_wrong_reference(fixture, tmp_path):
    for name in ("vae_config.json", "vae.ckpt"):
        shutil.copy(fixture / name, tmp_path / name)
    io = dict(np.load(fixture / "vae_io.npz"))
    io["decode_x"] = io["decode_x"] * 1.001
    np.savez(tmp_path / "vae_io.npz", **io)
    assert main(["verify", "videocrafter2-vae", str(tmp_path)]) == 1


def test_tiny_preset_matches_the_fixture_config(fixture, tiny_cfg):
    assert from_ldm_config(json.loads((fixture / "vae_config.json").read_text())) == tiny_cfg


def test_chunked_video_decode_and_encode_equal_one_shot():
    cfg = AutoencoderKLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)  # smaller than the fixture: fast compile
    graphdef, params = nnx.split(abstract_vae(cfg))
    rng = np.random.default_rng(0)  # numpy weights: nnx's truncated-normal init costs seconds to compile
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]) or 10),
                                                a.dtype), params)
    z = jax.random.normal(jax.random.key(1), (2, 3, 4, 6, cfg.embed_dim))

    @jax.jit
    def decode(params, z):
        model = nnx.merge(graphdef, params)
        one_shot = model.decode_latents(z.reshape(6, 4, 6, -1)).reshape(2, 3, 8, 12, -1)
        chunked = model.decode_video(z, frame_chunk=4)  # 6 frames → chunks of 4: 2 + 2 padding frames
        encoded = model.encode_latents(one_shot.reshape(6, 8, 12, -1)).reshape(2, 3, 4, 6, -1)
        return one_shot, chunked, encoded, model.encode_video(one_shot, frame_chunk=4)

    one_shot, chunked, encoded, encoded_chunked = decode(params, z)
    assert chunked.shape == (2, 3, 8, 12, 3) and encoded_chunked.shape == z.shape
    assert np.isfinite(one_shot).all() and float(jnp.abs(one_shot).max()) > 0.1
    np.testing.assert_allclose(chunked, one_shot, rtol=0, atol=1e-5 * float(jnp.abs(one_shot).max()))
    np.testing.assert_allclose(encoded_chunked, encoded, rtol=0, atol=1e-5 * float(jnp.abs(encoded).max()))


def test_full_size_keys_map_onto_the_full_size_model():
    entries = json.loads(MANIFEST.read_text())["state_dict"]
    shapes = strip_prefix({e["key"]: e["shape"] for e in entries}, PREFIX)
    assert len(shapes) == 248
    check_keys_only(shapes, RULES, nnx.state(abstract_vae(), nnx.Param), what="VideoCrafter2 VAE manifest")


def test_wrong_latent_channels_are_refused(tiny_cfg):
    model = abstract_vae(tiny_cfg)
    with pytest.raises(ValueError, match=r"C=4.*\(2, 4, 8, 12, 8\)"):
        model.decode_video(jnp.zeros((2, 4, 8, 12, 8)))
    with pytest.raises(ValueError, match="C=4"):  # channels-first video is caught too
        model.decode_video(jnp.zeros((2, 4, 3, 8, 12)))
    with pytest.raises(ValueError, match="C=3"):
        model.encode(jnp.zeros((1, 32, 32, 4)))


def test_missing_key_is_named(state, tiny_cfg):
    broken = dict(state)
    del broken["decoder.up.1.upsample.conv.weight"]
    with pytest.raises(CheckpointError, match=r"decoder\.up\.1\.upsample\.conv\.kernel"):
        convert_vae(broken, tiny_cfg)


def test_misshaped_key_is_named(state, tiny_cfg):
    broken = dict(state)
    broken["encoder.mid.attn_1.q.weight"] = np.zeros((64, 32, 1, 1), np.float32)
    with pytest.raises(CheckpointError, match=r"encoder\.mid\.attn_1\.q\.weight.*\(1, 1, 32, 64\)"):
        convert_vae(broken, tiny_cfg)


def test_unexpected_key_is_named(state, tiny_cfg):
    with pytest.raises(CheckpointError, match=r"encoder\.mid\.attn_2\.q"):
        convert_vae({**state, "encoder.mid.attn_2.q.weight": state["encoder.mid.attn_1.q.weight"]}, tiny_cfg)


def test_whole_checkpoint_routes_vae_and_text_groups(fixtures_dir, state, tiny_cfg, monkeypatch):
    """``convert.videocrafter2`` hands ``first_stage_model.*`` / ``cond_stage_model.model.*`` to our converters."""
    import convert.videocrafter2 as whole
    from convert.videocrafter2_text import convert_text
    from jax_repvideo.models.text_clip import OpenCLIPTextConfig

    # The U-Net group is its own converter's business (and slow to trace): stub it out here.
    monkeypatch.setattr(whole, "convert_unet", lambda sub_state, cfg: {"stub": np.zeros(1)})
    text_cfg = load(OpenCLIPTextConfig, ROOT / "configs" / "tiny_clip.yaml")
    text_state = load_torch_state_dict(fixtures_dir / "vc2_vae_text" / "text.ckpt")
    combined = {"model.diffusion_model.stub": np.zeros(1), **{PREFIX + k: v for k, v in state.items()}, **text_state}
    flat, config = whole.convert_checkpoint(combined, None, tiny_cfg, text_cfg)
    assert config["groups"] == ["unet", "vae", "text"] and config["vae"]["ch_mult"] == [1, 2, 2]
    expected = {**{f"vae.{k}": v for k, v in convert_vae(state, tiny_cfg).items()},
                **{f"text.{k}": v for k, v in convert_text(strip_prefix(text_state, "cond_stage_model.model."),
                                                           text_cfg).items()}}
    assert set(flat) == set(expected) | {"unet.stub"}
    for key, value in expected.items():
        np.testing.assert_array_equal(flat[key], value)

"""DiT converters: RepVideo SAT and diffusers CogVideoX, strictness, full-size coverage, live diffusers parity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convert import cogvideox, repvideo
from convert.common import CheckpointError, load_safetensors
from jax_repvideo import checkpoint, cli
from jax_repvideo.models.dit import load_dit_config

REPO = __import__("pathlib").Path(__file__).parents[1]


@pytest.fixture(scope="module")
def fixture_dir(fixtures_dir):
    return fixtures_dir / "repvideo"


@pytest.fixture(scope="module")
def sat_state(fixture_dir):
    return {k: v.numpy() for k, v in load_safetensors([fixture_dir / "weights.safetensors"]).items()}


@pytest.fixture(scope="module")
def sat_cfg(fixture_dir):
    return repvideo.read_config(fixture_dir)


@pytest.fixture(scope="module")
def diffusers_state(fixture_dir):
    return {k: v.numpy() for k, v in load_safetensors([fixture_dir / "weights_diffusers.safetensors"]).items()}


@pytest.fixture(scope="module")
def diffusers_cfg(fixture_dir):
    config = json.loads((fixture_dir / "config.json").read_text())["diffusers_baseline_config"]
    return cogvideox.config_from_diffusers(config)


# ------------------------------------------------------------------ the two key tables agree
def test_sat_and_diffusers_give_the_same_params(sat_state, sat_cfg, diffusers_state, diffusers_cfg):
    ours_sat = repvideo.convert_sat_state(sat_state, sat_cfg)
    ours_diffusers = cogvideox.convert_diffusers_state(diffusers_state, diffusers_cfg)
    assert set(ours_sat) - set(ours_diffusers) == {"gates"}
    for key, value in ours_diffusers.items():
        np.testing.assert_array_equal(ours_sat[key], value, err_msg=key)
    np.testing.assert_array_equal(ours_sat["gates"], sat_state["transformer.learnable_gating"])


def test_sat_prefixed_torch_file_under_module(tmp_path, fixture_dir, sat_state, sat_cfg):
    """The released layout: latest → 35000/mp_rank_00_model_states.pt, {"module": {prefix + key: tensor}}."""
    import torch

    (tmp_path / "latest").write_text("35000\n")
    (tmp_path / "35000").mkdir()
    (tmp_path / "config.json").write_text((fixture_dir / "config.json").read_text())
    module = {repvideo.PREFIX + k: torch.from_numpy(v.copy()) for k, v in sat_state.items()}
    torch.save({"module": module, "iteration": 35000}, tmp_path / "35000" / "mp_rank_00_model_states.pt")
    cfg, flat = repvideo.load_repvideo(tmp_path)
    assert cfg == sat_cfg
    expected = repvideo.convert_sat_state(sat_state, sat_cfg)
    for key, value in expected.items():
        np.testing.assert_array_equal(flat[key], value, err_msg=key)


# ------------------------------------------------------------------ strictness
def _sat_broken(state, kind):
    state = dict(state)
    if kind == "missing":
        del state["transformer.layers.3.attention.dense.weight"]
        return state, "transformer.layers.3.attention.dense.weight"
    if kind == "extra":
        state["transformer.layers.3.attention.rotary.weight"] = np.zeros((4,), np.float32)
        return state, "transformer.layers.3.attention.rotary.weight"
    key = "mixins.adaln_layer.adaLN_modulations.5.1.weight"
    state[key] = state[key][:-1]
    return state, key


def _diffusers_broken(state, kind):
    state = dict(state)
    if kind == "missing":
        del state["transformer_blocks.7.ff.net.2.bias"]
        return state, "transformer_blocks.7.ff.net.2.bias"
    if kind == "extra":
        state["transformer_blocks.7.attn1.to_add_out.weight"] = np.zeros((4,), np.float32)
        return state, "transformer_blocks.7.attn1.to_add_out.weight"
    key = "proj_out.weight"
    state[key] = state[key][:, :-2]
    return state, key


@pytest.mark.parametrize("kind", ["missing", "extra", "misshaped"])
def test_sat_bad_checkpoint_names_the_key(sat_state, sat_cfg, kind):
    state, key = _sat_broken(sat_state, kind)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        repvideo.convert_sat_state(state, sat_cfg)


@pytest.mark.parametrize("kind", ["missing", "extra", "misshaped"])
def test_diffusers_bad_checkpoint_names_the_key(diffusers_state, diffusers_cfg, kind):
    state, key = _diffusers_broken(diffusers_state, kind)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        cogvideox.convert_diffusers_state(state, diffusers_cfg)


# ------------------------------------------------------------------ full-size coverage, no weights allocated
@pytest.fixture(scope="module")
def manifest(fixture_dir):
    return json.loads((fixture_dir / "checkpoint_manifest.json").read_text())


def test_full_size_repvideo_sat_manifest(manifest):
    tensors = manifest["repvideo_2b_sat"]["tensors"]
    cfg = load_dit_config(REPO / "configs" / "repvideo_2b.yaml")
    repvideo.check_manifest({t["checkpoint_key"]: t["shape"] for t in tensors}, cfg)
    repvideo.check_manifest({t["key"]: t["shape"] for t in tensors}, cfg)  # unprefixed names
    broken = {t["key"]: t["shape"] for t in tensors if t["key"] != "transformer.learnable_gating"}
    with pytest.raises(CheckpointError, match="transformer.learnable_gating"):
        repvideo.check_manifest(broken, cfg)


def test_full_size_diffusers_manifest(manifest):
    tensors = manifest["cogvideox_2b_diffusers"]["tensors"]
    cfg = load_dit_config(REPO / "configs" / "cogvideox_2b.yaml")
    assert len(tensors) == 736
    cogvideox.check_manifest({t["key"]: t["shape"] for t in tensors}, cfg)
    wrong = {t["key"]: t["shape"] for t in tensors}
    wrong["transformer_blocks.29.attn1.norm_k.weight"] = [32]
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.29\.attn1\.norm_k\.weight"):
        cogvideox.check_manifest(wrong, cfg)


# ------------------------------------------------------------------ convert CLI → orbax → restore
def test_convert_repvideo_cli_roundtrip(tmp_path, fixture_dir):
    import jax

    from convert.cogvideox import abstract_model
    from jax_repvideo.models.dit import DiTConfig, jit_forward

    assert cli.main(["convert", "repvideo", str(fixture_dir), str(tmp_path / "out")]) == 0
    stored = checkpoint.read_config(tmp_path / "out")
    assert stored["kind"] == "repvideo"
    cfg = DiTConfig(**stored["model"])
    model = checkpoint.restore_into(tmp_path / "out", abstract_model(cfg))
    io = np.load(fixture_dir / "io.npz")
    latents = io["case2.hidden_states"].transpose(0, 1, 3, 4, 2)
    forward, state = jit_forward(model)
    with jax.default_matmul_precision("float32"):
        out = forward(state, latents, np.broadcast_to(io["case2.timestep"][:, None], latents.shape[:2]),
                      io["case2.encoder_hidden_states"])
    ref = io["case2.output"]
    assert np.abs(np.asarray(out).transpose(0, 1, 4, 2, 3) - ref).max() / np.abs(ref).max() < 1e-5


# ------------------------------------------------------------------ live diffusers oracle
LIVE_CONFIGS = [
    # 2B-like, latent 6x10 (config says 8x8), 3 latent frames.
    (dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
          text_embed_dim=20, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
          max_text_seq_length=7), (3, 6, 10)),
    # No affine norms, no qkv bias, out != in channels, sin-first time embedding with a freq shift.
    (dict(num_attention_heads=4, attention_head_dim=8, in_channels=6, out_channels=3, time_embed_dim=16,
          text_embed_dim=12, num_layers=3, sample_width=6, sample_height=6, sample_frames=5,
          max_text_seq_length=5, attention_bias=False, norm_elementwise_affine=False, flip_sin_to_cos=False,
          freq_shift=1, norm_eps=1e-6), (2, 4, 8)),
]


def _randomize(model, torch):
    """Every parameter random (norm scales around 1), so a swapped or missed tensor shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise / np.sqrt(np.prod(param.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def _write_live_case(folder, kwargs, size, torch):
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(**kwargs).eval()
    _randomize(model, torch)
    model.save_pretrained(folder / "transformer")
    frames, height, width = size
    generator = torch.Generator().manual_seed(1)
    io = {"num_cases": np.int32(2)}
    for k, steps in enumerate(([999.0, 10.0], [500.0, 37.0])):
        hidden = torch.randn(2, frames, kwargs["in_channels"], height, width, generator=generator)
        text = torch.randn(2, kwargs["max_text_seq_length"], kwargs["text_embed_dim"], generator=generator)
        timestep = torch.tensor(steps)
        with torch.no_grad():
            out = model(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep, return_dict=False)[0]
        io.update({f"case{k}.hidden_states": hidden.numpy(), f"case{k}.encoder_hidden_states": text.numpy(),
                   f"case{k}.timestep": timestep.numpy(), f"case{k}.output": out.numpy()})
    np.savez(folder / "io.npz", **io)


@pytest.mark.parametrize("kwargs, size", LIVE_CONFIGS, ids=["2b_like", "no_affine_no_bias"])
def test_verify_cogvideox_live_diffusers(tmp_path, kwargs, size, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    _write_live_case(tmp_path, kwargs, size, torch)
    assert cli.main(["verify", "cogvideox", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "max rel err" in line]
    assert len(lines) == 2 and all(line.endswith("ok") for line in lines)
    if kwargs["num_layers"] == 2:  # a reference off by 1e-3 must fail the command
        io = dict(np.load(tmp_path / "io.npz"))
        io["case1.output"] = io["case1.output"] * (1 + 1e-3)
        np.savez(tmp_path / "io.npz", **io)
        assert cli.main(["verify", "cogvideox", str(tmp_path)]) == 1
        assert capsys.readouterr().out.splitlines()[-1].endswith("FAIL")

"""LVDM / VideoCrafter2 converter: full-size key coverage without weights, strictness, schedule
buffers, and the whole ``main`` path (orbax + config) on the fixture's U-Net."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flax import nnx

from convert import videocrafter2 as C
from convert.common import CheckpointError, check_keys_only, load_torch_state_dict, strip_prefix
from jax_repvideo import checkpoint
from jax_repvideo.config import load
from jax_repvideo.models.unet3d import UNet3DConfig


@pytest.fixture(scope="module")
def fixture_dir(fixtures_dir):
    return fixtures_dir / "videocrafter2"


@pytest.fixture(scope="module")
def tiny_cfg():
    return load(UNet3DConfig, "configs/tiny_unet.yaml")


@pytest.fixture(scope="module")
def full_state(fixture_dir):
    return load_torch_state_dict(fixture_dir / "unet.ckpt")


@pytest.fixture(scope="module")
def unet_state(full_state):
    return strip_prefix(full_state, C.UNET_PREFIX)


def test_full_size_manifest_maps_onto_abstract_unet(fixture_dir):
    manifest = json.loads((fixture_dir / "checkpoint_manifest.json").read_text())
    shapes = {e["key"][len(C.UNET_PREFIX):]: e["shape"] for e in manifest["state_dict"]
              if e["key"].startswith(C.UNET_PREFIX)}
    cfg = UNet3DConfig()
    assert len(shapes) == 1484
    assert set(C.unet_state_dict_keys(cfg)) == set(shapes)
    abstract = nnx.state(C.abstract_unet(cfg), nnx.Param)  # shapes only
    check_keys_only(shapes, C.unet_rules(cfg), abstract)
    assert sum(int(np.prod(v.shape)) for v in __import__("jax").tree.leaves(abstract)) == 1_413_284_420


def test_converts_fixture_and_counts(unet_state, tiny_cfg):
    flat = C.convert_unet(unet_state, tiny_cfg)
    assert len(flat) == 1482 and sum(v.size for v in flat.values()) == 3_008_868
    w = unet_state["input_blocks.1.0.in_layers.2.weight"].numpy()  # (O, I, 3, 3) → (3, 3, I, O)
    np.testing.assert_array_equal(flat["input_blocks.1.0.in_conv.kernel"], w.transpose(2, 3, 1, 0))
    w = unet_state["init_attn.0.proj_in.weight"].numpy()  # Conv1d (O, I, 1) → Linear (I, O)
    np.testing.assert_array_equal(flat["init_attn.0.proj_in.kernel"], w[:, :, 0].T)


KEY = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


def test_removed_key_is_named(unet_state, tiny_cfg):
    state = {k: v for k, v in unet_state.items() if k != KEY}
    with pytest.raises(CheckpointError, match="missing: model.diffusion_model." + KEY):
        C.convert_unet(state, tiny_cfg)


def test_renamed_key_is_named(unet_state, tiny_cfg):
    state = dict(unet_state)
    state[KEY.replace("to_k", "to_key")] = state.pop(KEY)
    with pytest.raises(CheckpointError) as err:
        C.convert_unet(state, tiny_cfg)
    assert KEY in str(err.value) and KEY.replace("to_k", "to_key") in str(err.value)


def test_reshaped_tensor_is_named(unet_state, tiny_cfg):
    state = dict(unet_state)
    state[KEY] = state[KEY].reshape(-1, 16)
    with pytest.raises(CheckpointError, match="to_k"):
        C.convert_unet(state, tiny_cfg)


def test_truncated_file_is_rejected(fixture_dir, tmp_path):
    data = (fixture_dir / "unet.ckpt").read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        C.main(bad, tmp_path / "out", "configs/tiny_unet.yaml")


def _with_schedule(full_state):
    state = dict(full_state)
    state.update({k: torch.from_numpy(v.astype(np.float32)) for k, v in C.schedule_buffers().items()})
    return state


def test_schedule_buffers(full_state):
    buffers = C.schedule_buffers()
    assert buffers["betas"][0] == pytest.approx(0.00085) and buffers["betas"][-1] == pytest.approx(0.012)
    assert buffers["alphas_cumprod"][0] == pytest.approx(0.99915)
    assert buffers["alphas_cumprod"][-1] == pytest.approx(0.004660, abs=1e-6)
    assert buffers["scale_arr"].shape == (1400,)
    state = _with_schedule(full_state)
    C.validate_schedule(C.split_checkpoint(state)["schedule"])
    state["betas"] = torch.linspace(1e-4, 0.02, 1000)  # the plain linear schedule: wrong for VC2
    with pytest.raises(CheckpointError, match="betas"):
        C.validate_schedule(C.split_checkpoint(state)["schedule"])


def test_stray_keys_are_named(full_state):
    state = dict(full_state)
    state["model_ema.decay"] = torch.tensor(0.999)
    with pytest.raises(CheckpointError, match="model_ema.decay"):
        C.split_checkpoint(state)


def test_main_writes_orbax_and_config(full_state, tiny_cfg, tmp_path):
    src = tmp_path / "model.ckpt"
    torch.save({"state_dict": _with_schedule(full_state), "epoch": 3}, src)
    from jax_repvideo import cli

    out = tmp_path / "converted"
    assert cli.main(["convert", "videocrafter2", str(src), str(out), "--config", "configs/tiny_unet.yaml"]) == 0
    config = checkpoint.read_config(out)
    assert config["kind"] == "videocrafter2" and config["groups"] == ["unet"]
    assert config["unet"]["model_channels"] == 32 and len(config["schedule_buffers_checked"]) == 13
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(out / checkpoint.PARAMS_DIR)
    kernel = restored["unet"]["output_blocks"]["11"]["2"]["transformer_blocks"]["0"]["attn1"]["to_q"]["kernel"]
    ref = full_state[C.UNET_PREFIX + "output_blocks.11.2.transformer_blocks.0.attn1.to_q.weight"].numpy().T
    np.testing.assert_array_equal(np.asarray(kernel), ref)


@pytest.mark.parametrize("options", [["use_relative_position=true", "use_causal_attention=true"],
                                     ["use_linear=false", "tempspatial_aware=true", "fps_cond=false"],
                                     ["temporal_conv=false", "addition_attention=false", "temporal_attention=false"]])
def test_key_table_covers_architecture_options(options):
    """Every key such a checkpoint has finds a rule whose target exists, and every param is reached."""
    cfg = load(UNet3DConfig, "configs/tiny_unet.yaml", options)
    targets = set(checkpoint_paths(cfg))
    reached = set()
    for key in C.unet_state_dict_keys(cfg):
        rule, match = next((r, r.match(key)) for r in C.unet_rules(cfg) if r.match(key))
        reached.add(match.expand(rule.target))
    assert reached == targets


def checkpoint_paths(cfg):
    from convert.common import target_shapes

    return target_shapes(nnx.state(C.abstract_unet(cfg), nnx.Param))

"""OpenCLIP text tower + CLIP tokenizer: fixture parity through the CLI, key coverage, bad input."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.common import CheckpointError, check_keys_only, load_torch_state_dict, strip_prefix
from convert.videocrafter2_text import IGNORED, PREFIX, RULES, abstract_text, convert_text
from jax_repvideo.cli import main
from jax_repvideo.config import load
from jax_repvideo.models.text_clip import OpenCLIPTextConfig, from_embedder_config
from jax_repvideo.models.tokenizer_clip import ClipTokenizer

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "fixtures" / "videocrafter2" / "checkpoint_manifest.json"


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return fixtures_dir / "vc2_vae_text"


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def tiny_cfg():
    return load(OpenCLIPTextConfig, ROOT / "configs" / "tiny_clip.yaml")


@pytest.fixture(scope="module")
def state(fixture):
    return strip_prefix(load_torch_state_dict(fixture / "text.ckpt"), PREFIX)


def test_verify_cli_passes(fixture, capsys):
    assert main(["verify", "videocrafter2-text", str(fixture)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.endswith("ok") for line in lines)


def test_verify_cli_fails_on_a_wrong_reference(fixture, tmp_path):
    for name in ("text_config.json", "text.ckpt"):
        shutil.copy(fixture / name, tmp_path / name)
    io = dict(np.load(fixture / "text_io.npz"))
    io["text_tokens"] = io["text_tokens"].copy()
    io["text_tokens"][2, 3] += 1
    np.savez(tmp_path / "text_io.npz", **io)
    assert main(["verify", "videocrafter2-text", str(tmp_path)]) == 1


def test_tokenizer_reproduces_the_fixture_rows(fixture, tokenizer):
    io = np.load(fixture / "text_io.npz")
    with pytest.warns(UserWarning, match="prompt 3 has"):
        np.testing.assert_array_equal(tokenizer(list(io["text_prompts"])), io["text_tokens"])


def test_long_prompt_is_truncated_with_a_warning(tokenizer):
    with pytest.warns(UserWarning, match="truncated"):
        row = tokenizer("a red fox " * 100)[0]
    assert row.shape == (77,) and row[0] == tokenizer.sot_token_id and row[76] == tokenizer.eot_token_id
    assert (row[1:76] != 0).all()


def test_tokenizer_cleans_like_open_clip(tokenizer):
    # ftfy + html unescape + whitespace collapse + lowercase: these spellings tokenize alike.
    np.testing.assert_array_equal(tokenizer("  A  CAT &amp;\n dog "), tokenizer("a cat & dog"))
    row = tokenizer("")[0]
    assert list(row[:3]) == [tokenizer.sot_token_id, tokenizer.eot_token_id, 0]


def test_missing_merges_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt.gz"):
        ClipTokenizer(tmp_path / "nowhere.txt.gz")


def test_tiny_preset_matches_the_fixture_config(fixture, tiny_cfg):
    assert from_embedder_config(json.loads((fixture / "text_config.json").read_text())) == tiny_cfg


def test_full_size_keys_map_onto_the_full_size_model():
    entries = json.loads(MANIFEST.read_text())["state_dict"]
    shapes = {e["key"]: e["shape"] for e in entries}
    assert set(strip_prefix(shapes, "cond_stage_model.")) == {"model." + k for k in strip_prefix(shapes, PREFIX)}
    shapes = strip_prefix(shapes, PREFIX)
    assert len(shapes) == 294
    check_keys_only(shapes, RULES, nnx.state(abstract_text(), nnx.Param), ignore=IGNORED,
                    what="VideoCrafter2 text manifest")


def test_tokens_of_the_wrong_shape_are_refused(tiny_cfg):
    with pytest.raises(ValueError, match=r"\(batch, 77\)"):
        abstract_text(tiny_cfg)(jnp.zeros((2, 64), jnp.int32))


def test_missing_layer_key_is_named(state, tiny_cfg):
    broken = dict(state)
    del broken["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match=r"transformer\.resblocks\.1\.mlp\.c_fc\.bias"):
        convert_text(broken, tiny_cfg)


def test_misshaped_layer_key_is_named(state, tiny_cfg):
    broken = dict(state)
    broken["transformer.resblocks.2.attn.in_proj_weight"] = np.zeros((32, 16), np.float32)
    with pytest.raises(CheckpointError, match=r"transformer\.resblocks\.2\.attn\.in_proj_weight.*\(16, 32\)"):
        convert_text(broken, tiny_cfg)


def test_projection_keys_are_ignored_but_others_refused(state, tiny_cfg):
    assert "text_projection" in state and "logit_scale" in state
    convert_text(state, tiny_cfg)  # ignored on purpose: the penultimate output never reads them
    with pytest.raises(CheckpointError, match="visual.proj"):
        convert_text({**state, "visual.proj": state["text_projection"]}, tiny_cfg)

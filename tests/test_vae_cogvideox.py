"""CogVideoX causal 3D VAE: live parity with a random tiny diffusers ``AutoencoderKLCogVideoX``.

One tiny diffusers VAE is built per module (no download), saved with ``save_pretrained`` and run
through ``jax-repvideo verify cogvideox-vae``. Video frame counts 1, 9 and 17 (latent 1, 3, 5)
exercise the first-frame path; 13 latent frames decode to 49. The full-size key set comes from
diffusers on the meta device.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from flax import nnx

from convert.cogvideox_vae import RULES, abstract_vae, load_model
from convert.common import CheckpointError, check_keys_only
from jax_repvideo import checkpoint, cli
from jax_repvideo.config import load, to_dict
from jax_repvideo.models import vae_cogvideox as V

CONFIG = load(V.CogVideoXVAEConfig, Path(__file__).parents[1] / "configs" / "tiny_vae_cogvideox.yaml")
LATENT_HW = (4, 6)  # non-square, so a height/width swap cannot pass


def diffusers_kwargs(cfg: V.CogVideoXVAEConfig) -> dict:
    kwargs = {k: v for k, v in to_dict(cfg).items() if k not in ("param_dtype", "dtype")}
    n = len(cfg.block_out_channels)
    return dict(kwargs, block_out_channels=tuple(cfg.block_out_channels),
                down_block_types=("CogVideoXDownBlock3D",) * n, up_block_types=("CogVideoXUpBlock3D",) * n)


def to_ours(x: np.ndarray) -> np.ndarray:   # (B, C, T, H, W) → (B, T, H, W, C)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))


def to_torch_layout(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 4, 1, 2, 3)


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(directory with vae/ and io.npz, the torch VAE, our converted model)."""
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(**diffusers_kwargs(CONFIG)).eval()
    with torch.no_grad():  # GroupNorm params start at 1/0: randomise them so their mapping is tested
        for name, p in vae.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("cogvideox_vae")
    vae.save_pretrained(directory / "vae")
    cases = {}
    for k, (batch, frames) in enumerate([(1, 1), (1, 3), (2, 5)]):  # → 1, 9, 17 video frames
        latents = torch.randn(batch, CONFIG.latent_channels, frames, *LATENT_HW)
        with torch.no_grad():
            cases[f"case{k}.frames"] = vae.decode(latents).sample.numpy()
        cases[f"case{k}.latents"] = latents.numpy()
    np.savez(directory / "io.npz", num_cases=3, **cases)
    return directory, vae, load_model(directory / "vae")


def test_verify_cli_parity(reference, capsys):
    directory, _, _ = reference
    assert cli.main(["verify", "cogvideox-vae", str(directory)]) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out)
    assert "1→1 frames" in out and "3→9 frames" in out and "5→17 frames" in out


def test_verify_exits_nonzero_above_tolerance(reference, tmp_path):
    directory, _, _ = reference
    io = dict(np.load(directory / "io.npz"))
    io["case1.frames"] = io["case1.frames"] + 1e-2 * np.abs(io["case1.frames"]).max()
    np.savez(tmp_path / "io.npz", **io)
    (tmp_path / "vae").symlink_to(directory / "vae")
    assert cli.main(["verify", "cogvideox-vae", str(tmp_path)]) == 1


def test_13_latent_frames_decode_to_49_and_stream_equals_one_shot(reference):
    _, vae, model = reference
    assert V.decoded_frames(13) == 49 and V.decoded_frames(1) == 1 and V.decoded_frames(12) == 48
    z = torch.randn(1, CONFIG.latent_channels, 13, 2, 2)
    with torch.no_grad():
        ref = vae.decode(z).sample.numpy()
    one_shot = np.asarray(V.decode(model, to_ours(z.numpy())))
    assert one_shot.shape == (1, 49, 8, 8, 3)
    assert rel_err(to_torch_layout(one_shot), ref) <= 1e-4
    # 1 + 5 chunks; 2 per call → 2, 2, then 1 padded: the cache crosses three jit calls.
    blocks = list(V.decode_stream(model, to_ours(z.numpy()), chunks_per_call=2))
    assert [b.shape[1] for b in blocks] == [9, 16, 16, 8]
    streamed = np.concatenate(blocks, axis=1)
    assert np.abs(streamed - one_shot).max() <= 1e-6 * np.abs(one_shot).max()


def test_encode_matches_diffusers(reference):
    _, vae, model = reference
    h, w = (s * CONFIG.spatial_factor for s in LATENT_HW)
    for frames in (1, 9, 17):
        x = torch.randn(1, 3, frames, h, w)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
        mean, logvar = V.encode(model, to_ours(x.numpy()))
        assert mean.shape == (1, (frames - 1) // 4 + 1, *LATENT_HW, CONFIG.latent_channels)
        assert rel_err(to_torch_layout(mean), posterior.mean.numpy()) <= 1e-4
        assert rel_err(to_torch_layout(logvar), posterior.logvar.numpy()) <= 1e-4


def test_tiled_decode_matches_diffusers_tiling(reference):
    _, vae, model = reference
    z = torch.randn(1, CONFIG.latent_channels, 1, 4, 6)  # tiles of 4×4 latents at stride 3: two across
    vae.enable_tiling()
    try:
        with torch.no_grad():
            ref = vae.decode(z).sample.numpy()
    finally:
        vae.disable_tiling()
    tiling = V.Tiling(CONFIG.sample_height // 2, CONFIG.sample_width // 2)
    ours = V.decode_tiled(model, to_ours(z.numpy()), tiling)
    assert rel_err(to_torch_layout(ours), ref) <= 1e-4


def test_bad_latents_are_refused_before_compile(reference):
    _, _, model = reference
    with pytest.raises(ValueError, match="3 channels.*takes 4"):
        V.decode(model, np.zeros((1, 2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="channels"):  # (B, C, T, h, w) passed by mistake
        V.decode(model, np.zeros((1, 4, 2, 4, 6), np.float32))
    with pytest.raises(ValueError, match=r"\(B, T, h, w, 4\)"):
        list(V.decode_stream(model, np.zeros((2, 4, 4, 4), np.float32)))


def test_convert_cli_writes_a_restorable_checkpoint(reference, tmp_path):
    directory, vae, model = reference
    assert cli.main(["convert", "cogvideox-vae", str(directory), str(tmp_path / "out")]) == 0
    cfg = V.CogVideoXVAEConfig(**{**checkpoint.read_config(tmp_path / "out")["model"],
                                  "block_out_channels": tuple(CONFIG.block_out_channels)})
    assert cfg == CONFIG
    restored = checkpoint.restore_into(tmp_path / "out", abstract_vae(cfg))
    want = vae.state_dict()["decoder.up_blocks.1.resnets.0.conv1.conv.weight"].numpy().transpose(2, 3, 4, 1, 0)
    np.testing.assert_array_equal(np.asarray(restored.decoder.up_blocks[1].resnets[0].conv1.conv.kernel[...]), want)


def test_converter_names_bad_keys(reference):
    _, vae, _ = reference
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    abstract = nnx.state(abstract_vae(CONFIG), nnx.Param)
    renamed = dict(shapes)
    renamed["decoder.mid_block.resnets.0.conv3.conv.weight"] = renamed.pop("decoder.mid_block.resnets.0.conv2.conv.weight")
    with pytest.raises(CheckpointError, match=r"lacks: decoder\.mid_block\.resnets\.0\.conv3\.conv\.kernel"):
        check_keys_only(renamed, RULES, abstract)
    shapes.pop("encoder.norm_out.weight")
    with pytest.raises(CheckpointError, match=r"not filled.*encoder\.norm_out\.scale"):
        check_keys_only(shapes, RULES, abstract)


def test_full_size_cogvideox_2b_keys_map_onto_the_model():
    """Every key of the CogVideoX-2b VAE (diffusers on the meta device) fills our full-size model."""
    full = V.CogVideoXVAEConfig()
    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(**diffusers_kwargs(full))
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert len(shapes) == 436
    abstract = nnx.state(abstract_vae(full), nnx.Param)
    check_keys_only(shapes, RULES, abstract, what="CogVideoX-2b VAE")
    assert sum(int(np.prod(s)) for s in shapes.values()) == 215_583_907


def test_full_size_decode_shapes_13_to_49_frames():
    """Traced only (no compile, no weights): 13 latent frames of 60×90 → 49 frames of 480×720."""
    import jax

    model = abstract_vae(V.CogVideoXVAEConfig())
    graphdef, state = nnx.split(model)
    z = jax.ShapeDtypeStruct((1, 13, 60, 90, 16), np.float32)
    out = jax.eval_shape(V._decode_jit, graphdef, state, z)
    assert out.shape == (1, 49, 480, 720, 3)

"""RepVideo fine-tuning end to end on CPU: synthetic mp4s → tfds latents → tiny DiT training.

One jitted train step (same static spec) serves the straight run and the interrupted + resumed
run; gates-only training compiles a second one.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from jax_repvideo import checkpoint
from jax_repvideo.config import ConfigError, from_dict
from jax_repvideo.models.dit import CogVideoXDiT
from jax_repvideo.training import train as T
from jax_repvideo.training.config import TrainConfig
from jax_repvideo.training.synthetic import write_folder

CONFIGS = Path(__file__).parent.parent / "configs"
STEPS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    folder = write_folder(root / "videos", [20, 18, 16, 20, 12, 14])
    base = {
        "data_dir": str(folder), "steps": STEPS, "out_dir": str(root / "run"), "seed": 0,
        "model_preset": str(CONFIGS / "tiny_dit.yaml"), "compute_dtype": "float32", "remat": "full", "attention_backend": "xla",
        "vae": {"preset": str(CONFIGS / "tiny_vae_cogvideox.yaml")}, "text": {"preset": str(CONFIGS / "tiny_t5.yaml")},
        "log_every": 1, "save_every": STEPS // 2, "keep": 2, "progress": False,
        "data": {"num_frames": 9, "frame_stride": 1, "height": 24, "width": 32, "preprocess": True,
                 "batch_size": 2, "cache_dir": str(root / "tfds")},
        "optim": {"learning_rate": 2e-3, "gate_learning_rate": 2e-2, "warmup_steps": 4, "weight_decay": 0.0},
    }
    straight = T.train(from_dict(TrainConfig, base))
    return root, base, straight


def cfg_with(base, **kw):
    return from_dict(TrainConfig, {**base, **kw})


def test_loss_falls(setup):
    _, _, straight = setup
    losses = [r["loss"] for r in straight["history"]]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    print(f"loss mean first 8 steps {first:.4f} → last 8 steps {last:.4f} (ratio {last / first:.3f})")
    assert last < 0.7 * first
    record = straight["history"][-1]
    assert set(record) >= {"step", "loss", "grad_norm", "lr", "gates"} and len(record["gates"]) == straight["dit"].num_layers


def test_metrics_jsonl(setup):
    root, _, _ = setup
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def test_resume_is_bit_exact(setup):
    root, base, straight = setup
    cfg = cfg_with(base, out_dir=str(root / "resumed"))
    half = T.train(cfg, stop_after=STEPS // 2)
    assert half["export"] is None and half["history"][-1]["step"] == STEPS // 2
    resumed = T.train(cfg)
    assert resumed["history"][0]["step"] == STEPS // 2 + 1
    for path, value in straight["params"].items():
        np.testing.assert_array_equal(np.asarray(resumed["params"][path]), np.asarray(value), err_msg=path)


def test_export_loads_into_model(setup):
    _, _, straight = setup
    saved = checkpoint.read_config(straight["export"])
    assert saved["kind"] == "repvideo" and saved["model"]["repvideo"] is True
    dit = from_dict(type(straight["dit"]), saved["model"])
    model = checkpoint.restore_into(straight["export"], nnx.eval_shape(lambda: CogVideoXDiT(dit, rngs=nnx.Rngs(0))))
    loaded = T.flat_params(model)
    assert set(loaded) == set(straight["params"])
    for path, value in straight["params"].items():
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(value), err_msg=path)


def test_gates_only_changes_only_gates(setup):
    root, base, _ = setup
    cfg = cfg_with(base, out_dir=str(root / "gates"), trainable="gates", steps=6, log_every=6, save_every=6)
    dit, saved = T.model_config(cfg)
    before = T.flat_params(T.build_model(cfg, dit, saved))
    after = T.train(cfg)["params"]
    changed = sorted(p for p in before if not np.array_equal(np.asarray(before[p]), np.asarray(after[p])))
    assert changed == ["gates"]


def test_gates_only_needs_gates(setup):
    _, base, _ = setup
    with pytest.raises(ConfigError, match="no parameter matches gate_pattern"):
        T.param_labels({"blocks.attn.w": 0}, "gates", TrainConfig.gate_pattern)

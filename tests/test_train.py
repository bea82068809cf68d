"""RepVideo fine-tuning end to end on CPU: synthetic mp4s → tfds latents → tiny DiT training.

One jitted train step (same static spec) serves the straight run and the interrupted + resumed
run; gates-only training compiles a second one.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from two_hosts import run_on_two_hosts

from jax_repvideo import checkpoint, cli
from jax_repvideo.config import ConfigError, from_dict, to_dict
from jax_repvideo.models.attention import attention
from jax_repvideo.models.dit import CogVideoXDiT, DiTConfig
from jax_repvideo.pipeline_cogvideox import CogVideoXPipeline
from jax_repvideo.training import data as data_lib
from jax_repvideo.training import train as T
from jax_repvideo.training.config import TrainConfig
from jax_repvideo.training.encoders import build_encoder
from jax_repvideo.training.synthetic import write_folder

TINY = Path(__file__).parent.parent / "configs" / "train_tiny.yaml"
STEPS = 40


def overrides(root, name, **kw):
    items = {"data_dir": root / "videos", "out_dir": root / name, "steps": STEPS, "log_every": 1,
             "save_every": STEPS // 2, "data.cache_dir": root / "tfds", **kw}
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The straight run, through the CLI: ``jax-repvideo train configs/train_tiny.yaml …``."""
    root = tmp_path_factory.mktemp("train")
    write_folder(root / "videos", [20, 18, 16, 20, 12, 14])
    assert cli.main(["train", str(TINY), *overrides(root, "run")]) == 0
    history = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    export = root / "run" / "export"
    dit = from_dict(DiTConfig, checkpoint.read_config(export / "transformer")["model"])
    model = checkpoint.restore_into(export / "transformer", nnx.eval_shape(lambda: CogVideoXDiT(dit, rngs=nnx.Rngs(0))))
    return root, {"history": history, "params": T.flat_params(model), "dit": dit, "export": export}


def test_loss_falls(setup):
    _, straight = setup
    losses = [r["loss"] for r in straight["history"]]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    print(f"loss mean first 8 steps {first:.4f} → last 8 steps {last:.4f} (ratio {last / first:.3f})")
    assert last < 0.7 * first
    record = straight["history"][-1]
    assert set(record) >= {"step", "loss", "grad_norm", "lr", "gates"} and len(record["gates"]) == straight["dit"].num_layers


def test_metrics_jsonl(setup):
    root, _ = setup
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def test_resume_is_bit_exact(setup):
    root, straight = setup
    cfg = T.load_config(TINY, overrides(root, "resumed", progress=False))
    half = T.train(cfg, stop_after=STEPS // 2)
    assert half["export"] is None and half["history"][-1]["step"] == STEPS // 2
    resumed = T.train(cfg)
    assert resumed["history"][0]["step"] == STEPS // 2 + 1
    for path, value in straight["params"].items():
        np.testing.assert_array_equal(np.asarray(resumed["params"][path]), np.asarray(value), err_msg=path)


def test_export_loads_in_generate(setup):
    """The export is a CogVideoX model folder: generate's pipeline restores every part from it."""
    _, straight = setup
    saved = checkpoint.read_config(straight["export"] / "transformer")
    assert saved["kind"] == "repvideo" and saved["model"]["repvideo"] is True
    pipe = CogVideoXPipeline.from_pretrained(straight["export"])
    loaded = T.flat_params(pipe.models.transformer)
    assert set(loaded) == set(straight["params"]) and "gates" in loaded
    for path, value in straight["params"].items():
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(value), err_msg=path)
    assert pipe.tokenizer(["a square"]).shape == (1, straight["dit"].max_text_seq_length)


def test_gates_only_changes_only_gates(setup):
    root, _ = setup
    cfg = T.load_config(TINY, overrides(root, "gates", trainable="gates", steps=6, save_every=6, progress=False))
    dit, saved = T.model_config(cfg)
    before = T.flat_params(T.build_model(cfg, dit, saved))
    after = T.train(cfg)["params"]
    changed = sorted(p for p in before if not np.array_equal(np.asarray(before[p]), np.asarray(after[p])))
    assert changed == ["gates"]


def test_gates_only_needs_gates():
    with pytest.raises(ConfigError, match="no parameter matches gate_pattern"):
        T.param_labels({"blocks.attn.w": 0}, "gates", TrainConfig.gate_pattern)


def test_cli_bad_data_dir_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", str(TINY), f"data_dir={tmp_path / 'missing'}", f"out_dir={tmp_path / 'run'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_pixel_path_matches_preprocessed_latents(setup):
    """Training on pixels encodes each batch with the same frozen VAE/T5 the preprocessing pass used."""
    root, _ = setup
    cfg = T.load_config(TINY, overrides(root, "pixels", progress=False, **{"data.preprocess": False}))
    dit, _ = T.model_config(cfg)
    encoder = build_encoder(cfg, dit)
    pixels = data_lib.prepare(cfg.data_config, root / "tfds").as_data_source()["train"]
    latents = data_lib.prepare(dataclasses.replace(cfg.data_config, preprocess=True), root / "tfds", encoder)
    latents = latents.as_data_source()["train"]
    assert len(pixels) == len(latents) == 6
    for i in (0, 3):  # same keys → same record order in both datasets
        assert pixels[i]["caption"] == latents[i]["caption"]
        np.testing.assert_array_equal(encoder.encode_video(pixels[i]["video"][None])[0], latents[i]["latents"])
        np.testing.assert_array_equal(encoder.encode_text([pixels[i]["caption"].decode()])[0],
                                      latents[i]["text_embedding"])
    result = T.train(cfg, encoder=encoder, stop_after=2)
    assert [r["step"] for r in result["history"]] == [1, 2] and np.isfinite(result["history"][-1]["loss"])


def test_init_from_plain_cogvideox_checkpoint_adds_gates(setup, tmp_path):
    """Gates-only training on a new base model: a checkpoint without gates, gates start at gate_init."""
    root, straight = setup
    base = {p: v for p, v in straight["params"].items() if p != "gates"}
    plain = dataclasses.replace(straight["dit"], repvideo=False)
    checkpoint.save(tmp_path / "cogvideox", base, {"kind": "cogvideox", "model": to_dict(plain)})
    cfg = T.load_config(TINY, overrides(root, "finetune", init_checkpoint=tmp_path / "cogvideox", trainable="gates",
                                        gate_init=0.0, **{"model.repvideo": True}))
    dit, saved = T.model_config(cfg)
    params = T.flat_params(T.build_model(cfg, dit, saved))
    assert dit.repvideo and set(params) == set(base) | {"gates"}
    np.testing.assert_array_equal(np.asarray(params["gates"]), np.zeros(dit.num_layers))
    for path, value in base.items():
        np.testing.assert_array_equal(np.asarray(params[path]), np.asarray(value), err_msg=path)
    wrong = dataclasses.replace(plain, num_layers=plain.num_layers - 1)
    checkpoint.save(tmp_path / "wrong", {p: v[:-1] if p.startswith("blocks.") else v for p, v in base.items()},
                    {"kind": "cogvideox", "model": to_dict(wrong)})
    cfg = dataclasses.replace(cfg, init_checkpoint=str(tmp_path / "wrong"), model={"num_layers": plain.num_layers})
    dit, saved = T.model_config(cfg)
    with pytest.raises(ConfigError, match="shape mismatches"):
        T.build_model(cfg, dit, saved)


SHARDED_RUN = """
import json, os, sys
from jax_repvideo.training import train as T
cfg = T.load_config(sys.argv[1], sys.argv[2:])
stop_after = int(os.environ.get("STOP_AFTER", "2")) or None
print("RESULT " + json.dumps(T.train(cfg, stop_after=stop_after)["history"]))
"""


def test_sharded_on_4_cpu_devices_matches_one_device(setup):
    """fsdp=2 × tensor=2 on 4 emulated CPU devices: the same first two steps as the 1-device run."""
    root, straight = setup
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    args = overrides(root, "sharded", progress=False, **{"mesh.fsdp": 2, "mesh.tensor": 2})
    proc = subprocess.run([sys.executable, "-c", SHARDED_RUN, str(TINY), *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for ours, ref in zip(history, straight["history"][:2]):
        assert abs(ours["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (ours, ref)
        assert abs(ours["grad_norm"] - ref["grad_norm"]) <= 1e-4 * ref["grad_norm"], (ours, ref)


def test_two_processes_match_one_device_and_resume(setup):
    """Two hosts (processes) × 2 CPU devices, fsdp=2 × tensor=2: the first two steps match the 1-device
    run; the checkpoint, metrics and export are written once; a second launch resumes from the checkpoint."""
    root, straight = setup
    args = overrides(root, "two_hosts", progress=False, steps=3, save_every=2, **{"mesh.fsdp": 2, "mesh.tensor": 2})
    outputs = run_on_two_hosts(["-c", SHARDED_RUN, str(TINY), *args], root / "two_hosts_logs" / "first",
                               STOP_AFTER="2")
    for out in outputs:  # every process computes the same global metrics
        history = json.loads(out.split("RESULT ", 1)[1])
        for ours, ref in zip(history, straight["history"][:2], strict=True):
            assert abs(ours["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (ours, ref)
            assert abs(ours["grad_norm"] - ref["grad_norm"]) <= 1e-4 * ref["grad_norm"], (ours, ref)

    outputs = run_on_two_hosts(["-c", SHARDED_RUN, str(TINY), *args], root / "two_hosts_logs" / "resumed",
                               STOP_AFTER="0")
    assert all("at step 2" in out and json.loads(out.split("RESULT ", 1)[1])[0]["step"] == 3 for out in outputs)
    run = root / "two_hosts"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    dit = from_dict(DiTConfig, checkpoint.read_config(run / "export" / "transformer")["model"])
    exported = T.flat_params(checkpoint.restore_into(run / "export" / "transformer",
                                                     nnx.eval_shape(lambda: CogVideoXDiT(dit, rngs=nnx.Rngs(0)))))
    assert exported.keys() == straight["params"].keys()
    assert all(np.isfinite(np.asarray(v)).all() for v in exported.values())


def test_presets_parse_and_unknown_keys_are_named():
    real = T.load_config(TINY.parent / "train_repvideo.yaml", ["data_dir=/videos", "steps=10"])
    assert (real.data_config.data_dir, real.steps, real.remat, real.compute_dtype) == ("/videos", 10, "full", "bfloat16")
    assert (real.data.num_frames, real.data.height, real.data.width) == (49, 480, 720)
    with pytest.raises(ConfigError, match="optim.lr"):
        T.load_config(TINY, ["optim.lr=1e-4"])


def test_chunked_attention_gradients_match_dense():
    """The checkpointed key-block step of chunked attention (what training at 17,776 tokens uses)
    gives the dense gradients; several query and key blocks, a padded last block."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 21, 2, 8)) for i in range(3))

    def grads(**kw):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, **kw))), argnums=(0, 1, 2)))(q, k, v)

    for ours, ref in zip(grads(backend="chunked", q_chunk=8, kv_chunk=8), grads(backend="xla")):
        assert float(jnp.abs(ours - ref).max() / jnp.abs(ref).max()) < 1e-5

"""RepVideo fine-tuning: the loop, orbax train state, the export and ``jax-repvideo train``.

The step itself (loss, optimizer, jit) is ``training/step.py``; the data ``training/data.py``.
Batch ``k`` comes from the data iterator's position and every random draw of step ``k`` from
``fold_in(key(seed), k)``, so a run restored from its orbax checkpoint (params, optimizer state,
step, iterator position) continues bit for bit. The final params are exported in ``convert``'s
inference format (``jax_repvideo.checkpoint``, kind ``repvideo``), which ``generate`` loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jax_repvideo import checkpoint, sharding
from jax_repvideo.config import ConfigError, from_dict, load, load_yaml, to_dict
from jax_repvideo.models.dit import CogVideoXDiT, DiTConfig
from jax_repvideo.training import data as data_lib
from jax_repvideo.training.config import TrainConfig
from jax_repvideo.training.step import (StepSpec, flat_params, gate_paths, learning_rate, make_optimizer,
                                         param_labels, schedule_table, train_step_fn)

CHECKPOINT_KIND = "repvideo"
ASSETS = Path(__file__).resolve().parent.parent / "assets"

# ----------------------------------------------------------------------------- model


def model_config(cfg: TrainConfig) -> tuple[DiTConfig, dict | None]:
    """The DiT architecture and, when fine-tuning, the init checkpoint's config."""
    if cfg.init_checkpoint:
        saved = checkpoint.read_config(cfg.init_checkpoint)
        base = dict(saved["model"])
    else:
        saved = None
        base = load_yaml(cfg.model_preset) if cfg.model_preset else {}  # {} = CogVideoX-2B defaults
        base = dict(base.get("model", base))
    return from_dict(DiTConfig, {**base, **cfg.model}, "model"), saved


def build_model(cfg: TrainConfig, dit: DiTConfig, saved: dict | None) -> CogVideoXDiT:
    dtype = jnp.dtype(cfg.compute_dtype)
    kw = dict(dtype=dtype, param_dtype=jnp.float32, attention_backend=cfg.attention_backend, remat=cfg.remat)
    # rbg keys: eager threefry init compiles a large program per parameter shape
    model = CogVideoXDiT(dit, rngs=nnx.Rngs(jax.random.key(cfg.seed, impl="rbg")), **kw)
    if cfg.gate_init is not None and dit.repvideo:
        model.gates[...] = jnp.full_like(model.gates[...], cfg.gate_init)
    if saved is None:
        return model
    source_cfg = from_dict(DiTConfig, saved["model"], "init_checkpoint.model")
    source = checkpoint.restore_into(
        cfg.init_checkpoint, nnx.eval_shape(lambda: CogVideoXDiT(source_cfg, rngs=nnx.Rngs(0), **kw)))
    loaded, target = flat_params(source), flat_params(model)
    extra = sorted(set(loaded) - set(target))
    missing = sorted(set(target) - set(loaded) - set(gate_paths(target, cfg.gate_pattern)))
    shapes = [p for p in set(loaded) & set(target) if loaded[p].shape != target[p].shape]
    if extra or missing or shapes:
        raise ConfigError(f"init_checkpoint {cfg.init_checkpoint} does not fit the model: extra {extra[:5]}, "
                          f"missing {missing[:5]}, shape mismatches {sorted(shapes)[:5]}")
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, checkpoint.nest({**target, **loaded}))
    nnx.update(model, state)
    return model


# ----------------------------------------------------------------------------- batches


def latent_batches(cfg: TrainConfig, iterator: data_lib.BatchIterator, encoder) -> Iterator[tuple]:
    """``(latents, text_embedding)`` per step, encoding pixels on the fly unless preprocessed."""
    for batch in iterator:
        if "latents" in batch:
            yield batch["latents"], batch["text_embedding"]
        else:
            yield encoder.encode_video(batch["video"]), encoder.encode_text(batch["caption"])


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(cfg: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, save_interval_steps=cfg.save_every,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(cfg.out_dir).absolute() / "checkpoints", options=options,
                                 item_names=("state", "data"))


def save_state(manager, step: int, params, opt_state, iterator, force: bool = False) -> None:
    # The step is a host scalar: a jax scalar would live on one device, which orbax refuses across hosts.
    state = {"params": params, "opt_state": opt_state, "step": np.asarray(step, np.int32)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(iterator.state())), force=force)


def restore_state(manager, params, opt_state):
    step = manager.latest_step()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
    target["step"] = np.asarray(0, np.int32)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             data=ocp.args.JsonRestore()))
    state = restored["state"]
    return state["params"], state["opt_state"], int(state["step"]), restored["data"]


def export(cfg: TrainConfig, dit: DiTConfig, params: Mapping[str, jax.Array], encoder) -> Path:
    """Writes ``out_dir/export`` as a CogVideoX model folder that ``generate`` loads (``checkpoint=``):
    ``transformer/`` (the trained DiT, kind ``repvideo``, same format as ``convert``), ``vae/`` and
    ``text_encoder/`` (links to the converted checkpoints used, or the random preset weights written
    out) and ``tokenizer/spiece.model``."""
    folder = Path(cfg.out_dir).absolute() / "export"
    kind = CHECKPOINT_KIND if dit.repvideo else "cogvideox"
    primary = sharding.is_primary()
    # Every process runs this: gathering the (possibly cross-host sharded) params is collective, and
    # so is orbax's save inside checkpoint.save (it writes once). Plain file operations: primary only.
    host_params = sharding.gather_to_host(dict(params))
    checkpoint.save(folder / "transformer", host_params, {"kind": kind, "model": to_dict(dit), "trained_steps": cfg.steps})
    for part, enc, model, kind in (("vae", cfg.vae, "vae", "cogvideox-vae"), ("text_encoder", cfg.text, "t5", "t5")):
        target = folder / part
        if primary and (target.is_symlink() or target.is_file()):
            target.unlink()
        if enc.checkpoint:
            if primary:
                target.symlink_to(Path(enc.checkpoint).absolute(), target_is_directory=True)
        elif encoder is not None:
            module = getattr(encoder, model)
            checkpoint.save(target, flat_params(module), {"kind": kind, "model": to_dict(module.config)})
    if cfg.tokenizer and primary:
        (folder / "tokenizer").mkdir(exist_ok=True)
        shutil.copyfile(cfg.tokenizer, folder / "tokenizer" / "spiece.model")
    return folder


# ----------------------------------------------------------------------------- loop


class MetricsLog:
    """One JSON object per logged step in ``out_dir/metrics.jsonl`` (appended on resume)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, *, encoder=None, stop_after: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) training; returns ``{"params", "dit", "history", "export"}``.

    ``encoder`` (``data.Encoder``) is built from ``cfg.vae``/``cfg.text`` when not given.
    ``stop_after`` ends the run early at that step (after saving), as an interruption would.
    """
    out = Path(cfg.out_dir)
    data_cfg = cfg.data_config
    dit, saved = model_config(cfg)
    # First, before anything touches JAX: several processes must start multi-host JAX before any
    # array exists (the encoders below build models).
    layout = sharding.setup(cfg.mesh) if cfg.mesh is not None else None
    if layout is not None:
        sharding.check_model(dit, cfg.mesh)
        try:  # fail before any compile when the global batch does not split over the batch axes
            layout.sharding(("batch",), (data_cfg.batch_size,))
        except ValueError as err:
            raise ConfigError(f"data.batch_size {data_cfg.batch_size} and the mesh: {err}") from None
    if encoder is None:
        from jax_repvideo.training.encoders import build_encoder

        encoder = build_encoder(cfg, dit)
    builder = data_lib.prepare(data_cfg, out / "tfds", encoder if data_cfg.preprocess else None)
    source = builder.as_data_source()["train"]
    iterator = data_lib.BatchIterator(source, data_cfg.batch_size, data_cfg.shuffle_seed,
                                      jax.process_index(), jax.process_count())
    model = build_model(cfg, dit, saved)
    if layout is not None:
        model = layout.place_model(model)  # params split by the layout's parameter rules
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    params = flat_params(model)
    del model
    labels = param_labels(params, cfg.trainable, cfg.gate_pattern)
    spec = StepSpec(cfg.optim, tuple(sorted(labels.items())), cfg.steps, cfg.text_dropout)
    opt_state = jax.jit(make_optimizer(spec).init)(params)  # moments inherit the params' placement
    if layout is not None:
        opt_state = _onto_mesh(opt_state, layout)

    manager = checkpoint_manager(cfg)
    start = 0
    if manager.latest_step() is not None:
        params, opt_state, start, data_state = restore_state(manager, params, opt_state)
        iterator.restore(data_state)
        print(f"resumed from {manager.directory} at step {start}")

    alphas_bar = schedule_table(cfg.snr_shift_scale)
    gates = gate_paths(params, cfg.gate_pattern)
    lr = learning_rate(cfg.optim, cfg.optim.learning_rate, cfg.steps)
    gate_lr = learning_rate(cfg.optim, cfg.optim.gate_learning_rate, cfg.steps)
    primary = jax.process_index() == 0  # one log and one progress bar per run, not per host
    log = MetricsLog(out / "metrics.jsonl")
    step_fn = train_step_fn()
    history = []
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    bar = _progress(cfg, start, end) if primary else None
    batches = latent_batches(cfg, iterator, encoder)
    tick, tick_step = time.perf_counter(), start
    for step in range(start, end):
        latents, text = (_global_batch(x, layout) for x in next(batches))
        with layout.activate() if layout is not None else contextlib.nullcontext():
            params, opt_state, metrics = step_fn(params, opt_state, rest, step, latents, text, alphas_bar,
                                                 cfg.seed, graphdef=graphdef, spec=spec)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            record = {"step": done, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                      "lr": float(lr(step))}  # the backbone's (0 updates applied when trainable: gates)
            if gates:
                record["gate_lr"] = float(gate_lr(step))
                record["gates"] = np.asarray(params[gates[0]], np.float64).round(6).tolist()
            now = time.perf_counter()
            record["steps_per_s"] = round((done - tick_step) / max(now - tick, 1e-9), 4)
            tick, tick_step = now, done
            history.append(record)
            if primary:
                log.write(record)
                _report(bar, record)
        if bar is not None:
            bar.update(1)
        if done % cfg.save_every == 0 or done == end:
            save_state(manager, done, params, opt_state, iterator, force=done == end)
    manager.wait_until_finished()
    if bar is not None:
        bar.close()
    result = {"params": params, "dit": dit, "history": history, "export": None}
    if end == cfg.steps:
        result["export"] = export(cfg, dit, params, encoder)
    return result


def _onto_mesh(tree, layout: sharding.Layout):
    """Leaves that live on one device only (the optimizer's step counts) replicated over the mesh: a
    checkpoint restores each leaf onto its target's devices, and under several processes one host's
    device is not a placement the train step accepts."""
    mesh_devices = set(layout.mesh.devices.flat)

    def place(x):
        return x if x.sharding.device_set == mesh_devices else layout.put(np.asarray(x), (None,) * x.ndim)

    return jax.tree.map(place, tree)


def _global_batch(local: np.ndarray, layout) -> jax.Array:
    """This host's slice of the global batch → one array split over the mesh's ``batch`` axes."""
    if layout is None:
        return jnp.asarray(local)
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    placement = layout.sharding(("batch",) + (None,) * (local.ndim - 1), shape)
    return jax.make_array_from_process_local_data(placement, np.asarray(local), shape)


def _progress(cfg: TrainConfig, start: int, end: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _report(bar, record: dict) -> None:
    text = f"step {record['step']} loss {record['loss']:.5f} grad_norm {record['grad_norm']:.4f} lr {record['lr']:.3g}"
    if bar is None:
        print(text + (f" gates {record['gates']}" if "gates" in record else ""))
        return
    bar.set_postfix(loss=f"{record['loss']:.4f}", steps_s=record["steps_per_s"], refresh=False)
    bar.write(text + (f" gates {record['gates']}" if "gates" in record else ""))


def load_config(config_path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Loads a train YAML; relative preset and tokenizer paths not found from the working directory
    are looked up next to the YAML, then in the package assets (``tiny_spiece.model``)."""
    cfg = load(TrainConfig, config_path, overrides)
    here = Path(config_path).parent

    def resolve(path: str) -> str:
        if not path or Path(path).is_absolute() or Path(path).exists():
            return path
        for folder in (here, ASSETS):
            if (folder / path).exists():
                return str(folder / path)
        return path

    return dataclasses.replace(
        cfg, model_preset=resolve(cfg.model_preset), tokenizer=resolve(cfg.tokenizer),
        vae=dataclasses.replace(cfg.vae, preset=resolve(cfg.vae.preset)),
        text=dataclasses.replace(cfg.text, preset=resolve(cfg.text.preset)))


def main(config_path: str, overrides: Sequence[str]) -> int:
    """``jax-repvideo train CONFIG [key=value …]``."""
    try:
        cfg = load_config(config_path, overrides)
        result = train(cfg)
    except (ConfigError, data_lib.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {result['export']}")
    return 0

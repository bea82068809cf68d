"""``jax-repvideo plan CONFIG [key=value …]``: memory per device for a preset and a mesh, from shapes only.

Nothing runs and no weights are allocated:

* **parameters**: ``nnx.eval_shape`` of the denoiser placed by the mesh's parameter rules (an
  abstract mesh, so an 8-device plan works on a laptop); bytes of each device's shard;
* **activations**: the forward of one model call is traced to a jaxpr (no compile) with the
  per-device batch, and the peak of the bytes live at once is taken, walking the equations in order
  and freeing each value after its last use. XLA fuses elementwise ops and schedules differently,
  so the real peak is lower or higher (on small cases: 1.8× above XLA's CPU memory analysis for the
  DiT, 0.54× of it for the U-Net); treat it as an estimate within about 2×. For the DiT it is
  divided by ``context × tensor`` (tokens and heads split; the gathered K/V make that slightly
  optimistic for attention).

CONFIG is a run preset (``family: videocrafter2|cogvideox``, as ``generate`` takes) or an
architecture preset (a U-Net or DiT config; then the model call is the default clip with CFG).
``plan.batch``, ``plan.frames``, ``plan.height``, ``plan.width`` (latent size) and ``plan.dtype``
override the model-call shape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jex

from jax_repvideo import config as config_lib
from jax_repvideo import sharding
from jax_repvideo.config import ConfigError

GIB = 1024**3
VAE_FACTOR = 8  # both full-size VAEs: 8× spatial (architecture presets; run presets use their VAE's)


@dataclasses.dataclass(frozen=True)
class PlanOverrides:
    batch: int | None = None  # model-call batch (windows × CFG)
    frames: int | None = None  # latent frames per model call
    height: int | None = None  # latent height
    width: int | None = None  # latent width
    dtype: str | None = None  # parameter and compute dtype


@dataclasses.dataclass(frozen=True)
class Job:
    """One denoiser call: what the memory is planned for."""

    family: str  # "videocrafter2" (U-Net) or "cogvideox" (DiT)
    model_config: Any
    batch: int
    frames: int
    height: int
    width: int
    dtype: str
    why_batch: str


def main(config_path: str, overrides: Sequence[str] = ()) -> int:
    try:
        data = config_lib.apply_overrides(config_lib.load_yaml(config_path), overrides)
        plan_overrides = config_lib.from_dict(PlanOverrides, data.pop("plan", None), "plan")
        job, mesh_cfg = _job(data, plan_overrides)
        report = plan(job, mesh_cfg)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}")
        return 1
    print(f"plan for {config_path}")
    print(report)
    return 0


# ----------------------------------------------------------------------------- the model call


def _job(data: dict, over: PlanOverrides) -> tuple[Job, sharding.MeshConfig]:
    if "family" in data:
        return _job_from_run(data, over)
    mesh_cfg = config_lib.from_dict(sharding.MeshConfig, data.pop("mesh", None), "mesh")
    return _job_from_architecture(data, over), mesh_cfg


def _job_from_run(data: dict, over: PlanOverrides) -> tuple[Job, sharding.MeshConfig]:
    from jax_repvideo import generate_config

    cfg = config_lib.from_dict(generate_config.GenerateConfig, data)
    if cfg.family == "videocrafter2":
        factor = cfg.videocrafter2.vae.downsample_factor
    else:
        factor = cfg.cogvideox.vae.spatial_factor
    height, width = cfg.height // factor, cfg.width // factor
    cfg_factor = 2 if cfg.guidance.scale != 1.0 else 1
    if cfg.family == "videocrafter2":
        model_config, clip = cfg.videocrafter2.unet, cfg.videocrafter2.unet.temporal_length or 16
    else:
        model_config = cfg.cogvideox.transformer
        clip = (model_config.sample_frames - 1) // model_config.temporal_compression_ratio + 1
    if cfg.sampler.kind == "fifo":
        windows = cfg.fifo.num_partitions * (2 if cfg.fifo.lookahead else 1)
        frames, why = cfg.fifo.video_length, f"{windows} FIFO windows × {cfg_factor} (CFG)"
    else:
        windows, frames, why = 1, clip, f"1 clip × {cfg_factor} (CFG)"
    job = Job(cfg.family, model_config, windows * cfg_factor, frames, height, width,
              "float32" if cfg.dtype == "float32" else "bfloat16", why)
    return _overridden(job, over), cfg.mesh


def _job_from_architecture(data: dict, over: PlanOverrides) -> Job:
    from jax_repvideo.models.dit import DiTConfig
    from jax_repvideo.models.unet3d import UNet3DConfig

    section = data.get("model", data)
    if "num_attention_heads" in section:
        model_config = config_lib.from_dict(DiTConfig, section)
        frames = (model_config.sample_frames - 1) // model_config.temporal_compression_ratio + 1
        job = Job("cogvideox", model_config, 2, frames, model_config.sample_height, model_config.sample_width,
                  "bfloat16", "1 clip × 2 (CFG)")
    elif "model_channels" in section:
        model_config = config_lib.from_dict(UNet3DConfig, section)
        job = Job("videocrafter2", model_config, 2, model_config.temporal_length or 16, 320 // VAE_FACTOR,
                  512 // VAE_FACTOR, "bfloat16", "1 clip × 2 (CFG)")
    else:
        raise ConfigError("plan: CONFIG is neither a run preset (family: …) nor a U-Net / DiT architecture preset")
    return _overridden(job, over)


def _overridden(job: Job, over: PlanOverrides) -> Job:
    changes = {k: v for k, v in dataclasses.asdict(over).items() if v is not None}
    if "batch" in changes:
        changes["why_batch"] = "plan.batch"
    return dataclasses.replace(job, **changes)


def _model_and_inputs(job: Job, batch: int) -> tuple[Callable[[], nnx.Module], Callable, tuple]:
    """Constructor, ``forward(model, *inputs)`` and abstract inputs for ``batch`` samples."""
    dtype = jnp.dtype(job.dtype)
    latents = jax.ShapeDtypeStruct((batch, job.frames, job.height, job.width, job.model_config.in_channels), dtype)
    timesteps = jax.ShapeDtypeStruct((batch, job.frames), jnp.int32)
    if job.family == "videocrafter2":
        from jax_repvideo.models.unet3d import UNet3D

        cfg = job.model_config
        context = jax.ShapeDtypeStruct((batch, job.frames, 77, cfg.context_dim), dtype)

        def constructor():
            return UNet3D(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)

        return constructor, lambda m, x, t, c: m(x, t, c, 8), (latents, timesteps, context)
    from jax_repvideo.models.dit import CogVideoXDiT

    cfg = job.model_config
    text = jax.ShapeDtypeStruct((batch, cfg.max_text_seq_length, cfg.text_embed_dim), dtype)

    def constructor():  # the chunked (flash-style) attention: what long sequences run with
        return CogVideoXDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, attention_backend="chunked")

    return constructor, lambda m, x, t, c: m(x, t, c), (latents, timesteps, text)


# ----------------------------------------------------------------------------- the plan


def plan(job: Job, mesh_cfg: sharding.MeshConfig) -> str:
    layout = sharding.abstract_layout(mesh_cfg)
    sharding.check_model(job.model_config, mesh_cfg)
    batch_split = math.prod(layout.mesh.shape[a] for a in layout.rules["batch"])
    if job.batch % batch_split:
        raise ValueError(f"the model-call batch {job.batch} ({job.why_batch}) does not split over "
                         f"{' × '.join(layout.rules['batch'])} = {batch_split} devices; change the mesh or plan.batch")
    constructor, forward, inputs = _model_and_inputs(job, job.batch // batch_split)
    graphdef, state = nnx.split(nnx.eval_shape(constructor))
    params = nnx.state(nnx.merge(graphdef, state), nnx.Param)
    shardings = layout.param_shardings(params)
    total_params = sum(math.prod(v.shape) for v in jax.tree.leaves(params))
    param_bytes = sum(_nbytes(v.shape, v.dtype) for v in jax.tree.leaves(params))
    device_param_bytes = sum(_nbytes(s.shard_shape(v.shape), v.dtype)
                             for v, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))

    def call(state, *args):
        return forward(nnx.merge(graphdef, state), *args)

    jaxpr = jax.make_jaxpr(call)(state, *inputs).jaxpr
    state_bytes = sum(_nbytes(v.shape, v.dtype) for v in jax.tree.leaves(state))
    activations = max(peak_bytes(jaxpr) - state_bytes, 0)
    if job.family == "cogvideox":
        activations //= mesh_cfg.context * mesh_cfg.tensor
    shape = mesh_cfg.shape
    lines = [
        f"  model       {_model_name(job)} ({job.dtype})",
        f"  mesh        {' × '.join(f'{k}={v}' for k, v in shape.items())} = {mesh_cfg.size} devices",
        f"  model call  batch {job.batch} = {job.why_batch}; {job.frames} latent frames of "
        f"{job.height}×{job.width}; {job.batch // batch_split} per device",
        f"  parameters  {total_params / 1e6:,.1f} M = {_size(param_bytes)} in all, "
        f"{_size(device_param_bytes)} per device",
        f"  activations {_size(activations)} per device (estimated peak of one forward)",
        f"  total       {_size(device_param_bytes + activations)} per device "
        "(the VAE and text encoder are extra, used between denoiser calls)",
    ]
    return "\n".join(lines)


def _model_name(job: Job) -> str:
    if job.family == "videocrafter2":
        return f"VideoCrafter2 3D U-Net (model_channels {job.model_config.model_channels})"
    cfg = job.model_config
    kind = "RepVideo" if cfg.repvideo else "CogVideoX"
    return f"{kind} DiT ({cfg.num_layers} layers, {cfg.num_attention_heads} heads × {cfg.attention_head_dim})"


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def _nbytes(shape, dtype) -> int:
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:  # PRNG key and other extended dtypes
        itemsize = getattr(dtype, "itemsize", 8)
    return math.prod(shape) * itemsize


def _var_bytes(v) -> int:
    aval = getattr(v, "aval", None)
    if isinstance(v, jex.Literal) or not hasattr(aval, "shape"):
        return 0
    return _nbytes(aval.shape, aval.dtype)


def peak_bytes(jaxpr: jex.Jaxpr) -> int:
    """Most bytes live at once when ``jaxpr`` runs its equations in order.

    Inputs stay live throughout (the caller holds them); every other value is freed after its last
    use. A nested jaxpr (scan/while body, cond branch, pjit, remat) adds its own peak above its inputs.
    """
    last_use: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jex.Literal):
                last_use[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, jex.Literal):
            last_use[v] = len(jaxpr.eqns)
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    live = sum(_var_bytes(v) for v in inputs)
    peak = live
    for i, eqn in enumerate(jaxpr.eqns):
        inner = max((_inner_extra(sub) for sub in jex.jaxprs_in_params(eqn.params)), default=0)
        out = sum(_var_bytes(v) for v in eqn.outvars)
        peak = max(peak, live + inner + out)
        live += out
        for v in {v for v in eqn.invars if not isinstance(v, jex.Literal)}:
            if last_use.get(v) == i and v not in inputs:
                live -= _var_bytes(v)
        for v in eqn.outvars:  # outputs nobody reads
            if v not in last_use:
                live -= _var_bytes(v)
    return peak


def _inner_extra(sub) -> int:
    jaxpr = sub.jaxpr if isinstance(sub, jex.ClosedJaxpr) else sub
    inputs = sum(_var_bytes(v) for v in set(jaxpr.invars) | set(jaxpr.constvars))
    return max(peak_bytes(jaxpr) - inputs, 0)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1], sys.argv[2:]))

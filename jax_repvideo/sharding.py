"""Scale-out: the device mesh, logical-axis rules, parameter placement and multi-host start-up.

One program runs from one GPU to a TPU pod; only the ``mesh`` section of the config changes.

* The mesh has four named axes (maxdiffusion's convention):
  ``data`` (independent samples: FIFO windows × CFG, batch, VAE frames), ``fsdp`` (weights split
  across devices, gathered per layer; the batch is split over it too), ``context`` (the DiT's token
  sequence) and ``tensor`` (attention heads and MLP hidden units).
* Arrays are described with *logical* axis names (``batch``, ``seq``, ``heads``, ...). ``rules``
  maps each logical name to mesh axes; the table is config data (``mesh.rules.<name>=[...]``).
* Models carry no sharding code. Their parameters get logical names from ``param_rules``: regexes on
  the dotted parameter path, first match wins, names aligned with the *trailing* dimensions (so a
  stacked, scanned layer's leading layer axis stays unsharded). Unmatched parameters are replicated.
* Activations are placed at the model boundary (``Layout.put`` for inputs, ``shard_denoiser`` for a
  sampler's model call: its batch, FIFO windows × CFG, on ``data``) and, inside the layers, at the
  few points marked with ``models.logical.constrain``; XLA's sharding propagation carries the
  placement everywhere else. Trace and run under ``Layout.activate()``.

The DiT's joint attention under ``context`` (all-gather of K/V): attention marks its queries
``(·, seq, act_heads, ·)`` and its keys/values ``(·, None, act_heads, ·)``. The queries, the hidden
state and the RepVideo window sum (carried next to it in the layer scan, computed elementwise from
it) stay split over tokens; each device gathers the full keys and values over ``context`` and
attends its own query block. Heads are split over ``tensor`` through the q/k/v/out-projection
weights, so a head count the tensor size doesn't divide is rejected (``check_model``).
The U-Net is meant for ``data`` (and ``fsdp``): its heads vary per level and its GEGLU halves would
be resharded under ``tensor``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import re
from typing import Any, Callable, Iterator, Literal, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jax_repvideo.models import logical

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Logical axis → mesh axes. Activation names and parameter names share the table.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp"),  # model-call batch: FIFO windows × CFG, or plain batch × CFG
    "frames": ("data",),  # frames of one video (VAE decode)
    "seq": ("context",),  # DiT joint token sequence
    "act_heads": ("tensor",),
    # parameters
    "embed": ("fsdp",),  # model width, the input side of a projection
    "conv_in": ("fsdp",),  # input channels of a convolution
    "heads": ("tensor",),  # heads × head_dim of q/k/v (and the input side of the out projection)
    "mlp": ("tensor",),  # feed-forward hidden units
    "layers": (),  # the leading axis of stacked (scanned) layers
}

# Dotted parameter path regex → logical names of the trailing dims. First match wins.
DEFAULT_PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # attention projections (U-Net attn1/attn2, DiT joint attention): heads on the output side
    (r"(^|\.)(to_q|to_k|to_v|query|key|value|qkv|to_qkv|q_proj|k_proj|v_proj)\.kernel$", ("embed", "heads")),
    (r"(^|\.)(to_q|to_k|to_v|query|key|value|qkv|to_qkv|q_proj|k_proj|v_proj)\.bias$", ("heads",)),
    (r"(^|\.)(to_out|out_proj|o_proj|attn_out|dense)(\.0)?\.kernel$", ("heads", "embed")),
    # feed-forward: hidden units on the output of the first projection, the input of the second
    (r"(^|\.)(ff|mlp|feed_forward)\..*(proj_in|proj|fc1|wi|linear_1|net\.0(\.proj)?)\.kernel$", ("embed", "mlp")),
    (r"(^|\.)(ff|mlp|feed_forward)\..*(proj_in|proj|fc1|wi|linear_1|net\.0(\.proj)?)\.bias$", ("mlp",)),
    (r"(^|\.)(ff|mlp|feed_forward)\..*(proj_out|fc2|wo|linear_2|net\.2)\.kernel$", ("mlp", "embed")),
    # convolutions (kh, kw, in, out) / (kt, kh, kw, in, out): weights split over fsdp
    (r"conv.*\.kernel$", ("conv_in", None)),
    # any other dense kernel: fsdp on its input side
    (r"\.kernel$", ("embed", None)),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The ``mesh`` section of a run config. The product of the four sizes is the device count."""

    data: int = 1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1
    # "auto": call jax.distributed.initialize() when the environment describes several processes
    # (JAX_COORDINATOR_ADDRESS, a multi-host TPU slice, SLURM, Open MPI); "on": always; "off": never.
    distributed: Literal["auto", "on", "off"] = "auto"
    # overrides of DEFAULT_RULES, e.g. {"batch": ["data"]} to keep the batch off fsdp
    rules: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # extra (regex, logical names) pairs tried before DEFAULT_PARAM_RULES
    param_rules: tuple[tuple[str, tuple[str | None, ...]], ...] = ()

    @property
    def shape(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    @property
    def size(self) -> int:
        return math.prod(self.shape.values())


# ----------------------------------------------------------------------------- multi-host

def wants_distributed(cfg: MeshConfig, environ: dict[str, str] | None = None) -> bool:
    """Whether this run is one process of several (from the config, else the environment)."""
    if cfg.distributed != "auto":
        return cfg.distributed == "on"
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice lists every worker
        return True
    return any(int(env.get(name, "1") or 1) > 1 for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize_distributed(cfg: MeshConfig) -> bool:
    """Starts the JAX distributed runtime once, before any computation; True if it is running."""
    if not wants_distributed(cfg):
        return False
    if not jax.distributed.is_initialized():
        # TPU pods, SLURM and Open MPI describe themselves; a manual launch sets
        # JAX_COORDINATOR_ADDRESS (read by jax) plus JAX_NUM_PROCESSES and JAX_PROCESS_ID (read here).
        count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=int(count) if count else None,
                                   process_id=int(index) if index else None)
    return True


def is_primary() -> bool:
    """Only process 0 writes videos, latents and logs; every process runs the same code."""
    return jax.process_index() == 0


def gather_to_host(tree):
    """Numpy copies of every (possibly cross-host sharded) array of ``tree``, on every process.
    Collective under several processes: all of them must call it, in the same order."""
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)


# ----------------------------------------------------------------------------- mesh and rules


def resolve_rules(cfg: MeshConfig) -> dict[str, tuple[str, ...]]:
    """DEFAULT_RULES with the config's overrides; an unknown mesh axis name is an error."""
    rules = {**DEFAULT_RULES, **{k: tuple(v) for k, v in cfg.rules.items()}}
    for name, axes in rules.items():
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"mesh.rules.{name}: unknown mesh axis {unknown[0]!r}; the mesh axes are {MESH_AXES}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"mesh.rules.{name}: mesh axis repeated in {list(axes)}")
    return rules


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes data, fsdp, context, tensor over all (global) devices."""
    _checked_rules(cfg)
    devices = list(jax.devices() if devices is None else devices)
    if cfg.size != len(devices):
        sizes = " × ".join(f"{axis}={size}" for axis, size in cfg.shape.items())
        raise ValueError(
            f"the mesh {sizes} has {cfg.size} devices but {len(devices)} are available; set the mesh.* sizes "
            f"so that their product is {len(devices)} (e.g. mesh.data={len(devices)})"
        )
    # Auto axes: sharding propagates through models that contain no sharding code.
    return jax.make_mesh(tuple(cfg.shape.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def check_heads(num_heads: int, cfg: MeshConfig, what: str = "the model") -> None:
    """Heads are split over ``tensor`` whole; a size that doesn't divide them is an error."""
    if num_heads % cfg.tensor:
        choices = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"mesh.tensor={cfg.tensor} does not divide the {num_heads} attention heads of {what}; "
            f"choose mesh.tensor from {choices}"
        )


HEAD_FIELDS = ("num_attention_heads", "num_heads", "heads")


def check_model(model_config: Any, cfg: MeshConfig) -> None:
    """Checks a model's architecture config against the mesh (head counts today)."""
    for name in HEAD_FIELDS:
        heads = getattr(model_config, name, None)
        if isinstance(heads, int) and heads > 0 and cfg.tensor > 1:
            check_heads(heads, cfg, type(model_config).__name__)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh with its rules: turns logical names into shardings and places arrays and models."""

    mesh: Mesh | jax.sharding.AbstractMesh
    rules: dict[str, tuple[str, ...]]
    param_rules: tuple[tuple[str, tuple[str | None, ...]], ...]

    # --- specs

    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None, *,
             strict: bool | None = True) -> PartitionSpec:
        """PartitionSpec for logical ``names`` (``logical.ANY``: the compiler chooses). With ``shape``,
        a dim the mesh axes don't divide is an error when ``strict``, left whole when False, left to
        the compiler when None. Axes of size 1 are dropped."""
        if shape is not None and len(shape) != len(names):
            raise ValueError(f"logical names {tuple(names)} do not match an array of shape {tuple(shape)}")
        used: set[str] = set()
        parts = []
        for dim, name in enumerate(names):
            if name is None or name == logical.ANY:
                parts.append(None if name is None else PartitionSpec.UNCONSTRAINED)
                continue
            if name not in self.rules:
                raise ValueError(f"unknown logical axis name {name!r}; known: {sorted(self.rules)}")
            axes = tuple(a for a in self.rules[name] if self.mesh.shape[a] > 1 and a not in used)
            split = math.prod(self.mesh.shape[a] for a in axes)
            if shape is not None and shape[dim] % split:
                if strict:
                    sizes = ", ".join(f"{a}={self.mesh.shape[a]}" for a in axes)
                    raise ValueError(f"dimension {dim} ({name}) of size {shape[dim]} does not split over "
                                     f"{sizes} (shape {tuple(shape)})")
                if strict is None:  # activations: let the compiler place it
                    parts.append(PartitionSpec.UNCONSTRAINED)
                    continue
                axes = ()
            used.update(axes)
            parts.append(axes[0] if len(axes) == 1 else (axes or None))
        return PartitionSpec(*parts)

    def sharding(self, names, shape=None, *, strict: bool | None = True) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape, strict=strict))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    # --- activations

    def put(self, x, names: Sequence[str | None]) -> jax.Array:
        """Places a host array (the same on every process) or a jax array with logical ``names``."""
        sharding = self.sharding(names, np.shape(x))
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def constrain(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        """Inside jit: pins an activation's placement by logical names (a dim the mesh axes
        don't divide is left to the compiler)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape, strict=None))

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Trace (and call) jitted model code inside this block: the layers' logical
        ``models.logical.constrain`` marks then resolve against this mesh and its rules."""
        token = _ACTIVE.set(self)
        try:
            with jax.set_mesh(self.mesh), logical.resolver(self.constrain):
                yield
        finally:
            _ACTIVE.reset(token)

    def shard_denoiser(self, denoise: Callable) -> Callable:
        """Wraps ``denoise(params, latents, timesteps, cond)`` (the FIFO / sampler contract) so the
        batch axis of its inputs and output (FIFO: windows × CFG) is split by the ``batch`` rule."""

        def batch_first(a):
            if not getattr(a, "ndim", 0):
                return a
            return self.constrain(a, ("batch",) + (None,) * (a.ndim - 1))

        def sharded(params, latents, timesteps, cond):
            latents, timesteps, cond = jax.tree.map(batch_first, (latents, timesteps, cond))
            return batch_first(denoise(params, latents, timesteps, cond))

        return sharded

    # --- parameters

    def param_names(self, path: str, ndim: int) -> tuple[str | None, ...]:
        """Logical names of a parameter from its dotted path; trailing-aligned, None-padded."""
        for pattern, names in self.param_rules:
            if re.search(pattern, path):
                names = tuple(names)[-ndim:] if ndim else ()
                return (None,) * (ndim - len(names)) + names
        return (None,) * ndim

    def param_shardings(self, state: nnx.State) -> nnx.State:
        """A NamedSharding per variable of ``state`` (concrete or abstract); non-params are replicated."""

        def one(path, variable):
            shape = np.shape(variable.get_value())
            if not isinstance(variable, nnx.Param):
                return variable.replace(self.replicated)
            names = self.param_names(_dotted(path), len(shape))
            return variable.replace(self.sharding(names, shape, strict=False))

        return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def init_model(self, constructor: Callable[[], nnx.Module]) -> nnx.Module:
        """Builds ``constructor()`` directly in its shardings: each device creates only its shards."""
        graphdef, abstract_state = nnx.split(nnx.eval_shape(constructor))
        shardings = self.param_shardings(abstract_state)
        state = jax.jit(lambda: nnx.split(constructor())[1], out_shardings=shardings)()
        return nnx.merge(graphdef, state)

    def abstract_model(self, constructor: Callable[[], nnx.Module]) -> nnx.Module:
        """``nnx.eval_shape(constructor)`` with a sharding on every leaf, the target for
        ``checkpoint.restore_into``: orbax reads each parameter straight into its shards."""
        graphdef, abstract_state = nnx.split(nnx.eval_shape(constructor))
        shardings = self.param_shardings(abstract_state)
        state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                             abstract_state, shardings)
        return nnx.merge(graphdef, state)

    def place_model(self, model: nnx.Module) -> nnx.Module:
        """Moves an existing (small) model's state into its shardings."""
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.device_put(state, self.param_shardings(state)))


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("active_layout", default=None)


def active_layout() -> Layout | None:
    """The layout whose ``activate()`` block is running, if any."""
    return _ACTIVE.get()


def shard_denoiser(denoise: Callable) -> Callable:
    """``active_layout().shard_denoiser(denoise)`` inside an ``activate()`` block, else ``denoise``:
    pipelines wrap their denoiser once and run unchanged on one device."""
    layout = active_layout()
    return denoise if layout is None else layout.shard_denoiser(denoise)


def abstract_model(constructor: Callable[[], nnx.Module]) -> nnx.Module:
    """The restore target of ``constructor``: sharded by the active layout, else plain ``eval_shape``."""
    layout = active_layout()
    if layout is None or layout.mesh.size == 1:
        return nnx.eval_shape(constructor)
    return layout.abstract_model(constructor)


def init_model(constructor: Callable[[], nnx.Module]) -> nnx.Module:
    """``constructor()`` built in the active layout's shardings (each device makes its shards)."""
    layout = active_layout()
    if layout is None or layout.mesh.size == 1:  # eager: no init compile on one device
        return constructor()
    return layout.init_model(constructor)


def setup(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Layout:
    """Starts multi-host JAX when asked, then builds the mesh and its rules."""
    if devices is None:
        initialize_distributed(cfg)
    rules, param_rules = _checked_rules(cfg)
    return Layout(make_mesh(cfg, devices), rules, param_rules)


def abstract_layout(cfg: MeshConfig) -> Layout:
    """The layout of ``cfg`` on an abstract mesh (no devices needed): for planning memory."""
    rules, param_rules = _checked_rules(cfg)
    mesh = jax.sharding.AbstractMesh(tuple(cfg.shape.values()), MESH_AXES,
                                     axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Layout(mesh, rules, param_rules)


def _checked_rules(cfg: MeshConfig):
    for axis, size in cfg.shape.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh.{axis} must be a positive integer, got {size!r}")
    rules = resolve_rules(cfg)
    param_rules = tuple(cfg.param_rules) + DEFAULT_PARAM_RULES
    for pattern, names in param_rules:
        re.compile(pattern)
        unknown = [n for n in names if n is not None and n not in rules]
        if unknown:
            raise ValueError(f"param rule {pattern!r} uses unknown logical axis {unknown[0]!r}; known: {sorted(rules)}")
    return rules, param_rules


def _dotted(path) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
    return ".".join(parts)

"""The converted-checkpoint format: ``DIR/params`` (orbax) plus ``DIR/config.json``.

``convert`` writes it, inference and fine-tuning export read it, and no torch is needed to load it.
``config.json`` holds ``{"kind": ..., "model": <architecture config>, ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jax_repvideo import sharding

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def nest(flat: Mapping[str, Any]) -> dict:
    """``{"a.b.0.c": x}`` → ``{"a": {"b": {0: {"c": x}}}}`` (integer parts become int keys)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def save(directory: str | Path, params: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """Writes flat dotted host ``params`` and the JSON ``config`` into ``directory``.

    Under several processes every one must call it with the same params (orbax's save is collective);
    only process 0 writes.
    """
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    tree = _string_keys(nest({k: np.asarray(v) for k, v in params.items()}))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, tree, force=True)
    checkpointer.wait_until_finished()
    if sharding.is_primary():
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a converted checkpoint directory")
    return json.loads(path.read_text())


def restore_into(directory: str | Path, model: nnx.Module) -> nnx.Module:
    """Restores the params of ``directory`` into ``model`` (a concrete or eval_shape'd module).

    Each parameter lands with the sharding of the target's leaf when it has one, so a sharded
    abstract model restores straight into its placement.
    """
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    target = jax.tree.map(_restore_arg, _string_keys(pure))
    restored = ocp.StandardCheckpointer().restore(Path(directory).absolute() / PARAMS_DIR, target)
    nnx.replace_by_pure_dict(state, _int_keys_like(restored, pure))
    return nnx.merge(graphdef, state)


def _restore_arg(leaf):
    placement = getattr(leaf, "sharding", None)
    if placement is None:
        placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placement)


def _string_keys(tree):
    if isinstance(tree, Mapping):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _int_keys_like(tree, like):
    if isinstance(like, Mapping):
        return {k: _int_keys_like(tree[str(k)], v) for k, v in like.items()}
    return tree

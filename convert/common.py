"""Declarative PyTorch → Flax conversion: safe loading, key tables, strict checking.

A converter is a list of ``Rule``s. Each rule's regex is matched (``fullmatch``) against a source
key; its target is a dotted path into the Flax model's parameter tree, which may use the regex
groups (``\\1``) and may end in ``[\\1]`` to fill one slice of a stacked (scanned) parameter. A rule
with several targets takes a transform that returns one array per target (fused projections).

``convert_state_dict`` fails hard, listing keys, on any unmapped source key, any unfilled target,
and any shape or dtype mismatch. Targets come from ``nnx.eval_shape`` of the model, so nothing is
allocated twice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

Transform = Callable[[np.ndarray], Any]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists the offending keys."""


# ---------------------------------------------------------------- layout transforms (PyTorch → Flax)
def identity(w: np.ndarray) -> np.ndarray:
    return w


def linear(w: np.ndarray) -> np.ndarray:
    """Linear ``(out, in)`` → ``(in, out)``."""
    return w.T


def conv1d(w: np.ndarray) -> np.ndarray:
    """Conv1d ``(O, I, k)`` → ``(k, I, O)``."""
    return w.transpose(2, 1, 0)


def conv2d(w: np.ndarray) -> np.ndarray:
    """Conv2d ``(O, I, kh, kw)`` → ``(kh, kw, I, O)``."""
    return w.transpose(2, 3, 1, 0)


def conv3d(w: np.ndarray) -> np.ndarray:
    """Conv3d ``(O, I, kt, kh, kw)`` → ``(kt, kh, kw, I, O)``."""
    return w.transpose(2, 3, 4, 1, 0)


def conv1x1_as_linear(w: np.ndarray) -> np.ndarray:
    """A 1×1 Conv2d ``(O, I, 1, 1)`` used as a Linear ``(I, O)``."""
    return w.reshape(w.shape[0], w.shape[1]).T


@dataclass(frozen=True)
class Rule:
    pattern: str
    target: str | tuple[str, ...]
    transform: Transform = identity

    def match(self, key: str) -> re.Match | None:
        return re.fullmatch(self.pattern, key)


# ---------------------------------------------------------------- safe loading
def load_torch_state_dict(path: str | Path, nested_keys: Sequence[str] = ("state_dict", "module")) -> dict:
    """Loads a torch checkpoint without running pickled code (``weights_only=True``, mmap).

    If the file holds a dict whose tensors sit under one of ``nested_keys``, that dict is returned.
    Values stay torch tensors (memory-mapped); ``to_numpy`` converts them one at a time.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, not a torch file, or a pickle that is not plain data
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise CheckpointError(f"cannot read {path} as a torch checkpoint ({type(err).__name__}: {err})") from None
    while isinstance(data, Mapping):
        inner = next((k for k in nested_keys if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            break
        data = data[inner]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict")
    return dict(data)


def load_safetensors(paths: Iterable[str | Path]) -> dict:
    """Lazily reads tensors from one or more safetensors files as numpy arrays."""
    from safetensors import safe_open

    out = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    out[key] = _LazySafetensor(str(path), key)
        except Exception as err:
            raise CheckpointError(f"cannot read {path} as safetensors ({err})") from None
    return out


def load_safetensors_folder(folder: str | Path) -> dict:
    """All tensors of a diffusers/transformers folder: a single file or an index of shards."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    return load_safetensors(files)


class _LazySafetensor:
    def __init__(self, path: str, key: str):
        self.path, self.key = path, key

    def numpy(self) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:  # pt handles bf16, which numpy lacks
            return to_numpy(f.get_tensor(self.key))


def to_numpy(value: Any) -> np.ndarray:
    """numpy view of a torch tensor / lazy tensor / array; bf16 and fp16 become float32."""
    if isinstance(value, _LazySafetensor):
        return value.numpy()
    if hasattr(value, "detach"):  # torch.Tensor
        import torch

        tensor = value.detach()
        if tensor.is_floating_point() and tensor.dtype != torch.float32 and tensor.dtype != torch.float64:
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(value)


def model_folder(src: str | Path, sub: str, what: str) -> Path:
    """``src`` itself when it holds a ``config.json`` (and no ``src/sub``), else ``src/sub``."""
    src = Path(src)
    folder = src if (src / "config.json").is_file() and not (src / sub).is_dir() else src / sub
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no {what} config at {folder / 'config.json'}")
    return folder


def fill_params(abstract_model, flat: Mapping[str, np.ndarray]):
    """A concrete NNX model: ``abstract_model`` (eval_shape) with its params set from flat dotted ``flat``."""
    from flax import nnx

    from jax_repvideo import checkpoint

    state = nnx.state(abstract_model, nnx.Param)
    nnx.replace_by_pure_dict(state, checkpoint.nest(flat))
    return nnx.merge(nnx.graphdef(abstract_model), state)


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- the table-driven conversion
def target_shapes(abstract_state) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Dotted path → (shape, dtype) for every parameter of an abstract (eval_shape) NNX state."""
    out = {}
    for path, var in abstract_state.flat_state():
        value = var.get_value() if hasattr(var, "get_value") else var
        out[".".join(str(p) for p in path)] = (tuple(value.shape), np.dtype(value.dtype))
    return out


def convert_state_dict(
    source: Mapping[str, Any],
    rules: Sequence[Rule],
    abstract_state,
    *,
    ignore: Sequence[str] = (),
    what: str = "checkpoint",
) -> dict[str, np.ndarray]:
    """Maps ``source`` through ``rules`` onto the parameters of ``abstract_state``.

    Returns dotted path → float array matching the target's shape and dtype. Keys matching an
    ``ignore`` regex are skipped on purpose (e.g. buffers that the Flax model recomputes).
    """
    targets = target_shapes(abstract_state)
    filled: dict[str, np.ndarray] = {}
    slices: dict[str, dict[int, np.ndarray]] = {}
    slice_keys: dict[str, dict[int, tuple[str, str]]] = {}  # stacked path → layer → key around its index
    source_keys: dict[str, str] = {}  # target path → source key, for messages
    unmapped, problems = [], []
    for key in source:
        if any(re.fullmatch(p, key) for p in ignore):
            continue
        rule, match = _first_match(rules, key)
        if rule is None:
            unmapped.append(key)
            continue
        array = to_numpy(source[key])
        if not np.issubdtype(array.dtype, np.floating):
            problems.append(f"{key}: dtype {array.dtype} is not floating point")
            continue
        names = (rule.target,) if isinstance(rule.target, str) else rule.target
        arrays = rule.transform(array)
        arrays = (arrays,) if isinstance(rule.target, str) else tuple(arrays)
        for name, value in zip(names, arrays):
            path = match.expand(name)
            stacked = re.fullmatch(r"(.*)\[(\d+)\]", path)
            if stacked:
                slices.setdefault(stacked.group(1), {})[int(stacked.group(2))] = value
                slice_keys.setdefault(stacked.group(1), {})[int(stacked.group(2))] = _key_template(key, match, name)
            elif path in filled:
                problems.append(f"{key}: target {path} is filled twice")
            else:
                filled[path] = value
                source_keys[path] = key
    for path, parts in slices.items():
        filled[path] = _stack(path, parts, targets, problems, slice_keys[path])
        if filled[path] is None:  # already reported; keeps the checks below quiet about it
            filled[path] = _shape_only(targets[path][0]) if path in targets else np.zeros((0,))
    if unmapped:
        raise CheckpointError(f"{what}: {len(unmapped)} unexpected key(s) with no place in the model: "
                              + ", ".join(sorted(unmapped)))
    extra_targets = sorted(set(filled) - set(targets))
    if extra_targets:
        raise CheckpointError(f"{what}: the key table names parameters the model lacks: {', '.join(extra_targets)}")
    missing = sorted(set(targets) - set(filled))
    if missing:
        raise CheckpointError(f"{what}: {len(missing)} model parameter(s) not filled by any key "
                              f"(missing from the checkpoint): " + ", ".join(missing))
    for path, value in filled.items():
        shape, dtype = targets[path]
        if tuple(value.shape) != shape:
            origin = f" (key {source_keys[path]})" if path in source_keys else ""
            problems.append(f"{path}{origin}: checkpoint gives shape {tuple(value.shape)}, model expects {shape}")
        else:
            filled[path] = value.astype(dtype, copy=False)
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    return filled


def _first_match(rules: Sequence[Rule], key: str):
    for rule in rules:
        match = rule.match(key)
        if match:
            return rule, match
    return None, None


def _key_template(key: str, match: re.Match, target: str) -> tuple[str, str]:
    """``key`` split around its layer index (the group that the target's ``[\\N]`` names)."""
    group = re.search(r"\[\\(\d+)\]$", target)
    if group is None:
        return key, ""
    start, end = match.span(int(group.group(1)))
    return key[:start], key[end:]


def _layer_keys(keys: dict[int, tuple[str, str]], layers: Iterable[int]) -> str:
    template = next(iter(keys.values()), None)
    if template is None:
        return ""
    return " (keys " + ", ".join(f"{template[0]}{i}{template[1]}" for i in layers) + ")"


def _stack(path: str, parts: dict[int, np.ndarray], targets, problems: list,
           keys: dict[int, tuple[str, str]] | None = None) -> np.ndarray | None:
    """The layers of one stacked param in order, or None after appending what is wrong to ``problems``."""
    keys = keys or {}
    expected = targets.get(path, ((len(parts),), None))[0][0]
    absent = sorted(set(range(expected)) - set(parts))
    if absent:
        problems.append(f"{path}: layer(s) {absent} missing from the checkpoint{_layer_keys(keys, absent)}")
        return None
    if len(parts) > expected:
        extra = sorted(set(parts) - set(range(expected)))
        problems.append(f"{path}: checkpoint has {len(parts)} layers, model has {expected}{_layer_keys(keys, extra)}")
        return None
    ordered = [parts[i] for i in range(expected)]
    layer_shape = targets[path][0][1:] if path in targets else tuple(ordered[0].shape)
    wrong = [i for i, part in enumerate(ordered) if tuple(part.shape) != tuple(layer_shape)]
    if wrong:
        problems.extend(f"{path}[{i}]{_layer_keys(keys, [i])}: checkpoint gives shape {tuple(ordered[i].shape)}, "
                        f"model expects {tuple(layer_shape)} per layer" for i in wrong)
        return None
    if all(_is_shape_only(p) for p in ordered):
        return _shape_only((expected, *ordered[0].shape))
    return np.stack(ordered)


def check_keys_only(keys_and_shapes: Mapping[str, Sequence[int]], rules: Sequence[Rule], abstract_state,
                    *, ignore: Sequence[str] = (), what: str = "manifest") -> None:
    """The strict check of ``convert_state_dict`` for a manifest of shapes, allocating no weights."""
    fake = {k: _shape_only(tuple(s)) for k, s in keys_and_shapes.items()}
    convert_state_dict(fake, rules, abstract_state, ignore=ignore, what=what)


def _shape_only(shape: tuple[int, ...]) -> np.ndarray:
    """A zero-strided float array: the right shape and no memory (views keep it free)."""
    return np.broadcast_to(np.float32(0), shape)


def _is_shape_only(array: np.ndarray) -> bool:
    return array.size > 1 and not any(array.strides)

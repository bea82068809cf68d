"""Typed configs: frozen dataclasses, YAML presets and ``key=value`` overrides.

Every config in the project is a frozen dataclass. ``from_dict`` builds one from plain data and
rejects unknown keys and wrongly typed values, naming the dotted key, so a typo in a preset or on
the command line fails before anything compiles.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the dotted key."""


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Builds dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(_join(path, k) for k in unknown)
        raise ConfigError(f"unknown config key(s) {names}; {cls.__name__} accepts: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():  # a partial section keeps the field's own default values
        default = fields[name].default
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            data[name] = {**to_dict(default), **value}
    values = {name: _coerce(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{path or cls.__name__}: {err}") from None


def to_dict(config: Any) -> Any:
    """Plain, JSON/YAML-ready data for a config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``a.b=value`` strings to nested plain data; values are parsed as YAML scalars."""
    result = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return result


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load(cls: type[T], path: str | Path, overrides: Sequence[str] = (), *, section: str | None = None) -> T:
    """Loads a YAML preset into ``cls`` after applying ``key=value`` overrides.

    ``section`` (dotted, e.g. ``"videocrafter2.unet"``) reads one part of a larger preset, such as the
    architecture inside a run preset; a file without that section is read whole.
    """
    data = load_yaml(path)
    for part in (section.split(".") if section else []):
        if not isinstance(data.get(part), dict):
            break
        data = data[part]
    return from_dict(cls, apply_overrides(data, overrides))


def replace(config: T, overrides: Sequence[str]) -> T:
    """A copy of ``config`` with ``key=value`` overrides applied and re-validated."""
    return from_dict(type(config), apply_overrides(to_dict(config), overrides))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a section ({hint.__name__}), got {value!r}")
        return from_dict(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_hint, value_hint = args or (Any, Any)
        return {
            _coerce(key_hint, k, f"{path}.{k}"): _coerce(value_hint, v, f"{path}.{k}")
            for k, v in value.items()
        }
    return _coerce_scalar(hint, value, path)


def _coerce_scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint in (int, float, bool, str):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{path}: cannot use {value!r} as {hint}")

import dataclasses
from typing import Literal

import pytest

from jax_repvideo import config


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 4
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    scale: float = 1.0
    dims: tuple[int, ...] = (1, 2)
    inner: Inner = Inner()
    path: str | None = None


def test_overrides_are_typed_and_nested(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("name: y\ninner:\n  size: 8\n")
    cfg = config.load(Outer, preset, ["scale=2", "inner.mode=b", "dims=[3,4,5]", "path=out.mp4"])
    assert cfg == Outer(name="y", scale=2.0, dims=(3, 4, 5), inner=Inner(size=8, mode="b"), path="out.mp4")
    assert config.from_dict(Outer, config.to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, message", [
    (["inner.sise=3"], "inner.sise"),
    (["scale=big"], "scale: expected float"),
    (["inner.mode=c"], "inner.mode: 'c' is not one of"),
    (["inner.size=1.5"], "inner.size: expected int"),
    (["dims=3"], "dims: expected a list"),
    (["noequals"], "key=value"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.replace(Outer(), override)


def test_missing_preset_is_reported(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(Outer, tmp_path / "nope.yaml")


@dataclasses.dataclass(frozen=True)
class WithCustomDefault:
    inner: Inner = Inner(size=9, mode="b")


def test_partial_section_keeps_the_fields_own_defaults():
    assert config.from_dict(WithCustomDefault, {"inner": {"size": 1}}).inner == Inner(size=1, mode="b")

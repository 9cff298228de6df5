"""Typed config: YAML + overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from hypertrain.config import (
    Config,
    ConfigError,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    parse_override,
)


@dataclasses.dataclass
class Inner:
    rate: float = 0.1
    names: list[str] = dataclasses.field(default_factory=list)
    mode: Literal["a", "b"] = "a"
    limit: int | None = None


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    steps: int = 10
    flag: bool = False


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("steps: 20\ninner:\n  rate: 3\n  names: [x, y]\n")
    cfg = load_config(Outer, path, ["inner.mode=b", "flag=true", "inner.limit=null", "inner.rate=1e-4"])
    assert cfg == Outer(inner=Inner(rate=1e-4, names=["x", "y"], mode="b", limit=None), steps=20, flag=True)
    assert isinstance(load_config(Outer, path).inner.rate, float)  # int 3 in YAML is accepted as float


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=many", "steps: expected int, got 'many'"),
        ("steps=1.5", "steps: expected int"),
        ("flag=1", "flag: expected true/false"),
        ("inner.mode=c", r"inner.mode: expected one of \['a', 'b'\]"),
        ("inner.names=x", "inner.names: expected a list"),
        ("inner.limit=ten", "inner.limit: expected"),
        ("inner.bogus=1", "unknown config key inner.bogus"),
        ("nothing", "not of the form key.sub=value"),
        ("steps.sub=1", "steps: expected int, got {.sub.: 1}"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Outer, bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown.yaml: unknown config key stepz"):
        load_config(Outer, unknown)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "absent.yaml")


def test_defaults_are_not_mutated_by_overrides():
    defaults = {"inner": {"names": ["a"]}}
    load_config(Outer, None, ["inner.rate=2.0"], defaults=defaults)
    assert defaults == {"inner": {"names": ["a"]}}


def test_helpers():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert apply_overrides({}, ["a.b=3"]) == {"a": {"b": 3}}
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": []}) == {"a.b": 1, "a.c.d": "x", "e": []}
    assert from_dict(Outer, None) == Outer()


def test_project_config_round_trips():
    cfg = load_config(Config, None, ["model.name=xl", "sni_prep.max_instances_per_task=7"])
    again = from_dict(Config, dataclasses.asdict(cfg))
    assert again == cfg and again.model.name == "xl"


def test_a_config_file_extends_others_in_order_and_cycles_are_named(tmp_path):
    from hypertrain.config import load_config

    (tmp_path / "base.yaml").write_text("train:\n  lr: 1.0e-4\n  total_steps: 5\nmodel:\n  name: small\n")
    (tmp_path / "method.yaml").write_text("method: pha\ntrain:\n  total_steps: 7\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.yaml").write_text("extends: [../base.yaml, ../method.yaml]\ntrain:\n  seed: 3\n")
    cfg = load_config(path=tmp_path / "sub" / "run.yaml")
    assert (cfg.method, cfg.model.name, cfg.train.lr, cfg.train.total_steps, cfg.train.seed) == ("pha", "small", 1e-4, 7, 3)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(path=tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml not found"):
        load_config(path=tmp_path / "c.yaml")

"""Config coercion: YAML/CLI values to declared types, Literals, unions, strict model files, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from todsynth.config import build_config, config_from_file, load_config, parse_overrides
from todsynth.errors import CheckpointError, ConfigError


@dataclass
class Demo:
    """Every kind of field the stage configs declare."""

    steps: int = 1
    lr: float = 1e-3
    amp: bool = False
    name: str = "run"
    out: Path = Path("runs")
    layers: tuple[int, ...] = (1,)
    crop: Literal["random", "center"] = "random"
    seed: int | None = None
    workers: int | Literal["auto"] = "auto"
    extra: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


def build(**values):
    return build_config(Demo, values)


def refused(match: str, strict: bool = False, **values) -> None:
    with pytest.raises(ConfigError, match=match):
        build_config(Demo, values, strict=strict)


def test_cli_strings_become_the_declared_types():
    cfg = build(steps="7", lr="1e-4", amp="yes", name=5, out="a/b", layers="2,4,", crop="center", seed="3")
    assert (cfg.steps, cfg.lr, cfg.amp, cfg.name, cfg.out, cfg.layers, cfg.crop, cfg.seed) == (
        7,
        1e-4,
        True,
        "5",
        Path("a/b"),
        (2, 4),
        "center",
        3,
    )
    assert type(cfg.steps) is int and type(cfg.lr) is float and type(cfg.layers) is tuple
    assert build(steps=7.0).steps == 7 and build(amp="0").amp is False and build(layers=[1, "2"]).layers == (1, 2)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"steps": "7.5"}, "'steps' must be an integer"),
        ({"steps": True}, "'steps' must be an integer"),
        ({"steps": "inf"}, "'steps' must be an integer"),
        ({"lr": "nan"}, "'lr' must be a finite number"),
        ({"lr": False}, "'lr' must be a number"),
        ({"amp": "maybe"}, "'amp' must be true or false"),
        ({"name": ["a"]}, "'name' must be a string"),
        ({"layers": 5}, "'layers' must be a list"),
        ({"layers": "1,x"}, "'layers' must be an integer"),
        ({"extra": [1]}, "'extra' must be a mapping"),
    ],
)
def test_wrong_values_name_the_setting(values, match):
    refused(match, **values)


def test_literal_choices_are_checked_and_listed():
    refused(r"'crop' must be one of \['random', 'center'\], got 'squash'", crop="squash")


def test_unions_try_each_type_and_list_them_all():
    assert build(seed=None).seed is None and build(workers="4").workers == 4 and build(workers="auto").workers == "auto"
    refused(r"'workers' must be an integer or 'auto', got 'many'", workers="many")
    refused("'seed' must be an integer", seed="x")  # one type besides None: that type's own message


def test_unknown_and_missing_settings_and_validate():
    refused(r"unknown setting 'stpes'; did you mean 'steps'\?", stpes=3)
    refused("steps must be >= 1", steps=0)

    @dataclass
    class Needs:
        size: int

    with pytest.raises(ConfigError, match=r"missing setting\(s\) \['size'\]"):
        build_config(Needs, {})


def test_strict_mode_converts_nothing():
    """Model files the program wrote hold exact types: a string or a float where an integer belongs is damage."""
    cfg = build_config(Demo, {"steps": 3, "lr": 1, "out": "x", "layers": [2, 3], "seed": None}, strict=True)
    assert (cfg.steps, cfg.lr, cfg.out, cfg.layers) == (3, 1.0, Path("x"), (2, 3)) and type(cfg.lr) is float
    refused("'steps' must be an integer, got '3'", strict=True, steps="3")
    refused("'steps' must be an integer, got 2.0", strict=True, steps=2.0)
    refused("'steps' must be an integer, got True", strict=True, steps=True)
    refused("'amp' must be true or false, got 'yes'", strict=True, amp="yes")
    refused("'layers' must be an integer", strict=True, layers=["2"])
    refused("'seed' must be an integer", strict=True, seed="1")


def test_model_files_turn_config_errors_into_checkpoint_errors(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(CheckpointError, match="'steps' must be an integer") as e:
        config_from_file(Demo, {"steps": "3"}, path, fix="save the model again")
    assert e.value.path == path and e.value.fix == "save the model again"
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        config_from_file(Demo, [1], path, fix="x")


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nname: file\n")
    cfg = load_config(Demo, path, {"name": "cli", "lr": None})
    assert (cfg.steps, cfg.name, cfg.lr) == (5, "cli", 1e-3)  # None overrides are "not given"
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Demo, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Demo, tmp_path / "missing.yaml")


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["steps=3", "lr = 0.5", "layers=[1, 2]", "name=a=b"]) == {
        "steps": 3,
        "lr": 0.5,
        "layers": [1, 2],
        "name": "a=b",
    }
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_overrides(["steps"])

"""Typed stage configs: one dataclass per stage, filled from YAML and CLI overrides, validated up front."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from todsynth.errors import CheckpointError, ConfigError, TodsynthError

C = TypeVar("C")


def _coerce(name: str, value: Any, tp: Any, source: str, strict: bool = False) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError naming the key.

    `strict` (JSON files the program wrote) converts nothing: "7" is no integer and 2.0 no count.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        options = [a for a in args if a is not type(None)]
        for a in options:
            try:
                return _coerce(name, value, a, source, strict)
            except ConfigError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise ConfigError(f"'{name}' must be {' or '.join(_describe(a) for a in options)}, got {value!r}",
                          path=source)
    if strict:
        return _check_exact(name, value, tp, source)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"'{name}' must be one of {list(args)}, got {value!r}", path=source)
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {value!r}", path=source)
        inner = args[0] if args else Any
        return origin(_coerce(name, v, inner, source) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"'{name}' must be true or false, got {value!r}", path=source)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"'{name}' must be an integer, got {value!r}", path=source)
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{name}' must be an integer, got {value!r}", path=source) from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"'{name}' must be an integer, got {value!r}", path=source)
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"'{name}' must be a number, got {value!r}", path=source)
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{name}' must be a number, got {value!r}", path=source) from None
        if not math.isfinite(f):
            raise ConfigError(f"'{name}' must be a finite number, got {value!r}", path=source)
        return f
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"'{name}' must be a string, got {value!r}", path=source)
        return str(value)
    if tp is Path:
        return Path(value)
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"'{name}' must be a mapping, got {value!r}", path=source)
    return value


def _describe(tp: Any) -> str:
    """What a value of the declared type `tp` looks like, for messages listing every accepted kind."""
    if typing.get_origin(tp) is typing.Literal:
        return ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        return "a list"
    names = {bool: "true, false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


_EXACT_TYPES: dict[Any, tuple[tuple[type, ...], str]] = {
    int: ((int,), "an integer"), float: ((int, float), "a number"), bool: ((bool,), "true or false"),
    str: ((str,), "a string"), Path: ((str,), "a path string")}


def _check_exact(name: str, value: Any, tp: Any, source: str) -> Any:
    """Return `value` if it already has the declared type (JSON lists become tuples), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {value!r}", path=source)
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return origin(_coerce(name, v, inner, source, strict=True) for v in value)
    if tp in _EXACT_TYPES:
        accepted, kind = _EXACT_TYPES[tp]
        if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"'{name}' must be {kind}, got {value!r}", path=source)
    return _coerce(name, value, tp, source)


def build_config(cls: type[C], values: dict[str, Any] | None = None, source: str = "config",
                 strict: bool = False) -> C:
    """Create `cls` from a mapping: unknown or missing keys and wrongly typed values raise ConfigError.

    `strict` refuses values of another type instead of converting them (see `_coerce`).
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(str(k) for k in set(values) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(names)}", path=source)
    missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing setting(s) {missing}", path=source)
    kwargs = {k: _coerce(k, v, hints[k], source, strict) for k, v in values.items()}
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Read a YAML file (optional) into `cls`, then apply `overrides` (e.g. from the CLI)."""
    import yaml

    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError("config file not found", path=path, fix="check the --config path") from None
        except OSError as e:
            raise ConfigError(f"cannot read the config file: {e.strerror}", path=path,
                              fix="give a readable YAML file") from None
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: e.g. a date like 2001-02-30
            raise ConfigError(f"not valid YAML: {e}", path=path, fix="fix the YAML syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("expected a mapping of setting: value", path=path)
        values.update(loaded or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(cls, values, source)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse CLI `--set key=value` items; values are YAML scalars (numbers, booleans, lists)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value", fix="write e.g. --set lr=0.001")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            raise ConfigError(f"override {item!r}: the value is not a YAML scalar or list ({e})",
                              fix="quote strings, e.g. --set name='a b'") from None
    return out


def config_from_file(cls: type[C], data: Any, path: str | Path, fix: str) -> C:
    """Build `cls` from a model file's JSON content with build_config's checks and strict types.

    Model folders (segmenter config.json, generator pipeline.json and transformer/config.json) are read
    through here, so one place checks their keys, types and ranges; any problem is a CheckpointError
    naming `path`, with `fix` unless the check gave a more specific one.
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"expected a JSON object of setting: value, got {type(data).__name__}",
                              path=path, fix=fix)
    try:
        return build_config(cls, data, str(path), strict=True)
    except TodsynthError as e:
        raise CheckpointError(e.problem, path=path, fix=e.fix or fix) from None


def require(cond: bool, message: str, source: str = "config", fix: str | None = None) -> None:
    """Raise ConfigError(message) unless `cond`; used by the configs' validate() methods."""
    if not cond:
        raise ConfigError(message, path=source, fix=fix)


def setting(default: Any = dataclasses.MISSING, *, help: str = "", resume_free: bool = False,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its one-line `help` and whether a resumed run may change it (`resume_free`: the
    setting does not change the trajectory, e.g. logging intervals or the output folder)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "resume_free": resume_free})


def resume_free_names(cls: type) -> set[str]:
    """Dotted names of the fields of the config class `cls` (nested configs included) declared resume_free."""
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("resume_free"):
            out.add(f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out |= {f"{f.name}.{n}" for n in resume_free_names(hints[f.name])}
    return out


def flat_dict(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings mapping (e.g. `dataclasses.asdict` of a config) as {dotted name: value}."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

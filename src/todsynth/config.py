"""Typed stage configs: one dataclass per stage, filled from YAML and CLI overrides, validated up front.

Configs nest (a dataclass field holds another config) and are reached by dotted names (`model.num_layers`) in
YAML (nested or dotted keys) and `--set`. Parsing is this module's small coercer over the type hints, not a
library: pydantic or omegaconf would add a dependency and a second model of every config for no fewer lines.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from todsynth.errors import CheckpointError, ConfigError, TodsynthError

C = TypeVar("C")
# what strict reading (files the program wrote) accepts for each plain type, and how a message names it
_EXACT_TYPES: dict[Any, tuple[tuple[type, ...], str]] = {
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    bool: ((bool,), "true or false"),
    str: ((str,), "a string"),
    Path: ((str,), "a path string"),
}


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
        raise ConfigError(f"'{name}' must be {' or '.join(_describe(a) for a in options)}, got {value!r}", path=source)
    if strict and tp in _EXACT_TYPES:
        accepted, kind = _EXACT_TYPES[tp]
        if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"'{name}' must be {kind}, got {value!r}", path=source)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"'{name}' must be one of {list(args)}, got {value!r}", path=source)
        return value
    if origin in (tuple, list):
        if isinstance(value, str) and not strict:
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {value!r}", path=source)
        return origin(_coerce(name, v, args[0] if args else Any, source, strict) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"'{name}' must be true or false, got {value!r}", path=source)
    if tp in (int, float):
        try:
            f = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            f = None
        if f is None or not math.isfinite(f) or (tp is int and f != int(f)):
            kind = "an integer" if tp is int else "a number" if f is None else "a finite number"
            raise ConfigError(f"'{name}' must be {kind}, got {value!r}", path=source)
        return int(f) if tp is int else f
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"'{name}' must be a string, got {value!r}", path=source)
        return str(value)
    if tp is Path:
        return Path(value)
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"'{name}' must be a mapping, got {value!r}", path=source)
    if dataclasses.is_dataclass(tp) and not isinstance(value, tp):
        raise ConfigError(f"'{name}' must be a mapping of settings, got {value!r}", path=source)
    return value


def _describe(tp: Any) -> str:
    """What a value of the declared type `tp` looks like, for messages listing every accepted kind."""
    if typing.get_origin(tp) is typing.Literal:
        return ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        return "a list"
    names = {bool: "true, false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def build_config(
    cls: type[C],
    values: dict[str, Any] | None = None,
    source: str = "config",
    strict: bool = False,
    check: bool = True,
    prefix: str = "",
) -> C:
    """Create `cls` from a mapping (nested mappings or dotted keys for nested configs): unknown or missing keys and
    wrongly typed values raise ConfigError naming the dotted setting; `check` runs the configs' validate().

    A nested config starts from its field's default and takes the given keys over it; a string in its place names
    a row of its class's `PRESETS`. `strict` refuses values of another type instead of converting them (`_coerce`).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flat = flatten(cls, values or {})
    for name in [n for n in fields if dataclasses.is_dataclass(hints[n]) and isinstance(flat.get(n), str)]:
        flat = {**flatten(cls, {name: _preset(hints[name], flat.pop(name), prefix + name, source)}), **flat}
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        head, _, rest = str(key).partition(".")
        if head in fields and rest and dataclasses.is_dataclass(hints[head]):
            nested.setdefault(head, {})[rest] = value
        elif head in fields and not rest:
            own[head] = value
        else:
            raise ConfigError(
                f"unknown setting '{prefix}{key}'{_nearest(cls, str(key), prefix)}",
                path=source,
                fix=None if strict else "use a setting `todsynth config show STAGE` lists",
            )
    required = [n for n, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in own and n not in nested]
    if missing:
        raise ConfigError(f"missing setting(s) {[prefix + n for n in missing]}", path=source)
    kwargs = {k: _coerce(prefix + k, v, hints[k], source, strict) for k, v in own.items()}
    for name, sub in nested.items():
        factory = fields[name].default_factory
        start = {} if factory is dataclasses.MISSING else flatten(hints[name], factory())
        kwargs[name] = build_config(hints[name], {**start, **sub}, source, strict, check, f"{prefix}{name}.")
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if check and validate is not None:
        validate()
    return cfg


def flatten(cls: type, values: Any, file: str | Path | None = None) -> dict[str, Any]:
    """Settings of the config class `cls` as {dotted name: value}: nested mappings (and config instances) of its
    nested configs flattened, mapping-valued settings of their own kept whole. A later spelling of a setting wins
    (`{**asdict(cfg), "crfm.steps": 0}`), unless they come from one `file` (two values of one setting: refused)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in _plain(values).items():
        head, _, rest = str(key).partition(".")
        tp = hints[head] if head in names else None
        if dataclasses.is_dataclass(tp) and (rest or isinstance(value, dict)):
            items = {f"{head}.{k}": v for k, v in flatten(tp, {rest: value} if rest else value).items()}
        else:
            items = {str(key): value}
        for name, v in items.items():  # e.g. `model: {num_layers: 2}` beside `model.num_layers: 3`
            if file is not None and name in out and out[name] != v:
                raise ConfigError(f"'{name}' is given twice, as {out[name]!r} and {v!r}", path=file, fix="give it once")
            out[name] = v
    return out


def _plain(values: Any) -> Any:
    """`values` with config instances (at any depth) as mappings."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        return dataclasses.asdict(values)
    return {k: _plain(v) for k, v in values.items()} if isinstance(values, dict) else values


def _preset(cls: type, name: str, setting: str, source: str) -> dict[str, Any]:
    """The settings of the preset `name` of the config class `cls` (its `PRESETS` registry)."""
    presets = getattr(cls, "PRESETS", {})
    if name not in presets:
        raise ConfigError(
            f"'{setting}' must be a mapping of settings or one of {list(presets)}, got {name!r}", path=source
        )
    return _plain(presets[name])


def setting_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """(dotted name, field) of every setting of the config class `cls`, nested configs' settings included."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        is_config = dataclasses.is_dataclass(hints[f.name])
        out += setting_fields(hints[f.name], f"{prefix}{f.name}.") if is_config else [(prefix + f.name, f)]
    return out


def _nearest(cls: type, key: str, prefix: str) -> str:
    """'; did you mean ...' naming the known settings nearest to the unknown `key` (same last part, or close),
    or '; known: [...]' when none is near."""
    import difflib

    known = [name for name, _ in setting_fields(cls)]
    leaf = key.rsplit(".", 1)[-1]
    near = [n for n in known if n.rsplit(".", 1)[-1] == leaf] + difflib.get_close_matches(key, known, n=3)
    near = list(dict.fromkeys(near))[:3]
    if not near:
        return f"; known: {[prefix + n for n in known]}"
    return "; did you mean " + " or ".join(f"'{prefix}{n}'" for n in near) + "?"


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    check: bool = True,
) -> C:
    """`cls` from `defaults`, then a YAML file (optional), then `overrides` (e.g. from the CLI; None values are
    not given); keys are dotted names or nested mappings."""
    values = flatten(cls, defaults or {})
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except FileNotFoundError:
            raise ConfigError("config file not found", path=path, fix="check the --config path") from None
        except OSError as e:
            raise ConfigError(
                f"cannot read the config file: {e.strerror}", path=path, fix="give a readable YAML file"
            ) from None
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: e.g. a date like 2001-02-30
            raise ConfigError(f"not valid YAML: {e}", path=path, fix="fix the YAML syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("expected a mapping of setting: value", path=path)
        values.update(flatten(cls, loaded or {}, path))
    values.update({k: v for k, v in flatten(cls, overrides or {}).items() if v is not None})
    return build_config(cls, values, source, check=check)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"key(s) {repeated} given twice", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse CLI `--set key=value` items; values are YAML scalars (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not key=value", fix="write e.g. --set lr=0.001 or --set model.num_layers=6"
            )
        k, v = item.split("=", 1)
        if not v.strip():  # YAML reads an empty value as null, which would quietly mean "the default"
            raise ConfigError(f"override {item!r} has no value", fix=f"give one, e.g. --set {k.strip()}=VALUE")
        try:
            out[k.strip()] = yaml.safe_load(v)
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            raise ConfigError(
                f"override {item!r}: the value is not a YAML scalar or list ({e})",
                fix="quote strings, e.g. --set name='a b'",
            ) from None
    return out


def config_from_file(cls: type[C], data: Any, path: str | Path, fix: str) -> C:
    """Build `cls` from a model file's JSON content with build_config's checks and strict types: model folders are
    read through here, so one place checks their keys, types and ranges; a problem is a CheckpointError naming `path`,
    with `fix` unless the check gave a more specific one."""
    if not isinstance(data, dict):
        raise CheckpointError(
            f"expected a JSON object of setting: value, got {type(data).__name__}", path=path, fix=fix
        )
    try:
        return build_config(cls, data, str(path), strict=True)
    except TodsynthError as e:
        raise CheckpointError(e.problem, path=path, fix=e.fix or fix) from None


def require(cond: bool, message: str, source: str = "config", fix: str | None = None) -> None:
    """Raise ConfigError(message) unless `cond`; used by the configs' validate() methods."""
    if not cond:
        raise ConfigError(message, path=source, fix=fix)


def require_at_least(cfg: Any, minimum: float, *names: str) -> None:
    """Refuse any of the (dotted) settings `names` of `cfg` that is not a finite number >= `minimum` (None: unset)."""
    for name in names:
        value = functools.reduce(getattr, name.split("."), cfg)
        ok = value is None or (math.isfinite(value) and value >= minimum)
        require(ok, f"{name} must be a finite number >= {minimum}, got {value!r}")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    resume_free: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field with its one-line `help` and whether a resumed run may change it (`resume_free`: the
    setting does not change the trajectory, e.g. logging intervals or the output folder)."""
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"help": help, "resume_free": resume_free}
    )


def like(cls: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """A field that is `cls`'s setting `name` (same help) with its own default: the part of a stage config
    that an experiment cell chooses."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if default is dataclasses.MISSING:
        return setting(f.default, default_factory=f.default_factory, help=f.metadata.get("help", ""))
    if dataclasses.is_dataclass(default):
        return setting(default_factory=lambda: dataclasses.replace(default), help=f.metadata.get("help", ""))
    return setting(default, help=f.metadata.get("help", ""))


def resume_free_names(cls: type) -> set[str]:
    """Dotted names of the settings of the config class `cls` (nested configs included) declared resume_free."""
    return {name for name, f in setting_fields(cls) if f.metadata.get("resume_free")}


def flat_dict(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings mapping (e.g. `dataclasses.asdict` of a config) as {dotted name: value}."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        out.update(flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_yaml(cfg: Any, defaults: Any = None, indent: str = "") -> str:
    """`cfg` as YAML that `load_config` reads back, each setting under a comment with its help, type and default
    (the value in `defaults`, a config of the same class; `cfg` itself when None)."""
    defaults = cfg if defaults is None else defaults
    hints = typing.get_type_hints(type(cfg))
    lines = []
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            lines += [
                f"{indent}# {f.metadata.get('help', '')}".rstrip(),
                f"{indent}{f.name}:",
                config_yaml(value, default, indent + "  "),
            ]
            continue
        kind = _type_name(hints[f.name])
        shown = yaml.safe_dump(_plain_value(default), default_flow_style=True, width=10**6).split("\n")[0]
        lines.append(f"{indent}# {f.metadata.get('help', '')} [{kind}; default {shown}]".replace("#  [", "# ["))
        text = yaml.safe_dump({f.name: _plain_value(value)}, default_flow_style=True, width=10**6, sort_keys=False)
        lines.append(indent + text.strip()[1:-1])
    return "\n".join(lines)


def _plain_value(value: Any) -> Any:
    """A setting's value as YAML writes it: tuples as lists, paths as strings."""
    if isinstance(value, (tuple, list)):
        return [_plain_value(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _type_name(tp: Any) -> str:
    """A type hint in words for `config show`: int, a | b | c, list of str, int or null."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0]) if args else 'any'}"
    return getattr(tp, "__name__", str(tp))

"""Typed configs from YAML files plus dotted ``key=value`` overrides.

Configs are nested dataclasses so a typo is caught before a run starts: an unknown key is an
error listing the valid ones. The same ``key=value`` grammar is used on the command line, in
sweep grids and in the probe's overrides.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from predet.errors import UserError


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


# ---------------------------------------------------------------------------------------------
# Value checks: every config class names what each of its values may be, and a config is checked
# whole when it is loaded, before any work, with one line naming the key, the value and what is
# allowed. A value the class does not check is one any value of its type fits.


@dataclass(frozen=True)
class Check:
    ok: typing.Callable[[Any], bool]
    allowed: str


def above(low: float) -> Check:
    return Check(lambda v: v > low, f"> {low}")


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f">= {low}")


def between(low: float, high: float) -> Check:
    return Check(lambda v: low <= v <= high, f"in [{low}, {high}]")


def one_of(*choices) -> Check:
    return Check(lambda v: v in choices, "one of " + ", ".join(str(c) for c in choices))


def each(check: Check, length: int | None = None, increasing: bool = False) -> Check:
    """A list whose items all pass ``check``: non-empty, ``length`` long, ascending if asked."""
    def ok(values) -> bool:
        return (len(values) > 0 and (length is None or len(values) == length) and all(check.ok(v) for v in values)
                and (not increasing or all(a <= b for a, b in zip(values, values[1:]))))

    size = f"{length} values" if length else "a non-empty list"
    return Check(ok, f"{size}, each {check.allowed}{', ascending' if increasing else ''}")


POSITIVE, NON_NEGATIVE, FRACTION = above(0), at_least(0), between(0, 1)
RANGE = each(POSITIVE, length=2, increasing=True)  # [low, high] of a sampled quantity


def checked(**checks: Check):
    """Class decorator: the checks :func:`validate` applies to a config class's fields."""
    def register(cls):
        unknown = set(checks) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
        cls.__config_checks__ = checks
        return cls

    return register


def validate(cfg, prefix: str = "") -> None:
    """Every value of a config (nested classes included) against its class's checks."""
    checks = getattr(type(cfg), "__config_checks__", {})
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
            continue
        check = checks.get(f.name)
        try:
            good = check is None or bool(check.ok(value))
        except TypeError:
            good = False
        if not good:
            shown = "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else repr(value)
            raise ConfigError(f"{key}={shown}: must be {check.allowed}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config dataclass, for error messages and docs."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            keys += valid_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, key) for v in value]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is str:
        return value if isinstance(value, str) else str(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "", root: type | None = None):
    """Build a config dataclass from a nested dict; unknown keys are errors."""
    root = root or cls
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'. Valid keys: " + ", ".join(valid_keys(root))
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            kwargs[f.name] = from_dict(tp, data[f.name], f"{prefix}{f.name}.", root)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, f"{prefix}{f.name}")
    return cls(**kwargs)


def flatten(data, sep: str = ".", prefix: str = "") -> dict:
    """The leaves of nested mappings under joined keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``); an
    empty mapping is a leaf of its own, so two configs that differ only there still differ."""
    if isinstance(data, Mapping) and data:
        out = {}
        for key, value in data.items():
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        return out
    return {prefix[: -len(sep)] if prefix else prefix: data}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=1`` -> (["a", "b"], 1); the value is parsed as YAML (``[1,2]``, ``true``, ``0.1``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package, e.g. ``finetune/fashiondet_r18_cpu``."""
    root = importlib.resources.files("predet") / "configs"
    return sorted(f"{group.name}/{f.name[:-5]}" for group in root.iterdir() if group.is_dir()
                  for f in group.iterdir() if f.name.endswith(".yaml"))


def shipped_config(name: str | Path):
    """The shipped config called ``name`` (``finetune/x``, ``finetune/x.yaml`` or a path ending in
    ``configs/finetune/x.yaml``, as the docs write it), or None; found with importlib.resources
    so it works from a wheel, not only from a source checkout."""
    parts = Path(name).parts
    if "configs" in parts:
        parts = parts[len(parts) - parts[::-1].index("configs"):]
    if not parts:
        return None
    parts = (*parts[:-1], parts[-1] if parts[-1].endswith(".yaml") else parts[-1] + ".yaml")
    resource = importlib.resources.files("predet").joinpath("configs", *parts)
    return resource if resource.is_file() else None


BASE_KEY = "_base_"  # a config that is another one plus changes names it here


def merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` laid over it, mappings merged key by key (lists replaced)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML file, or a shipped config by name when no such file exists. A ``_base_: NAME``
    entry (a path beside the file, or a shipped config) is loaded first and the rest laid over it,
    as MMDetection's ``_base_`` does, so a pilot or variant config states only what differs."""
    source = Path(path) if Path(path).is_file() else shipped_config(path)
    if source is None:
        raise ConfigError(f"config file not found: {path} (shipped configs: {', '.join(shipped_configs())})")
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {BASE_KEY} must name a config file, got {base!r}")
    beside = Path(str(source)).parent / base
    parent = str(beside) if beside.is_file() else base
    if str(source) in _seen:
        raise ConfigError(f"{path}: {BASE_KEY} chain loops back to {source}")
    return merge(load_yaml(parent, (*_seen, str(source))), data)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()):
    """YAML file (optional) + overrides -> validated config dataclass of type ``cls``."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    try:
        cfg = from_dict(cls, data)
        validate(cfg)
        return cfg
    except ConfigError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{exc}") from None

"""Typed configuration: dataclasses, YAML defaults, ``--set a.b=c`` overrides.

The rules (timm/nanoGPT style): a dataclass per component declares every key with its type and default; a YAML file
sets values; ``--set`` overrides them; :func:`from_dict` checks every key and type and fails with a
:class:`ConfigError` that names the key and what is allowed. The resolved config is a plain dict (JSON-able), so it
is written into the run folder and stored in checkpoints, and a model is rebuilt from it alone.

This module is a leaf: it imports nothing else from vidssl.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what is expected."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin in (list, tuple):
        return f"a list of {', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and convert it (int -> float, list -> tuple, dict -> dataclass)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool) and ("off" if not value else "on") in get_args(tp):
            return "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        if value in get_args(tp) and not (isinstance(value, bool) and True not in get_args(tp)):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is not Any:
            return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def fields_of(cls: type) -> dict[str, Any]:
    """``{field name: resolved type}`` of a config dataclass."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and type (missing keys take defaults)."""
    data = dict(data or {})
    fields = fields_of(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed keys here: {', '.join(fields)}")
    kwargs = {}
    for name, tp in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], tp, f"{prefix}.{name}" if prefix else name)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc
    check = getattr(obj, "validate", None)
    if callable(check):
        check(prefix)
    return obj


def to_dict(cfg: Any) -> Any:
    """Dataclass (nested) -> plain dict/list/scalars, JSON-able."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.0.c=value"`` -> (``["a", "b", "0", "c"]``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE (for example optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a nested plain dict (copied); list items are addressed by index."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{where}: list index {part!r} out of range (list has {len(node)} items)")
                node = node[int(part)]
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{where}: is a value, not a section; cannot set {'.'.join(path)}")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"{'.'.join(path)}: list index out of range (list has {len(node)} items)")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Rows ``(dotted key, type description, default)`` of a config dataclass, for ``--help`` and docs."""
    rows = []
    defaults = cls()
    for name, tp in fields_of(cls).items():
        key = f"{prefix}{name}"
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
        else:
            rows.append((key, _type_name(tp), to_dict(default)))
    return rows


__all__ = [
    "ConfigError",
    "apply_overrides",
    "describe",
    "fields_of",
    "from_dict",
    "load_yaml",
    "parse_override",
    "to_dict",
]

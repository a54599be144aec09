"""Reading configs: YAML recipes and `section.key=value` command-line overrides into the dataclasses of
engine/config.py. Mistakes are errors that say where: an unknown key names the closest valid one, a wrong type names
the field, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from engine.config import RunConfig
from engine.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parents[1]  # the project folder of a source checkout (configs/, ds_configs/)


def project_file(path: str | Path) -> Path:
    """A recipe or DeepSpeed config as given (relative to the working directory) or, when no such file exists there,
    in the project's checkout: `configs/tiny.yaml` names the same file from any directory."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not (CHECKOUT / path).exists():
        return path
    return CHECKOUT / path


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}: expected one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}={value!r}: expected {len(args)} items")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a mapping")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
    return value


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def build(cls, data: dict, where: str = ""):
    """Instantiate dataclass `cls` from nested plain data, checking every key and type."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (valid here: {', '.join(fields)})")
        kwargs[key] = _coerce(value, fields[key], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a section defined outside this file (e.g. the reward model's architecture)
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _fields(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
    return keys


def apply_override(data: dict, override: str, cls) -> None:
    """Set `a.b.c=value` in nested `data`; the value is parsed as YAML (so 1e-5, true, [1, 2] and null work)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. sampling.steps=20")
    key, raw = override.split("=", 1)
    valid = _all_keys(cls)
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=1)
        raise ConfigError(f"unknown config key {key!r} in override {override!r}"
                          + (f"; did you mean {close[0]}?" if close else ""))
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=RunConfig):
    """Read a YAML recipe (or start from defaults), apply overrides, validate; errors name the file."""
    data: dict = {}
    source = "overrides"
    if path is not None:
        source, path = str(path), project_file(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override, cls)
    try:
        return build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_dict(config) -> dict:
    """Plain nested data (for writing the resolved config next to a run)."""
    return dataclasses.asdict(config)

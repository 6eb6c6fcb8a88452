"""Typed config machinery: dataclasses loaded from YAML with dotted CLI overrides.

Each field carries its documentation in ``metadata["doc"]`` (see :func:`field`). Loading
checks unknown keys, types, and each dataclass's ``validate()``; every error names the
dotted path of the field and, where there is a fixed set, the allowed values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config value is wrong. ``field`` is the dotted path, e.g. ``train.learning_rate``."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


def field(default: Any = dataclasses.MISSING, *, doc: str, default_factory: Any = dataclasses.MISSING, path: bool = False):
    """A dataclass field with its documentation attached (shown by ``rayimg <job> --help-config``).

    ``path=True`` marks a local path or URI: :func:`absolute_paths` resolves local ones before a
    job ships its config to Ray workers, whose working directory is not the user's."""
    kwargs: dict[str, Any] = {"metadata": {"doc": doc, "path": path}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def check(condition: bool, field_name: str, message: str) -> None:
    """Raise ConfigError(field_name, message) unless condition holds."""
    if not condition:
        raise ConfigError(field_name, message)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"must be {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or type(value) is not type(next(a for a in allowed if a == value)):
            raise ConfigError(path, f"must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(k, key_tp, path): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # a section whose lines are all commented out
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, f"must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"must be a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, checking keys, types and ranges."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"must be a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(where, f"unknown key; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        factory = fields[name].default_factory
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[name]) and factory is not dataclasses.MISSING:
            # a partial section fills its gaps from the field's own default (DemoJob's 64x64
            # generation settings), not from the section class's defaults
            value = _merge(to_dict(factory()), value)
        kwargs[name] = _convert(value, hints[name], sub)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            sub = f"{path}.{name}" if path else name
            raise ConfigError(sub, "is required")
    obj = cls(**kwargs)
    validate_tree(obj, path)
    return obj


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, mappings merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def validate_tree(obj: Any, path: str = "") -> None:
    """Run ``validate()`` on obj; prefix the field path of any ConfigError with ``path``."""
    validate = getattr(obj, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except ConfigError as e:
        if path and not e.field.startswith(path + "."):
            raise ConfigError(f"{path}.{e.field}" if e.field else path, e.message) from None
        raise


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (for YAML, adapter.json and hashing)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.learning_rate=5e-5`` -> (["train", "learning_rate"], 5e-05). Values parse as YAML."""
    if "=" not in text:
        raise ConfigError("", f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("", f"override {text!r} has an empty field name")
    try:
        value = yaml.load(raw, Loader=_LOADER) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(key, f"cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested mapping (creating sections as needed)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys[: i + 1]), "is not a section; cannot set a field inside it")
            node = child
        node[keys[-1]] = value
    return data


def _yaml_loader() -> type:
    """SafeLoader that also reads 5e-5 (no dot) as a float, as users expect."""
    import re

    class Loader(yaml.SafeLoader):
        pass

    # YAML 1.2 booleans: only true/false. 'no' (mixed_precision) and 'yes' stay strings.
    Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


_LOADER = _yaml_loader()


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError("", f"{p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{p}: top level must be a mapping of sections")
    return data


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load job config ``cls`` from an optional YAML file plus dotted overrides, validated."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def describe(cls: type, prefix: str = "") -> list[str]:
    """Lines documenting every field of ``cls``: dotted name, type, default, doc."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{name}:  {f.metadata.get('doc', '')}")
            lines.extend(describe(tp, name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        lines.append(f"  {name} ({_type_name(tp)}, default {default}): {f.metadata.get('doc', '')}")
    return lines


def absolute_paths(obj: Any) -> Any:
    """A copy of a config with every local path field (``field(path=True)``) made absolute."""
    import os

    if not dataclasses.is_dataclass(obj):
        return obj
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = absolute_paths(value)
        elif f.metadata.get("path") and isinstance(value, str) and value and "://" not in value:
            if f.name == "pretrained" and not os.path.exists(os.path.expanduser(value)):
                continue  # a hub id or a tiny-model name, not a path
            changes[f.name] = os.path.abspath(os.path.expanduser(value))
        elif f.metadata.get("path") and isinstance(value, str) and value.startswith("file://"):
            changes[f.name] = "file://" + os.path.abspath(os.path.expanduser(value[len("file://"):]))
    return dataclasses.replace(obj, **changes)

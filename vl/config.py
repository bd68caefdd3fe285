"""Frozen dataclass configs loaded from YAML, with ``--set a.b=c`` overrides.

Every component owns a frozen dataclass. A run config nests them. ``load_config(RunConfig, "configs/x.yaml",
["model.hidden_size=64"])`` builds the nested dataclasses, and any key that no dataclass declares is an error that
names the key and the file. ``save_config`` writes the fully resolved config into a run directory, so a run is
reproducible from its directory alone.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vl.atomic import atomic_output
from vl.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override that does not match the dataclass it configures."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    """Turn a YAML value into the field's declared type: nested dataclasses, tuples, Optionals, numbers."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r} in {source}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r} in {source}")
        return from_dict(tp, value, source=source, prefix=where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r} in {source}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)} in {source}")
            return tuple(_coerce(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        coerced = [_coerce(v, item, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r} in {source}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, where, source): _coerce(v, val_tp, f"{where}.{k}", source) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)} in {source}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r} in {source}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r} in {source}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r} in {source}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r} in {source}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError naming the key and ``source``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} in {source}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}' in {source} (known: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(value, hints[key], where, source)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {err} in {source}") from None
    except ValueError as err:  # __post_init__ validation
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {err} (in {source})") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a (nested) dataclass config; tuples become lists."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a raw config mapping; values are parsed as YAML (``3``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, key, value)
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _read_run_file(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...]
                   ) -> tuple[dict[str, Any], str]:
    """A config file as a mapping with ``--set`` overrides applied, and a description of its source.

    ``model:`` may name a model config file (``uniter-tiny.yaml``: relative to the config's directory, else to the
    working directory); its ``model:`` section is read in. Overrides apply after that (``model.text.num_layers=2``
    works). A ``model=FILE`` override replaces the file named by ``model:`` (``--set model=lxmert-tiny.yaml``:
    another architecture, same recipe).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    model_files = [item.partition("=")[2] for item in overrides if item.startswith("model=")]
    overrides = [item for item in overrides if not item.startswith("model=")]
    if path is not None:
        path = Path(path)
        data = read_yaml(path)
        source = str(path)
        if model_files:
            data["model"] = model_files[-1]
        model = data.get("model")
        if isinstance(model, str):
            candidates = [path.parent / model, Path(model)]
            model_path = next((p for p in candidates if p.is_file()), None)
            if model_path is None:
                named = "by --set model=" if model_files else f"in {path}"
                raise ConfigError(f"model: file {model!r} named {named} not found (looked in {path.parent} and "
                                  f"{Path.cwd()})")
            model_data = read_yaml(model_path)
            data["model"] = model_data.get("model", model_data)
            source = f"{path} (model from {model_path})"
    elif model_files:
        raise ConfigError(f"--set model={model_files[-1]}: a model file needs a run config file (--config)")
    if overrides:
        data = apply_overrides(data, list(overrides))
        source = f"{source} (with --set {' '.join(overrides)})"
    return data, source


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load ``cls`` from a YAML file (or its defaults when ``path`` is None) and apply ``--set`` overrides.

    The one loader of run configs: a ``model:`` that names a file is read in (see ``_read_run_file``).
    """
    data, source = _read_run_file(path, tuple(overrides))
    return from_dict(cls, data, source=source)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so no half-written file is ever seen."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def save_config(cfg: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config into ``run_dir/name``."""
    path = Path(run_dir) / name
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path

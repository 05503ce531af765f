"""The config loader's mechanics: YAML file + dotted overrides -> a typed dataclass tree.

Plain dataclasses (not OmegaConf/Hydra) because we want exactly two behaviours that those
libraries make awkward: an unknown key fails with one line listing the valid keys, and a
value is coerced to the field's declared type with an error naming the key. The schema itself
lives with the layer it configures (trainer/config.py, cluster/config.py).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from core.errors import InputError

T = TypeVar("T")


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the dataclass tree rooted at `cls`."""
    keys = []
    for name, typ in get_type_hints(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += valid_keys(typ, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def _coerce(value: Any, typ: type, key: str) -> Any:
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"config key '{key}': expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise InputError(f"config key '{key}': expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML's `true` for a string-typed switch such as cluster.bf16
            return "true" if value else "false"
        return str(value)
    return value


def _apply(root: Any, key: str, value: Any) -> None:
    parts = key.split(".")
    target = root
    for i, part in enumerate(parts):
        hints = get_type_hints(type(target))
        if part not in hints:
            raise InputError(f"unknown config key '{key}'; valid keys: {', '.join(valid_keys(type(root)))}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hints[part]):
                if not isinstance(value, dict):
                    raise InputError(f"config key '{key}': expected a mapping, got {value!r}")
                for sub, v in value.items():
                    _apply(root, f"{key}.{sub}", v)
            else:
                setattr(target, part, _coerce(value, hints[part], key))
        else:
            if not dataclasses.is_dataclass(hints[part]):
                raise InputError(f"unknown config key '{key}'; valid keys: {', '.join(valid_keys(type(root)))}")
            target = getattr(target, part)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_tree(cls: type[T], path: str | os.PathLike | None, overrides: list[str] = ()) -> T:
    """`cls()` with the YAML at `path` (optional), then `dotted.key=value` overrides, applied (not checked)."""
    cfg = cls()
    if path:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise InputError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise InputError(f"{p}: expected a mapping at the top level")
        for key, value in _flatten(raw).items():
            _apply(cfg, key, value)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override '{item}': expected dotted.key=value")
        key, value = item.split("=", 1)
        _apply(cfg, key.strip(), value)
    return cfg


def check_positive(values: dict[str, float]) -> None:
    for key, v in values.items():
        if v <= 0:
            raise InputError(f"config key '{key}': must be positive, got {v}")


def check_choices(choices: dict[str, tuple[Any, tuple]]) -> None:
    """{key: (value, allowed values)}: a value outside its allowed ones fails naming the key."""
    for key, (v, allowed) in choices.items():
        if v not in allowed:
            raise InputError(f"config key '{key}': expected one of {', '.join(map(str, allowed))}, got {v!r}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)

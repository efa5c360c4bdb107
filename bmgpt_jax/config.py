"""Typed configuration: YAML files in `configs/` plus `key=value` overrides, validated into dataclasses.

Every config is a (possibly nested) dataclass. `load(cls, path, overrides)` reads the YAML file, applies
dotted overrides such as `lm.num_layers=4` or `train.lr=3e-4`, and builds `cls`, checking every key and
every value's type. An unknown or mistyped key raises `ConfigError` naming the nearest valid keys, so a
typo never silently falls back to a default. A value out of its range (`num_layers: 0`, `lr: -1`) is
refused by the dataclass's `__post_init__` (`check_range`), and the error names the dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


def _config_dir() -> Path:
    """Where the named configs live: `bmgpt_jax/configs/` in an installed package (setup.py ships the
    top-level `configs/` there), else the checkout's top-level `configs/` (a plain checkout on PYTHONPATH,
    or an editable install, which imports the package from the checkout)."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


CONFIG_DIR = _config_dir()


class ConfigError(ValueError):
    """A config key or value that does not fit the dataclass it is read into."""


class RangeError(ConfigError):
    """A field's value outside its range, raised by a config dataclass's `__post_init__` (`check_range`).
    Built directly the message names `Class.field`; read by `from_dict` it names the dotted key
    (`num_layers` of the `model.lm` section: `model.lm.num_layers=0: must be >= 1`)."""

    def __init__(self, cls: type, key: str, value: Any, need: str):
        self.cls, self.key, self.value, self.need = cls, key, value, need
        super().__init__(f"{cls.__name__}.{key}={value!r}: {need}")


def check_range(cfg: Any, names: str | Sequence[str], low: float, high: float = math.inf, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """RangeError for the first of the fields `names` of dataclass `cfg` whose value is outside [low, high]
    (`low_open` / `high_open`: that end excluded); a None value (an optional field left unset) passes."""
    for name in [names] if isinstance(names, str) else names:
        value = getattr(cfg, name)
        if value is None or ((low < value if low_open else low <= value)
                             and (value < high if high_open else value <= high)):
            continue
        if high == math.inf:
            need = f"must be {'>' if low_open else '>='} {low}"
        else:
            need = f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise RangeError(type(cfg), name, value, need)


def _unknown_key_error(key: str, valid: Sequence[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return ConfigError(f"unknown config key {where}{key!r}{hint} (valid keys: {', '.join(sorted(valid))})")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert it where the conversion is lossless."""
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
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{where}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `5e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a plain mapping, recursing into nested dataclasses."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown_key_error(key, list(fields), prefix)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except RangeError as e:
        raise ConfigError(f"{prefix}{e.key}={e.value!r}: {e.need}") from None
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    except ConfigError as e:                     # a `__post_init__`'s, naming the field: give its full key
        raise ConfigError(f"{prefix}{e}") from None
    except ValueError as e:   # another __post_init__ check: named by its section (`model.esm: hidden_size=...`)
        if not prefix or str(e).startswith(prefix):
            raise
        raise ConfigError(f"{prefix[:-1]}: {e}") from None
    return obj


def check_fields(obj: Any) -> None:
    """Check each field of the dataclass instance `obj` against its annotation, as `from_dict` checks a
    YAML value (a lossless conversion kept: an int for a float, a list for a tuple); ConfigError naming
    the field. For a config's `__post_init__`, so one built in code or from JSON is checked too."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = _coerce(value, hints[f.name], f.name)
        if checked is not value:
            object.__setattr__(obj, f.name, checked)   # frozen dataclasses too


def to_dict(cfg: Any) -> dict:
    """The plain-mapping form of a config (tuples become lists), suitable for YAML or JSON."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs between two `to_dict` forms (a key on
    one side only counts as a difference)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def apply_overrides(data: dict, overrides: Sequence[str], cls: type | None = None) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested mapping, checking keys against `cls`."""
    data = dict(data or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            where = f" ({e.problem})" if getattr(e, "problem", None) else ""
            hint = ("; in a double-quoted string a backslash is doubled (trainable=[\"^llm\\\\.\"]), or "
                    "single-quote it (trainable=['^llm\\.'])") if "\\" in raw else ""
            raise ConfigError(f"override {item!r}: the value is not valid YAML{where}{hint}") from None
        parts = key.strip().split(".")
        node, node_cls = data, cls
        for depth, part in enumerate(parts):
            if node_cls is not None:
                names = [f.name for f in dataclasses.fields(node_cls)]
                if part not in names:
                    raise _unknown_key_error(part, names, ".".join(parts[:depth]) + ("." if depth else ""))
                hint = typing.get_type_hints(node_cls)[part]
                node_cls = _dataclass_in(hint)
            if depth == len(parts) - 1:
                node[part] = value
            else:
                child = node.get(part)
                child = dict(child) if isinstance(child, dict) else {}
                node[part] = child
                node = child
    return data


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def resolve_path(path: str | os.PathLike) -> Path:
    """A config file as given, or a bare name looked up in `configs/` (`tiny` -> configs/tiny.yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    inside = Path(*p.parts[1:]) if len(p.parts) > 1 and p.parts[0] == CONFIG_DIR.name else p   # configs/x.yaml
    for cand in (CONFIG_DIR / inside, CONFIG_DIR / f"{inside}.yaml"):
        if cand.is_file():
            return cand
    if p.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder: give a YAML file in it "
                          f"(e.g. {CONFIG_DIR.name}/tiny.yaml)")
    raise ConfigError(f"config file {str(path)!r} not found (looked in . and {CONFIG_DIR})")


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping. A `base: other.yaml` key in any mapping (top level or a section such as
    `lm:`) merges that file underneath it, deeply; the path is relative to the including file."""
    p = resolve_path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise _yaml_error(p, e) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text (UTF-8) file ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return _resolve_bases(data, p)


def _yaml_error(path: Path, e: yaml.YAMLError) -> ConfigError:
    """One line for a file YAML cannot read: the file, the line and column, what the parser expected."""
    context, problem = getattr(e, "context", None), getattr(e, "problem", None)
    start, found = getattr(e, "context_mark", None), getattr(e, "problem_mark", None)
    mark = start or found
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = ": ".join(x for x in (context, problem) if x) or str(e).splitlines()[0]
    if start and found and (start.line, start.column) != (found.line, found.column):
        what += f" (line {found.line + 1}, column {found.column + 1})"
    return ConfigError(f"{path}: not valid YAML{where}: {what}")


def _resolve_bases(data: dict, path: Path) -> dict:
    folder = path.parent
    data = {k: _resolve_bases(v, path) if isinstance(v, dict) else v for k, v in data.items()}
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    return _deep_merge(read_yaml(folder / base if (folder / base).is_file() else base), data)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Read `path` (YAML; optional), apply `overrides` and validate into `cls`."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides, cls))

"""Typed records from YAML/JSON mappings: one coercion and validation mechanism for run configs and sweep specs.

A record is a frozen dataclass whose `__post_init__` validates its own fields. `build(cls, mapping)` makes one:
unknown keys are errors naming the nearest valid key, every value is checked against its annotation (bool is
never a number, lists become tuples, nested records are built recursively); `to_plain(record)` gives the mapping
back. Class attributes tailor a record: `__schema_error__` (the exception its problems raise, default
ConfigError), `__schema_noun__` (what its keys are called in messages) and `__schema_shorthand__` (a field
name: a bare scalar means {field: scalar}, e.g. `search: random` for `search: {algorithm: random}`).

Also here: YAML read safely (python tags refused, alias bombs and deep nesting caught), dotted keys, and
`key=value` command-line overrides.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

MAX_YAML_VALUES = 100_000
# scalar annotation -> (what the message says is expected, the values accepted); bool is never one of the others
SCALARS = {bool: ("true or false", lambda v: isinstance(v, bool)),
           int: ("an integer", lambda v: isinstance(v, int) or (isinstance(v, float) and v.is_integer())),
           float: ("a number", lambda v: isinstance(v, (int, float))),
           str: ("a string", lambda v: isinstance(v, (str, int, float)))}


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key and the fix."""


class YamlLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (plain data only) that also reads YAML 1.2 floats: PyYAML follows YAML 1.1, where a
    float needs a dot and a signed exponent, so `1e-3`, `5e-4` or `1.0e5` would be strings."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """Every YAML text richkd reads (configs, specs, --set values, ${ENV} values) goes through here."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass: plain data only


def check(cond: bool, key: str, msg: str, error: type = ConfigError) -> None:
    if not cond:
        raise error(f"{key}: {msg}")


def in_range(value: float | None, key: str, lo: float | None = None, hi: float | None = None,
             lo_open: bool = False, hi_open: bool = False, error: type = ConfigError) -> None:
    """`value` within [lo, hi] (or the open ends asked for); None, an optional value left unset, passes."""
    if value is None or ((lo is None or (value > lo if lo_open else value >= lo))
                         and (hi is None or (value < hi if hi_open else value <= hi))):
        return
    raise error(f"{key}: {value!r} is out of range; expected a value in {'(' if lo_open else '['}"
                f"{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{')' if hi_open else ']'}")


def one_of(value: Any, key: str, choices: Sequence[str], error: type = ConfigError) -> None:
    if value not in choices:
        raise error(f"{key}: {value!r} is not one of {', '.join(choices)}{suggest(str(value), choices)}")


def suggest(key: str, valid: Sequence[str]) -> str:
    """"; did you mean 'x'?" for the nearest valid name, or ""."""
    hint = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """A `cls` record from a mapping (None = all defaults); see the module docstring."""
    error = getattr(cls, "__schema_error__", ConfigError)
    where = prefix.rstrip(".")
    if raw is None:
        raw = {}
    shorthand = getattr(cls, "__schema_shorthand__", None)
    if shorthand and not isinstance(raw, Mapping) and isinstance(raw, (str, int, float, bool)):
        raw = {shorthand: raw}
    if not isinstance(raw, Mapping):
        raise error(f"{where or 'config'}: expected a mapping of {cls.__name__} fields, got {raw!r:.80}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    for key in raw:
        if key not in names:
            unknown_key(str(key), names, where, error, noun=getattr(cls, "__schema_noun__", "config key"))
    return cls(**{name: coerce(raw[name], hints[name], f"{prefix}{name}", error) for name in names if name in raw})


def coerce(value: Any, typ: Any, key: str, error: type = ConfigError) -> Any:
    """Check and convert one value to the annotated type; bool is never accepted as a number."""
    if is_dataclass(typ):
        return build(typ, value, prefix=key + ".")
    if typ is Any:
        return value
    origin = get_origin(typ)
    if origin is Union or origin is types.UnionType:
        options = [a for a in get_args(typ) if a is not type(None)]
        if len(options) == len(get_args(typ)):
            return value          # a union of kinds (e.g. "auto" or a bool): the record's __post_init__ decides
        if value is None:
            return None
        return coerce(value, options[0], key, error) if len(options) == 1 else value
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise error(f"{key}: expected a list, got {value!r}")
        args = get_args(typ)
        item_type = args[0] if args else Any
        return tuple(coerce(v, item_type, f"{key}[{i}]", error) for i, v in enumerate(value))
    if origin in (dict, Mapping) or typ in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise error(f"{key}: expected a mapping, got {value!r}")
        args = get_args(typ)
        value_type = args[1] if len(args) == 2 else Any
        return {k: coerce(v, value_type, f"{key}.{k}", error) for k, v in value.items()}
    if typ in SCALARS:
        what, fits = SCALARS[typ]
        if not fits(value) or (typ is not bool and isinstance(value, bool)):
            raise error(f"{key}: expected {what}, got {value!r}")
        return typ(value)
    return value


def unknown_key(key: str, valid: Sequence[str], section: str, error: type = ConfigError,
                noun: str = "config key") -> None:
    where = f"{section}.{key}" if section else key
    full = [f"{section}.{v}" if section else v for v in valid]
    raise error(f"unknown {noun} {where!r}{suggest(where, full)} (valid keys "
                f"{'in ' + section if section else 'here'}: {', '.join(sorted(valid))})")


def to_plain(value: Any) -> Any:
    """Records, tuples and mappings as plain dicts and lists (for YAML/JSON and for crossing process boundaries)."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict:
    flat: dict = {}
    for key, value in nested.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {f"{prefix}{key}": value})
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is parsed as YAML so 0.1, true, [1, 2] and null work."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=0.01")
    key, raw = text.split("=", 1)
    try:
        value = read_yaml(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_yaml_mapping(path: str | os.PathLike) -> dict:
    """A YAML file's top-level mapping, read safely (read_yaml); every problem is one ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} " + ("is a folder" if p.is_dir() else "does not exist"))
    try:
        data = read_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:   # includes python/object tags: safe_load builds plain data only
        raise ConfigError(f"{p}: {yaml_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); save it as UTF-8 "
                          "YAML") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config (hundreds of levels); check the file") from None
    if data is None:   # empty, or only comments: not silently "all defaults"
        raise ConfigError(f"{p} is empty; write its sections there (examples: configs/, search_spaces/)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    check_size(data, p)
    return data


def yaml_problem(exc: "yaml.YAMLError") -> str:
    """One line for a YAML error (PyYAML's own text spans several lines, with a caret under the spot)."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if "python/" in problem:   # !!python/object, !!python/name, ...: never constructed by safe_load
        return (f"not valid YAML{where}: python tags are refused (the file would run code); write plain YAML "
                f"values ({problem})")
    return f"not valid YAML{where}: {problem}"


def check_size(data: Any, where: Any) -> None:
    """Refuse YAML whose aliases expand to a huge tree ("billion laughs"): later walks over it would never end."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: more than {MAX_YAML_VALUES} values once YAML aliases (*name) are expanded; "
                              "a config or sweep spec is far smaller, check the file")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)

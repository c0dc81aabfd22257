"""Typed run configurations: flat dataclasses whose fields carry their help text and limits, validated by
one function whatever the values came from (a YAML file, command-line flags, Python).

A field is declared once with `opt(default, help)` and a type that may carry limits
(``Annotated[float, Interval(ge=0, le=1)]``); the CLI builds its options from the same fields
(`curate/commands/_options.py`), and `build_config` checks every value with pydantic (strict: no silent
"3" -> 3) before the dataclass is made. An error is one line naming the key and where the value came from.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import TypeAdapter, ValidationError

from curate.errors import CurateError

COMMAND_LINE = "command line"
RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}

C = TypeVar("C")


class ConfigError(CurateError):
    """A bad value of one key; `build_config` adds where the value came from."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def opt(default: Any, help: str, *, flags: tuple[str, ...] | None = None, parse: Callable[[str], Any] | None = None,
        cli: bool = True, fixed: bool = False) -> Any:
    """A config field: default, help text (shown by ``--help``) and how the CLI spells / parses it.

    ``flags``: option declarations (default ``--field-name``, ``--x/--no-x`` for booleans); ``parse``: turns
    the flag's text into the field's value; ``cli``: offered as an option; ``fixed``: the class's default is
    the only accepted value (a YAML key that must agree with the command, e.g. ``method``).
    """
    meta = {"help": help, "flags": flags, "parse": parse, "cli": cli, "fixed": fixed}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(type(default), default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> its type with the limits (``Annotated`` extras kept)."""
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint)


def _union_args(hint: Any) -> tuple[Any, ...]:
    if get_origin(hint) in (typing.Union, types.UnionType):
        return get_args(hint)
    return (hint,)


def _strip(hint: Any) -> Any:
    return get_args(hint)[0] if get_origin(hint) is Annotated else hint


def _limits(hint: Any) -> str:
    """'in [0, 1]', '> 0', '>= 1' ... from the ``annotated_types`` limits of a type."""
    b: dict[str, Any] = {}
    for arm in _union_args(hint):
        for m in get_args(arm)[1:] if get_origin(arm) is Annotated else ():
            b.update({n: getattr(m, n) for n in ("gt", "ge", "lt", "le") if getattr(m, n, None) is not None})
    lo = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    hi = (b["le"], "]") if "le" in b else (b["lt"], ")") if "lt" in b else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    return f"{'<=' if hi and hi[1] == ']' else '<'} {hi[0] if hi else '?'}"


def describe_type(hint: Any) -> str:
    """What a value of this type looks like, in words (the error message's 'must be ...')."""
    words = []
    for arm in _union_args(hint):
        arm = _strip(arm)
        origin = get_origin(arm)
        if arm is type(None):
            words.append("null")
        elif origin is Literal:
            words.append("one of " + ", ".join(map(str, get_args(arm))))
        elif arm is bool:
            words.append("true or false")
        elif arm is int:
            words.append("a number (whole)")
        elif arm is float:
            words.append("a number")
        elif arm is str:
            words.append("text")
        elif origin is list:
            words.append("a list")
        elif origin is dict:
            words.append("a mapping")
        else:
            words.append(getattr(arm, "__name__", str(arm)))
    return " or ".join(words)


def check_value(cls: type, key: str, value: Any) -> Any:
    """The value as the field's type (ints become floats for float fields), or a `ConfigError`."""
    hint = field_types(cls)[key]
    try:
        return _adapter(hint).validate_python(value, strict=True)
    except ValidationError as e:
        kinds = {err["type"] for err in e.errors()}
        if kinds & RANGE_ERRORS:
            raise ConfigError(key, f"{key} must be {_limits(hint)}, got {value!r}") from None
        raise ConfigError(key, f"{key} must be {describe_type(hint)}, not {value!r}") from None


def build_config(cls: type[C], layers: list[tuple[Mapping[str, Any], str]]) -> C:
    """Defaults < each (values, where) layer in order; every value checked, then the cross-field rules.

    ``where`` names the source in errors: a file path or ``COMMAND_LINE``.
    """
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer, where in layers:
        unknown = sorted(set(layer) - set(known))
        if unknown:
            place = "on the command line" if where == COMMAND_LINE else f"in {where}"
            raise CurateError(f"unknown {cls.__name__} option(s) {place}: {', '.join(unknown)} "
                              f"(known: {', '.join(known)})")
        for key, value in layer.items():
            f = known[key]
            if f.metadata.get("fixed") and value != default_of(f):
                raise CurateError(f"{where} says {key} {value!r} but this command uses {default_of(f)!r}")
            try:
                values[key] = check_value(cls, key, value)
            except ConfigError as e:
                raise CurateError(f"{e} ({where})") from None
            origin[key] = where
    cfg = cls(**values)
    check = getattr(cfg, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            where = origin.get(e.key)
            raise CurateError(f"{e} ({where})" if where else str(e)) from None
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A flat mapping of option: value from a YAML file (one-line errors)."""
    p = Path(path)
    if not p.is_file():
        raise CurateError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise CurateError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CurateError(f"{p}: expected a mapping of option: value at the top level")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """Defaults < YAML file < overrides (command-line flags, None meaning 'not given')."""
    layers: list[tuple[Mapping[str, Any], str]] = []
    if path is not None:
        layers.append((read_yaml(path), str(path)))
    layers.append(({k: v for k, v in (overrides or {}).items() if v is not None}, COMMAND_LINE))
    return build_config(cls, layers)


def validated(cfg: C) -> C:
    """Check a config made in Python (``LogitCacheConfig(k=0)``) by the same rules as YAML and flags."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}  # type: ignore[arg-type]
    return build_config(type(cfg), [(values, f"{type(cfg).__name__} arguments")])


__all__ = ["COMMAND_LINE", "ConfigError", "build_config", "check_value", "describe_type", "load_config",
           "opt", "read_yaml", "validated"]

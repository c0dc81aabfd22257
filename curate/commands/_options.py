"""Typer options generated from config dataclass fields, so each option is declared once (in the config).

Typer reads a command's parameters from its function signature; `config_options` builds that signature
(``Annotated[T | None, typer.Option(...)]`` per field, the field's default shown in ``--help``) and hands the
command a dict of the options given on the command line (click's parameter source tells given from default),
ready for `curate.configs.build_config` to lay over a YAML file's values.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import Field, fields
from typing import Annotated, Any, Literal, get_args, get_origin

import typer

from curate.configs import default_of, field_types

OPTIONS = "options"  # the parameter that receives the given options
CONTEXT = "typer_ctx"  # the click context Typer passes in (it tells given options from defaults)


def _arms(hint: Any) -> list[Any]:
    """The alternatives of a type, limits stripped: ``Annotated[int, Ge(1)] | None`` -> [int, NoneType]."""
    arms = get_args(hint) if get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return [get_args(a)[0] if get_origin(a) is Annotated else a for a in arms]


def _metavar(hint: Any) -> str:
    words = []
    for arm in _arms(hint):
        if get_origin(arm) is Literal:
            return "[" + "|".join(map(str, get_args(arm))) + "]"
        if get_origin(arm) in (list, dict):
            return "TEXT"
        if arm in (int, float):
            words.append({int: "INTEGER", float: "FLOAT"}[arm])
    return words[0] if words else "TEXT"


def _param(f: Field, hint: Any) -> inspect.Parameter:
    """Booleans are flags; every other option is read as text and converted by `from_text`, so a bad value is
    refused by the config's own rules (`curate.configs.build_config`), exactly as the same value in YAML."""
    is_bool = _arms(hint)[0] is bool
    name = f.name.replace("_", "-")
    flags = f.metadata.get("flags") or ((f"--{name}/--no-{name}",) if is_bool else (f"--{name}",))
    default = default_of(f)
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default))
    elif isinstance(default, dict):
        default = None
    elif default is not None and not is_bool:
        default = str(default)
    # a default that is or holds only spaces would show as `[default:  ]`: quoted, it reads as what it is
    quoted = isinstance(default, str) and (default == "" or default != default.strip())
    option = typer.Option(*flags, help=f.metadata.get("help"),
                          show_default=repr(default) if quoted else default is not None,
                          metavar=None if is_bool else _metavar(hint))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[(bool if is_bool else str) | None, option])


def from_text(f: Field, hint: Any, value: Any) -> Any:
    """A flag's text as the field's value: the field's own parser, comma lists for list fields, numbers for
    number fields, null for optional ones; anything else stays text for the config's type check to refuse."""
    if not isinstance(value, str):
        return value
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse(value)
    arms = _arms(hint)
    if type(None) in arms and value.strip().lower() in ("null", "none"):
        return None
    if any(get_origin(a) is list for a in arms):
        if str in arms and "," not in value:
            return value  # e.g. lora_target_modules: all-linear
        return [part.strip() for part in value.split(",") if part.strip()]
    for typ in (int, float):
        if typ in arms:
            try:
                return typ(value)
            except ValueError:
                continue
    return value


def config_options(cls: type, *, exclude: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command taking ``options: dict``: its own parameters, then one option per field of
    ``cls`` (not excluded, not declared by the command itself). ``options`` holds the given ones only."""
    skip = set(exclude)
    hints = field_types(cls)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != OPTIONS]
        gen = {f.name: f for f in fields(cls)
               if f.metadata.get("cli", True) and f.name not in skip and f.name not in {p.name for p in own}}
        ctx_param = inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = own + [_param(f, hints[f.name]) for f in gen.values()] + [ctx_param]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            ctx = kwargs.pop(CONTEXT)
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in gen}
            source = {k: getattr(ctx.get_parameter_source(k), "name", "DEFAULT") for k in given}
            given = {k: from_text(gen[k], hints[k], v) for k, v in given.items() if source[k] != "DEFAULT"}
            return fn(**kwargs, **{OPTIONS: given})

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must see the generated signature, not the function's own
        return wrapper

    return deco


__all__ = ["config_options", "from_text"]

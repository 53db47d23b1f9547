"""CLI options generated from the parameter specs (:class:`prcore.data.schema.Param`).

``@spec_options(params)`` adds one Typer option per parameter to a command: its flag(s), type,
default and help text come from the spec, and every value is checked by the spec's rule before the
command body runs (one line, exit 2). The body receives the values as one ``params`` dict, so a
new sampling or training parameter reaches ``prcore sample`` / ``prcore train`` without an edit here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import typer

from prcore.cli.errors import UserError, user_errors
from prcore.data.schema import BOOL, FLOAT, INT, LIST_STR, STR, Param, excerpt

_TYPES: dict[str, type] = {INT: int, FLOAT: float, STR: str, BOOL: bool, LIST_STR: str}


def _option(name: str, p: Param, default: Any, *, optional: bool = False) -> inspect.Parameter:
    """The Typer option of one parameter (bools as ``--x/--no-x``, lists comma-separated);
    ``optional``: default None, meaning "the run's default" (the spec's default, shown in the help)."""
    flags = p.flags
    if p.kind == BOOL:
        flags = tuple(f"{f}/--no-{f[2:]}" for f in flags[:1]) + flags[1:]
    if p.kind == LIST_STR and default is not None:
        default = ",".join(default)
    rule = p.spec.rule(p.kind)
    help_text = p.spec.help + ("" if rule in ("text", "true or false") else f" Allowed: {rule}.")
    if optional:
        help_text += f" Where the manifest leaves it empty; default: {default!r}." if default is not None else " Where the manifest leaves it empty."
        default = None
    annotation: Any = _TYPES[p.kind] | None if p.nullable or default is None else _TYPES[p.kind]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, *flags, help=help_text), annotation=annotation)


def check_values(params: Mapping[str, Param], values: Mapping[str, Any], *, optional: bool = False) -> dict[str, Any]:
    """``values`` as the method takes them (lists split on commas), each checked by its spec
    (``optional``: None passes, meaning "the run's default"); the first bad one raises
    :class:`UserError` naming its flag."""
    out = {}
    for name, p in params.items():
        value = values[name]
        if p.kind == LIST_STR and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        if value is None:
            problem = None if p.nullable or optional else "is required"
        else:
            problem = p.spec.problem(p.kind, value)
        if problem:
            raise UserError(f"{p.flags[0]} {excerpt(value)} is not allowed: {p.name} {problem}")
        out[name] = value
    return out


def spec_options(params: Mapping[str, Param], *, defaults: Mapping[str, Any] | None = None,
                 optional: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command whose last parameter is ``params: dict``: the CLI gets one option per
    entry of ``params`` (``defaults`` overrides a spec default for this command only; ``optional``:
    every option defaults to None, "the run's default", as ``prcore run`` wants)."""
    overrides = dict(defaults or {})

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "params"]
        generated = [_option(name, p, overrides.get(name, p.default), optional=optional) for name, p in params.items()]
        own_names = {p.name for p in own}

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            with user_errors():
                values = check_values(params, {k: v for k, v in kwargs.items() if k not in own_names}, optional=optional)
            return fn(**{k: v for k, v in kwargs.items() if k in own_names}, params=values)

        command.__signature__ = inspect.Signature([*own, *generated])  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in [*own, *generated]}
        del command.__wrapped__  # typer reads __signature__, not the wrapped function's
        return command

    return decorate

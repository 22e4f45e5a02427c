"""The one validation machinery of the settings dataclasses (every stage's `*Config`).

Settings are frozen dataclasses with one documented field each, validated in `__post_init__`:
`check_types` first (each value has its annotated type: the one type rule, whatever the value came
from), then the dataclass's own limits through `check`. Values read from YAML, JSON or the command
line only get their shape converted here (`coerce`: a list becomes a tuple, "1e-4" a float); whether
the result is allowed is the dataclass's word alone. Every error names its field (`ConfigError.field`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing

from .errors import ConfigError


def check(ok: bool, message: str, field: str | None = None) -> None:
    """Raise ConfigError(message, field) unless ok."""
    if not ok:
        raise ConfigError(message, field=field)


def finite(x) -> bool:
    return math.isfinite(x)


def check_types(obj) -> None:
    """Each field holds a value of its annotated type (int is not bool; a float field takes an int)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        check(is_a(value, hint), f"{f.name} must be {type_words(hint)}, got {value!r}", f.name)
        numbers = value if isinstance(value, tuple) else (value,)
        check(not any(isinstance(x, float) and not math.isfinite(x) for x in numbers),
              f"{f.name} must be a finite number, got {value!r}", f.name)  # not "must be >= 0" for inf or nan


def is_a(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(is_a(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, tuple) and all(is_a(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


def type_words(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_words(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is tuple:
        return f"a tuple of {type_words(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def coerce(value, hint):
    """A value as YAML / JSON hold it, in the shape of `hint`: lists become tuples, a lone scalar a 1-tuple,
    a number written as text ("1e-4", which YAML reads as a string) a float. Nothing is checked here: a value
    that does not convert stays as it is, and the dataclass's `check_types` names it."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        return tuple(coerce(v, typing.get_args(hint)[0]) for v in value) if isinstance(value, list) else value
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def field_docs(cls) -> dict[str, str]:
    """{field: its docstring} of a dataclass (the string literal under each field): help texts, one source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def build(cls, raw, where: str, section: str = ""):
    """cls from a raw mapping (YAML, JSON); `where` names the source (a file, "command line"), `section` the
    nesting (sections are dataclass fields). Errors name the field with its section: `optim.lr`."""
    at = f"{where}: {section}" if section else where
    check(isinstance(raw, dict), f"{at}: expected a mapping, got {raw!r}", section or None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    check(not unknown, f"{at}: unknown field(s) {unknown}; known: {sorted(fields)}",
          _dotted(section, unknown[0]) if unknown else None)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value or {}, where, _dotted(section, name))
        else:
            kwargs[name] = coerce(value, hint)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # the section's own messages may already name it ("optim.lr must be ...")
        message = str(e) if not section or str(e).startswith(section + ".") else f"{section}.{e}"
        raise ConfigError(f"{where}: {message}", field=_dotted(section, e.field) if e.field else section or None) \
            from e


def _dotted(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def plain(x):
    """A dataclass dict as YAML writes it: tuples as lists."""
    if isinstance(x, tuple):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    return x

"""Command-line flags from settings dataclasses (litgpt style: the CLI *is* the dataclass fields).

`add_fields(parser, Cls)` adds one `--field-name` flag per field: its type, default, choices (a field's
`metadata["choices"]`) and help text (the field's docstring) all come from the dataclass, so nothing is
restated by hand; `config_from(args, Cls)` builds the dataclass back, and its `__post_init__` validates.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing

from .validation import field_docs


class ListOf:
    """argparse type: comma-separated values of one kind -> tuple ('' = empty); errors say what was expected."""

    def __init__(self, kind, words: str):
        self.kind, self.words = kind, words
        self.__name__ = f"list of {words}"

    def __call__(self, text: str) -> tuple:
        try:
            return tuple(self.kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {self.words}, got {text!r}") from None


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


_SCALARS = {int: (integer, "integers"), float: (number, "numbers"), str: (str, "names")}
FROM_MODEL = " (default: as the model's ar2dlm.json says)"


def add_fields(parser, cls, names=None, defaults: dict | None = None, choices: dict | None = None,
               repeat: tuple = ()) -> None:
    """One flag per dataclass field (all fields unless `names`): --field-name, its type, default, choices and
    docstring; the dataclass validates. `defaults` replaces a field's default (None = "not given": the value
    comes from elsewhere, such as the model's ar2dlm.json); `repeat` names tuple fields given once per value."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names or fields:
        f, flag = fields[name], "--" + name.replace("_", "-")
        default = (defaults or {}).get(name, f.default if f.default is not dataclasses.MISSING else None)
        help = docs.get(name, "").replace("%", "%%")
        if default is not None and not isinstance(default, bool) and "default" not in help:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help += f" (default {shown})"
        kind = hints[name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: the flag takes an X
            kind = next(h for h in typing.get_args(kind) if h is not type(None))
        if kind is bool:
            if default is None:  # the model's ar2dlm.json decides unless the flag is given either way
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help + FROM_MODEL)
            elif default:
                parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                    help=f"turn off (on by default): {help}")
            else:
                parser.add_argument(flag, action="store_true", help=help)
        elif typing.get_origin(kind) is tuple:
            elem, words = _SCALARS[typing.get_args(kind)[0]]
            if name in repeat:
                parser.add_argument(flag, action="append", type=elem, help=help + " (repeatable)")
            else:
                parser.add_argument(flag, type=ListOf(elem, words), default=default, help=help)
        else:
            parser.add_argument(flag, type=_SCALARS[kind][0], default=default, help=help,
                                choices=(choices or {}).get(name, f.metadata.get("choices")))


def config_from(args, cls, **extra):
    """cls from the parsed flags of its fields (a flag left None takes the field's default)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in fields and (v is not None or fields[k].default is None)}
    return cls(**given, **extra)


def given(args, names) -> dict:
    """{name: value} of the flags among `names` that were given (left None = not given)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def cli_words(message: str, parser: argparse.ArgumentParser | None) -> str:
    """An API message in the command line's words: `name=True` becomes the verb's flag `--name`."""
    if parser is None:
        return message
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if flags and isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            message = re.sub(rf"\b{action.dest}=True\b", flags[0], message)
    if any("--ar" in a.option_strings for a in parser._actions):
        message = message.replace("allow_ar=True", "--ar")
    return message

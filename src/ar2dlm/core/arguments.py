"""Type checks where a Python call enters ar2dlm: prompts and keyword settings.

A wrong type caught here is a ConfigError naming the argument and what it
accepts, instead of a failure deep in a tokenizer or, worse, garbage: a list of
strings read as token ids, or bytes (a sequence of ints) decoded as a prompt.
Paths are checked by `files.check_path`.
"""

from __future__ import annotations

import numbers
from typing import Iterable

from .errors import ConfigError

ACCEPTS = "a string, or a list of token ids (ints)"


def shown(value) -> str:
    """A value as an error message shows it: its type and (the start of) its repr."""
    return "None" if value is None else f"{type(value).__name__} {value!r}"[:80]


def check_prompt(prompt, name: str = "prompt") -> None:
    """One prompt: a str, or a non-string sequence of ints (a list, tuple or 1-D tensor of token ids)."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, (bytes, bytearray, dict, set)) or not hasattr(prompt, "__len__") \
            or not hasattr(prompt, "__iter__"):
        raise ConfigError(f"{name} must be {ACCEPTS}, got {shown(prompt)}", field=name)
    for t in prompt:
        if not _is_id(t):
            raise ConfigError(f"{name} must be {ACCEPTS}; it is a {type(prompt).__name__} holding "
                              f"{shown(t)} (to give several prompts, use generate)", field=name)


def _is_id(t) -> bool:
    return (isinstance(t, numbers.Integral) and not isinstance(t, bool)) or _integral_scalar(t)


def _integral_scalar(t) -> bool:
    """A 0-d integer tensor / numpy scalar (what iterating over a tensor of token ids yields)."""
    dtype = getattr(t, "dtype", None)
    return getattr(t, "ndim", None) == 0 and dtype is not None and not getattr(dtype, "is_floating_point", True) \
        and "int" in str(dtype)


def check_prompts(prompts, name: str = "prompts") -> None:
    """A batch: one prompt (a str or a list of token ids), or a non-empty list of prompts."""
    if isinstance(prompts, str):
        return
    if isinstance(prompts, (bytes, bytearray, dict, set)) or not hasattr(prompts, "__len__") \
            or not hasattr(prompts, "__iter__"):
        raise ConfigError(f"{name} must be a string, a list of strings or a list of token-id lists, got "
                          f"{shown(prompts)}", field=name)
    items = list(prompts)
    if items and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items):
        return  # one prompt given as token ids
    for i, p in enumerate(items):
        check_prompt(p, f"{name}[{i}]")


def check_keywords(given: Iterable[str], allowed: Iterable[str], call: str) -> None:
    """Unknown keyword arguments are named as the caller wrote them, with what `call` takes."""
    allowed = set(allowed)
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ConfigError(f"{call}() got an unknown keyword argument {unknown[0]!r}; it takes "
                          f"{', '.join(sorted(allowed))}", field=unknown[0])

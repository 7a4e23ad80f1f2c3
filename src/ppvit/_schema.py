"""A dataclass's values checked against its own type hints: the one type check of settings read from
JSON or YAML (a job's settings, a dataset's manifest), where ``"3"`` may stand for ``3``.

The hints are the schema; nothing here restates them. ``int`` takes integers (not booleans),
``float`` finite numbers, ``str`` text (or a path), ``Literal`` one of its values, ``X | None``
either, ``dict``/``list`` their items, a dataclass an instance of it. Text is what UTF-8 can
write: JSON's ``"\\ud800"`` reads into a lone surrogate, which every answer or file naming it
would fail on.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from typing import Any, Literal


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (hints this module does not know pass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, os.PathLike) or (isinstance(value, str) and _is_text(value))
    if origin is dict:
        return isinstance(value, dict) and all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if origin in (list, tuple) and args:
        return isinstance(value, list | tuple) and all(matches(v, args[0]) for v in value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def _is_text(value: str) -> bool:
    """Whether ``value`` can be written as UTF-8 (no lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def describe(hint: Any) -> str:
    """A hint in words for an error line (``an integer``, ``one of random, zero``, ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is dict:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}"
    if origin in (list, tuple):
        return f"a list of {describe(args[0])}" if args else "a list"
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "text", type(None): "null"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def check_fields(obj: Any, where: str = "") -> None:
    """Raise ValueError naming the first field of dataclass ``obj`` whose value is not of its hinted type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not matches(value, hints[f.name]):
            shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
            raise ValueError(f"{where}{f.name} {shown}: must be {describe(hints[f.name])}")

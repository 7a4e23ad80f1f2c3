"""A dataclass's values checked against its own type hints: the one type check of settings read from
JSON or YAML (a job's settings, a dataset's manifest), where ``"3"`` may stand for ``3``.

The hints are the schema; nothing here restates them. ``int`` takes integers (not booleans),
``float`` finite numbers, ``str`` text (or a path), ``Literal`` one of its values, ``X | None``
either, ``dict``/``list`` their items, a dataclass an instance of it.
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
        return isinstance(value, str | os.PathLike)
    if origin is dict:
        return isinstance(value, dict) and all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if origin in (list, tuple) and args:
        return isinstance(value, list | tuple) and all(matches(v, args[0]) for v in value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
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


def lone_surrogate(doc: Any, path: str = "") -> str | None:
    """Where a JSON document (its strings and keys) holds text no UTF-8 writes, a lone UTF-16 surrogate (valid
    JSON, ``"\\ud800"``), as ``classes.train[0]``; None if nowhere.
    What a client sends the service is held to it: such a class name was declared, trained and served, then every
    client command naming it failed. Not a rule of :func:`matches`: Python decodes a file name's non-UTF-8 bytes
    to surrogates, which local paths may hold."""
    if isinstance(doc, str):
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the text"
        return None
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        where = f"{path}[{k}]" if isinstance(doc, list) else f"{path}.{k}" if path else str(k)
        if isinstance(k, str) and lone_surrogate(k) is not None:
            return f"a key of {path}" if path else "a key"
        found = lone_surrogate(v, where)
        if found is not None:
            return found
    return None

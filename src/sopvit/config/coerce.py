"""Coercion of plain YAML data into typed dataclass trees, driven by the field annotations.

Supported annotations: int, float, bool, str, pathlib.Path, ``X | None`` and other unions, ``Literal[...]``,
``list[T]``, ``tuple[T, ...]`` / ``tuple[A, B]``, ``dict[K, V]`` and nested dataclasses; anything else is a
``TypeError`` when the schema is first used. Errors are one-line ``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

_UNIONS = (Union, types.UnionType)
_NAMES: dict[Any, str] = {
    int: "an int",
    float: "a float",
    bool: "a bool",
    str: "a string",
    Path: "a path",
    type(None): "null",
}
_FAIL = object()


class ConfigError(ValueError):
    """A bad config value; ``key`` is a dotted path (relative to the raising dataclass until re-keyed)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message, key)
        self.message, self.key = message, key

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message

    def add_prefix(self, prefix: str) -> None:
        """Re-key in place so a bare ``raise`` keeps the traceback pointing at the failed check."""
        self.key = join_key(prefix, self.key)
        self.args = (self.message, self.key)


def check(condition: bool, key: str, message: str) -> None:
    """In ``validate()``: raise ``ConfigError(message, key)`` unless ``condition`` (key relative to self)."""
    if not condition:
        raise ConfigError(message, key)


def join_key(prefix: str, key: str) -> str:
    """``a.b`` + ``c`` -> ``a.b.c``; list indices attach without a dot (``a.b[0]``)."""
    if not prefix or not key:
        return prefix or key
    return prefix + key if key.startswith("[") else f"{prefix}.{key}"


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields; resolving handles ``from __future__ import annotations``."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(f"{cls.__qualname__}: cannot resolve a field annotation ({exc})") from exc
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def check_schema(cls: type) -> None:
    """Reject unsupported annotations up front, not only when a recipe happens to set that field."""
    _check_type(cls, cls.__qualname__, set())


def _check_type(tp: Any, where: str, seen: set[type]) -> None:
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp not in seen:
            seen.add(tp)
            for name, sub in field_types(tp).items():
                _check_type(sub, f"{tp.__qualname__}.{name}", seen)
    elif origin in (*_UNIONS, list, tuple, dict) and args:
        for arg in args:
            if arg is not Ellipsis:
                _check_type(arg, where, seen)
    elif origin is not Literal and tp not in _NAMES:
        raise TypeError(f"{where}: unsupported config annotation {tp!r}")


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in _UNIONS:
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple and args[-1] is not Ellipsis:
        return f"a list of {len(args)} items"
    if origin in (list, tuple):
        return "a list"
    return "a mapping" if origin is dict or dataclasses.is_dataclass(tp) else _NAMES.get(tp, repr(tp))


def _scalar(value: Any, tp: Any) -> Any:
    """``value`` as the scalar type ``tp``, or ``_FAIL``; bools are never silently taken for numbers."""
    if tp is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if tp is float and isinstance(value, str):
        # YAML 1.1 loads `1e-3` (no dot) as a string, yet that is how learning rates are written.
        try:
            return float(value)
        except ValueError:
            return _FAIL
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, str | Path):
        return Path(value)
    if tp in (bool, str, type(None)) or (tp is int and not isinstance(value, bool)):
        return value if type(value) is tp else _FAIL
    return _FAIL


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (plain YAML data) converted to the annotation ``tp``, or a ``ConfigError`` at ``key``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in _UNIONS:
        if value is None and type(None) in args:
            return None
        arms = [arg for arg in args if arg is not type(None)]
        if len(arms) == 1:  # Optional[X]: let X report its own, more precise error
            return coerce(value, arms[0], key)
        for arm in arms:
            try:
                return coerce(value, arm, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if any(value == arg and type(value) is type(arg) for arg in args):
            return value
    elif origin in (list, tuple) and isinstance(value, list | tuple):
        variadic = origin is list or args[-1] is Ellipsis
        if variadic or len(args) == len(value):
            item_types = [args[0]] * len(value) if variadic else list(args)
            items = [coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
            return items if origin is list else tuple(items)
    elif origin is dict and isinstance(value, Mapping):
        return {coerce(k, args[0], key): coerce(v, args[1], join_key(key, str(k))) for k, v in value.items()}
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return merge(tp, None, value, key)
    elif (result := _scalar(value, tp)) is not _FAIL:
        return result
    raise ConfigError(f"expected {_describe(tp)}, got {reprlib.repr(value)}", key)


def accepts_str(tp: Any) -> bool:
    """Whether some string is a valid ``tp``, so unparseable override text may be taken literally."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in _UNIONS:
        return any(accepts_str(arg) for arg in args)
    return any(isinstance(arg, str) for arg in args) if origin is Literal else tp in (str, Path)


def dataclass_arm(tp: Any) -> type | None:
    """The dataclass in ``tp`` (itself or inside ``X | None``), whose sections merge key by key."""
    arms = get_args(tp) if get_origin(tp) in _UNIONS else (tp,)
    found = [arm for arm in arms if isinstance(arm, type) and dataclasses.is_dataclass(arm)]
    return found[0] if len(found) == 1 else None


def unknown_key(key: str, name: str, valid: Iterable[str], cls: type | None = None) -> ConfigError:
    """The error for ``key`` (ending in ``name``), suggesting the closest sibling or listing them all.

    A section class may list its retired keys in a ``RENAMED`` mapping (old name -> what to write now).
    """
    parent, valid = key[: len(key) - len(name)], list(valid)
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    if name in renamed:
        return ConfigError(f"'{key}' was retired: {renamed[name]}")
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{parent}{close[0]}'?" if close else "valid keys: " + ", ".join(valid)
    return ConfigError(f"unknown key '{key}' ({hint})")


def _field_default(cls: type, name: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def construct(cls: type, base: Any, changes: dict[str, Any], prefix: str) -> Any:
    """``base`` with ``changes`` (a copy), or a new ``cls`` from them when there is no base yet."""
    if base is None:
        for field in dataclasses.fields(cls):
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if field.init and required and field.name not in changes:
                raise ConfigError(f"missing required key '{join_key(prefix, field.name)}'")
    try:
        return cls(**changes) if base is None else dataclasses.replace(base, **changes)
    except ConfigError as exc:  # raised by a __post_init__ with a key relative to this section
        exc.add_prefix(prefix)
        raise


def merge(cls: type, base: Any, values: Mapping[Any, Any], prefix: str) -> Any:
    """``base`` (or the defaults of ``cls``) updated from a mapping; nested sections merge recursively."""
    hints, changes = field_types(cls), {}
    for raw_name, value in values.items():
        name = str(raw_name)
        key = join_key(prefix, name)
        if name not in hints:
            raise unknown_key(key, name, hints, cls)
        current = getattr(base, name) if base is not None else _field_default(cls, name)
        sub = dataclass_arm(hints[name])
        if sub is not None and isinstance(value, Mapping):
            changes[name] = merge(sub, current if isinstance(current, sub) else None, value, key)
        else:
            changes[name] = coerce(value, hints[name], key)
    return construct(cls, base, changes, prefix)

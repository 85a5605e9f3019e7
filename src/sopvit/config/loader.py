"""Typed configs: ``@dataclass`` schemas filled from defaults, a YAML recipe and ``a.b=value`` overrides.

Every mistake is a one-line ``ConfigError`` naming the dotted key, because a bad config should die at
start-up with a readable message rather than hours into a run. Schemas validate themselves in an optional
``validate()`` method with ``check(cond, key, message)``; keys there are relative to the dataclass and
the loader prefixes the section's dotted path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml

from sopvit.config.coerce import (
    ConfigError,
    accepts_str,
    check_schema,
    coerce,
    construct,
    dataclass_arm,
    field_types,
    join_key,
    merge,
    unknown_key,
)

T = TypeVar("T")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate keys, which plain YAML silently resolves to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = None if key_node.tag == _MERGE_TAG else self.construct_object(key_node, deep=deep)
            if key is None or not isinstance(key, Hashable):  # SafeLoader reports unhashable keys itself
                continue
            if key in seen:
                problem = f"duplicate key {key!r}"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, then the YAML mapping at ``path``, then ``key=value`` overrides, then validate."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config expects a dataclass type, got {cls!r}")
    check_schema(cls)
    values = _read_yaml(Path(path)) if path is not None else {}
    return apply_overrides(merge(cls, None, values, ""), overrides)


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """A validated copy of ``cfg`` with dotted ``a.b.c=value`` overrides (values parsed as YAML) applied."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single string")
    check_schema(_dataclass_type(cfg))
    for item in overrides:
        key, sep, text = item.partition("=")
        names = key.strip().split(".")
        if not sep or not all(names):
            raise ConfigError(f"invalid override {item!r}: expected dotted.key=value")
        cfg = _override(cfg, names, text, "")
    validate_config(cfg)
    return cfg


def validate_config(cfg: Any) -> None:
    """Run every ``validate()`` in the tree, innermost dataclass first, keying errors by full dotted path."""
    _dataclass_type(cfg)
    _validate(cfg, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML/JSON data for ``cfg``: tuples become lists and paths strings; ``load_config`` inverts it."""
    _dataclass_type(cfg)
    result: dict[str, Any] = _plain(cfg)
    return result


def save_config(cfg: Any, path: str | Path, header: str | None = None) -> None:
    """Write ``cfg`` as YAML, optionally under a ``# header`` comment block; ``load_config`` reads it back."""
    path = Path(path)
    comment = "".join(f"# {line}".rstrip() + "\n" for line in (header or "").splitlines())
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so a crash mid-write never leaves a truncated config next to a checkpoint.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(comment + body, encoding="utf-8")
    tmp.replace(path)


def recipe_header(path: str | Path) -> str:
    """The leading ``#`` comment block of a YAML recipe (command, hardware, time, score), ``#`` stripped."""
    lines: list[str] = []
    for line in _read_text(Path(path)).splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        lines.append(stripped[1:].removeprefix(" ").rstrip())
    return "\n".join(lines).strip("\n")


def _dataclass_type(cfg: Any) -> type:
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return type(cfg)


def _parse_override(text: str, tp: Any, key: str) -> Any:
    try:
        value = _load_yaml(text)
    except yaml.YAMLError as exc:
        if accepts_str(tp):  # `name=a: b` or `name=[x` can only have meant the literal text
            return coerce(text, tp, key)
        raise ConfigError(f"cannot parse {text!r} as YAML ({_yaml_problem(exc)})", key) from exc
    try:
        return coerce(value, tp, key)
    except ConfigError:
        # `name=yes` or `tag=1` on a shell mean strings, although YAML typed them as bool / int first.
        if accepts_str(tp) and not isinstance(value, str):
            return coerce(text, tp, key)
        raise


def _override(cfg: Any, names: list[str], text: str, prefix: str) -> Any:
    cls: type = type(cfg)
    hints = field_types(cls)
    name, *rest = names
    key = join_key(prefix, name)
    if name not in hints:
        raise unknown_key(key, name, hints, cls)
    tp, current, sub = hints[name], getattr(cfg, name), dataclass_arm(hints[name])
    if not rest:
        try:
            value = _load_yaml(text)
        except yaml.YAMLError:
            value = None
        if sub is not None and isinstance(value, Mapping):  # `section={a: 1}` merges like a YAML file
            return merge(cls, cfg, {name: value}, prefix)
        new = _parse_override(text, tp, key)
    elif sub is not None:
        # An unset optional section starts from its defaults, so `head.dim=256` works on `head: null`.
        base = current if isinstance(current, sub) else merge(sub, None, {}, key)
        new = _override(base, rest, text, key)
    elif get_origin(tp) is dict and len(rest) == 1 and isinstance(current, Mapping):
        key_type, value_type = get_args(tp)
        entry = join_key(key, rest[0])
        new = {**current, _parse_override(rest[0], key_type, entry): _parse_override(text, value_type, entry)}
    else:
        raise ConfigError(f"has no sub-key '{'.'.join(rest)}'", key)
    return construct(cls, cfg, {name: new}, prefix)


def _validate(value: Any, key: str) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _validate(getattr(value, field.name), join_key(key, field.name))
        validate = getattr(value, "validate", None)
        if callable(validate):
            try:
                validate()
            except ConfigError as exc:
                exc.add_prefix(key)
                raise
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _validate(item, f"{key}[{i}]")
    elif isinstance(value, Mapping):
        for name, item in value.items():
            _validate(item, join_key(key, str(name)))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {name: _plain(item) for name, item in value.items()}
    return str(value) if isinstance(value, Path) else value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def _read_yaml(path: Path) -> Mapping[Any, Any]:
    try:
        data = _load_yaml(_read_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({_yaml_problem(exc)})") from exc
    if data is None:  # an empty recipe means "all defaults"
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    return " ".join(str(getattr(exc, "problem", None) or "syntax error").split())

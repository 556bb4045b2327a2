"""YAML configuration files loaded into frozen dataclasses, with errors that point at the line.

``load(path, Schema)`` reads a YAML mapping and builds ``Schema`` (a dataclass whose fields may be
``int``, ``float``, ``str``, ``bool``, ``Literal[...]``, enums, ``tuple[X, ...]``, ``dict[str, X]``,
``X | None`` or nested dataclasses). Every problem raises ``ConfigError`` naming the file, the
line and the dotted field, e.g. ``run.yaml:7: training.lr: expected a number, got 'fast'``.
Unknown keys are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from device.errors import ConfigError

T = TypeVar("T")


class SettingError(ValueError):
    """Raised by a schema's ``__post_init__`` to reject one of its own settings; the loader
    reports it at that setting's line, like a type error."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class _Located:
    value: Any
    line: int  # 1-based; 0 when unknown
    key_lines: Mapping[str, int] = dataclasses.field(default_factory=dict)  # mappings only


def _construct(node: yaml.Node) -> Any:
    """The plain value of one composed node, exactly as ``yaml.safe_load`` would build it (an
    empty value, ``key:``, is ``None``)."""
    return yaml.SafeLoader("").construct_document(node)


def _to_plain(node: yaml.Node, path: Path) -> _Located:
    """Convert a composed YAML node into plain values wrapped with their line numbers.

    A key given twice in one mapping is a ``ConfigError`` (YAML loaders silently keep the last
    one, so the first, often a whole section, would be ignored without a word)."""
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, _Located] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(_construct(key_node))
            key_line = key_node.start_mark.line + 1
            if key in out:
                raise ConfigError(
                    f"{path}:{key_line}: {key}: given twice in one mapping (first on line "
                    f"{key_lines[key]})"
                )
            out[key] = _to_plain(value_node, path)
            key_lines[key] = key_line
        return _Located(out, line, key_lines)
    if isinstance(node, yaml.SequenceNode):
        return _Located([_to_plain(v, path) for v in node.value], line)
    return _Located(_construct(node), line)


def read_yaml(path: Path) -> _Located:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if node is None:
        return _Located({}, 1)
    try:
        return _to_plain(node, path)
    except yaml.YAMLError as exc:  # a value no safe loader constructs, e.g. an unknown tag
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None


def load(path: str | Path, schema: type[T], *, overrides: Mapping[str, Any] | None = None) -> T:
    """Load and validate ``path`` into ``schema``; ``overrides`` replace top-level keys."""
    path = Path(path)
    root = read_yaml(path)
    if not isinstance(root.value, dict):
        raise ConfigError(f"{path}:{root.line}: expected a mapping at the top level")
    if overrides:
        root = _Located(
            {**root.value, **{k: _Located(v, 0) for k, v in overrides.items()}}, root.line
        )
    return typing.cast(T, _build(schema, root, path, ""))


def from_mapping(data: Mapping[str, Any], schema: type[T], *, source: str = "<config>") -> T:
    """Validate an already-parsed mapping (no line numbers) into ``schema``."""
    return typing.cast(T, _build(schema, _wrap(data), Path(source), ""))


def _wrap(value: Any) -> _Located:
    if isinstance(value, Mapping):
        return _Located({str(k): _wrap(v) for k, v in value.items()}, 0)
    if isinstance(value, list | tuple):
        return _Located([_wrap(v) for v in value], 0)
    return _Located(value, 0)


def _fail(path: Path, node: _Located, field: str, message: str) -> ConfigError:
    where = f"{path}:{node.line}" if node.line else str(path)
    return ConfigError(f"{where}: {field or '<top>'}: {message}")


def _describe(value: Any) -> str:
    return f"{value!r}" if not isinstance(value, dict | list) else type(value).__name__


def _build(tp: Any, node: _Located, path: Path, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    value = node.value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise _fail(path, node, field, f"expected a mapping, got {_describe(value)}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            key = unknown[0]
            raise _fail(
                path,
                _Located(None, node.key_lines.get(key, node.line)),
                _join(field, key),
                f"unknown setting; known: {', '.join(sorted(fields))}",
            )
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _build(hints[name], value[name], path, _join(field, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(path, node, _join(field, name), "required setting is missing")
        try:
            return tp(**kwargs)
        except SettingError as exc:
            if exc.setting in value:  # blame the line of the setting, not the whole mapping
                raise _fail(
                    path, value[exc.setting], _join(field, exc.setting), exc.reason
                ) from None
            raise _fail(path, node, field, f"{exc.setting}: {exc.reason}") from None
        except (TypeError, ValueError) as exc:
            raise _fail(path, node, field, str(exc)) from None
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        fitting = _fitting_dataclasses(args, value)
        if len(fitting) == 1:
            # A union of settings sections is told apart by its keys: the one section that
            # knows every key given is meant, and its own error (at its line) is the one shown.
            return _build(fitting[0], node, path, field)
        closest = _closest_dataclass(args, value) if not fitting else None
        if closest is not None:  # no section knows every key: the closest one names the stray
            return _build(closest, node, path, field)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _build(arg, node, path, field)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"{path}:{node.line}: {field}: {_describe(value)} matches none of "
            f"{', '.join(getattr(a, '__name__', str(a)) for a in args)}"
        )
    if origin is typing.Literal:
        if value not in args:
            raise _fail(
                path,
                node,
                field,
                f"expected one of {', '.join(map(repr, args))}, got {_describe(value)}",
            )
        return value
    if origin is tuple or origin is list:
        if not isinstance(value, list):
            raise _fail(path, node, field, f"expected a list, got {_describe(value)}")
        item = args[0] if args else Any
        items = [_build(item, v, path, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise _fail(path, node, field, f"expected a mapping, got {_describe(value)}")
        item = args[1] if len(args) == 2 else Any
        return {k: _build(item, v, path, _join(field, k)) for k, v in value.items()}
    if tp is Any:
        return _unwrap(node)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            known = ", ".join(repr(m.value) for m in tp)
            raise _fail(
                path, node, field, f"expected one of {known}, got {_describe(value)}"
            ) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, node, field, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, node, field, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(path, node, field, f"expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, node, field, f"expected a string, got {_describe(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise _fail(path, node, field, f"expected a path, got {_describe(value)}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (path.parent / p)
    raise TypeError(f"config schema type {tp!r} at {field} is not supported")


def _fitting_dataclasses(args: tuple[Any, ...], value: Any) -> list[Any]:
    """The dataclasses among a union's ``args`` whose settings include every key of the
    mapping ``value`` (none when ``value`` is not a mapping)."""
    if not isinstance(value, dict):
        return []
    return [
        arg
        for arg in args
        if dataclasses.is_dataclass(arg)
        and isinstance(arg, type)
        and set(value) <= {f.name for f in dataclasses.fields(arg) if f.init}
    ]


def _closest_dataclass(args: tuple[Any, ...], value: Any) -> Any:
    """The dataclass among ``args`` that knows the most keys of the mapping ``value`` (the
    first on a tie); None when ``value`` is not a mapping or no arg is a dataclass."""
    if not isinstance(value, dict):
        return None
    known = [
        (len(set(value) & {f.name for f in dataclasses.fields(arg) if f.init}), -i, arg)
        for i, arg in enumerate(args)
        if dataclasses.is_dataclass(arg) and isinstance(arg, type)
    ]
    return max(known, key=lambda k: k[:2])[2] if known else None


def _unwrap(node: _Located) -> Any:
    if isinstance(node.value, dict):
        return {k: _unwrap(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [_unwrap(v) for v in node.value]
    return node.value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name

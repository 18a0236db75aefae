"""Dataclasses to JSON and back, driven by their type hints.

`encode` turns a dataclass (nested dataclasses, lists, dicts, plain values) into JSON values;
a field's `metadata` may rename its key (`key`) or leave it out while it is None (`omit`).
`decode` rebuilds the dataclass from such values by reading the field types: dataclasses,
`list[X]`, `dict[str, X]`, `X | None` and unions of dataclasses (the first whose fields
hold every key of the value). Keys a class does not know are refused.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import TypeVar, Union

from bastion.errors import ConfigError

T = TypeVar("T")
JsonValue = typing.Union[  # noqa: UP007 (a recursive alias needs the string form)
    None, bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"]
]
JsonObject = dict[str, JsonValue]


def field(
    *, key: str | None = None, omit: bool = False, default: object = dataclasses.MISSING
) -> typing.Any:  # noqa: ANN401
    """A dataclass field stored under `key` (else its name), left out of JSON while None
    when `omit`."""
    meta = {"key": key, "omit": omit}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, list | dict):
        factory = type(default)
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _key(f: dataclasses.Field[object]) -> str:
    return f.metadata.get("key") or f.name


def encode(value: object) -> JsonValue:
    """JSON values of a dataclass tree (tuples become lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: JsonObject = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.metadata.get("omit") and (v is None or v is False):
                continue
            out[_key(f)] = encode(v)
        return out
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


@cache
def _hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def decode(cls: type[T], value: object) -> T:
    """The dataclass `cls` rebuilt from JSON values written by `encode`."""
    return typing.cast(T, _decode(cls, value, cls.__name__))


def _decode(tp: typing.Any, value: object, where: str) -> object:  # noqa: ANN401
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) > 1 and isinstance(value, Mapping):
            for a in args:
                if dataclasses.is_dataclass(a):
                    keys = {_key(f) for f in dataclasses.fields(a)}
                    if set(value) <= keys:
                        return _decode(a, value, where)
        for a in args:
            if _fits(a, value):
                return _decode(a, value, where)
        raise ConfigError(f"report field {where} holds {value!r}, not {tp}; the file is damaged")
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (object,)
        seq = _expect(value, list, where)
        items = [_decode(arg, v, f"{where}[{i}]") for i, v in enumerate(seq)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        _, arg = typing.get_args(tp)
        return {k: _decode(arg, v, f"{where}.{k}") for k, v in _expect(value, dict, where).items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        raw = _expect(value, dict, where)
        hints = _hints(tp)
        fields = {_key(f): f for f in dataclasses.fields(tp)}
        unknown = set(raw) - set(fields)
        if unknown:
            raise ConfigError(
                f"report field {where} has unknown key(s) {', '.join(sorted(unknown))}; "
                "it was written by another Bastion version"
            )
        kwargs = {
            f.name: _decode(hints[f.name], raw[k], f"{where}.{k}")
            for k, f in fields.items()
            if k in raw
        }
        return tp(**kwargs)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _fits(tp: typing.Any, value: object) -> bool:  # noqa: ANN401
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple):
        return isinstance(value, list)
    if origin is dict or dataclasses.is_dataclass(origin):
        return isinstance(value, dict)
    if origin is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return True


def _expect(value: object, kind: type[T], where: str) -> T:
    if not isinstance(value, kind):
        raise ConfigError(
            f"report field {where} should be a JSON {'array' if kind is list else 'object'}; "
            "the file is damaged"
        )
    return value

"""Strict, versioned records: the one codec for everything that crosses a process boundary.

A record is a frozen dataclass deriving from :class:`WireRecord`; its field types say everything
about it. ``to_wire()`` turns it into plain msgpack-able values (nested records by their own
``to_wire``, enums by value, tuples as lists); ``from_wire(data)`` parses such values back by the
field types. Validation runs whenever a record is built, so a record built in code is held to the
same rules as one read from a peer: every field is checked against its type, and constraints
attached with ``typing.Annotated`` (:class:`Text`, :class:`Number`, :class:`Items`) bound lengths and
ranges; a record's ``check()`` adds rules across fields. A wrong version, a missing or extra field,
or a value of the wrong type or range raises :class:`~efedllm.common.errors.RecordError` naming the
field (``step request.position must be >= 0, got -1``).

A record's ``kind`` names it in errors. Its ``version`` is written as its ``version`` field, and a
reader rejects any other version rather than misread it; parts that exist only inside other records
(a hop, a span) have none and travel without one (a versioned record nested in another, such as a
delivered step's reply, keeps its own).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from typing import Annotated, Any, Callable, ClassVar

from efedllm.common.errors import RecordError


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RecordError(message)


@dataclasses.dataclass(frozen=True)
class Text:
    """A ``str`` field of at most ``max_length`` characters; an ``identifier`` is also non-empty and printable."""

    max_length: int = 256
    identifier: bool = False

    def check(self, name: str, value: str) -> None:
        if len(value) > self.max_length:
            raise RecordError(f"{name} is longer than {self.max_length} characters")
        if self.identifier and not (value and value.isprintable()):
            raise RecordError(f"{name} must be a non-empty printable string")


@dataclasses.dataclass(frozen=True)
class Number:
    """A number field within ``[minimum, maximum]``; floats must be finite unless ``finite`` is False."""

    minimum: float | None = None
    maximum: float | None = None
    finite: bool = True

    def check(self, name: str, value: float) -> None:
        if self.finite and not math.isfinite(value):
            raise RecordError(f"{name} must be a finite number, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise RecordError(f"{name} must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise RecordError(f"{name} must be <= {self.maximum}, got {value}")


@dataclasses.dataclass(frozen=True)
class Items:
    """A tuple field of ``minimum`` to ``maximum`` items (``noun`` names them in errors)."""

    minimum: int = 0
    maximum: int = 1024
    noun: str = "items"

    def check(self, name: str, value: tuple) -> None:
        if not self.minimum <= len(value) <= self.maximum:
            raise RecordError(f"{name} needs {self.minimum}..{self.maximum} {self.noun}, got {len(value)}")


MAX_PEER_ID_LENGTH = 128
MAX_KEY_LENGTH = 4096  # the hex of a signed owner key
PeerId = Annotated[str, Text(MAX_PEER_ID_LENGTH)]
Identifier = Annotated[str, Text(64, identifier=True)]  # session and step ids
Key = Annotated[str, Text(MAX_KEY_LENGTH)]
Count = Annotated[int, Number(minimum=0)]
Positive = Annotated[int, Number(minimum=1)]
NonNegative = Annotated[float, Number(minimum=0.0)]


class WireRecord:
    """Base of the frozen dataclasses that cross a process boundary (see the module docstring).

    A record is declared as ``class Hop(WireRecord, kind="hop")`` (a part) or
    ``class StepRequest(WireRecord, kind="step request", version=WIRE_VERSION)`` (a message).
    """

    KIND: ClassVar[str] = "record"
    VERSION: ClassVar[int | None] = None

    def __init_subclass__(cls, kind: str | None = None, version: int | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.KIND, cls.VERSION = kind, version

    def __post_init__(self) -> None:
        for field in _fields(type(self)):
            field.check(field.label, getattr(self, field.name))
        self.check()

    def check(self) -> None:
        """Rules across fields, beyond each field's type; raises RecordError naming what is wrong."""

    def to_wire(self) -> Any:
        data = {} if self.VERSION is None else {"version": self.VERSION}
        for field in _fields(type(self)):
            data[field.name] = _encode(getattr(self, field.name))
        return data

    @classmethod
    def from_wire(cls, data: Any):
        fields = _fields(cls)
        expected = {field.name for field in fields} | ({"version"} if cls.VERSION is not None else set())
        data = check_keys(cls.KIND, data, expected)
        if cls.VERSION is not None:
            check_version(cls.KIND, data["version"], cls.VERSION)
        return cls(**{field.name: field.decode(field.label, data[field.name]) for field in fields})


def check_keys(kind: str, data: Any, expected: set[str]) -> dict:
    if not isinstance(data, dict):
        raise RecordError(f"{kind} must be a mapping, got {type(data).__name__}")
    if data.keys() != expected:
        missing, extra = expected - data.keys(), data.keys() - expected
        require(not missing, f"{kind} lacks field(s) {sorted(missing)}")
        raise RecordError(f"{kind} has unknown field(s) {sorted(map(str, extra))}")
    return data


def check_version(kind: str, value: Any, supported: int) -> None:
    require(isinstance(value, int) and not isinstance(value, bool), f"{kind}.version must be an int, got {value!r}")
    require(value == supported, f"{kind} has version {value}, this peer reads version {supported}")


Check = Callable[[str, Any], None]
Decode = Callable[[str, Any], Any]


@dataclasses.dataclass(frozen=True)
class _Field:
    """One field of a record, with its type turned into a checker and a decoder once (every message uses them)."""

    name: str
    label: str  # how errors name it: "step request.position"
    check: Check
    decode: Decode


@functools.cache
def _fields(cls: type) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple(_Field(item.name, f"{cls.KIND}.{item.name}", _checker(hints[item.name]), _decoder(hints[item.name]))
                 for item in dataclasses.fields(cls))


def _optional(kind: Any) -> Any | None:
    """``X`` for ``X | None``, else None."""
    if typing.get_origin(kind) not in (typing.Union, types.UnionType):
        return None
    (inner,) = [argument for argument in typing.get_args(kind) if argument is not type(None)]
    return inner


def _checker(kind: Any) -> Check:
    """A function that raises RecordError naming the field unless a value is of type ``kind``, constraints included."""
    inner = _optional(kind)
    if inner is not None:
        check_inner = _checker(inner)
        return lambda name, value: value is None or check_inner(name, value)
    if typing.get_origin(kind) is Annotated:
        base, *constraints = typing.get_args(kind)
        return _constrained(_checker(base), constraints)
    if typing.get_origin(kind) is tuple:
        return _tuple_checker(_checker(typing.get_args(kind)[0]))
    if kind is float:
        return _isinstance_checker((int, float), "a number")
    return _isinstance_checker(kind, f"of type {getattr(kind, 'KIND', getattr(kind, '__name__', kind))}")


def _constrained(check_base: Check, constraints: list) -> Check:
    def check(name: str, value: Any) -> None:
        check_base(name, value)
        for constraint in constraints:
            constraint.check(name, value)
    return check


def _tuple_checker(check_item: Check) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, tuple):
            raise RecordError(f"{name} must be a tuple, got {type(value).__name__}")
        for item in value:
            check_item(f"{name}[]", item)
    return check


def _isinstance_checker(kind, what: str) -> Check:
    def check(name: str, value: Any) -> None:
        # True is an int to Python, never a number to a record
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise RecordError(f"{name} must be {what}, got {value!r}"[:300])
    return check


def _decoder(kind: Any) -> Decode:
    """A function from a value as read off the wire to the field's type; plain values pass to the checks."""
    inner = _optional(kind)
    if inner is not None:
        decode_inner = _decoder(inner)
        return lambda name, value: None if value is None else decode_inner(name, value)
    if typing.get_origin(kind) is Annotated:
        return _decoder(typing.get_args(kind)[0])
    if typing.get_origin(kind) is tuple:
        return _tuple_decoder(_decoder(typing.get_args(kind)[0]))
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return _enum_decoder(kind)
    if isinstance(kind, type) and issubclass(kind, WireRecord):
        return lambda name, value: kind.from_wire(value)
    return lambda name, value: value


def _tuple_decoder(decode_item: Decode) -> Decode:
    def decode(name: str, value: Any) -> tuple:
        require(isinstance(value, (list, tuple)), f"{name} must be a list, got {type(value).__name__}")
        return tuple(decode_item(name, item) for item in value)
    return decode


def _enum_decoder(kind: type[enum.Enum]) -> Decode:
    def decode(name: str, value: Any) -> enum.Enum:
        try:
            return kind(value)
        except ValueError:
            raise RecordError(f"{name} {value!r} is not one of {[member.value for member in kind]}") from None
    return decode


def _encode(value: Any) -> Any:
    if isinstance(value, WireRecord):
        return value.to_wire()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_encode(item) for item in value]
    return value

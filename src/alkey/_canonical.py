"""An injective, deterministic byte encoding of cache-key arguments.

Every value is written as a type tag followed by a length-prefixed body, so no two
different argument lists produce the same bytes: ``('a', 'b')`` and ``('a/b',)`` differ
in their item count and lengths, ``1``, ``1.0``, ``True`` and ``'1'`` in their tags.
Dictionaries and sets are written in the order of their encoded items, so insertion order
and ``PYTHONHASHSEED`` never change a key. Nothing depends on ``hash()`` or ``id()``.

Model instances, mapped classes, tables and identifier strings -- wherever they appear,
nested or not -- become token references: the chunk list holds the identifier itself as a
``str`` (every other chunk is ``bytes``), and the key generator replaces it by the
identifier and its current token before hashing.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final

from sqlalchemy import inspect
from sqlalchemy.orm import InstanceState, Mapper
from sqlalchemy.orm.base import DEFAULT_STATE_ATTR
from sqlalchemy.schema import Table

from alkey import identity

__all__ = ["MAX_DEPTH", "Chunk", "encode_arguments"]

#: Deeper nesting is refused: it is almost always a reference cycle.
MAX_DEPTH: Final = 64


#: ``bytes``: encoded data; ``str``: a validated identifier whose token goes here.
Chunk = bytes | str


def _framed(tag: bytes, body: bytes) -> bytes:
    return tag + str(len(body)).encode("ascii") + b":" + body


def _text(value: str) -> bytes:
    # surrogatepass: lone surrogates are valid Python strings and must stay distinct.
    return value.encode("utf-8", "surrogatepass")


_SCALARS: Final[dict[type, Callable[[Any], bytes]]] = {
    int: lambda v: _framed(b"i", str(v).encode("ascii")),
    float: lambda v: _framed(b"f", repr(v).encode("ascii")),
    complex: lambda v: _framed(b"c", repr(v).encode("ascii")),
    bytes: lambda v: _framed(b"b", v),
    bytearray: lambda v: _framed(b"b", bytes(v)),
    memoryview: lambda v: _framed(b"b", v.tobytes()),
    decimal.Decimal: lambda v: _framed(b"d", str(v).encode("ascii")),
    uuid.UUID: lambda v: _framed(b"u", v.bytes),
    datetime.datetime: lambda v: _framed(b"D", v.isoformat().encode("ascii")),
    datetime.date: lambda v: _framed(b"a", v.isoformat().encode("ascii")),
    datetime.time: lambda v: _framed(b"t", v.isoformat().encode("ascii")),
    datetime.timedelta: lambda v: _framed(b"T", repr(v).encode("ascii")),
}


class _Encoder:
    __slots__ = ("chunks", "position")

    def __init__(self, position: int) -> None:
        self.chunks: list[Chunk] = []
        self.position = position

    def _fail(self, error: type[Exception], problem: str) -> Exception:
        return error(f"cache key argument {self.position + 1}: {problem}")

    def encode(self, value: object, depth: int = 0) -> None:
        # Ordered by frequency in real keys: strings and model instances first.
        kind = type(value)
        if kind is str:
            self._string(value)  # type: ignore[arg-type]
            return
        state = getattr(value, DEFAULT_STATE_ATTR, None)
        if isinstance(state, InstanceState):
            self.chunks.append(identity.instance_identifier(state))
            return
        encode_scalar = _SCALARS.get(kind)
        if encode_scalar is not None:
            self.chunks.append(encode_scalar(value))
        elif value is None:
            self.chunks.append(b"N")
        elif kind is bool:
            self.chunks.append(b"1" if value else b"0")
        elif depth >= MAX_DEPTH:
            raise self._fail(ValueError, f"nested deeper than {MAX_DEPTH} levels (a cycle?)")
        elif kind is list or kind is tuple:
            self._sequence(b"l" if kind is list else b"(", value, depth)  # type: ignore[arg-type]
        elif kind is dict or isinstance(value, Mapping):
            self._unordered(b"m", list(value.items()), depth)  # type: ignore[attr-defined]
        elif isinstance(value, (set, frozenset)):
            self._unordered(b"S", [(item,) for item in value], depth)
        elif isinstance(value, (list, tuple)):
            self._sequence(b"l" if isinstance(value, list) else b"(", value, depth)
        else:
            self._other(value, depth)

    def _string(self, value: str) -> None:
        if identity.is_identifier(value):
            try:
                identity.parse_identifier(value)
            except ValueError as error:
                raise self._fail(ValueError, str(error)) from None
            self.chunks.append(value)
        else:
            self.chunks.append(_framed(b"s", _text(value)))

    def _sequence(self, tag: bytes, items: list[Any] | tuple[Any, ...], depth: int) -> None:
        self.chunks.append(tag + str(len(items)).encode("ascii") + b"[")
        for item in items:
            self.encode(item, depth + 1)
        self.chunks.append(b"]")

    def _unordered(self, tag: bytes, entries: list[tuple[Any, ...]], depth: int) -> None:
        encoded = []
        for entry in entries:
            sub = _Encoder(self.position)
            for part in entry:
                sub.encode(part, depth + 1)
            encoded.append(sub.chunks)
        # Order by a byte form in which a token reference sorts by its identifier: stable, and
        # independent of the token values fetched later.
        encoded.sort(key=_sort_key)
        self.chunks.append(tag + str(len(encoded)).encode("ascii") + b"{")
        for chunks in encoded:
            self.chunks.extend(chunks)
        self.chunks.append(b"}")

    def _other(self, value: object, depth: int) -> None:
        if isinstance(value, enum.Enum):
            self.chunks.append(_framed(b"e", _text(_qualified_name(type(value)))))
            self.encode(value.value, depth + 1)
            return
        if isinstance(value, Table):
            self.chunks.append(identity.table_identifier(value))
            return
        if isinstance(inspect(value, raiseerr=False), Mapper):
            self.chunks.append(identity.identifier_for(value))
            return
        kind = type(value)
        fields = _record_fields(value)
        if fields is not None:
            # Field by field, so that instances and sets inside are encoded as such,
            # not through a repr that hides them or depends on hash order.
            self.chunks.append(_framed(b"r", _text(_qualified_name(kind))))
            self._sequence(b"(", [(name, getattr(value, name)) for name in fields], depth)
            return
        try:
            text = str(value)
        except Exception as error:
            raise self._fail(
                TypeError,
                f"str() of {kind.__qualname__} failed ({type(error).__name__}: {error}); "
                "pass a value that can be turned into text",
            ) from error
        if _MEMORY_ADDRESS.search(text):
            raise self._fail(
                TypeError,
                f"{kind.__qualname__} has no stable text form (its text contains a memory "
                "address, which differs between processes); define __str__ or pass a value "
                "that identifies it",
            )
        self.chunks.append(_framed(b"o", _text(_qualified_name(kind))) + _framed(b"s", _text(text)))


_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _record_fields(value: object) -> list[str] | None:
    """Field names of a dataclass or attrs instance, else None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [field.name for field in dataclasses.fields(value)]
    attributes = getattr(type(value), "__attrs_attrs__", None)
    if attributes is not None:
        return [attribute.name for attribute in attributes]
    return None


def _qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _sort_key(chunks: list[Chunk]) -> bytes:
    return b"".join(
        chunk if type(chunk) is bytes else _framed(b"k", chunk.encode("ascii"))  # type: ignore[union-attr]
        for chunk in chunks
    )


def encode_arguments(args: tuple[object, ...]) -> list[Chunk]:
    """Encode a whole argument list; raise TypeError/ValueError naming the bad argument."""
    chunks: list[Chunk] = [b"A" + str(len(args)).encode("ascii") + b"["]
    for position, arg in enumerate(args):
        # Fast path for the commonest argument, a model instance.
        state = getattr(arg, DEFAULT_STATE_ATTR, None)
        if type(state) is InstanceState:
            chunks.append(identity.instance_identifier(state))
            continue
        encoder = _Encoder(position)
        encoder.encode(arg)
        chunks.extend(encoder.chunks)
    chunks.append(b"]")
    return chunks

"""An injective, deterministic byte encoding of cache-key arguments.

Every value is written as a type tag followed by a length-prefixed body, so no two
different argument lists produce the same bytes: ``('a', 'b')`` and ``('a/b',)`` differ
in their item count and lengths, ``1``, ``1.0``, ``True`` and ``'1'`` in their tags.
Dictionaries and sets are written in the order of their encoded items, so insertion order
and ``PYTHONHASHSEED`` never change a key. Nothing depends on ``hash()`` or ``id()``.

Model instances, mapped classes, tables and identifier strings -- wherever they appear,
nested or not -- become token references: the chunk list holds the identifier itself as a
``str`` (every other chunk is ``bytes``), and the key generator hashes the identifier
and its current token for it (see :class:`alkey.keys.KeyPlan`).

The rule is that every argument gets an encoding that determines it, or a ``TypeError``
naming it. A key built from a value's text is only right when that text is the value's
identity: ``str(select(User).where(User.id == 1))`` shows ``:id_1``, not ``1``, and the
text of a container hides the instances in it, whose writes would then never change the
key. So every standard container is walked item by item (sequences in order; mappings,
sets and the set-like ``keys()`` and ``items()`` views in canonical order, like the dicts
they view), and what has no trustworthy encoding -- SQL statements and expressions, ORM
queries and dynamic or write-only relationships, iterators, lambdas and nested functions,
objects without a ``__str__`` or ``__repr__`` of their own -- is refused with the fix.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import re
import sys
import types
import uuid
from collections import UserString
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterator,
    Mapping,
    Sequence,
    Set,
    ValuesView,
)
from itertools import chain
from typing import Any, Final

from sqlalchemy import inspect
from sqlalchemy.engine import Row
from sqlalchemy.orm import (
    AppenderQuery,
    InstanceState,
    Mapper,
    Query,
    QueryableAttribute,
    WriteOnlyCollection,
)
from sqlalchemy.orm.base import DEFAULT_STATE_ATTR
from sqlalchemy.orm.util import AliasedInsp
from sqlalchemy.schema import Table
from sqlalchemy.sql import ClauseElement, Executable

from alkey import identity
from alkey.snapshot import load_expired, loaded_state, loaded_states

__all__ = ["MAX_DEPTH", "Chunk", "encode_arguments"]

#: Deeper nesting is refused: it is almost always a reference cycle.
MAX_DEPTH: Final = 64


#: ``bytes``: encoded data; ``str``: a validated identifier whose token goes here.
Chunk = bytes | str

#: Called with the state of an instance of a session not checked yet (see
#: :data:`checked_session`), to warn if that session is not bound: set by
#: :func:`alkey.events.bind` (which this module must not import), so that a process that
#: never binds pays one global lookup per key and nothing more.
check_session: Callable[[InstanceState[Any]], None] | None = None
#: The ``session_id`` of the session :data:`check_session` saw last. Keys are built a
#: request at a time, so the check runs about once per session, not once per key.
checked_session: int | None = None


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
    __slots__ = ("chunks", "expired", "position")

    def __init__(self, position: int, expired: list[InstanceState[Any]] | None) -> None:
        self.chunks: list[Chunk] = []
        self.position = position
        #: Where instances whose attributes their session expired are collected, to be
        #: loaded together (None: each is loaded as it is met).
        self.expired = expired

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
            if check_session is not None and state.session_id not in (checked_session, None):
                check_session(state)
            self.chunks.append(identity.instance_identifier(state))
            self.chunks.append(loaded_state(state, self.expired))
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
        elif isinstance(value, list):
            # A list subclass (a relationship's InstrumentedList) is a list of its items.
            self._sequence(b"l", value, depth)
        elif isinstance(value, tuple):
            # A namedtuple (or os.stat_result...): its class is part of what it means, so
            # Point(1, 2) and (1, 2) key apart, and so do two namedtuple classes.
            self.chunks.append(_framed(b"n", _text(_qualified_name(kind))))
            self._sequence(b"(", value, depth)
        else:
            self._other(value, depth)

    def _string(self, value: str) -> None:
        if identity.is_identifier(value):
            try:
                identity.parse_identifier(value)
            except ValueError as error:
                raise self._fail(ValueError, str(error)) from None
            identity.learn_dependencies(value)
            self.chunks.append(value)
        else:
            self.chunks.append(_framed(b"s", _text(value)))

    def _sequence(self, tag: bytes, items: list[Any] | tuple[Any, ...], depth: int) -> None:
        chunks = self.chunks
        chunks.append(tag + str(len(items)).encode("ascii") + b"[")
        # A list of instances (a query's result, a relationship) is the commonest nested
        # argument: its runs of instances take the batch path top-level ones take.
        run: list[InstanceState[Any]] = []
        for item in items:
            state = getattr(item, DEFAULT_STATE_ATTR, None)
            if type(state) is InstanceState:
                run.append(state)
                continue
            if run:
                _instances(chunks, run, self.expired)
                run = []
            self.encode(item, depth + 1)
        if run:
            _instances(chunks, run, self.expired)
        chunks.append(b"]")

    def _unordered(self, tag: bytes, entries: list[tuple[Any, ...]], depth: int) -> None:
        encoded = []
        for entry in entries:
            sub = _Encoder(self.position, self.expired)
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
        """Encode whatever the fast branches of :meth:`encode` did not: rarer types first
        by what they are, then containers by what they promise, then refusals, and text
        last, only for objects that define their own."""
        if isinstance(value, enum.Enum):
            self.chunks.append(_framed(b"e", _text(_qualified_name(type(value)))))
            self.encode(value.value, depth + 1)
            return
        if isinstance(value, Table):
            self.chunks.append(identity.table_identifier(value))
            return
        inspected = inspect(value, raiseerr=False)
        if isinstance(inspected, Mapper):
            self.chunks.append(identity.identifier_for(value))
            return
        if isinstance(inspected, AliasedInsp):
            # aliased(User) stands for the table, as User does; its text is the same for
            # every alias of every class of that name.
            self.chunks.append(identity.mapper_identifier(inspected.mapper))
            return
        if isinstance(value, QueryableAttribute):
            # User.name: a column of a class, by the class's import path and its key (its
            # text, "User.name", is shared by classes of that name in other modules).
            # Of an alias too: aliased(User).name is the column User.name.
            owner = getattr(getattr(value, "parent", None), "mapper", None)
            module, qualname = _import_path(owner.class_ if owner is not None else value.class_)
            if not module:
                raise self._fail(
                    TypeError,
                    f"{value} is an attribute of a class that cannot be found again by its "
                    "name (defined in a function); pass the attribute's name as a string",
                )
            name = _text(f"{qualname}.{value.key}")
            self.chunks.append(b"x" + _framed(b"M", _text(module)) + _framed(b"Q", name))
            return
        kind = type(value)
        fields = _record_fields(value)
        if fields is not None:
            # Field by field, so that instances and sets inside are encoded as such,
            # not through a repr that hides them or depends on hash order.
            self.chunks.append(_framed(b"r", _text(_qualified_name(kind))))
            self._sequence(b"(", [(name, getattr(value, name)) for name in fields], depth)
            return
        if isinstance(value, Row):
            # A result row: its values (instances become token references) and, like a
            # namedtuple's class, its column names, which code reading row.name relies on.
            self.chunks.append(_framed(b"w", _text(_qualified_name(kind))))
            self._sequence(b"(", list(zip(value._fields, value, strict=True)), depth)
            return
        refusal = _refusal(value)
        if refusal is not None:
            raise self._fail(TypeError, refusal)
        if not isinstance(value, _TEXT_SEQUENCES):
            # Containers by their abstract type, whose contract says that iterating them
            # yields their content, finitely and repeatably (an arbitrary iterable's
            # iteration may do I/O or yield only part of it, as a DataFrame's yields its
            # column labels, so those keep to the text rules below). Tagged with the
            # class, as a deque of items is not the list of them.
            if isinstance(value, ValuesView):
                # Not set-like (values repeat, and Python never finds two equal): in order.
                self.chunks.append(_framed(b"q", _text(_qualified_name(kind))))
                self._sequence(b"l", list(value), depth)
                return
            if isinstance(value, Set):
                # dict.keys(), dict.items() and other sets: in canonical order, as the dict
                # they view (and as Python compares them).
                self.chunks.append(_framed(b"U", _text(_qualified_name(kind))))
                self._unordered(b"S", [(item,) for item in value], depth)
                return
            if isinstance(value, Sequence):
                # deque, array.array, UserList...
                self.chunks.append(_framed(b"q", _text(_qualified_name(kind))))
                self._sequence(b"l", list(value), depth)
                return
        if isinstance(value, _ROUTINES):
            module, qualname = _import_path(value)
            if not module:
                raise self._fail(
                    TypeError,
                    f"{_describe(value)} has no stable text form and cannot be found again "
                    "by its name (a lambda, a nested function, a bound method or a class "
                    "defined in a function): its text is a memory address or a name that "
                    "other objects share; pass a module-level function or class, or a value "
                    "that identifies it",
                )
            self.chunks.append(b"g" + _framed(b"M", _text(module)) + _framed(b"Q", _text(qualname)))
            return
        if kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__:
            raise self._fail(TypeError, _no_text(kind))
        try:
            text = str(value)
        except Exception as error:
            raise self._fail(
                TypeError,
                f"str() of {kind.__qualname__} failed ({type(error).__name__}: {error}); "
                "pass a value that can be turned into text",
            ) from error
        if _MEMORY_ADDRESS.search(text):
            raise self._fail(TypeError, _no_text(kind))
        self.chunks.append(_framed(b"o", _text(_qualified_name(kind))) + _framed(b"s", _text(text)))


def _no_text(kind: type) -> str:
    return (
        f"{kind.__qualname__} has no stable text form (its text contains a memory "
        "address, which differs between processes); define __str__ or pass a value "
        "that identifies it"
    )


#: Sequences whose text is exactly their content, and keeps its encoding: str and bytes
#: subclasses and UserString (walking them character by character would change their keys
#: for nothing), and range, whose text ``range(0, 9, 2)`` is its start, stop and step --
#: walked, ``range(0)`` and ``range(5, 5)`` would share a key, and a long one take long.
_TEXT_SEQUENCES: Final = (str, bytes, bytearray, memoryview, UserString, range)

#: Functions and classes: keyed by their import path, or refused.
_ROUTINES: Final = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
)

_SQL_FIX: Final = (
    "pass the values it depends on instead (the ids or instances it selects, a list of "
    "the rows it returns, and a string naming the query)"
)


def _refusal(value: object) -> str | None:
    """Why ``value`` cannot be part of a key, with what to pass instead, or None.

    These are the values whose text is not their identity and that cannot be walked: a
    statement's text shows bind placeholders (``:id_1``) rather than the values bound to
    them, so ``... == 1`` and ``... == 2`` would share a key; a dynamic or write-only
    relationship's text is the same for every parent; iterating an iterator consumes it.
    """
    name = type(value).__qualname__
    if isinstance(value, AppenderQuery):
        return (
            f"{name} (a lazy='dynamic' relationship) has the same text for every parent and "
            "hides its rows; pass list(...) of its members, or the related class to key on "
            "any write to its table"
        )
    if isinstance(value, WriteOnlyCollection):
        return (
            f"{name} (a write-only relationship) has the same text for every parent and "
            "holds no rows; pass the rows you read through its select(), or the related "
            "class to key on any write to its table"
        )
    if isinstance(value, (Query, ClauseElement, Executable)):
        return (
            f"{name} is a SQL construct: its text is SQL in which bound values are "
            f"placeholders (:id_1), the same for different queries; {_SQL_FIX}"
        )
    if isinstance(value, (Iterator, AsyncIterator)):
        return (
            f"{name} is an iterator (a generator, or the result of iter(), map(), a query's "
            "execution...): encoding it would consume it; pass a list of its items"
        )
    return None


def _import_path(value: object) -> tuple[str, str]:
    """``(module, qualified name)`` under which ``value`` is found again, else ``('', '')``.

    The rule pickle uses for functions and classes: a module-level function or class
    (``len``, ``json.dumps``, ``MyEnum``, ``MyClass.a_static_method``, ``MyClass.a_classmethod``)
    is the same object in every process, so its path is its identity. A lambda, a nested
    function or a class defined in a function has a ``<...>`` in its qualified name and is
    a new object each time that code runs; a method bound to an instance is more than its
    function. Only modules already imported are looked in: nothing is imported here.
    """
    module = getattr(value, "__module__", None)
    if module is None:
        # Methods of built-in classes: str.upper (its __objclass__), dict.fromkeys (bound
        # to the class, its __self__) live in their class's module.
        owner = getattr(value, "__objclass__", None) or getattr(value, "__self__", None)
        if isinstance(owner, type):
            module = owner.__module__
    qualname = getattr(value, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return "", ""
    found: object = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    # A classmethod is a new bound method at each access, equal to the one we have; a
    # class is compared by identity only (a metaclass may define __eq__).
    if found is value or (not isinstance(value, type) and found == value):
        return module, qualname
    return "", ""


def _describe(value: object) -> str:
    qualname = getattr(value, "__qualname__", None)
    kind = type(value).__qualname__
    return f"{kind} {qualname!r}" if isinstance(qualname, str) else kind


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
    """Encode a whole argument list; raise TypeError/ValueError naming the bad argument.

    Instances whose session expired their attributes (after a commit or rollback) need
    them loaded for their state (see :mod:`alkey.snapshot`): the first pass collects them,
    :func:`~alkey.snapshot.load_expired` loads them with one query per class and session,
    and a second pass encodes them -- rather than one query per instance.
    """
    expired: list[InstanceState[Any]] = []
    chunks = _encode(args, expired)
    if expired:
        load_expired(expired)
        chunks = _encode(args, None)
    return chunks


def _encode(args: tuple[object, ...], expired: list[InstanceState[Any]] | None) -> list[Chunk]:
    chunks: list[Chunk] = [b"A" + str(len(args)).encode("ascii") + b"["]
    # The commonest arguments, model instances, are encoded a run at a time: their
    # identifiers and states each come from one loop (see identity.instance_identifiers).
    run: list[InstanceState[Any]] = []
    for position, arg in enumerate(args):
        state = getattr(arg, DEFAULT_STATE_ATTR, None)
        if type(state) is InstanceState:
            run.append(state)
            continue
        if run:
            _instances(chunks, run, expired)
            run = []
        encoder = _Encoder(position, expired)
        encoder.encode(arg)
        chunks.extend(encoder.chunks)
    if run:
        _instances(chunks, run, expired)
    chunks.append(b"]")
    return chunks


def _instances(
    chunks: list[Chunk], states: list[InstanceState[Any]], expired: list[InstanceState[Any]] | None
) -> None:
    """Append each instance's identifier, then its state, as :meth:`_Encoder.encode` does."""
    # Whether the session is bound: asked of the run's first instance only, and only for
    # a session not asked about yet (instances of one key nearly always share one).
    if check_session is not None and states[0].session_id not in (checked_session, None):
        check_session(states[0])
    identifiers = identity.instance_identifiers(states)
    chunks += chain.from_iterable(zip(identifiers, loaded_states(states, expired), strict=True))

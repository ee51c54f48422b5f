"""What a model instance was loaded with: the part of its key that a stale load cannot share.

A reader that loads a row, then builds its key, then renders from what it loaded races
every writer: if a write commits and bumps the row's token between the load and the key,
the reader caches the *old* render under the *new* token, for everyone, until the next
write -- the "stale set" that memcache leases exist for (Nishtala et al., NSDI 2013).

alkey closes it the way Rails does with its ``cache_key_with_version``: the key of an
instance depends on its row's token *and* on the state the instance holds, so a key built
from a stale load is one that no reader of the fresh row ever builds. What an instance
holds is:

* the value of each of its column attributes (a ``column_property`` too), expired ones
  loaded first, as reading them would, and deferred ones marked as not loaded;
* the members of each loaded one-to-many and many-to-many relationship -- their
  identities and column values, in collection order -- because a render of the parent
  shows them, and writing a one-to-many member (``touch_parents``), or changing who is a
  many-to-many member, changes this row's token.

Instances without a row yet (pending or transient) stand for their table, as in alkey
0.3, and add nothing. Identifier strings have no loaded state: a key built from
``'alkey:users#1'`` after the data was loaded is not protected; build it before loading,
or pass the instance.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import logging
import operator
import secrets
import sys
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import exc as sa_exc
from sqlalchemy import select, tuple_
from sqlalchemy.orm import InstanceState, Mapper
from sqlalchemy.orm import base as orm_base
from sqlalchemy.orm import exc as orm_exc
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.interfaces import MANYTOMANY, ONETOMANY

from alkey.identity import schemas_of

__all__ = ["LOAD_BATCH", "load_expired", "loaded_state", "loaded_states", "members_of"]

log = logging.getLogger("alkey.snapshot")

_NOT_LOADED: Final = b"-"


@dataclass(frozen=True, slots=True)
class _Plan:
    """Which attributes of one mapper's instances make up their state, worked out once."""

    columns: frozenset[str]
    #: The column attributes a plain load loads (not deferred): those whose expiry makes
    #: the instance load them again before it is keyed, as a fresh load would have them.
    loaded: frozenset[str]
    #: The column attributes, in a fixed order, and a function reading them from an
    #: instance's ``__dict__`` as a tuple.
    keys: tuple[str, ...]
    getter: Callable[[dict[str, Any]], tuple[Any, ...]]
    #: Per column attribute, in that order: its name, and how its value (or its absence)
    #: is framed in the state when it has no plain repr.
    frames: tuple[tuple[str, bytes, bytes], ...]
    collections: tuple[str, ...]


_plans: dict[Mapper[Any], _Plan] = {}


def _plan(mapper: Mapper[Any]) -> _Plan:
    plan = _plans.get(mapper)
    if plan is None:
        columns = sorted(prop.key for prop in mapper.column_attrs)
        loaded = frozenset(prop.key for prop in mapper.column_attrs if not prop.deferred)
        collections = tuple(
            sorted(
                rel.key for rel in mapper.relationships if rel.direction in (ONETOMANY, MANYTOMANY)
            )
        )
        frames = tuple((key, f"a{key}=".encode(), f"a{key}-".encode()) for key in columns)
        getter = (
            operator.itemgetter(*columns)
            if len(columns) > 1
            else lambda values: (values[columns[0]],)
        )
        plan = _plans[mapper] = _Plan(
            frozenset(columns), loaded, tuple(columns), getter, frames, collections
        )
    return plan


def loaded_state(
    state: InstanceState[Any], expired: list[InstanceState[Any]] | None = None
) -> bytes:
    """The encoded state of a persistent instance, to follow its identifier in a key.

    Empty for an instance without a row (it stands for its table). An instance whose
    column attributes its session expired is added to ``expired`` (and gets an empty
    state, to be encoded again once :func:`load_expired` loaded them all), or, with no
    such list, loaded on its own. Never raises for a value it cannot encode: such a value
    makes the key one that no other load shares (a guaranteed miss, never a stale hit),
    and is logged once per attribute.

    The state is not hashed on its own (the whole key is hashed once): it is the repr of
    the instance's row of plain values, tagged ``v`` -- a tuple literal, whose end a
    reader finds -- or anything else (a tzinfo's repr is text of its own) framed by its
    length and tagged ``V``.
    """
    if state.key is None:
        return b""
    plan = _plans.get(state.mapper) or _plan(state.mapper)
    expired_attributes = state.expired_attributes
    if expired_attributes and not expired_attributes.isdisjoint(plan.loaded):
        if expired is not None:
            expired.append(state)
            return b""
        _load_expired(state, plan)
    values = state.dict
    body = _columns(values, state, plan)
    if not plan.collections and body[:1] == b"(" and _literal_row(_row(values, plan)):
        return b"v" + body  # as loaded_states() encodes it
    if plan.collections:
        parts = [body]
        for key in plan.collections:
            if key not in values:
                parts.append(b"c" + key.encode() + _NOT_LOADED)
                continue
            parts.append(b"c" + key.encode() + b"[")
            for member in members_of(values[key]):
                member_state = instance_state(member)
                member_plan = _plans.get(member_state.mapper) or _plan(member_state.mapper)
                identity = member_state.key
                parts.append(repr(identity[1] if identity is not None else None).encode())
                parts.append(member_state.mapper.class_.__qualname__.encode())
                parts.append(_columns(member_state.dict, member_state, member_plan))
            parts.append(b"]")
        body = b"".join(parts)
    return b"V%d:%s" % (len(body), body)


def loaded_states(
    states: Iterable[InstanceState[Any]], expired: list[InstanceState[Any]] | None = None
) -> list[bytes]:
    """:func:`loaded_state` of each state: the same answers, from one loop whose common
    case -- every column loaded, values of plain types, no loaded collection to follow --
    costs no call of Python code, because a key may name a thousand instances."""
    encoded: list[bytes] = []
    append = encoded.append
    plain = _PLAIN_REPR.issuperset
    # How SQLAlchemy finds an instance's __dict__ (looked up now: an instrumentation
    # extension may replace it), without the InstanceState.dict property around it.
    instance_dict = orm_base.instance_dict
    seen: Mapper[Any] | None = None
    simple = False  # whether seen's instances can take the common case
    loaded: frozenset[str] = frozenset()
    columns: frozenset[str] = frozenset()
    getter: Callable[[dict[str, Any]], tuple[Any, ...]] = tuple
    for state in states:
        mapper = state.mapper
        if mapper is not seen:
            plan = _plans.get(mapper) or _plan(mapper)
            seen, simple = mapper, not plan.collections
            loaded, columns, getter = plan.loaded, plan.columns, plan.getter
        if simple and state.key is not None:
            expired_attributes = state.expired_attributes
            obj = state.obj()
            if (
                obj is not None
                and (not expired_attributes or expired_attributes.isdisjoint(loaded))
                and (values := instance_dict(obj)).keys() >= columns
            ):
                row = getter(values)
                if plain(map(type, row)) or _literal_row(row):
                    append(b"v" + repr(row).encode("utf-8", "surrogatepass"))
                    continue
        append(loaded_state(state, expired))
    return encoded


def members_of(value: Any) -> Iterable[Any]:
    """The instances a loaded relationship attribute holds, whatever its shape: a list, a
    set (in the order of their identities, the same in every process), a dict-keyed
    collection's values, or one instance (``uselist=False``) or none."""
    if value is None:
        return ()
    if isinstance(value, dict):  # attribute_keyed_dict collections
        return list(value.values())
    if isinstance(value, (list, set, frozenset, tuple)) or hasattr(value, "__iter__"):
        members = list(value)
        if isinstance(value, (set, frozenset)):
            # No order of its own: sort by identity, so that every process agrees.
            members.sort(key=lambda member: repr(instance_state(member).key))
        return members
    return (value,)  # a scalar one-to-one (uselist=False)


#: Most rows one query of :func:`load_expired` asks for.
LOAD_BATCH: Final = 500


def load_expired(states: Iterable[InstanceState[Any]]) -> None:
    """Load the expired column attributes of ``states``: one query per class and session
    (in batches of :data:`LOAD_BATCH`), as reading them one by one would, in one.

    After ``commit()`` (``expire_on_commit``) or ``rollback()`` every attribute is
    expired; loading them gives a key the same state a fresh load gives, so such
    instances key like any other. Instances of a tenant's schema or of a shard are loaded
    one by one, through SQLAlchemy's own load of their identity, which knows where they
    live. A detached instance, or one whose row is gone, keeps them unloaded and keys as
    such: a reader of it loads its data after the key, if at all.

    Raises :class:`~sqlalchemy.exc.MissingGreenlet` for instances of an ``AsyncSession``
    outside a greenlet: :class:`alkey.asyncio.AsyncCacheKeyGenerator` then loads them with
    ``await``.
    """
    groups: dict[tuple[int, Mapper[Any]], tuple[Any, dict[Any, InstanceState[Any]]]] = {}
    alone: list[InstanceState[Any]] = []
    for state in states:
        session = state.session
        key = state.key
        if session is None or key is None:
            continue
        _refuse_without_greenlet(session)
        if key[2] is not None or schemas_of(state) is not None:
            alone.append(state)
            continue
        _, members = groups.setdefault((id(session), state.mapper), (session, {}))
        members[tuple(key[1])] = state
    for (_, mapper), (session, members) in groups.items():
        keys = list(members)
        columns = list(mapper.primary_key)
        for start in range(0, len(keys), LOAD_BATCH):
            batch = keys[start : start + LOAD_BATCH]
            where = (
                columns[0].in_([key[0] for key in batch])
                if len(columns) == 1
                else tuple_(*columns).in_(batch)
            )
            # Rows already in the identity map get their expired attributes loaded. No
            # autoflush: building a key must not write the session's pending changes.
            with _greenlet_errors(), session.no_autoflush:
                session.scalars(select(mapper).where(where)).unique().all()
    for state in [*alone, *(s for _, (_, m) in groups.items() for s in m.values())]:
        plan = _plans.get(state.mapper) or _plan(state.mapper)
        if not state.expired_attributes.isdisjoint(plan.loaded):
            _load_expired(state, plan)  # not loaded above: deleted meanwhile, or alone


def _load_expired(state: InstanceState[Any], plan: _Plan) -> None:
    """Load one instance's expired column attributes, as reading one of them would: its
    expired columns that are not deferred (SQLAlchemy loads them together), and never a
    deferred one, which a fresh load would not have either (nor a ``raiseload`` one)."""
    for key in plan.keys:  # sorted: the same column in every process
        if key in plan.loaded and key in state.expired_attributes:
            obj = state.obj()
            if obj is None:  # pragma: no cover - the caller holds the instance
                return
            session = state.session
            try:
                if session is None:
                    getattr(obj, key)  # raises DetachedInstanceError
                    return
                _refuse_without_greenlet(session)
                # No autoflush: building a key must not write pending changes.
                with _greenlet_errors(), session.no_autoflush:
                    getattr(obj, key)
            except (orm_exc.DetachedInstanceError, orm_exc.ObjectDeletedError):
                pass  # no row to load: it keys as not loaded, and renders as it can
            return


def _refuse_without_greenlet(session: Any) -> None:
    """Raise :class:`~sqlalchemy.exc.MissingGreenlet` for the session of an
    ``AsyncSession`` outside a greenlet -- before a load would start (and leave behind) a
    coroutine that nothing awaits."""
    if "sqlalchemy.ext.asyncio" not in sys.modules:
        return  # no AsyncSession can exist
    from sqlalchemy.ext.asyncio.session import async_session
    from sqlalchemy.util.concurrency import in_greenlet

    if async_session(session) is not None and not in_greenlet():
        raise sa_exc.MissingGreenlet(
            "the expired attributes of an AsyncSession's instance can only be loaded with "
            "await (alkey.asyncio.AsyncCacheKeyGenerator does)"
        )


@contextlib.contextmanager
def _greenlet_errors() -> Iterator[None]:
    """Raise a load's :class:`~sqlalchemy.exc.MissingGreenlet` as itself: SQLAlchemy wraps
    it in a ``StatementError`` when a statement meets it."""
    try:
        yield
    except sa_exc.StatementError as error:
        if isinstance(error.orig, sa_exc.MissingGreenlet):
            raise error.orig from None
        raise


def _columns(values: dict[str, Any], state: InstanceState[Any], plan: _Plan) -> bytes:
    """The column values of an instance (``values``: its ``__dict__``), encoded."""
    # Every column loaded: read them in one C call.
    row = plan.getter(values) if values.keys() >= plan.columns else _row(values, plan)
    # The common case: values whose repr is their identity, a valid literal each, so the
    # repr of the row, in a fixed order of columns, tells every row apart (a datetime's
    # tzinfo must have a repr of its own too). Length-framed by the caller.
    if _PLAIN_REPR.issuperset(map(type, row)) or (
        _REPR_IS_IDENTITY.issuperset(map(type, row)) and _has_stable_repr(row)
    ):
        return repr(row).encode("utf-8", "surrogatepass")
    parts = [b"\0"]  # never the first byte of a repr: the two forms never meet
    for key, present, absent in plan.frames:
        value = values.get(key, _ABSENT)
        if value is _ABSENT:
            parts.append(absent)
            continue
        parts.append(present)
        kind = type(value)
        if kind is str:  # the commonest value, framed here without a call
            body = value.encode("utf-8", "surrogatepass")
            parts.append(b"str:%d:" % len(body))
            parts.append(body)
        else:
            parts.append(_value(state.mapper, key, value))
    return b"".join(parts)


def _row(values: dict[str, Any], plan: _Plan) -> tuple[Any, ...]:
    """The column values of an instance in the plan's order, unloaded ones as absent."""
    return tuple(values.get(key, _ABSENT) for key in plan.keys)


def _literal_row(row: tuple[Any, ...]) -> bool:
    """Whether the repr of ``row`` is a Python literal, whose end a reader finds (tag
    ``v``): plain values, and datetimes and times that are naive or in a time zone of the
    standard library. Any other tzinfo's repr is text of its own, which could read as what
    follows it in the key: such rows are framed by their length."""
    for value in row:
        kind = type(value)
        if kind in _PLAIN_REPR:
            continue
        if kind not in _ZONED or type(value.tzinfo) not in _LITERAL_ZONES:
            return False
    return True


class _Absent:
    """Stands for a column attribute that was not loaded (deferred, or not expired yet)."""

    def __repr__(self) -> str:
        return "<not loaded>"


_ABSENT: Final = _Absent()
_REPR_IS_IDENTITY: Final = frozenset(
    {str, int, float, bool, type(None), bytes, decimal.Decimal, uuid.UUID, datetime.datetime,
     datetime.date, datetime.time, datetime.timedelta, _Absent}
)  # fmt: skip
_ZONED: Final = frozenset({datetime.datetime, datetime.time})
#: The types whose repr is their identity with no further check (not a zoned type).
_PLAIN_REPR: Final = _REPR_IS_IDENTITY - _ZONED
#: The tzinfo types (and none) whose repr is a literal: ``datetime.timezone(...)``,
#: ``zoneinfo.ZoneInfo(key='...')``.
_LITERAL_ZONES: Final = frozenset({type(None), datetime.timezone, zoneinfo.ZoneInfo})
_unencodable: set[tuple[Mapper[Any], str]] = set()


def _value(mapper: Mapper[Any], key: str, value: Any) -> bytes:
    """One loaded value, framed by its type and length, the same in every process.

    Loaded values are what the database driver returns -- scalars, and lists and dicts of
    them for JSON and array columns, whose order the stored value fixes -- so their
    ``repr`` is deterministic, except for sets (sorted here) and objects whose ``repr``
    holds a memory address.
    """
    kind = type(value)
    text: str
    if kind is int or kind is bool or value is None:
        text = repr(value)
    elif kind is str:
        text = value
    elif kind is set or kind is frozenset:
        text = "{" + ", ".join(sorted(repr(item) for item in value)) + "}"
    else:
        text = repr(value)
        if not _has_stable_repr(value):
            if (mapper, key) not in _unencodable:
                _unencodable.add((mapper, key))
                log.warning(
                    "alkey cannot encode %s.%s: its value's repr() holds a memory address, "
                    "which differs on every load, so keys of such instances always miss. "
                    "Give the type a __repr__ that shows its value.",
                    mapper.class_.__qualname__,
                    key,
                )
            return secrets.token_bytes(16)
    body = text.encode("utf-8", "surrogatepass")
    return b"%s:%d:%s" % (kind.__qualname__.encode(), len(body), body)


def _has_stable_repr(value: Any, depth: int = 0) -> bool:
    """Whether ``value``'s repr is the same in every process: not the default
    ``<... object at 0x...>`` of an object (or of a datetime's tzinfo), at any depth of
    the lists, tuples, dicts and sets a JSON, array or pickled column holds. (Text that
    merely contains " at 0x" is data, and stable.)"""
    kind = type(value)
    if kind in _REPR_IS_IDENTITY and kind not in (datetime.datetime, datetime.time):
        return True
    if kind is datetime.datetime or kind is datetime.time:
        return value.tzinfo is None or not _default_repr(type(value.tzinfo))
    if depth > 32:
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_has_stable_repr(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(
            _has_stable_repr(k, depth + 1) and _has_stable_repr(v, depth + 1)
            for k, v in value.items()
        )
    # Its own repr, which may still show an address (a memoryview, a bound method).
    return not _default_repr(kind) and " at 0x" not in repr(value)


def _default_repr(kind: type) -> bool:
    return bool(getattr(kind, "__repr__", None) is object.__repr__)

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
  identities and column values, in collection order -- because writing such a member
  changes this row's token (``touch_parents``), and a render of the parent shows them.

Instances without a row yet (pending or transient) stand for their table, as in alkey
0.3, and add nothing. Identifier strings have no loaded state: a key built from
``'alkey:users#1'`` after the data was loaded is not protected; build it before loading,
or pass the instance.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import InstanceState, Mapper
from sqlalchemy.orm import exc as orm_exc
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.interfaces import MANYTOMANY, ONETOMANY

__all__ = ["loaded_state"]

log = logging.getLogger("alkey.snapshot")

#: The tag that frames an instance's state in the key's byte encoding.
STATE_TAG: Final = b"v"

_NOT_LOADED: Final = b"-"


@dataclass(frozen=True, slots=True)
class _Plan:
    """Which attributes of one mapper's instances make up their state, worked out once."""

    columns: tuple[str, ...]
    collections: tuple[str, ...]


_plans: dict[Mapper[Any], _Plan] = {}


def _plan(mapper: Mapper[Any]) -> _Plan:
    plan = _plans.get(mapper)
    if plan is None:
        columns = tuple(sorted(prop.key for prop in mapper.column_attrs))
        collections = tuple(
            sorted(
                rel.key for rel in mapper.relationships if rel.direction in (ONETOMANY, MANYTOMANY)
            )
        )
        plan = _plans[mapper] = _Plan(columns, collections)
    return plan


def loaded_state(state: InstanceState[Any]) -> bytes:
    """The encoded state of a persistent instance, to follow its identifier in a key.

    Empty for an instance without a row (it stands for its table). Never raises for a
    value it cannot encode: such a value makes the key one that no other load shares (a
    guaranteed miss, never a stale hit), and is logged once per attribute.
    """
    if state.key is None:
        return b""
    plan = _plans.get(state.mapper) or _plan(state.mapper)
    _load_expired(state, plan)
    digest = hashlib.sha256()
    _columns(digest, state, plan)
    values = state.dict
    for key in plan.collections:
        if key not in values:
            digest.update(b"c" + key.encode() + _NOT_LOADED)
            continue
        digest.update(b"c" + key.encode() + b"[")
        for member in _members(values[key]):
            member_state = instance_state(member)
            member_plan = _plans.get(member_state.mapper) or _plan(member_state.mapper)
            identity = member_state.key
            digest.update(repr(identity[1] if identity is not None else None).encode())
            digest.update(member_state.mapper.class_.__qualname__.encode())
            _columns(digest, member_state, member_plan)
        digest.update(b"]")
    return STATE_TAG + digest.digest()


def _members(value: Any) -> Iterable[Any]:
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


def _load_expired(state: InstanceState[Any], plan: _Plan) -> None:
    """Load the expired column attributes, as reading one of them would (one SELECT).

    After ``commit()`` (``expire_on_commit``) or ``rollback()`` every attribute is
    expired; loading them here gives the key the same state a fresh load gives, so such
    an instance keys like any other. A detached instance, or one of an ``AsyncSession``
    outside :func:`alkey.asyncio` (which loads them with ``await``), keeps them unloaded.
    """
    expired = state.expired_attributes
    if not expired:
        return
    for key in plan.columns:
        if key in expired:
            obj = state.obj()
            if obj is None:  # pragma: no cover - the caller holds the instance
                return
            try:
                getattr(obj, key)
            except (orm_exc.DetachedInstanceError, orm_exc.ObjectDeletedError):
                return
            except sa_exc.MissingGreenlet:
                raise
            return


def _columns(digest: Any, state: InstanceState[Any], plan: _Plan) -> None:
    values = state.dict
    parts = []
    for key in plan.columns:
        value = values.get(key, _ABSENT)
        if value is _ABSENT:
            parts.append(f"a{key}-".encode())
        else:
            parts.append(f"a{key}=".encode() + _value(state.mapper, key, value))
    digest.update(b"".join(parts))


_ABSENT: Final = object()
_MEMORY_ADDRESS: Final = re.compile(r" at 0x[0-9a-fA-F]+")
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
    if kind is str:
        text = value
    elif kind is set or kind is frozenset:
        text = "{" + ", ".join(sorted(repr(item) for item in value)) + "}"
    else:
        text = repr(value)
        if kind not in _PLAIN and _MEMORY_ADDRESS.search(text):
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
    return f"{kind.__qualname__}:{len(body)}:".encode() + body


_PLAIN: Final = frozenset({int, float, bool, type(None)})

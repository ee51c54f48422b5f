"""Writes the database makes by itself, following from the writes a statement makes.

Deleting or updating a row may make the database write other rows: the referential
actions of the foreign keys that reference it (``ON DELETE CASCADE``, ``SET NULL``,
``SET DEFAULT``, ``ON UPDATE ...``), the children of ``passive_deletes`` relationships, and
whatever :func:`alkey.catalog.declare_writes` declared. Which child rows is never reported,
so those tables' rows count as unknown; and the rules are precise, so that an ordinary
write invalidates no more than it must:

* an INSERT cascades nothing through foreign keys;
* a DELETE follows ``ondelete`` actions and ``passive_deletes`` relationships;
* an UPDATE follows ``onupdate`` actions only through foreign keys whose referenced
  columns it sets -- renaming a user reaches no item -- and, when its columns are not
  known, through every ``onupdate`` action;
* ``SET NULL`` / ``SET DEFAULT`` update the child's foreign-key columns, so they go on only
  through foreign keys that reference those columns with an ``onupdate`` action;
* a declared write (a trigger) is a write of unknown kind to its target: it goes on
  through both ``ondelete`` and ``onupdate`` actions;
* all of it transitively, each table and kind followed once (cycles end).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Final, Literal

from alkey import catalog
from alkey.identity import table_write_identifiers

__all__ = ["Kind", "cascaded_identifiers", "cascaded_parts", "cascaded_tables", "may_cascade"]

#: What a statement does to a table: ``write`` when it may do any of the three (MERGE, a
#: trigger, ``INSERT OR REPLACE``).
Kind = Literal["insert", "update", "delete", "write"]

_ACTIONS: Final = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})
_CACHE_SIZE: Final = 4096

#: How the database reached a table it writes by itself: along a foreign key of that
#: table (the referenced table and the foreign key's columns), or otherwise (None: a
#: ``passive_deletes`` relationship, a declared write).
Arrival = tuple[str, frozenset[str]] | None

_cache: dict[tuple[str, str, frozenset[str] | None], dict[str, frozenset[Arrival]]] = {}
_cache_version = -1
_cache_lock = threading.Lock()


def cascaded_tables(part: str, kind: Kind, columns: frozenset[str] | None) -> frozenset[str]:
    """The tables (encoded parts) that the database writes when a statement of ``kind``
    writes table ``part``, setting ``columns`` (lower-case names; ``None``: unknown)."""
    return frozenset(_cascade(part, kind, columns))


def _cascade(
    part: str, kind: Kind, columns: frozenset[str] | None
) -> dict[str, frozenset[Arrival]]:
    """:func:`cascaded_tables`, with how the database reached each table, cached."""
    global _cache_version
    version = catalog.version()
    key = (part, kind, columns)
    with _cache_lock:
        if _cache_version != version:
            _cache.clear()
            _cache_version = version
        found = _cache.get(key)
    if found is None:
        found = _follow(part, kind, columns)
        with _cache_lock:
            # Filed only if the catalog did not change while it was worked out.
            if _cache_version == version == catalog.version():
                if len(_cache) >= _CACHE_SIZE:
                    _cache.clear()
                _cache[key] = found
    return found


def _follow(part: str, kind: Kind, columns: frozenset[str] | None) -> dict[str, frozenset[Arrival]]:
    written: dict[str, set[Arrival]] = {}
    seen: set[tuple[str, str, frozenset[str] | None]] = set()
    pending: list[tuple[str, Kind, frozenset[str] | None]] = [(part, kind, columns)]
    while pending:
        step = pending.pop()
        if step in seen:
            continue
        seen.add(step)
        table, action, changed = step
        following: list[tuple[tuple[str, Kind, frozenset[str] | None], Arrival]] = [
            ((target, "write", None), None) for target in catalog.declared_writes(table)
        ]
        if action in ("delete", "write"):
            for reference in catalog.references_to(table):
                along = _along(table, reference.columns, reference.ondelete)
                if reference.ondelete == "CASCADE":
                    following.append(((reference.child, "delete", None), along))
                elif reference.ondelete in _ACTIONS:
                    following.append(((reference.child, "update", reference.columns), along))
            following += [
                ((child, "delete", None), None) for child in catalog.passive_delete_children(table)
            ]
        if action in ("update", "write"):
            for reference in catalog.references_to(table):
                if reference.onupdate in _ACTIONS and (
                    changed is None or not changed.isdisjoint(reference.referred)
                ):
                    along = _along(table, reference.columns, reference.onupdate)
                    following.append(((reference.child, "update", reference.columns), along))
        for target, arrival in following:
            written.setdefault(target[0], set()).add(arrival)
            pending.append(target)
    return {child: frozenset(arrivals) for child, arrivals in written.items()}


def _along(table: str, columns: frozenset[str], action: str | None) -> Arrival:
    """How a referential action reaches the child: along its foreign key onto the rows the
    statement wrote (CASCADE, SET NULL) -- or, for SET DEFAULT, onto a default parent that
    nothing wrote, which must not pass for one of them."""
    return None if action == "SET DEFAULT" else (table, columns)


def may_cascade(part: str, kind: Kind) -> bool:
    """Whether a write of ``kind`` to ``part`` can make the database write anything else,
    whatever columns it sets (a cheap test before working out the columns)."""
    return bool(cascaded_tables(part, kind, None))


def cascaded_parts(
    writes: Iterable[tuple[str, Kind, frozenset[str] | None]],
) -> dict[str, set[Arrival]]:
    """Every table the database writes by itself because of ``writes``, with how it
    reached each (see :data:`Arrival`)."""
    parts: dict[str, set[Arrival]] = {}
    for part, kind, columns in writes:
        for child, arrivals in _cascade(part, kind, columns).items():
            parts.setdefault(child, set()).update(arrivals)
    return parts


def cascaded_identifiers(writes: Iterable[tuple[str, Kind, frozenset[str] | None]]) -> set[str]:
    """What the writes the database makes by itself invalidate: every table reached,
    rows unknown (empty when nothing cascades)."""
    parts = cascaded_parts(writes)
    return table_write_identifiers(parts) if parts else set()

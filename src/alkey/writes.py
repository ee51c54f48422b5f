"""What each write path invalidates: flushes, bulk statements, raw SQL, related parents,
and the manual ``touch`` / ``invalidate`` for writes alkey cannot see.

Every function here turns a write into the identifiers whose tokens it must bump -- rows
when the rows are known, a table's unknown-rows token when they are not, the unknown-writes
token when even the tables are not -- and leaves *when* to bump to the caller
(:mod:`alkey.events` at the outermost commit, or :func:`invalidate` at once).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from sqlalchemy import inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import InstanceState, Mapper, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.interfaces import MANYTOONE
from sqlalchemy.schema import Table

from alkey.client import get_redis_client
from alkey.constants import GLOBAL_WRITE_TOKEN
from alkey.identity import (
    UNKNOWN_WRITES,
    Identifier,
    bulk_identifiers,
    encode_table,
    family_identifiers,
    parse_identifier,
    table_part,
    table_write_identifiers,
    write_identifiers,
)
from alkey.tokens import TokenStore, store_for
from alkey.tracking import changes_of

__all__ = [
    "TOUCH_INFO_KEY",
    "flushed",
    "invalidate",
    "invalidation_identifiers",
    "raw_sql_writes",
    "statement_writes",
    "touch",
]

#: ``relationship(..., info={TOUCH_INFO_KEY: False})`` stops writes of the child from
#: invalidating the parent across that relationship.
TOUCH_INFO_KEY: Final = "alkey_touch"


_MODIFIED_KEY: Final = "alkey.modified_before_flush"


def modified_before_flush(session: Session) -> None:
    """Note, in ``before_flush``, which dirty instances have net changes.

    After the flush, an attribute that was set to a SQL expression
    (``counter.version = Counter.version + 1``) has been expired and no longer shows as
    modified, although its row was updated: asking before is the reliable way.
    """
    session.info[_MODIFIED_KEY] = {
        instance_state(obj) for obj in session.dirty if session.is_modified(obj)
    }


def flushed(session: Session, flush_context: UOWTransaction, touch_parents: bool) -> set[str]:
    """Everything one flush wrote: rows inserted, changed or deleted, and their parents."""
    # session.dirty also lists instances whose attributes were set to equal values. Those
    # changed before the flush, or by it (foreign keys it synchronised), count.
    before = session.info.pop(_MODIFIED_KEY, set())
    updated = [
        obj for obj in session.dirty if instance_state(obj) in before or session.is_modified(obj)
    ]
    states = [instance_state(obj) for obj in [*session.new, *updated, *session.deleted]]
    # The unit of work also deletes rows the session lists nowhere: delete-orphans.
    states += [
        state
        for state, (is_delete, list_only) in getattr(flush_context, "states", {}).items()
        if is_delete and not list_only
    ]
    written = write_identifiers(states)
    if touch_parents:
        written |= _related(states)
    return written


def _related(states: Iterable[InstanceState[Any]]) -> set[str]:
    """Parents across many-to-one relationships (before and after the flush), and both
    sides of changed many-to-many collections."""
    identifiers: set[str] = set()
    for state in states:
        for relationship in state.mapper.relationships:
            if not relationship.info.get(TOUCH_INFO_KEY, True):
                continue
            if relationship.secondary is not None:
                history = state.attrs[relationship.key].history
                changed = [*history.added, *history.deleted]
                if changed:
                    identifiers |= write_identifiers(instance_state(o) for o in changed)
                    if isinstance(relationship.secondary, Table):
                        identifiers |= table_write_identifiers(
                            [encode_table(relationship.secondary)]
                        )
            elif relationship.direction is MANYTOONE:
                identifiers |= _parents(state, relationship)
    return identifiers


def _parents(state: InstanceState[Any], relationship: Any) -> set[str]:
    parent: Mapper[Any] = relationship.mapper
    pairs = dict(relationship.local_remote_pairs)
    by_remote = {remote: local for local, remote in pairs.items()}
    if set(by_remote) != set(parent.primary_key):
        # It references some other column of the parent: which row is not known.
        return bulk_identifiers(parent, None)
    keys: set[tuple[Any, ...]] = set()
    # The foreign key's value now and, when it moved, before: old and new parent,
    # whether the relationship or only the column (order.user_id = 2) was set.
    columns = [by_remote[column] for column in parent.primary_key]
    attributes = [state.mapper.get_property_by_column(column).key for column in columns]
    if state.key is not None and any(attribute not in state.dict for attribute in attributes):
        # A row that existed, whose foreign key was never loaded: its parent is unknown.
        # (A new row's unset foreign key is NULL: no parent.)
        return bulk_identifiers(parent, None)
    histories = [state.attrs[key].history for key in attributes]
    current = [state.dict.get(key) for key in attributes]
    if None not in current:
        keys.add(tuple(current))
    previous = [
        history.deleted[0] if history.deleted else value
        for history, value in zip(histories, current, strict=True)
    ]
    if None not in previous:
        keys.add(tuple(previous))
    # A parent set through the relationship whose key the flush has not copied yet.
    history = state.attrs[relationship.key].history
    for obj in [*history.added, *history.deleted]:
        identity = instance_state(obj).key if obj is not None else None
        if identity is not None:
            keys.add(tuple(identity[1]))
    return bulk_identifiers(parent, keys) if keys else set()


def statement_writes(state: ORMExecuteState, result: Any, touch_parents: bool) -> set[str]:
    """What an UPDATE, DELETE or INSERT run through ``Session.execute`` wrote.

    With ``touch_parents``, the parents across its many-to-one relationships too: which
    ones is not known (the rows' foreign keys are not reported), so all of them.
    """
    statement = state.statement
    mapper = state.bind_mapper
    if mapper is None:
        table = getattr(statement, "table", None)
        if not isinstance(table, Table):
            return table_write_identifiers(None)
        return table_write_identifiers([encode_table(table)])
    written = bulk_identifiers(mapper, _known_keys(state, result, mapper))
    if touch_parents:
        for relationship in mapper.relationships:
            if relationship.direction is MANYTOONE and relationship.info.get(TOUCH_INFO_KEY, True):
                written |= bulk_identifiers(relationship.mapper, None)
    return written


def _known_keys(
    state: ORMExecuteState, result: Any, mapper: Mapper[Any]
) -> list[tuple[Any, ...]] | None:
    """The primary keys of the rows a bulk statement wrote, if SQLAlchemy says which."""
    statement = state.statement
    width = len(mapper.primary_key)
    if state.is_update and _sets_primary_key(statement, mapper):
        return None  # the rows' old keys are unknown
    if getattr(statement, "_post_values_clause", None) is not None or getattr(
        statement, "_prefixes", None
    ):
        return None  # an upsert (ON CONFLICT, OR REPLACE) may write another row than named
    returned = getattr(result, "returned_defaults_rows", None)
    if returned is not None and (state.is_update or state.is_delete):
        # synchronize_session="fetch" on a database with RETURNING.
        return [tuple(row)[:width] for row in returned]
    parameters = state.parameters
    if (
        isinstance(parameters, list)
        and parameters
        and getattr(statement, "whereclause", None) is None
    ):
        # ORM bulk INSERT, or bulk UPDATE by primary key: the keys are in the parameters.
        names = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
        keys = [tuple(row.get(name) for name in names) for row in parameters]
        if all(None not in key for key in keys):
            return keys
    return None


def _sets_primary_key(statement: Any, mapper: Mapper[Any]) -> bool:
    values = getattr(statement, "_values", None) or dict(
        getattr(statement, "_ordered_values", ()) or ()
    )
    if not values and getattr(statement, "_multi_values", None):
        return True  # cannot tell
    names = {column.key for column in mapper.primary_key}
    names |= {mapper.get_property_by_column(column).key for column in mapper.primary_key}
    for target in values:
        name = getattr(target, "key", target)
        if name in names:
            return True
    return False


def raw_sql_writes(statement: str, dialect: Dialect) -> set[str]:
    """What a raw SQL statement writes, from its text (see :mod:`alkey.sql`)."""
    from alkey.sql import written_tables

    tables = written_tables(statement, dialect.name, dialect.default_schema_name)
    if tables is not None and not tables:
        return set()
    return table_write_identifiers(tables)


def invalidation_identifiers(target: object) -> set[str]:
    """What writing ``target`` -- an instance, a mapped class, a Table or an identifier --
    invalidates, for :func:`touch` and :func:`invalidate`."""
    if isinstance(target, str):
        parsed = parse_identifier(target)
        if parsed.table is None:
            return {GLOBAL_WRITE_TOKEN, UNKNOWN_WRITES}
        if parsed.key is None:
            return table_write_identifiers([table_part(parsed.schema, parsed.table)])
        table = str(Identifier(parsed.table, None, parsed.schema))
        # The row in subclass tables too: a joined subclass instance keys on those.
        return {GLOBAL_WRITE_TOKEN, *family_identifiers(target), *family_identifiers(table)}
    if isinstance(target, Table):
        return table_write_identifiers([encode_table(target)])
    insp = inspect(target, raiseerr=False)
    if isinstance(insp, InstanceState):
        if insp.key is None:
            return bulk_identifiers(insp.mapper, None)
        return write_identifiers([insp])
    if isinstance(insp, Mapper):
        return bulk_identifiers(insp, None)
    raise TypeError(
        f"cannot invalidate a {type(target).__qualname__}: pass model instances, mapped "
        "classes, Table objects or alkey identifiers"
    )


def touch(session: Session, *targets: object) -> None:
    """Invalidate ``targets`` when ``session``'s current transaction commits.

    For writes alkey cannot see -- a trigger, another service, a stored procedure -- that
    belong to this transaction: recorded like any other write, so a rollback drops them.
    ``session`` must be bound (:func:`alkey.events.bind`).
    """
    from alkey.events import is_bound

    if not is_bound(session):
        raise ValueError(
            "alkey.touch() needs a session bound with alkey.bind(): this one would never "
            "bump what it records"
        )
    identifiers: set[str] = set()
    for target in targets:
        identifiers |= invalidation_identifiers(target)
    if identifiers:
        if session.get_transaction() is None:
            session.begin()  # what the session's next statement would do by itself
        changes_of(session).record(session, identifiers)


def invalidate(*targets: object, tokens: TokenStore | None = None) -> None:
    """Invalidate ``targets`` now, outside any transaction (one round trip).

    For writes that have already committed elsewhere: a migration script, another service.
    Tokens live in ``tokens``, else in the default client's store.
    """
    identifiers: set[str] = set()
    for target in targets:
        identifiers |= invalidation_identifiers(target)
    if identifiers:
        (tokens if tokens is not None else store_for(get_redis_client())).bump(identifiers)

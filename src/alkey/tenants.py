"""Tenants and shards: which copy of a mapped table an instance's row lives in.

Two ways of serving several tenants from one set of models put rows with the same primary
key in different tables, and those rows must never share a token or a key:

* **schema per tenant**, with ``schema_translate_map`` (on the engine, a connection, a
  session's bind or one statement): a row of ``Item`` read through
  ``{None: 'tenant_a'}`` lives in ``tenant_a.items``, so its identifier is
  ``alkey:tenant_a.items#1``. That is also what raw SQL naming ``tenant_a.items``, and the
  SQL SQLAlchemy renders for the translated statement, invalidate;
* **horizontal sharding** (``sqlalchemy.ext.horizontal_shard``, or any ``identity_token``):
  the row's identity carries its shard, and its identifier too: ``alkey:items#1@shard_a``.
  Table and unknown-rows tokens are shared by the shards (a write that cannot name its
  rows changes every shard's row keys of that table: more misses, never a stale hit).

This module records, as SQLAlchemy loads an instance, the schema map it was loaded with
(``alkey.identity.record_schemas()``); :func:`record_flushed` does the same for the
instances a flush inserts. A tenant's write also changes the key of the mapped class or
``Table`` (which stands for the table in every schema); to key on one tenant's table, name
it: ``'alkey:tenant_a.items#*'``.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.orm import InstanceState, Mapper, ORMExecuteState, Session
from sqlalchemy.orm.context import QueryContext

from alkey.identity import SchemaMap, freeze_schema_map, record_schemas, schemas_of

__all__ = ["record_flushed", "statement_schemas"]

_QUERY_KEY: Final = "alkey.schemas"
_UNSET: Final = object()


def _connection_schemas(
    session: Session | None, mapper: Mapper[Any] | None, bind_arguments: Any = None
) -> SchemaMap | None:
    """The schema map of the connection ``session``'s transaction holds for the bind a
    statement of ``mapper`` chose (``bind_arguments``): its engine's options and any given
    to ``Session.connection(execution_options=...)``, which SQLAlchemy applies over a
    statement's own. The bind's own options when the transaction holds none for it (rows
    read after a commit). Procures nothing: no connection, no transaction."""
    if session is None:
        return None
    arguments = dict(bind_arguments) if bind_arguments else {}
    bind = arguments.pop("bind", None)
    if bind is None:
        if mapper is not None:
            arguments.setdefault("mapper", mapper)
        try:
            bind = session.get_bind(**arguments)
        except Exception:  # no bind at all: nothing was translated
            return None
    held = _held_connection(session, bind)
    options = (held if held is not None else bind).get_execution_options()
    translate = options.get("schema_translate_map")
    return None if translate is None else freeze_schema_map(translate)


def _held_connection(session: Session, bind: Any) -> Any:
    """The connection the session's transaction holds for ``bind``, if any (what
    SQLAlchemy 2.1.7's ``SessionTransaction.bound_connection`` answers, read the way
    every 2.x keeps it: by bind, in the root transaction)."""
    root = session.get_transaction()
    held = getattr(root, "_connections", None) if root is not None else None
    entry = held.get(bind) if isinstance(held, dict) else None
    return None if entry is None else entry[0]


#: SQLAlchemy's own Session.get_bind, which chooses a bind by mapper alone (None if
#: something replaced it before alkey was imported: then it is asked for each instance).
_OWN_GET_BIND: Final = (
    Session.get_bind if Session.get_bind.__module__ == "sqlalchemy.orm.session" else None
)


def _statement_schemas(
    options: Any,
    statement: Any,
    session: Session | None,
    mapper: Mapper[Any] | None,
    bind_arguments: Any = None,
) -> SchemaMap | None:
    """The schema map a statement ran with, in SQLAlchemy's order: one given to
    ``execute()``; else its connection's (its engine's, or given to
    ``Session.connection()``), which wins over the statement's own; else the
    statement's own. ``options``: those given to ``execute()`` alone."""
    own = (getattr(statement, "_execution_options", None) or {}).get("schema_translate_map")
    given = options.get("schema_translate_map")
    if given is not None:
        return freeze_schema_map(given)
    connection = _connection_schemas(session, mapper, bind_arguments)
    if connection is not None:
        return connection
    return None if own is None else freeze_schema_map(own)


def _loaded(state: InstanceState[Any], context: QueryContext | None, *args: Any) -> None:
    """``load`` / ``refresh``: remember the schema map the row was read through, worked
    out once per query. (A bulk UPDATE that sets the new values on the instances it
    matched refreshes them without a query: their row stays where it was.)"""
    if context is None:
        return
    attributes = context.attributes
    schemas = attributes.get(_QUERY_KEY, _UNSET)
    if schemas is _UNSET:
        # One query runs on one connection: the first instance's mapper finds its bind.
        schemas = attributes[_QUERY_KEY] = _statement_schemas(
            context.execution_options,
            context.query,
            context.session,
            state.mapper,
            getattr(context, "bind_arguments", None),
        )
    if schemas is not None or schemas_of(state) is not None:
        record_schemas(state, schemas)


def record_flushed(session: Session, states: list[InstanceState[Any]]) -> None:
    """Give the instances a flush inserts the schema map of the bind they were written to
    (call before working out what the flush wrote)."""
    # Which connection a mapper's rows went to depends on the mapper alone, unless the
    # session chooses binds of its own (horizontal sharding: by instance).
    by_mapper = type(session).get_bind is _OWN_GET_BIND
    found: dict[Mapper[Any], SchemaMap | None] = {}
    for state in states:
        if state.key is None or schemas_of(state) is None:
            mapper = state.mapper
            if not by_mapper:
                schemas = _connection_schemas(session, mapper, {"instance": state.obj()})
            elif mapper in found:
                schemas = found[mapper]
            else:
                schemas = found[mapper] = _connection_schemas(session, mapper)
            if schemas is not None:
                record_schemas(state, schemas)


def statement_schemas(orm_state: ORMExecuteState) -> SchemaMap | None:
    """The schema map a statement run through ``Session.execute`` is translated with."""
    return _statement_schemas(
        orm_state.local_execution_options,
        orm_state.statement,
        orm_state.session,
        orm_state.bind_mapper,
        orm_state.bind_arguments,
    )


event.listen(Mapper, "load", _loaded, raw=True)
event.listen(Mapper, "refresh", _loaded, raw=True)

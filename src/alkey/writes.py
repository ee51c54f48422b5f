"""What each write path invalidates: flushes, bulk statements, raw SQL, related parents,
the database's own cascades, and the targets of :mod:`alkey.manual`'s ``touch`` and
``invalidate`` for writes alkey cannot see.

Every function here turns a write into the identifiers whose tokens it must bump -- rows
when the rows are known, a table's unknown-rows token when they are not, the unknown-writes
token when even the tables are not -- and leaves *when* to bump to the caller
(:mod:`alkey.events` at the outermost commit, or :func:`alkey.manual.invalidate` at once).
It never talks to Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from sqlalchemy import inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import InstanceState, Mapper, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import NO_VALUE, PassiveFlag
from sqlalchemy.orm.interfaces import MANYTOONE
from sqlalchemy.schema import Table
from sqlalchemy.sql import operators
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList

from alkey import catalog
from alkey.cascades import Arrival, Kind, cascaded_parts, may_cascade
from alkey.constants import GLOBAL_WRITE_TOKEN
from alkey.identity import (
    UNKNOWN_WRITES,
    Identifier,
    SchemaMap,
    bulk_identifiers,
    encode_table,
    family_identifiers,
    mapped_part,
    parse_identifier,
    row_identifiers,
    schemas_of,
    table_identifier,
    table_part,
    table_write_identifiers,
    translate_identifiers,
    translations_of,
    view_writes,
    write_identifiers,
    writes_of,
)
from alkey.snapshot import members_of
from alkey.sql import writes
from alkey.tenants import statement_schemas
from alkey.written import Written

__all__ = [
    "TOUCH_INFO_KEY",
    "flushed",
    "in_flush",
    "invalidation_identifiers",
    "raw_sql_writes",
    "statement_writes",
]

#: ``relationship(..., info={TOUCH_INFO_KEY: False})`` stops writes of the child from
#: invalidating the parent across that relationship.
TOUCH_INFO_KEY: Final = "alkey_touch"


_MODIFIED_KEY: Final = "alkey.modified_before_flush"
_NO_CHANGE: Final = PassiveFlag.NO_CHANGE
#: The implementation of a plain column attribute (renamed with a leading underscore in
#: SQLAlchemy 2.1), whose history _net_change reads without building it.
_SCALAR: Final[type | None] = next(
    (
        vars(orm_attributes)[name]
        for name in ("_ScalarAttributeImpl", "ScalarAttributeImpl")
        if name in vars(orm_attributes)
    ),
    None,  # renamed again: every attribute's history is asked of SQLAlchemy
)
_IN_FLUSH_KEY: Final = "alkey.in_flush"


def modified_before_flush(session: Session) -> None:
    """Note, in ``before_flush``, which dirty instances have net changes, and which of
    their attributes changed.

    After the flush, an attribute that was set to a SQL expression
    (``counter.version = Counter.version + 1``) has been expired and no longer shows as
    modified, although its row was updated: asking before is the reliable way. The
    attributes decide whether an UPDATE reaches referenced columns (see
    :mod:`alkey.cascades`).

    It also marks the session as inside a unit-of-work flush (until :func:`flushed`), which
    tells the flush's own statements, whose rows the flush reports, from those of
    ``bulk_save_objects`` and ``bulk_*_mappings``, which SQLAlchemy runs the same way but
    with no flush events.
    """
    modified = {}
    for obj in session.dirty:
        state = instance_state(obj)
        if _net_change(state):
            modified[state] = frozenset(state.committed_state)
    session.info[_MODIFIED_KEY] = modified
    session.info[_IN_FLUSH_KEY] = True


def _net_change(state: InstanceState[Any]) -> bool:
    """``session.is_modified(obj)``: whether an attribute of ``state`` holds a net change.

    The same answer from the attributes that can have one -- those with a committed value
    recorded (``committed_state``), whose history SQLAlchemy compares -- instead of asking
    the history of every attribute of the class, for every dirty instance of every flush.
    """
    if not state.modified:
        return False
    values = state.dict
    manager = state.manager
    committed = state.committed_state
    for key in list(committed):
        attribute = manager.get(key)
        if attribute is None:  # pragma: no cover - committed values are of attributes
            return True  # unknown: a change, the safe side
        impl = attribute.impl
        if type(impl) is _SCALAR:
            # A column attribute: SQLAlchemy's history of it (History.from_scalar_attribute)
            # is empty exactly when it holds a value equal to the committed one, by the
            # column type's comparison ("is True": a SQL expression assigned is a change).
            current = values.get(key, NO_VALUE)
            if current is NO_VALUE or impl.is_equal(current, committed[key]) is not True:
                return True
            continue
        added, _, deleted = impl.get_history(state, values, passive=_NO_CHANGE)
        if added or deleted:
            return True
    return False


def in_flush(session: Session) -> bool:
    """Whether ``session`` runs a unit-of-work flush now, rather than a bulk save.

    A mark left by a flush that raised (no ``after_flush``) is dropped as soon as the
    session is seen outside any flush.
    """
    if not getattr(session, "_flushing", False):  # SQLAlchemy's own "flush in progress"
        session.info.pop(_IN_FLUSH_KEY, None)
        return False
    return bool(session.info.get(_IN_FLUSH_KEY))


def flushed(session: Session, flush_context: UOWTransaction, touch_parents: bool) -> Written:
    """Everything one flush wrote: rows inserted, changed or deleted, and their parents."""
    # session.dirty also lists instances whose attributes were set to equal values. Those
    # changed before the flush, or by it (foreign keys it synchronised), count.
    before: dict[InstanceState[Any], frozenset[str]] = session.info.pop(_MODIFIED_KEY, {})
    session.info.pop(_IN_FLUSH_KEY, None)
    updated = [
        state
        for state in map(instance_state, session.dirty)
        if state in before or _net_change(state)
    ]
    inserted = [instance_state(obj) for obj in session.new]
    deleted = [instance_state(obj) for obj in session.deleted]
    # The unit of work also deletes rows the session lists nowhere: delete-orphans.
    deleted += [
        state
        for state, (is_delete, list_only) in getattr(flush_context, "states", {}).items()
        if is_delete and not list_only
    ]
    states = [*inserted, *updated, *deleted]
    written = writes_of(states)  # held until the transaction ends: compact
    related = _related(states, deleted) if touch_parents else None
    if related:
        written.update(related)
    cascaded = _flush_cascades(inserted, updated, deleted, before, touch_parents)
    if cascaded:
        written.update(cascaded)
    return written


_Steps = set[tuple[str, Kind, frozenset[str] | None]]


def _flush_cascades(
    inserted: list[InstanceState[Any]],
    updated: list[InstanceState[Any]],
    deleted: list[InstanceState[Any]],
    before: dict[InstanceState[Any], frozenset[str]],
    touch_parents: bool,
) -> set[str]:
    """What the database writes by itself because of a flush (see :mod:`alkey.cascades`),
    in the tenant's tables for rows written through a schema translate map."""
    steps: dict[SchemaMap | None, _Steps] = {}
    for kind, states in (("insert", inserted), ("delete", deleted)):
        for mapper, schemas in {(state.mapper, schemas_of(state)) for state in states}:
            steps.setdefault(schemas, set()).update(
                (encode_table(table), kind, None)  # type: ignore[misc]
                for table in mapper.tables
            )
    version = catalog.version()
    seen: Mapper[Any] | None = None
    cascading: list[tuple[str, Any]] = []
    for state in updated:
        mapper = state.mapper
        if mapper is not seen:
            known = _update_cascades.get(mapper)
            if known is None or known[0] != version:
                known = _update_cascades[mapper] = (version, _cascading_tables(mapper))
            seen, cascading = mapper, known[1]
        for part, table in cascading:
            keys = before.get(state, frozenset()) | frozenset(state.committed_state)
            steps.setdefault(schemas_of(state), set()).add(
                (part, "update", _columns_of(mapper, table, keys))
            )
    written: set[str] = set()
    for schemas, group in steps.items():
        written |= _cascaded(group, schemas, touch_parents)
    return written


#: The tables of each mapper that an UPDATE could cascade from, with the catalog version
#: they were worked out under: most flushes update rows, and few tables cascade.
_update_cascades: dict[Mapper[Any], tuple[int, list[tuple[str, Any]]]] = {}


def _cascading_tables(mapper: Mapper[Any]) -> list[tuple[str, Any]]:
    parts = [(encode_table(table), table) for table in mapper.tables]
    return [(part, table) for part, table in parts if may_cascade(part, "update")]


def _cascaded(
    steps: Iterable[tuple[str, Kind, frozenset[str] | None]],
    schemas: SchemaMap | None,
    touch_parents: bool,
) -> set[str]:
    """What the database's own writes following ``steps`` invalidate (see
    :mod:`alkey.cascades`): each table it reaches, rows unknown, in the tenant's tables
    for a write through a schema map -- and, with ``touch_parents``, the parents of the
    rows it deleted or updated, as for any other write whose rows are unknown."""
    parts = cascaded_parts(steps)
    if not parts:
        return set()
    identifiers = table_write_identifiers(parts)
    if touch_parents:
        for part, arrivals in parts.items():
            identifiers |= _parents_of_table(part, arrivals)
    return translate_identifiers(identifiers, schemas)


def _touched_parents(mapper: Mapper[Any]) -> list[Any]:
    """``mapper``'s many-to-one relationships whose parents its rows' writes touch
    (``info={TOUCH_INFO_KEY: False}`` opts one out)."""
    return [
        relationship
        for relationship in mapper.relationships
        if relationship.direction is MANYTOONE and relationship.info.get(TOUCH_INFO_KEY, True)
    ]


def view_parents(part: str) -> list[Mapper[Any]]:
    """The parents' mappers of the classes mapped to a join or a select that read table
    ``part``: a write to the table touches every row of them, as the foreign key that
    names a row's parent may be in another of the class's tables."""
    return [
        relationship.mapper
        for mapper in catalog.views_of(part)
        for relationship in _touched_parents(mapper)
    ]


def _parents_of_table(
    part: str, arrivals: Iterable[Arrival] = (), *, sides: bool = True
) -> set[str]:
    """The parents of rows of table ``part`` written without saying which: every row its
    mappers reference many-to-one, and, for an association table, both sides of its
    many-to-many relationships (unless ``sides`` is false: a flush's own association
    rows, whose partners the flush touches precisely). Except, when the database wrote
    them by itself, along the foreign key it came by (``arrivals``, see
    :mod:`alkey.cascades`): those parents are the rows the statement wrote, bumped
    already."""
    along = frozenset(arrivals)
    identifiers: set[str] = set()
    for mapper in catalog.mappers_of(part):
        for relationship in _touched_parents(mapper):
            path = (
                mapped_part(relationship.mapper),
                frozenset(column.name.lower() for column in relationship.local_columns),
            )
            if along and along == {path}:
                continue
            identifiers |= bulk_identifiers(relationship.mapper, None)
    for parent in view_parents(part):
        identifiers |= bulk_identifiers(parent, None)
    for mapper in catalog.association_sides(part) if sides else ():
        side = mapped_part(mapper)
        onto_side = {
            (side, reference.columns)
            for reference in catalog.references_to(side)
            if reference.child == part
        }
        # Skipped only when the rows reached it by the one foreign key it has onto this
        # side (a self-referential association also holds the other side's rows there).
        if along and len(onto_side) == 1 and along == onto_side:
            continue
        identifiers |= bulk_identifiers(mapper, None)
    return identifiers


def _columns_of(mapper: Mapper[Any], table: Any, keys: Iterable[Any]) -> frozenset[str] | None:
    """The lower-case names of ``table``'s columns that attribute or column ``keys`` set.

    ``None`` when one of them cannot be told (an expression): any column, then.
    """
    columns: set[str] = set()
    for key in keys:
        if isinstance(key, str) and key in table.c:
            columns.add(table.c[key].name.lower())
            continue
        prop = _property(mapper, key)
        if prop is None:
            return None
        for column in getattr(prop, "columns", ()):
            if getattr(column, "table", None) is table:
                columns.add(column.name.lower())
    return frozenset(columns)


class _Columns:
    """Stands for a mapped property where only its columns matter."""

    def __init__(self, *columns: Any) -> None:
        self.columns = columns


def _property(mapper: Mapper[Any], key: Any) -> Any:
    """What a SET target names -- an attribute name, an instrumented attribute or a
    Column -- as something with ``columns`` (``None`` when it is none of these)."""
    if isinstance(key, str):
        # A name that is no column attribute (a relationship's) sets no column itself.
        return mapper.attrs[key] if key in mapper.attrs else _Columns()
    prop = getattr(key, "property", None)
    if prop is not None:
        return prop
    if getattr(key, "table", None) is not None and hasattr(key, "name"):
        return _Columns(key)
    return None


def _related(
    states: Iterable[InstanceState[Any]], deleted: Iterable[InstanceState[Any]] = ()
) -> set[str]:
    """Parents across many-to-one relationships (before and after the flush), and both
    sides of changed many-to-many collections -- a deleted row leaves every collection it
    was in: its partners if they are loaded, else every row of their table."""
    identifiers: set[str] = set()
    gone = set(deleted)
    seen: Mapper[Any] | None = None
    touching: tuple[Any, ...] = ()
    for state in states:
        mapper = state.mapper
        if mapper is not seen:
            # SQLAlchemy builds mapper.relationships anew when a property is added, even
            # to a configured mapper: the same object means the same relationships.
            relationships = mapper.relationships
            known = _touching.get(mapper)
            if known is None or known[0] is not relationships:
                known = _touching[mapper] = (relationships, _touching_relationships(mapper))
            seen, touching = mapper, known[1]
        for relationship in touching:
            if not relationship.info.get(TOUCH_INFO_KEY, True):
                continue  # read on every flush: an application may change it at run time
            if relationship.secondary is not None:
                if state in gone:
                    identifiers |= _left_collections(state, relationship)
                    continue
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


#: Per mapper, with the ``mapper.relationships`` it was worked out from: the relationships
#: whose writes may touch the other side, many-to-one or many-to-many (most mappers' rows
#: have none to follow; whether each one is opted out is read on every flush).
_touching: dict[Mapper[Any], tuple[object, tuple[Any, ...]]] = {}


def _touching_relationships(mapper: Mapper[Any]) -> tuple[Any, ...]:
    return tuple(
        relationship
        for relationship in mapper.relationships
        if relationship.secondary is not None or relationship.direction is MANYTOONE
    )


def _left_collections(state: InstanceState[Any], relationship: Any) -> set[str]:
    """What a deleted row's many-to-many ``relationship`` changes: the partners it had --
    those loaded now, and those removed earlier in the same flush -- or, not loaded, every
    row of their table (in the row's tenant); and the association table."""
    schemas = schemas_of(state)
    history = state.attrs[relationship.key].history
    if relationship.key in state.dict:
        partners = [*members_of(state.dict[relationship.key]), *history.deleted]
        identifiers = write_identifiers(instance_state(o) for o in partners if o is not None)
    else:
        identifiers = bulk_identifiers(relationship.mapper, None, schemas=schemas)
    if isinstance(relationship.secondary, Table):
        identifiers |= translate_identifiers(
            table_write_identifiers([encode_table(relationship.secondary)]), schemas
        )
    return identifiers


def _parents(state: InstanceState[Any], relationship: Any) -> set[str]:
    parent: Mapper[Any] = relationship.mapper
    pairs = dict(relationship.local_remote_pairs)
    by_remote = {remote: local for local, remote in pairs.items()}
    # The parent lives with the child: in the same tenant's schema, on the same shard.
    schemas = schemas_of(state)
    token = state.key[2] if state.key is not None else state.identity_token
    if set(by_remote) != set(parent.primary_key):
        # It references some other column of the parent: which row is not known.
        return bulk_identifiers(parent, None, schemas=schemas)
    keys: set[tuple[Any, ...]] = set()
    # The foreign key's value now and, when it moved, before: old and new parent,
    # whether the relationship or only the column (order.user_id = 2) was set.
    columns = [by_remote[column] for column in parent.primary_key]
    attributes = [state.mapper.get_property_by_column(column).key for column in columns]
    if state.key is not None and any(attribute not in state.dict for attribute in attributes):
        # A row that existed, whose foreign key was never loaded: its parent is unknown.
        # (A new row's unset foreign key is NULL: no parent.)
        return bulk_identifiers(parent, None, schemas=schemas)
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
    if not keys:
        return set()
    return bulk_identifiers(parent, keys, schemas=schemas, identity_token=token)


def statement_writes(state: ORMExecuteState, result: Any, touch_parents: bool) -> set[str]:
    """What an UPDATE, DELETE or INSERT run through ``Session.execute`` wrote.

    With ``touch_parents``, the parents across its many-to-one relationships too: which
    ones is not known (the rows' foreign keys are not reported), so all of them.
    """
    statement = state.statement
    mapper = state.bind_mapper
    kind: Kind = "delete" if state.is_delete else "update" if state.is_update else "insert"
    if mapper is None:
        table = getattr(statement, "table", None)
        if not isinstance(table, Table):
            return table_write_identifiers(None)
        part = encode_table(table)
        columns = _set_columns(state, None, table) if kind == "update" else None
        written = table_write_identifiers([part]) | _cascaded(
            [(part, kind, columns)], None, touch_parents
        )
        if touch_parents:
            written |= _parents_of_table(part)  # a Table's rows never say their parents
        return written
    schemas = statement_schemas(state)
    token = state.execution_options.get("identity_token")
    written = bulk_identifiers(
        mapper, _known_keys(state, result, mapper), schemas=schemas, identity_token=token
    )
    # Through a class mapped to a join or a select: every row of the tables it reads.
    written |= view_writes(mapper, schemas)
    if touch_parents:
        for relationship in _touched_parents(mapper):
            written |= bulk_identifiers(relationship.mapper, None, schemas=schemas)
    steps: list[tuple[str, Kind, frozenset[str] | None]] = []
    for table in mapper.tables:
        part = encode_table(table)
        if kind == "update" and may_cascade(part, kind):
            steps.append((part, kind, _set_columns(state, mapper, table)))
        else:
            steps.append((part, kind, None))
    return written | _cascaded(steps, schemas, touch_parents)


def _set_columns(
    state: ORMExecuteState, mapper: Mapper[Any] | None, table: Any
) -> frozenset[str] | None:
    """The columns of ``table`` that a bulk UPDATE sets (``None``: cannot tell)."""
    statement = state.statement
    values = getattr(statement, "_values", None) or dict(
        getattr(statement, "_ordered_values", ()) or ()
    )
    keys: set[Any] = set(values)
    parameters = state.parameters
    if isinstance(parameters, list) and getattr(statement, "whereclause", None) is None:
        # Bulk UPDATE by primary key: the key names the row, the rest is set.
        names = set()
        if mapper is not None:
            names = {mapper.get_property_by_column(c).key for c in mapper.primary_key}
        for row in parameters:
            keys.update(name for name in row if name not in names)
    elif isinstance(parameters, dict):
        keys.update(parameters)
    if getattr(statement, "_multi_values", None):
        return None
    if mapper is None:
        columns: set[str] = set()
        for key in keys:
            name = key if isinstance(key, str) else getattr(key, "key", None)
            if not isinstance(name, str) or name not in table.c:
                return None
            columns.add(table.c[name].name.lower())
        return frozenset(columns)
    return _columns_of(mapper, table, keys)


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


def raw_sql_writes(
    statement: str,
    dialect: Dialect,
    context: Any = None,
    *,
    touch_parents: bool = True,
    association_sides: bool = True,
) -> set[str]:
    """What a statement that reaches the cursor writes, from its text (see
    :mod:`alkey.sql`), and what the database writes by itself because of it.

    ``context``, the execution context of a compiled Core statement, tells the rows an
    INSERT, UPDATE or DELETE writes when its parameters carry their primary keys.
    """
    found = writes(statement, dialect.name, dialect.default_schema_name)
    if found is None:
        return table_write_identifiers(None)
    if not found:
        return set()
    rows = _compiled_rows(context, found) if context is not None else None
    identifiers: set[str] = set()
    steps: dict[SchemaMap | None, list[tuple[str, Kind, frozenset[str] | None]]] = {}
    for write in found:
        for part in _candidates(write):
            if rows is not None and part == rows[0]:
                identifiers |= _rows_identifiers(rows[1], rows[2])
            else:
                identifiers |= table_write_identifiers([part])
            inserted = _inserted_parents(context, part) if write.kind == "insert" else None
            if write.kind != "ddl" and touch_parents and inserted is not None:
                identifiers |= inserted  # a Core INSERT's parameters name its parents
            elif write.kind != "ddl" and touch_parents:
                # Rows written by Core or raw SQL never say their foreign keys; a tenant's
                # copy of a mapped table has the mapped table's parents, in that tenant.
                identifiers |= _parents_of_table(part, sides=association_sides)
                for original, copied_by in translations_of(part):
                    parents = _parents_of_table(original, sides=association_sides)
                    identifiers |= translate_identifiers(parents, copied_by)
            if write.kind != "ddl":
                step = (write.kind, write.columns)
                steps.setdefault(None, []).append((part, *step))  # type: ignore[arg-type]
                # A tenant's copy of a mapped table cascades as the mapped table does,
                # into the same tenant's tables.
                for original, copied_by in translations_of(part):
                    steps.setdefault(copied_by, []).append((original, *step))  # type: ignore[arg-type]
    for schemas, group in steps.items():
        identifiers |= _cascaded(group, schemas, touch_parents)
    return identifiers


def _inserted_parents(context: Any, part: str) -> set[str] | None:
    """The parent rows of the rows a compiled Core INSERT into table ``part`` writes, read
    from its parameters: an audit row inserted for one user touches that user, not every
    user. ``None`` when they cannot all be read (raw SQL, INSERT ... SELECT, a foreign key
    onto other columns than its parent's primary key, a parameter missing, an association
    table's sides): then every row of the parent tables counts."""
    compiled = getattr(context, "compiled", None)
    statement = getattr(compiled, "statement", None)
    parameters = getattr(context, "compiled_parameters", None)
    table = getattr(statement, "table", None)
    if not isinstance(statement, Insert) or not isinstance(table, Table) or not parameters:
        return None
    if encode_table(table) != part or statement.select is not None or statement._multi_values:
        return None
    if catalog.association_sides(part) or catalog.views_of(part):
        return None
    identifiers: set[str] = set()
    for mapper in catalog.mappers_of(part):
        for relationship in _touched_parents(mapper):
            parent: Mapper[Any] = relationship.mapper
            by_remote = {remote: local for local, remote in relationship.local_remote_pairs}
            if set(by_remote) != set(parent.primary_key):
                return None
            names = [by_remote[column].key for column in parent.primary_key]
            keys: set[tuple[Any, ...]] = set()
            for row in parameters:
                if any(name not in row for name in names):
                    return None
                key = tuple(row[name] for name in names)
                if None not in key:  # a NULL foreign key: no parent
                    keys.add(key)
            if keys:
                identifiers |= bulk_identifiers(parent, keys)
    return identifiers


def _candidates(write: Any) -> set[str]:
    """Every table that a name in SQL may reach.

    Its spellings (as written, folded, with and without the connection's default schema),
    and the known tables of that name that the connection's search path (PostgreSQL) or
    attached databases (SQLite) may lead to, which SQL text alone cannot tell: for a name
    without a schema, every known table of that name in any schema; for one with a
    schema, also the known tables of that name declared without one.
    """
    parts = set(write.parts)
    for name in write.names:
        for part in catalog.tables_named(name):
            if not write.qualified or "." not in part:
                parts.add(part)
    return parts


def _rows_identifiers(table: Table, keys: list[tuple[Any, ...]]) -> set[str]:
    """A write to these rows of ``table``: rows, table, subclass tables, global."""
    identifiers = {GLOBAL_WRITE_TOKEN, *family_identifiers(table_identifier(table))}
    for key in keys:
        for row in row_identifiers(table, key):
            identifiers |= family_identifiers(row)
    return identifiers


def _compiled_rows(
    context: Any, found: tuple[Any, ...]
) -> tuple[str, Table, list[tuple[Any, ...]]] | None:
    """The rows a compiled Core INSERT, UPDATE or DELETE writes, when its parameters say.

    An INSERT whose every parameter set carries the primary key (no upsert, no
    ``INSERT ... SELECT``), or an UPDATE / DELETE whose WHERE clause is a conjunction
    that pins each primary-key column to a parameter and that sets no primary-key column.
    Anything else -- or a statement that writes more than its own table -- is ``None``.
    """
    compiled = getattr(context, "compiled", None)
    statement = getattr(compiled, "statement", None)
    table = getattr(statement, "table", None)
    parameters = getattr(context, "compiled_parameters", None)
    if not isinstance(statement, (Insert, Update, Delete)) or not isinstance(table, Table):
        return None
    part = encode_table(table)
    if len(found) != 1 or part not in found[0].parts or not parameters:
        return None
    if getattr(statement, "_independent_ctes", None) or getattr(compiled, "ctes", None):
        return None
    primary_key = list(table.primary_key.columns)
    if not primary_key or getattr(statement, "_post_values_clause", None) is not None:
        return None
    if getattr(statement, "_prefixes", None) or getattr(statement, "_hints", None):
        return None
    if isinstance(statement, Insert):
        if statement.select is not None or statement._multi_values:
            return None
        names: list[Any] = [column.key for column in primary_key]
    else:
        if getattr(statement, "_extra_froms", None):
            return None  # UPDATE ... FROM, DELETE ... USING: may reach other rows
        columns = found[0].columns
        if isinstance(statement, Update) and (
            columns is None or any(c.name.lower() in columns for c in primary_key)
        ):
            return None  # the rows' new keys are not the ones named
        binds = _pinned(statement.whereclause, primary_key)
        if binds is None:
            return None
        bind_names = getattr(compiled, "bind_names", {})
        names = [bind_names.get(binds[column]) for column in primary_key]
    keys = []
    for row in parameters:
        key = tuple(row.get(name) for name in names)
        if None in key:
            return None
        keys.append(key)
    return part, table, keys


def _pinned(clause: Any, primary_key: list[Any]) -> dict[Any, Any] | None:
    """Each primary-key column's bind parameter, if ``clause`` is ``pk == :param AND ...``."""
    if clause is None:
        return None
    terms = list(clause.clauses) if isinstance(clause, BooleanClauseList) else [clause]
    if isinstance(clause, BooleanClauseList) and clause.operator is not operators.and_:
        return None
    pinned: dict[Any, Any] = {}
    for term in terms:
        if not isinstance(term, BinaryExpression) or term.operator is not operators.eq:
            continue
        left, right = term.left, term.right
        if isinstance(left, BindParameter):
            left, right = right, left
        if not isinstance(right, BindParameter) or right.expanding:
            continue
        for column in primary_key:
            if left is column:
                pinned[column] = right
    return pinned if len(pinned) == len(primary_key) else None


def invalidation_identifiers(target: object) -> set[str]:
    """What writing ``target`` -- an instance, a mapped class, a Table or an identifier --
    invalidates, for :func:`alkey.touch` and :func:`alkey.invalidate`."""
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
        return bulk_identifiers(insp, None) | view_writes(insp)
    raise TypeError(
        f"cannot invalidate a {type(target).__qualname__}: pass model instances, mapped "
        "classes, Table objects or alkey identifiers"
    )

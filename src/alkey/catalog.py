"""What alkey knows of the database's tables: names, schemas, foreign keys, and the writes
the database makes by itself.

A write does not always stop at the table it names. ``ON DELETE CASCADE`` deletes child
rows, ``ON UPDATE CASCADE`` / ``SET NULL`` / ``SET DEFAULT`` update them, and a trigger may
write any table. To invalidate those rows too, alkey needs the schema the application
declared -- and a raw ``UPDATE invoices`` must be matched to ``shop.invoices`` when the
connection's ``search_path`` (or SQLite's attached databases) leads there.

The catalog is read from, never copied into:

* every :class:`~sqlalchemy.schema.MetaData` that holds a mapped class's table, found
  through SQLAlchemy's mapper registries each time the catalog is consulted, so tables and
  classes defined later (or added to a MetaData later) are seen;
* each MetaData passed to :func:`register_metadata`, for Core-only applications that map
  no classes;
* ``relationship(..., passive_deletes=True)``, taken as the application's statement that the
  database deletes those children by itself, even where the foreign key in the metadata
  declares no ``ondelete``;
* :func:`declare_writes`, for what the metadata cannot say: triggers, rules, and
  foreign keys that exist in the database but not in the metadata.

Lookups are indexed; the index is rebuilt, at the next lookup, only after SQLAlchemy
reports a new mapper, table or foreign key (or one of the functions below is called).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import MetaData, event, inspect
from sqlalchemy.exc import NoReferencedTableError
from sqlalchemy.orm import Mapper, mapperlib
from sqlalchemy.orm.exc import UnmappedClassError
from sqlalchemy.orm.interfaces import MANYTOMANY, ONETOMANY
from sqlalchemy.schema import ForeignKeyConstraint, Table

from alkey.identity import encode_table, maps_view

__all__ = [
    "Reference",
    "association_sides",
    "declare_writes",
    "declared_writes",
    "mappers_of",
    "passive_delete_children",
    "references_to",
    "register_metadata",
    "tables_named",
    "undeclare_writes",
    "unregister_metadata",
    "views_of",
]


@dataclass(frozen=True, slots=True)
class Reference:
    """A foreign key of ``child`` onto ``parent`` with the actions the database takes.

    Column names are lower case: raw SQL spells them in any case.
    """

    child: str  #: the encoded table part of the referencing table
    parent: str  #: the encoded table part of the referenced table
    columns: frozenset[str]  #: the child's foreign-key columns
    referred: frozenset[str]  #: the parent's referenced columns
    ondelete: str | None  #: ``CASCADE``, ``SET NULL``, ``SET DEFAULT`` or None
    onupdate: str | None  #: ``CASCADE``, ``SET NULL``, ``SET DEFAULT`` or None


@dataclass
class _Index:
    by_name: dict[str, set[str]] = field(default_factory=dict)
    references: dict[str, list[Reference]] = field(default_factory=dict)
    passive: dict[str, set[str]] = field(default_factory=dict)
    mappers: dict[str, list[Mapper[Any]]] = field(default_factory=dict)
    views: dict[str, list[Mapper[Any]]] = field(default_factory=dict)
    secondaries: dict[str, set[Mapper[Any]]] = field(default_factory=dict)


_registered: list[MetaData] = []
_declared: dict[str, set[str]] = {}
_lock = threading.Lock()
_index: _Index | None = None
#: Bumped on every change of what the catalog knows; callers key their caches on it.
_version = 0


def register_metadata(metadata: MetaData) -> None:
    """Let alkey know the tables of ``metadata``, which no mapped class uses.

    Mapped classes' tables are found by themselves; a Core-only application registers its
    MetaData so that its foreign keys' ``ON DELETE`` / ``ON UPDATE`` actions and its
    schemas are known. Registering again is a no-op. Tables added to ``metadata`` later
    are seen.
    """
    if not isinstance(metadata, MetaData):
        raise TypeError(
            f"register_metadata() takes a sqlalchemy MetaData, not "
            f"{type(metadata).__qualname__}; for a declarative base pass Base.metadata"
        )
    with _lock:
        if not any(known is metadata for known in _registered):
            _registered.append(metadata)
            _changed()


def unregister_metadata(metadata: MetaData) -> None:
    """Undo :func:`register_metadata` (no-op if it was not registered)."""
    with _lock:
        _registered[:] = [known for known in _registered if known is not metadata]
        _changed()


def _table_part(target: object, role: str) -> str:
    """The encoded table part of a Table, a mapped class or a ``'[schema.]table'`` name."""
    if isinstance(target, Table):
        return encode_table(target)
    if isinstance(target, str):
        try:
            return encode_table(target)
        except ValueError as error:
            raise ValueError(f"declare_writes(): {role} {error}") from None
    mapper = inspect(target, raiseerr=False)
    if isinstance(mapper, Mapper):
        if maps_view(mapper):
            tables = ", ".join(sorted(encode_table(table) for table in mapper.tables))
            raise TypeError(
                f"declare_writes(): the {role} {target!r} is mapped to a join or a select, "
                f"not to one table: name each of its tables instead ({tables})"
            )
        return encode_table(mapper.local_table)
    raise TypeError(
        f"declare_writes(): the {role} {target!r} is not a table; pass a Table, a mapped "
        "class or a table name ('table' or 'schema.table')"
    )


def declare_writes(table: object, *also_writes: object) -> None:
    """Declare that every write to ``table`` also writes each of ``also_writes``.

    For writes the database makes that the metadata does not describe: a trigger that
    copies ``orders`` rows into ``order_audit`` (``declare_writes("orders",
    "order_audit")``), a rule, a foreign key that exists only in the database. Any insert,
    update or delete that reaches ``table``, by any path, then also changes every key of
    the other tables (which rows is unknown), and whatever those writes cascade to in turn.

    Tables are Table objects, mapped classes, or names (``'table'`` or
    ``'schema.table'``), which need not be mapped. Declaring again adds to what was
    declared.
    """
    if not also_writes:
        raise ValueError(
            "declare_writes() needs the table written and at least one table it also "
            "writes, e.g. declare_writes('orders', 'order_audit')"
        )
    source = _table_part(table, "table")
    targets = {_table_part(target, "written table") for target in also_writes}
    with _lock:
        _declared.setdefault(source, set()).update(targets)
        _changed()


def undeclare_writes(table: object, *also_writes: object) -> None:
    """Withdraw :func:`declare_writes`: the named targets, or all of ``table``'s."""
    source = _table_part(table, "table")
    with _lock:
        if also_writes:
            targets = {_table_part(target, "written table") for target in also_writes}
            _declared.get(source, set()).difference_update(targets)
        else:
            _declared.pop(source, None)
        _changed()


def declared_writes(part: str) -> frozenset[str]:
    """The table parts declared as written whenever table ``part`` is written."""
    return frozenset(_declared.get(part, ()))


def _changed() -> None:
    global _index, _version
    _index = None
    _version += 1


def version() -> int:
    """A number that changes whenever the catalog's answers may have changed."""
    _notice_new_properties()
    return _version


#: Seconds between two looks for properties added to configured mappers.
PROPERTY_CHECK_INTERVAL: Final = 0.25
_properties = -1
_properties_checked = 0.0


def _notice_new_properties() -> None:
    """Rebuild the index when a relationship was added to a mapper already configured
    (``Owner.pets = relationship(..., passive_deletes=True)`` after first use), which no
    SQLAlchemy event reports: by counting the mappers' properties, at most once per
    :data:`PROPERTY_CHECK_INTERVAL` (the count walks every mapper; writes ask often)."""
    global _properties, _properties_checked
    now = time.monotonic()
    if now - _properties_checked < PROPERTY_CHECK_INTERVAL:
        return
    _properties_checked = now
    count = sum(len(getattr(mapper, "_props", ())) for mapper in _mappers(_registries()))
    if count != _properties:
        with _lock:
            if _properties >= 0:
                _changed()
            _properties = count


def tables_named(name: str) -> frozenset[str]:
    """The table parts of every known table called ``name`` (any case), in any schema."""
    return frozenset(_current().by_name.get(name.lower(), ()))


def references_to(part: str) -> tuple[Reference, ...]:
    """The foreign keys that reference table ``part``."""
    return tuple(_current().references.get(part, ()))


def mappers_of(part: str) -> tuple[Mapper[Any], ...]:
    """The configured mappers whose own table is table ``part`` (several under single-table
    inheritance)."""
    return tuple(_current().mappers.get(part, ()))


def views_of(part: str) -> tuple[Mapper[Any], ...]:
    """The configured mappers over a join or a select that read table ``part``."""
    return tuple(_current().views.get(part, ()))


def association_sides(part: str) -> frozenset[Mapper[Any]]:
    """The mappers whose many-to-many relationships go through table ``part`` (an
    association table): a write to its rows changes their collections."""
    return frozenset(_current().secondaries.get(part, ()))


def passive_delete_children(part: str) -> frozenset[str]:
    """Tables whose rows the database deletes with a row of ``part``, as the mapper says:
    the child (or association) tables of its ``passive_deletes`` relationships."""
    return frozenset(_current().passive.get(part, ()))


def _registries() -> list[Any]:
    return list(getattr(mapperlib, "_mapper_registries", ()))


def _mappers(registries: Iterable[Any]) -> list[Mapper[Any]]:
    """Every mapper of ``registries``, read while other threads may be declaring classes:
    a registry's mappers are a weak dictionary that such a thread may change under the
    read, so a read that meets a change is done again."""
    registries = list(registries)
    for attempt in range(100):
        try:
            return [mapper for registry in registries for mapper in _mapped(registry)]
        except (RuntimeError, UnmappedClassError):  # changed meanwhile: read it again
            time.sleep(0.001 * attempt)
    return [mapper for registry in registries for mapper in _mapped(registry)]


def _mapped(registry: Any) -> Iterable[Mapper[Any]]:
    """``registry.mappers``, less the classes whose mapping waits for the mappers to
    configure (the base of ``AbstractConcreteBase``), for which SQLAlchemy's collection
    raises ``UnmappedClassError`` until then."""
    try:
        mappers: Iterable[Mapper[Any]] = registry.mappers
    except UnmappedClassError:
        managers = list(getattr(registry, "_managers", ()))
        return [manager.mapper for manager in managers if getattr(manager, "is_mapped", False)]
    return mappers


def _metadatas(registries: Iterable[Any]) -> list[MetaData]:
    found: dict[int, MetaData] = {id(m): m for m in _registered}
    for registry in registries:
        metadata = getattr(registry, "metadata", None)
        if isinstance(metadata, MetaData):
            found.setdefault(id(metadata), metadata)
    for mapper in _mappers(registries):
        for table in mapper.tables:
            if isinstance(table, Table):
                found.setdefault(id(table.metadata), table.metadata)
    return list(found.values())


def _current() -> _Index:
    """The index, rebuilt after a mapper, table or foreign key came (see :func:`_learn`).

    Consulted for every write a flush or statement makes: answering from the index must
    cost next to nothing, so changes are learnt from SQLAlchemy's events, not looked for.
    """
    global _index
    _notice_new_properties()
    index = _index
    if index is not None:
        return index
    seen = _version
    registries = _registries()
    index = _build(_metadatas(registries), registries)
    with _lock:
        if _version == seen:  # nothing changed while it was being built
            _index = index
    return index


def _learn(*args: Any) -> None:
    """A mapper was configured, or a table or foreign key joined a schema: what the
    catalog knows may have changed. (Tables and mappers that existed before alkey was
    imported are read at the first build.)"""
    with _lock:
        _changed()


def _build(metadatas: list[MetaData], registries: list[Any]) -> _Index:
    index = _Index()
    for metadata in metadatas:
        for table in list(metadata.tables.values()):
            part = encode_table(table)
            index.by_name.setdefault(table.name.lower(), set()).add(part)
            for constraint in table.foreign_key_constraints:
                reference = _reference(part, constraint)
                if reference is not None:
                    index.references.setdefault(reference.parent, []).append(reference)
    for mapper in _mappers(registries):
        if not mapper.configured:
            continue  # configured before the first write that could need it
        if not maps_view(mapper):
            index.mappers.setdefault(encode_table(mapper.local_table), []).append(mapper)
        else:
            for read in mapper.tables:
                index.views.setdefault(encode_table(read), []).append(mapper)
        for relationship in mapper.relationships:
            if isinstance(relationship.secondary, Table):
                secondary = encode_table(relationship.secondary)
                index.secondaries.setdefault(secondary, set()).add(mapper)
            if not relationship.passive_deletes:
                continue
            for parent, child in _passive_pairs(relationship):
                index.passive.setdefault(parent, set()).add(child)
    return index


def _reference(child: str, constraint: ForeignKeyConstraint) -> Reference | None:
    try:
        parent = constraint.referred_table
        referred = frozenset(element.column.name.lower() for element in constraint.elements)
    except NoReferencedTableError:
        return None  # a table this process never defined: nothing of it can be cached
    return Reference(
        child=child,
        parent=encode_table(parent),
        columns=frozenset(column.name.lower() for column in constraint.columns),
        referred=referred,
        ondelete=constraint.ondelete.upper() if constraint.ondelete else None,
        onupdate=constraint.onupdate.upper() if constraint.onupdate else None,
    )


def _passive_pairs(relationship: Any) -> set[tuple[str, str]]:
    """(parent table, child table) for a ``passive_deletes`` relationship."""
    pairs: set[tuple[str, str]] = set()
    if relationship.direction is ONETOMANY:
        for local, remote in relationship.local_remote_pairs:
            if isinstance(local.table, Table) and isinstance(remote.table, Table):
                pairs.add((encode_table(local.table), encode_table(remote.table)))
    elif relationship.direction is MANYTOMANY and isinstance(relationship.secondary, Table):
        secondary = encode_table(relationship.secondary)
        for local, _ in relationship.synchronize_pairs:
            if isinstance(local.table, Table):
                pairs.add((encode_table(local.table), secondary))
    return pairs


event.listen(Mapper, "mapper_configured", _learn)
event.listen(Table, "after_parent_attach", _learn)
event.listen(ForeignKeyConstraint, "after_parent_attach", _learn)

"""Writes from outside the application: PostgreSQL's logical decoding bumps the tokens.

Why: alkey sees the writes made through bound sessions and engines. Other services,
``psql`` sessions, migrations, cron jobs and admin tools write the same database, and each
such write would leave keys stale until their TTL. PostgreSQL already records every
committed change in its write-ahead log; logical decoding reads it back as rows. A
:class:`ChangeListener` reads those rows and bumps exactly the tokens the application's own
write of them would bump -- each row's, its table's and the global one -- so that *any*
committed write, from anywhere, changes the right keys::

    listener = ChangeListener("postgresql+psycopg://alkey@db/app", metadata=Base.metadata)
    listener.create()  # once: a publication of the tables, and a replication slot
    listener.run()  # polls, bumps, confirms; until stopped

(or ``alkey listen postgresql://alkey@db/app`` from a shell).

How: through a *publication* (``CREATE PUBLICATION alkey FOR TABLE ...``, the tables that
have a primary key) and a *logical replication slot* with PostgreSQL's built-in
``pgoutput`` plugin. Each poll reads what the slot holds without consuming it
(``pg_logical_slot_peek_binary_changes``), decodes the committed transactions
(:func:`decode`), bumps their identifiers in one round trip, and only then moves the
slot's confirmed position past them (``pg_replication_slot_advance``). So:

* **nothing is lost**: a listener killed between the bump and the confirmation bumps those
  transactions again when it restarts, and while Redis is down nothing is confirmed --
  the changes wait in the slot, and are bumped once Redis answers;
* **the cost of waiting**: PostgreSQL keeps the write-ahead log from the slot's position
  on. A listener that stays down, or a slot nobody reads, makes the log grow until the
  disk is full: drop an abandoned slot (:meth:`ChangeListener.drop`, ``alkey listen
  --drop-slot``), or bound it with ``max_slot_wal_keep_size``;
* **writes the application made are bumped twice**: once by its own commit, once by the
  listener. That costs one more bump per transaction, and a key built between the two
  bumps misses once more; nothing is ever stale for it.

Identifiers are spelled exactly as the application's own writes spell them
(:func:`alkey.identity.row_identifiers`): with ``metadata`` (the application's
``MetaData``), each table is matched to its ``Table`` and its primary-key values are typed
as its columns load them; without it, values are typed by their PostgreSQL type (integers,
numerics, UUIDs, dates and timestamps, ``bytea``, ``char(n)`` unpadded), and tables of
``default_schema`` are spelled without their schema, as a ``Table`` without ``schema=``
spells them.

Requirements: ``wal_level = logical`` (a restart), a role with the ``REPLICATION``
attribute (or a superuser) for the slot, and ownership of the tables (or a superuser) for
the publication. Tables without a primary key are left out of the publication: PostgreSQL
refuses ``UPDATE`` and ``DELETE`` on a published table that has no replica identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import logging
import re
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from sqlalchemy import Engine, MetaData, Table, create_engine, text
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy import table as table_clause
from sqlalchemy.orm import configure_mappers

from alkey import catalog
from alkey.constants import (
    GLOBAL_WRITE_TOKEN,
    NAMESPACE,
    ROW_SEPARATOR,
    UNKNOWN_ROWS,
    UNKNOWN_WRITES,
)
from alkey.errors import TokenStoreError, redacted
from alkey.identity import (
    _coercer,
    bulk_identifiers,
    encode_table,
    family_identifiers,
    row_identifier,
    row_identifiers,
    table_identifier,
    table_write_identifiers,
)
from alkey.tokens import TokenStore
from alkey.writes import _parents_of_table, _touched_parents, view_parents

__all__ = [
    "ROWS_PER_TABLE",
    "ChangeListener",
    "Column",
    "ListenerStoppedError",
    "Naming",
    "Relation",
    "Transaction",
    "decode",
]

log = logging.getLogger("alkey.cdc")

#: A name PostgreSQL accepts unquoted for a slot or a publication.
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: How the publication's comment notes the bumps owed (tables' OIDs: every row of each).
_OWED = "alkey owes a bump of: "
#: In that note: the token every key depends on (a new slot's bump).
_EVERY_KEY = "every-key"


class Column(NamedTuple):
    """A column of a published table, as the ``Relation`` message describes it."""

    #: Its name.
    name: str
    #: Whether it is part of the table's replica identity (its primary key, by default).
    key: bool
    #: The OID of its type (``pg_type``).
    type_oid: int


class Relation(NamedTuple):
    """A published table, as the ``Relation`` message describes it."""

    #: Its schema (``public``...).
    schema: str
    #: Its name.
    name: str
    #: Its columns, in the table's order.
    columns: tuple[Column, ...]
    #: Its primary key's columns, in the key's order, when the catalog was asked (a
    #: ``Relation`` message names the replica identity, which may be another index, or
    #: every column); empty when not known.
    primary_key: tuple[str, ...] = ()
    #: Its replica identity's columns, as the ``Relation`` message flags them: an
    #: ``UPDATE`` that changes none of them logs no old row. ``None``: every change
    #: carries its old key (the outbox's triggers record it).
    identity: tuple[str, ...] | None = None


class Transaction(NamedTuple):
    """A committed transaction, decoded: where it ends, and what its writes invalidate."""

    #: The position just past its COMMIT, to confirm once it is bumped.
    end: str
    #: The identifiers of every row, table and the global token it wrote.
    identifiers: frozenset[str]


# -- decoding pgoutput (protocol version 1) --------------------------------------------------


class _Reader:
    """Reads a pgoutput message's fields in order."""

    __slots__ = ("at", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 1  # past the message's type byte

    def byte(self) -> int:
        value = self.data[self.at]
        self.at += 1
        return value

    def int16(self) -> int:
        (value,) = struct.unpack_from("!h", self.data, self.at)
        self.at += 2
        return int(value)

    def int32(self) -> int:
        (value,) = struct.unpack_from("!i", self.data, self.at)
        self.at += 4
        return int(value)

    def skip(self, count: int) -> None:
        self.at += count

    def string(self) -> str:
        end = self.data.index(b"\0", self.at)
        # UTF-8, as the listener's sessions ask (client_encoding); only a SQL_ASCII
        # database passes other bytes through, and names nothing the application can
        # decode either.
        value = self.data[self.at : end].decode("utf-8", "surrogateescape")
        self.at = end + 1
        return value

    def tuple(self) -> list[str | None]:
        """A ``TupleData``: each column's value as text, in UTF-8 (``None``: NULL, a
        TOASTed value the change left as it was, or bytes that are not UTF-8, which a
        SQL_ASCII database passes through -- a key of them names every row, never a
        wrong one)."""
        values: list[str | None] = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind in (ord("n"), ord("u")):
                values.append(None)
            else:  # 't': text ('b', binary, is never asked for)
                length = self.int32()
                try:
                    values.append(self.data[self.at : self.at + length].decode("utf-8"))
                except UnicodeDecodeError:
                    values.append(None)
                self.at += length
        return values


#: Rows of one table in one transaction named one by one; past them, the table's every
#: row at once (its unknown-rows token): a migration that rewrites a million rows must
#: not make a bump of a million tokens.
ROWS_PER_TABLE = 10_000


def decode(
    messages: Iterable[tuple[str, bytes]],
    relations: dict[int, Relation],
    naming: Callable[..., Iterable[str]],
    describe: Callable[[int, Relation], Relation] | None = None,
) -> Iterator[Transaction]:
    """The committed transactions in ``messages`` -- ``(lsn, pgoutput message)`` pairs, as
    ``pg_logical_slot_peek_binary_changes`` returns them -- each with the identifiers its
    writes invalidate.

    ``relations`` collects the tables the messages describe (a ``Relation`` message comes
    before a table's first change in each decoding session); ``naming(relation, row)``
    gives the identifiers of a change to a row of ``relation`` whose values (a whole row,
    in column order; an old row's are its replica identity's alone) are ``row``, or, with
    ``None``, of the table's every row (``TRUNCATE``); ``old_unknown=True`` says an
    update logged no old row (its foreign keys may have moved).
    ``describe(relid, relation)`` may complete a relation from the catalog (its primary
    key) as it is read. A transaction cut off at the end of
    ``messages`` is not yielded. Past :data:`ROWS_PER_TABLE` rows of one table, a
    transaction names that table's every row instead.
    """
    identifiers: set[str] | None = None
    rows: dict[tuple[str, str], int] = {}  # by table named: a partitioned one's, whole
    for lsn, message in messages:
        kind = message[:1]
        reader = _Reader(message)
        if kind == b"B":
            identifiers = set()
            rows = {}
        elif kind == b"C":
            if identifiers is not None:
                if identifiers:
                    identifiers.add(GLOBAL_WRITE_TOKEN)
                yield Transaction(lsn, frozenset(identifiers))
            identifiers = None
        elif kind == b"R":
            relid = reader.int32()
            schema, name = reader.string(), reader.string()
            reader.skip(1)  # replica identity setting
            columns = []
            for _ in range(reader.int16()):
                flags = reader.byte()
                column = reader.string()
                type_oid = reader.int32()
                reader.skip(4)  # type modifier
                columns.append(Column(column, bool(flags & 1), type_oid & 0xFFFFFFFF))
            relation = Relation(
                schema, name, tuple(columns), identity=tuple(c.name for c in columns if c.key)
            )
            relations[relid] = relation if describe is None else describe(relid, relation)
        elif identifiers is None:
            continue  # a change outside a transaction we saw begin: never confirmed alone
        elif kind in (b"I", b"U", b"D"):
            relid = reader.int32()
            relation = relations[relid]
            table = (relation.schema, relation.name)
            seen = rows[table] = rows.get(table, 0) + 1
            if seen > ROWS_PER_TABLE:
                if seen == ROWS_PER_TABLE + 1:
                    identifiers.update(naming(relation, None))
                continue
            first = True
            while reader.at < len(message):
                marker = reader.byte()  # 'K' old key, 'O' old row, 'N' new row
                row = reader.tuple()
                if kind == b"U" and first and marker == ord("N"):
                    # No old row logged: its foreign keys may have moved from parents
                    # the log does not name.
                    identifiers.update(naming(relation, row, old_unknown=True))
                else:
                    identifiers.update(naming(relation, row))
                first = False
                if marker == ord("N"):
                    break
        elif kind == b"T":
            count = reader.int32()
            reader.skip(1)  # options: CASCADE, RESTART IDENTITY
            for _ in range(count):
                identifiers.update(naming(relations[reader.int32()], None))
        # 'O' origin, 'Y' type, 'M' logical message: nothing to bump


# -- naming: identifiers spelled as the application's writes spell them ----------------------


def _timestamp(value: str) -> datetime.datetime:
    """A ``timestamp``/``timestamptz`` in PostgreSQL's ISO text output (with its offset,
    for ``timestamptz``), whatever the number of fractional digits."""
    value = value.replace(" ", "T", 1)
    offset = ""
    match = re.search(r"([+-]\d\d(?::?\d\d)?)$", value)
    if match:
        offset = match.group(1)
        value = value[: match.start()]
        if len(offset) == 3:
            offset += ":00"
    if "." in value:
        whole, fraction = value.split(".", 1)
        value = f"{whole}.{fraction[:6].ljust(6, '0')}"
    return datetime.datetime.fromisoformat(value + offset)


def _time(value: str) -> datetime.time:
    if "." in value:
        whole, fraction = value.split(".", 1)
        value = f"{whole}.{fraction[:6].ljust(6, '0')}"
    return datetime.time.fromisoformat(value)


_OCTAL_ESCAPE = re.compile(r"\\([0-3][0-7]{2})|\\(\\)")


def _bytea(value: str) -> bytes:
    """A ``bytea`` in either output: hex (``\\x4142``), or escape (``AB\\000``), which
    the outbox's trigger records when the writer's session sets ``bytea_output`` to
    ``escape`` -- and which, read as hex, could name another row. (Escape output never
    starts with ``\\x``: it doubles a backslash or follows it with three octal digits.)"""
    if value.startswith("\\x"):
        return bytes.fromhex(value[2:])
    if not value.isascii():
        raise ValueError("escape output of bytea is ASCII")
    unescaped = _OCTAL_ESCAPE.sub(lambda found: "\\" if found[2] else chr(int(found[1], 8)), value)
    if "\\" in _OCTAL_ESCAPE.sub("", value):
        raise ValueError(f"not a bytea in escape output: {value!r}")
    return unescaped.encode("latin-1")


#: How a key value's text is read, by the OID of its PostgreSQL type.
_READERS: dict[int, Callable[[str], Any]] = {
    16: lambda value: value in ("t", "true"),  # bool (text output, or JSON's)
    17: _bytea,  # bytea, in hex or escape output
    20: int,  # int8
    21: int,  # int2
    23: int,  # int4
    26: int,  # oid
    700: float,  # float4
    701: float,  # float8
    1042: lambda value: value.rstrip(" "),  # char(n), padded
    1082: datetime.date.fromisoformat,  # date
    1083: _time,  # time
    1114: _timestamp,  # timestamp
    1184: _timestamp,  # timestamptz, with its offset
    1700: decimal.Decimal,  # numeric
    2950: uuid.UUID,  # uuid
    18: str,  # "char"
    19: str,  # name
    25: str,  # text
    1043: str,  # varchar
}


class Naming:
    """Identifiers of decoded changes, spelled as the application's writes spell them
    (see the module): ``metadata``'s tables where they match, else the types PostgreSQL
    names; tables of ``default_schema`` without their schema.

    A change to a known row invalidates the row -- and the same row in the tables of
    mapped subclasses whose rows live partly in its table -- and the table tokens; a
    change whose row cannot be named (a table without a key, a key value of a text this
    cannot read, a ``TRUNCATE``) invalidates every row of the table, through its
    unknown-rows token, as a raw SQL write of unknown rows does.
    """

    def __init__(self, metadata: MetaData | None = None, default_schema: str = "public") -> None:
        # The tables of mapped subclasses (joined inheritance) are known once the
        # application's mappers are configured: before the first plan is made.
        configure_mappers()
        self.default_schema = default_schema
        self._tables: dict[tuple[str, str], Table] = {}
        for table in metadata.tables.values() if metadata is not None else ():
            schema = table.schema if table.schema is not None else default_schema
            if table.schema is not None or (schema, table.name) not in self._tables:
                self._tables[schema, table.name] = table  # a Table naming its schema wins
        self._plans: dict[Relation, _Plan] = {}

    def _plan(self, relation: Relation) -> _Plan:
        plan = self._plans.get(relation)
        if plan is None:
            table = self._tables.get((relation.schema, relation.name))
            # A tenant's copy of a mapped table (schema_translate_map): spelled with the
            # tenant's schema, typed by the mapped table, which has a token of its own.
            mapped = None
            if table is None and relation.schema != self.default_schema:
                mapped = self._tables.get((self.default_schema, relation.name))
                if mapped is not None and mapped.schema is not None:
                    mapped = None  # a Table naming its schema is no tenant's template
            positions = {column.name: index for index, column in enumerate(relation.columns)}
            names: Sequence[str]
            coercers: list[Callable[[Any], Any] | None] = []
            if table is not None and all(c.name in positions for c in table.primary_key):
                names = [column.name for column in table.primary_key]
                target: Any = table
            else:
                names = relation.primary_key or [c.name for c in relation.columns if c.key]
                if mapped is not None and [c.name for c in mapped.primary_key] == list(names):
                    coercers = [_coercer(column) for column in mapped.primary_key]
                schema = None if relation.schema == self.default_schema else relation.schema
                target = table_clause(relation.name, schema=schema)
            key = [positions[name] for name in names] if set(names) <= positions.keys() else []
            readers = [_READERS.get(relation.columns[i].type_oid) for i in key]
            if any(read is None for read in readers):
                key, readers = [], []  # a type this cannot read: every row, safely
            part = encode_table(target)
            # The mappers whose instances are keyed by other columns than ``names``: each
            # names the row by its own key too, read from the row, else every row.
            keyed: list[tuple[Any, list[int], list[Callable[[str], Any]]]] = []
            for mapper, columns in _keyed_otherwise(
                catalog.mappers_of(encode_table(mapped) if mapped is not None else part),
                names,
            ):
                here = mapped is None and columns is not None and set(columns) <= positions.keys()
                at = [positions[c] for c in columns] if here and columns else []
                read = [_READERS.get(relation.columns[i].type_oid) for i in at]
                if not at or not all(read):
                    key, readers = [], []  # (a tenant's copy, too: see the guide's limits)
                    break
                keyed.append((mapper, at, read))  # type: ignore[arg-type]
            named = set(names).union(
                *([relation.columns[i].name for i in at] for _, at, _ in keyed)
            )
            everything = frozenset(table_write_identifiers([part]))
            if mapped is not None:
                everything |= {table_identifier(mapped)}
            unknown_rows = f"{NAMESPACE}:{part}{ROW_SEPARATOR}{UNKNOWN_ROWS}"
            # The rows the application's mappers touch through many-to-one relationships
            # (and an association table's sides): every row of them, when unknown.
            every_parent = frozenset(_parents_of_table(part))
            parents = []
            for mapper in catalog.mappers_of(part):
                for relationship in _touched_parents(mapper):
                    parent = relationship.mapper
                    by_remote = {remote: local for local, remote in relationship.local_remote_pairs}
                    found: tuple[list[int], list[Callable[[str], Any]]] | None = None
                    if set(by_remote) == set(parent.primary_key):
                        columns = [by_remote[column].name for column in parent.primary_key]
                        if set(columns) <= positions.keys():
                            at = [positions[column] for column in columns]
                            read = [_READERS.get(relation.columns[i].type_oid) for i in at]
                            if all(read):
                                found = (at, read)  # type: ignore[assignment]
                    parents.append(_Parent(parent, found))
            # A class mapped to a join or a select that reads this table: every row of
            # its parents (their foreign key may be in another of its tables).
            parents.extend(_Parent(parent, None) for parent in view_parents(part))
            plan = _Plan(
                target,
                key,
                readers,
                everything - {unknown_rows},
                everything | every_parent,
                tuple(parents),
                every_parent if catalog.association_sides(part) else frozenset(),
                tuple(coercers),
                tuple(keyed),
                relation.identity is None or named <= set(relation.identity),
            )
            self._plans[relation] = plan
        return plan

    def __call__(
        self, relation: Relation, row: list[str | None] | None, *, old_unknown: bool = False
    ) -> frozenset[str]:
        """What a change to ``row`` of ``relation`` invalidates (``None``: every row);
        ``old_unknown``: an update whose old row was not logged, so every row of each
        parent table (the row may have left any of them)."""
        plan = self._plan(relation)
        if row is None or not plan.key or (old_unknown and not plan.stable):
            # (An update that logged no old row changed no column of the replica
            # identity; a key with other columns may have moved from a row unnamed.)
            return plan.every_row
        texts = [row[i] if i < len(row) else None for i in plan.key]
        if any(value is None for value in texts):
            # Not in this tuple (an old row carries its replica identity only, which may
            # be another index), or unchanged TOAST: a primary key is never NULL.
            return plan.every_row
        try:
            values = [read(value) for value, read in zip(texts, plan.readers, strict=True)]  # type: ignore[misc,arg-type]
        except (ValueError, TypeError, decimal.InvalidOperation):
            return plan.every_row  # a key of a text this cannot read: every row, safely
        if plan.coercers:
            values = [
                value if coerce is None else coerce(value)
                for coerce, value in zip(plan.coercers, values, strict=True)
            ]
        target = plan.target
        rows = (
            row_identifiers(target, values)
            if isinstance(target, Table)
            else [row_identifier(target, *values)]
        )
        identifiers = set(plan.tables) | plan.sides
        for identifier in rows:
            identifiers |= family_identifiers(identifier)
        for mapper, at, readers in plan.keyed:
            # Typed and spelled by the mapper, as its instances are (see _keyed_otherwise).
            texts = [row[i] if i < len(row) else None for i in at]
            try:
                if any(value is None for value in texts):
                    raise ValueError("a key with a NULL part, or not in this tuple")
                own = [read(value) for value, read in zip(texts, readers, strict=True)]  # type: ignore[arg-type]
            except (ValueError, TypeError, decimal.InvalidOperation):
                return plan.every_row
            identifiers |= bulk_identifiers(mapper, [own])
        for parent in plan.parents:
            identifiers |= parent.of(None if old_unknown else row)
        return frozenset(identifiers)


class _Plan(NamedTuple):
    """How :class:`Naming` names the changes of one relation."""

    #: The ``Table`` of the metadata, or a table clause of the relation's name.
    target: Any
    #: The positions of the key's columns in the relation's rows, in key order.
    key: list[int]
    #: How each key value's text is read.
    readers: list[Callable[[str], Any] | None]
    #: The table tokens a change to a known row bumps (and the global one).
    tables: frozenset[str]
    #: What a change to unknown rows bumps: also the unknown-rows token, and every row
    #: of the tables whose rows the application's writes of this table touch.
    every_row: frozenset[str]
    #: The parents a row references many-to-one, as the application's mappers say.
    parents: tuple[_Parent, ...] = ()
    #: For an association table, every row of both sides (as a raw SQL write of one).
    sides: frozenset[str] = frozenset()
    #: For a tenant's copy of a mapped table: how its mapped table types each key value.
    coercers: tuple[Callable[[Any], Any] | None, ...] = ()
    #: The mappers whose instances are keyed by other columns than the table's key, each
    #: with where its key's values are in a row, in its key's order, and how each is read.
    keyed: tuple[tuple[Any, list[int], list[Callable[[str], Any]]], ...] = ()
    #: Whether an update that logs no old row keeps every key this names: true when all
    #: their columns are in the replica identity, whose change logs the old row.
    stable: bool = True


def _keyed_otherwise(
    mappers: Sequence[Any], names: Sequence[str]
) -> list[tuple[Any, list[str] | None]]:
    """The mappers among a table's ``mappers`` that key their instances by other columns
    than the table's primary key ``names`` -- a natural key mapped over a surrogate one
    (``__mapper_args__ = {"primary_key": [...]}``), the same columns in another order, a
    joined subclass keyed by a base column its table does not have -- each with the
    columns of this table that hold its key, in its key's order (``None``: not all of
    them are here). The application names an instance by its mapper's key, so a change
    read from the log must be named by it too."""
    found: list[tuple[Any, list[str] | None]] = []
    for mapper in mappers:
        table = mapper.local_table
        # A joined subclass's key is its base table's columns, equated to its own.
        equated = getattr(mapper, "_equivalent_columns", None) or {}
        columns: list[str] | None = []
        for column in mapper.primary_key:
            here = [c for c in _equal_to(column, equated) if c.table is table]
            if not here:
                columns = None
                break
            columns.append(here[0].name)  # type: ignore[union-attr]
        if columns != list(names):
            found.append((mapper, columns))
    return found


def _equal_to(column: Any, equated: dict[Any, set[Any]]) -> list[Any]:
    """``column`` and every column an inheritance condition makes equal to it, near ones
    first. SQLAlchemy's map equates each table's column to its parent's and children's
    only: a grandchild's key column is two steps from the base's."""
    found = [column]
    seen = {column}  # by identity: a Column's == builds an expression
    for near in found:  # grows as it goes: a walk breadth first
        for other in equated.get(near, ()):
            if other not in seen:
                seen.add(other)
                found.append(other)
    return found


class _Parent(NamedTuple):
    """A many-to-one relationship whose parent a change to a row touches, as the
    application's own write of that row does (``alkey_touch`` opts out, as there)."""

    #: The parent's mapper.
    mapper: Any
    #: Where the foreign key's values are in a row, in the parent's key order, and how
    #: each is read; ``None`` when it cannot be read (then every row of the parent).
    key: tuple[list[int], list[Callable[[str], Any]]] | None

    def of(self, row: list[str | None] | None) -> set[str]:
        """The parent rows ``row`` references: the one its foreign key names, or every
        row of the parent when the key is not in the row (an old row's replica identity
        alone, a NULL -- which cannot be told apart in the log -- or a value this cannot
        read)."""
        if self.key is not None and row is not None:
            at, readers = self.key
            texts = [row[i] if i < len(row) else None for i in at]
            if None not in texts:
                try:
                    values = tuple(read(t) for t, read in zip(texts, readers, strict=True))  # type: ignore[arg-type]
                except (ValueError, TypeError, decimal.InvalidOperation):
                    pass
                else:
                    return bulk_identifiers(self.mapper, [values])
        return bulk_identifiers(self.mapper, None)


# -- the listener ------------------------------------------------------------------------------


#: SQLSTATEs that waiting will not cure: the slot or publication is gone (dropped, or
#: invalidated past ``max_slot_wal_keep_size``), or the role lacks a privilege.
_FATAL = {
    "42704": "the slot or the publication does not exist",  # undefined_object
    "55000": "the slot can no longer give its changes (invalidated)",  # not in prerequisite
    "42501": "the role lacks a privilege",  # insufficient_privilege
    "42P01": "a table it reads does not exist (is the outbox installed?)",  # undefined_table
}


def _sqlstate(error: BaseException) -> str | None:
    original = getattr(error, "orig", error)
    state = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    return state if isinstance(state, str) else None


class ListenerStoppedError(Exception):
    """A change listener stopped for good: a failure that retrying will not cure (see
    the message), after which its slot or outbox must be set up again."""


class ChangeListener:
    """Bumps the tokens of every change PostgreSQL commits, read from a logical
    replication slot (see the module).

    ``database``: a SQLAlchemy URL or ``Engine`` of the database (PostgreSQL, with
    ``wal_level = logical``). ``tokens``: the store to bump in -- by default the process's
    default store (:func:`alkey.client.default_store`, so ``REDIS_URL`` and ``ALKEY_*``);
    the application's own ``key_prefix`` must be the same. It must be a Redis token store
    (:class:`~alkey.tokens.RedisTokenStore`), which tells a bump Redis took from one it
    kept for replay. ``slot`` and ``publication``: their names (``alkey``). ``metadata``
    and ``default_schema``: how tables are named (see :class:`Naming`). ``batch``: at most
    about this many messages a poll (whole transactions); ``poll_interval``: the pause
    when a poll found nothing; ``retry_interval``: the pause after Redis or the database
    failed.

    Not thread-safe: run one listener per slot (PostgreSQL lets one session use a slot at
    a time anyway).
    """

    def __init__(
        self,
        database: str | Engine,
        *,
        tokens: TokenStore | None = None,
        slot: str = "alkey",
        publication: str = "alkey",
        metadata: MetaData | None = None,
        default_schema: str = "public",
        batch: int = 10_000,
        poll_interval: float = 0.05,
        retry_interval: float = 1.0,
    ) -> None:
        for what, name in (("slot", slot), ("publication", publication)):
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"{what} name {name!r}: use lower-case letters, digits and underscores, "
                    "starting with a letter or underscore, at most 63 characters"
                )
        if batch < 1:
            raise ValueError(f"batch={batch!r}: a poll reads at least one message")
        self.engine, self._own_engine = _engine(database, "the change listener")
        self.tokens = _checked_store(tokens)
        self.slot = slot
        self.publication = publication
        self.naming = Naming(metadata, default_schema)
        self.batch = batch
        self.poll_interval = poll_interval
        self.retry_interval = retry_interval
        self._relations: dict[int, Relation] = {}
        self._described: dict[tuple[int, Relation], Relation] = {}
        self._advanced: str | None = None
        self._failing: str | None = None

    def close(self) -> None:
        """Close the database connections of the engine this listener made from a URL
        (one it was given is the caller's to dispose of)."""
        if self._own_engine:
            self.engine.dispose()

    def __enter__(self) -> ChangeListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        """A connection in autocommit with :data:`_SESSION`'s settings (an engine of the
        caller's gets them for the while, and its own back after)."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            if self._own_engine:  # an engine of ours sets them as it connects
                yield connection
                return
            for name, value in _SESSION:
                connection.exec_driver_sql(f"SET {name} = '{value}'")
            try:
                yield connection
            finally:
                with contextlib.suppress(Exception):
                    for name, _ in _SESSION:
                        connection.exec_driver_sql(f"RESET {name}")

    # -- set-up ------------------------------------------------------------------------------

    def create(self, tables: Iterable[str] | None = None) -> list[str]:
        """Create the publication and the slot, unless they exist, and add tables created
        since to the publication; the tables published.

        ``tables`` (``"name"`` or ``"schema.name"``): those, else every table of the
        database that has a primary key (permanent ones, outside PostgreSQL's own
        schemas; a partitioned table as itself, its partitions through it). The slot
        starts at the current end of the log: what was committed before it is not in it,
        so creating a slot also bumps the token every key depends on
        (:data:`~alkey.constants.UNKNOWN_WRITES`): every key misses once, and none can
        predate a write that no slot recorded (a first set-up, or a slot lost and made
        again). A table added to the publication has every row of it bumped.

        Neither bump can be lost, even by a crash between the change and its bump: the
        bumps owed are noted on the publication (its comment) before the slot is made,
        and in the transaction that adds the tables, and cleared once made; a
        ``create()`` that finds a note makes its bumps (a Redis failure raises, and the
        note stays for the next). Calls on the same publication, from any process, take
        turns (an advisory lock).
        """
        with self._connect() as connection:
            lock = {"key": f"alkey.cdc:{self.publication}"}
            connection.execute(text("SELECT pg_advisory_lock(hashtext(:key))"), lock)
            try:
                return self._create(connection, tables)
            finally:
                with contextlib.suppress(sqlalchemy_errors.DBAPIError):
                    connection.execute(text("SELECT pg_advisory_unlock(hashtext(:key))"), lock)

    def _create(self, connection: Any, tables: Iterable[str] | None) -> list[str]:
        """:meth:`create`, under its lock."""
        if tables is None:
            oids = [
                row[0]
                for row in connection.execute(
                    text(
                        "SELECT c.oid FROM pg_class c JOIN pg_namespace n "
                        "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
                        "AND NOT c.relispartition AND c.relpersistence = 'p' "
                        "AND c.relreplident <> 'n' "
                        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                        "AND n.nspname NOT LIKE 'pg_toast%' AND c.relname <> :outbox "
                        "AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid "
                        "AND i.indisprimary)"
                    ),
                    {"outbox": "alkey_outbox"},
                )
            ]
        else:
            oids = []
            for name in tables:
                oid = connection.execute(
                    text("SELECT to_regclass(:name)::oid"), {"name": name}
                ).scalar()
                if oid is None:
                    raise ValueError(f"no table {name!r} in the database to publish")
                oids.append(oid)
        publication = self._publication(connection)
        published: set[int] = set()
        if publication is not None:
            published = {
                row[0]
                for row in connection.execute(
                    text("SELECT prrelid FROM pg_publication_rel WHERE prpubid = :p"),
                    {"p": publication},
                )
            }
        new = [oid for oid in oids if oid not in published]
        names = dict(
            connection.execute(
                text(
                    "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname) "
                    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.oid = ANY(:oids)"
                ),
                {"oids": [*oids, *published]},
            ).all()
        )
        if publication is None:
            listing = f" FOR TABLE {', '.join(names[o] for o in oids)}" if oids else ""
            # Partitions as themselves (named as their root by `_describe`): through
            # the root, PostgreSQL would not publish a partition's TRUNCATE.
            connection.exec_driver_sql(
                f"CREATE PUBLICATION {self.publication}{listing} "
                "WITH (publish_via_partition_root = false)"
            )
            publication = self._publication(connection)
            new = []  # in the publication from its start, before the slot's
        else:
            connection.exec_driver_sql(
                f"ALTER PUBLICATION {self.publication} SET (publish_via_partition_root = false)"
            )
        owed = self._owed(connection, publication)
        slot = connection.execute(
            text("SELECT 1 FROM pg_replication_slots WHERE slot_name = :name"),
            {"name": self.slot},
        ).first()
        if new or not slot:
            owed |= {str(oid) for oid in new}
            if not slot:
                owed.add(_EVERY_KEY)
            # One transaction, on this connection (in autocommit: begun and ended here).
            connection.exec_driver_sql("BEGIN")
            try:
                if new:
                    connection.exec_driver_sql(
                        f"ALTER PUBLICATION {self.publication} ADD TABLE "
                        + ", ".join(names[o] for o in new)
                    )
                self._note(connection, owed)
                connection.exec_driver_sql("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    connection.exec_driver_sql("ROLLBACK")
                raise
        if not slot:
            connection.execute(
                text("SELECT pg_create_logical_replication_slot(:name, 'pgoutput')"),
                {"name": self.slot},
            )
        if owed:
            identifiers = self._every_row_of(
                connection, [int(oid) for oid in owed if oid != _EVERY_KEY]
            )
            if _EVERY_KEY in owed:
                identifiers.add(UNKNOWN_WRITES)
            self._bump(identifiers)
            self._note(connection, set())
        return sorted(names[o].replace('"', "") for o in {*oids, *published})

    def _publication(self, connection: Any) -> int | None:
        """The publication's OID, if it exists."""
        oid = connection.execute(
            text("SELECT oid FROM pg_publication WHERE pubname = :name"),
            {"name": self.publication},
        ).scalar()
        return None if oid is None else int(oid)

    def _owed(self, connection: Any, publication: int | None) -> set[str]:
        """The bumps a note on the publication says are owed: tables' OIDs (every row of
        each) and :data:`_EVERY_KEY`."""
        note = connection.execute(
            text("SELECT obj_description(:p, 'pg_publication')"), {"p": publication}
        ).scalar()
        if not isinstance(note, str) or not note.startswith(_OWED):
            return set()
        return {
            item for item in note[len(_OWED) :].split(",") if item.isdigit() or item == _EVERY_KEY
        }

    def _note(self, connection: Any, owed: set[str]) -> None:
        """Note on the publication the bumps ``owed`` (none: clear the note)."""
        listed = ",".join(sorted(owed))
        note = f"'{_OWED}{listed}'" if owed else "NULL"
        connection.exec_driver_sql(f"COMMENT ON PUBLICATION {self.publication} IS {note}")

    def _every_row_of(self, connection: Any, oids: Iterable[int]) -> set[str]:
        """What a write to unknown rows of each of the tables ``oids`` invalidates."""
        identifiers: set[str] = set()
        for schema, name in connection.execute(
            text(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE c.oid = ANY(:oids)"
            ),
            {"oids": list(oids)},
        ):
            relation = Relation(schema, name, ())
            identifiers |= self.naming(relation, None)
        return identifiers

    def drop(self) -> None:
        """Drop the slot and the publication, if they exist: PostgreSQL then stops keeping
        log for this listener. What is committed meanwhile is never bumped by it."""
        with self._connect() as connection:
            if connection.execute(
                text("SELECT 1 FROM pg_replication_slots WHERE slot_name = :name"),
                {"name": self.slot},
            ).first():
                connection.execute(
                    text("SELECT pg_drop_replication_slot(:name)"), {"name": self.slot}
                )
            connection.exec_driver_sql(f"DROP PUBLICATION IF EXISTS {self.publication}")

    # -- polling -----------------------------------------------------------------------------

    def poll(self) -> int:
        """Read what the slot holds, bump the committed transactions' tokens, and confirm
        them; the number of transactions bumped (0: nothing new).

        Reads up to the flushed end of the log; when it read all of it and everything
        written is flushed, the slot is moved to that end even if nothing there was
        published (other tables, other databases), or PostgreSQL would keep that log, and
        decode it again on every poll.

        Raises alkey's :class:`~alkey.errors.TokenStoreError` when Redis did not take the
        bump -- nothing is confirmed then, and the next poll tries again -- and
        SQLAlchemy's errors when the database did not answer.
        """
        with self._connect() as connection:
            # Decoding reads the log up to where it is flushed (`end`). The slot may be
            # moved past everything read only to a record's boundary that is flushed: the
            # insert position when it is (a commit record cut by the flush point would
            # otherwise be passed over when it is decoded later, its start being behind).
            end, boundary = connection.execute(
                text(
                    "SELECT f::text, CASE WHEN i <= f THEN i::text END FROM "
                    "(SELECT pg_current_wal_insert_lsn() AS i, "
                    "pg_current_wal_flush_lsn() AS f) AS here"
                )
            ).one()
            rows = connection.execute(
                text(
                    "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
                    ":slot, CAST(:end AS pg_lsn), :limit, 'proto_version', '1', "
                    "'publication_names', :publication)"
                ),
                {
                    "slot": self.slot,
                    "end": end,
                    "limit": self.batch,
                    "publication": self.publication,
                },
            ).all()
            self._relations.clear()  # each peek is a decoding session of its own

            def describe(relid: int, relation: Relation) -> Relation:
                return self._describe(connection, relid, relation)

            transactions = list(
                decode(
                    ((row[0], bytes(row[1])) for row in rows),
                    self._relations,
                    self.naming,
                    describe,
                )
            )
            identifiers: set[str] = set()
            for transaction in transactions:
                identifiers |= transaction.identifiers
            if identifiers:
                self._bump(identifiers)
            # Everything up to `end` was read unless the batch filled up; past the last
            # commit read, only to a flushed record boundary.
            confirm = boundary if len(rows) < self.batch else None
            if confirm is None and transactions:
                confirm = transactions[-1].end
            if confirm is not None and confirm != self._advanced:
                connection.execute(
                    text("SELECT pg_replication_slot_advance(:slot, CAST(:lsn AS pg_lsn))"),
                    {"slot": self.slot, "lsn": confirm},
                )
                self._advanced = confirm
        return len(transactions)

    def _describe(self, connection: Any, relid: int, relation: Relation) -> Relation:
        """``relation`` with its primary key and its key columns' base types (a domain's
        values read as its base type's), from the catalog; asked once per table shape.

        A partition is named as the partitioned table at its root, with the root's key,
        matched to the partition's columns by name (a partition attached later may order
        them differently): the application maps the root, and writes through it."""
        described = self._described.get((relid, relation))
        if described is None:
            root = connection.execute(
                text(
                    "SELECT c.oid, n.nspname, c.relname FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.oid = coalesce(pg_partition_root(:relid), :relid)"
                ),
                {"relid": relid},
            ).first()
            if root is None:
                # Dropped since this change was written: no key to read in the catalog.
                # Named by the log's name: by the metadata's Table, else every row.
                root = (relid, relation.schema, relation.name)
            found = dict(
                connection.execute(
                    text(
                        "SELECT a.attname, CASE WHEN t.typtype = 'd' THEN t.typbasetype "
                        "ELSE a.atttypid END FROM pg_index i, unnest(i.indkey) WITH "
                        "ORDINALITY AS k(num, pos), pg_attribute a, pg_type t "
                        "WHERE i.indrelid = :relid AND i.indisprimary "
                        "AND a.attrelid = i.indrelid AND a.attnum = k.num "
                        "AND t.oid = a.atttypid ORDER BY k.pos"
                    ),
                    {"relid": root[0]},
                ).all()
            )
            columns = tuple(
                Column(c.name, c.name in found, int(found.get(c.name, c.type_oid)))
                for c in relation.columns
            )
            described = relation._replace(
                schema=root[1], name=root[2], columns=columns, primary_key=tuple(found)
            )
            self._described[relid, relation] = described
        return described

    def _bump(self, identifiers: set[str]) -> None:
        _bump_taken(self.tokens, identifiers, "not confirmed to PostgreSQL yet")

    def run(self, stop: threading.Event | None = None) -> None:
        """Poll until ``stop`` is set (forever without one): at once while there is more,
        every ``poll_interval`` when idle, every ``retry_interval`` while Redis or the
        database fails -- each failure logged once, and its end, on ``alkey.cdc``.

        Raises :class:`ListenerStoppedError` for a failure that waiting will not cure: the slot
        or the publication gone (dropped, or the slot invalidated after falling more than
        ``max_slot_wal_keep_size`` behind), or a privilege missing."""
        stop = stop if stop is not None else threading.Event()
        while not stop.is_set():
            pause = self._round()
            if pause:
                stop.wait(pause)

    async def arun(self, stop: asyncio.Event | None = None) -> None:
        """:meth:`run` for an asyncio application: each poll runs in a worker thread (the
        database and Redis calls block), the pauses on the loop, until ``stop`` is set or
        the task is cancelled. ``tokens`` must then be a synchronous store (the default
        one is)."""
        await _arun(self._round, stop)

    def _round(self) -> float:
        """One poll; how long to pause before the next (0: there may be more now)."""
        return _round(self, self.poll, log, "change listener")

    def _failed(self, what: str, error: BaseException) -> None:
        _report(self, what, error, log, "change listener", f"they wait in slot {self.slot!r}")


# -- shared by the listeners (this one, and alkey.outbox's) ------------------------------------

#: Session settings a listener's connections need: key values in the text forms
#: ``_READERS`` read.
_SESSION = (
    ("DateStyle", "ISO,YMD"),
    ("bytea_output", "hex"),
    # Floats in their shortest exact text: at 0 or less (a server's or a role's default
    # may say so), a float8 key prints rounded and names another row.
    ("extra_float_digits", "3"),
    ("IntervalStyle", "postgres"),
    # The decoded changes come in the session's encoding: UTF-8 from any database's.
    ("client_encoding", "UTF8"),
)


def _engine(database: str | Engine, what: str) -> tuple[Engine, bool]:
    """The engine of ``database``, and whether it is the listener's own."""
    if isinstance(database, Engine):
        engine, own = database, False
    else:
        options = " ".join(f"-c {name}={value}" for name, value in _SESSION)
        engine = create_engine(database, connect_args={"options": options})
        own = True
    if engine.dialect.name != "postgresql":
        raise ValueError(
            f"{what} reads PostgreSQL's changes; "
            f"{engine.url.render_as_string(hide_password=True)!r} is {engine.dialect.name}"
        )
    return engine, own


def _checked_store(tokens: TokenStore | None) -> TokenStore:
    """``tokens`` (default: the default store), if it tells a bump Redis took from one it
    kept for replay (its ``pending``)."""
    if tokens is None:
        from alkey.client import default_store

        tokens = default_store()
    if callable(getattr(tokens, "abump", None)):
        raise ValueError(
            f"{tokens!r} bumps through asyncio, which a listener's worker thread cannot: "
            "pass a synchronous RedisTokenStore (arun() runs each poll in a thread)"
        )
    if not isinstance(getattr(tokens, "pending", None), frozenset):
        raise ValueError(
            f"{tokens!r} cannot tell a bump Redis took from one it kept for replay, so a "
            "listener could confirm a change before its bump: pass a RedisTokenStore "
            "(tokens=alkey.tokens.RedisTokenStore(client, key_prefix=...))"
        )
    return tokens


def _bump_taken(tokens: TokenStore, identifiers: set[str], unconfirmed: str) -> None:
    """Bump ``identifiers``, raising unless Redis took the bump: a store that degrades
    keeps a bump it could not send for replay, which is not yet a bump."""
    tokens.bump(identifiers)
    pending: frozenset[str] = getattr(tokens, "pending", frozenset())
    if not pending.isdisjoint(identifiers):
        raise TokenStoreError(
            f"Redis did not take the bump of {len(identifiers)} token(s) (kept for replay "
            f"by the store): {unconfirmed}"
        )


async def _arun(round_: Callable[[], float], stop: asyncio.Event | None) -> None:
    """Run ``round_`` (a listener's one step, which blocks) in a worker thread until
    ``stop`` is set, pausing on the loop for as long as each round says."""
    stop = stop if stop is not None else asyncio.Event()
    while not stop.is_set():
        pause = await asyncio.to_thread(round_)
        if pause:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)


def _round(listener: Any, step: Callable[[], int], logger: logging.Logger, what: str) -> float:
    """One ``step`` of a listener; how long to pause before the next."""
    try:
        found = step()
    except TokenStoreError as error:
        listener._failed("Redis", error)
        return float(listener.retry_interval)
    except sqlalchemy_errors.DBAPIError as error:
        problem = _FATAL.get(_sqlstate(error) or "")
        if problem is not None:
            logger.error("alkey's %s stops: %s (%s)", what, problem, redacted(str(error.orig)))
            raise ListenerStoppedError(f"{problem}: {redacted(str(error.orig)).strip()}") from None
        listener._failed("the database", error)
        return float(listener.retry_interval)
    except Exception as error:  # a bug of ours, or a text we cannot decode: nothing confirmed
        listener._failed("decoding", error)
        return float(listener.retry_interval)
    if listener._failing is not None:
        logger.warning("alkey's %s works again (%s answers)", what, listener._failing)
        listener._failing = None
    return 0.0 if found else float(listener.poll_interval)


def _report(
    listener: Any, what: str, error: BaseException, logger: logging.Logger, who: str, kept: str
) -> None:
    if listener._failing != what:
        listener._failing = what
        logger.warning(
            "alkey's %s cannot go on: %s failed (%s: %s). Nothing is confirmed meanwhile: "
            "%s, and are bumped once it answers (retrying every %gs).",
            who,
            what,
            type(error).__name__,
            redacted(str(error)),
            kept,
            listener.retry_interval,
        )

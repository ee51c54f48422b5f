"""Identifiers: the names of the tokens alkey keeps, derived from SQLAlchemy's mappers.

An identifier names one token:

* ``alkey:users#1`` -- one row (here the row of table ``users`` whose primary key is 1);
* ``alkey:users#*`` -- one table;
* ``alkey:*#*`` -- everything (:data:`alkey.constants.GLOBAL_WRITE_TOKEN`).

The row part comes from the mapper's identity (any primary key: integer, string, UUID,
composite), never from an ``id`` attribute, and the table part from the mapped
:class:`~sqlalchemy.schema.Table` (schema included), never from ``__tablename__``.

The encoding is unambiguous, so two different rows never share a token:

* every character outside ``A-Z a-z 0-9 _ -`` (and ``.`` in row values) is written as
  ``%XX``, the upper-case hex of its UTF-8 bytes; a ``#``, ``,``, ``:`` or ``*`` inside a
  table name or a key value therefore never reads as a separator;
* a schema-qualified table is ``schema.table`` (a ``.`` inside a schema or table name is
  ``%2E``, so ``Table('a.b')`` and ``Table('b', schema='a')`` stay apart);
* a composite key joins its encoded values with ``,`` in primary-key column order;
* an empty string is written ``~`` (and a real ``~`` as ``%7E``).

Each row, table and value has exactly one spelling; :func:`parse_identifier` rejects every
other spelling (lower-case hex, needless escapes), because a second spelling of a row would
name a second token that no write ever bumps.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import re
import string
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from sqlalchemy import CHAR, NCHAR, DateTime, Enum, Uuid, event, inspect
from sqlalchemy.orm import InstanceState, Mapper, configure_mappers, mapperlib
from sqlalchemy.schema import Table
from sqlalchemy.sql.expression import FromClause

from alkey import constants
from alkey.constants import ALL_ROWS, GLOBAL_WRITE_TOKEN, NAMESPACE, ROW_SEPARATOR
from alkey.written import Written

__all__ = [
    "UNKNOWN_ROWS",
    "UNKNOWN_WRITES",
    "Identifier",
    "bulk_identifiers",
    "dependencies",
    "encode_table",
    "family_identifiers",
    "identifier_for",
    "instance_identifier",
    "is_identifier",
    "parse_identifier",
    "row_identifier",
    "row_identifiers",
    "table_identifier",
    "table_part",
    "table_write_identifiers",
    "write_identifiers",
    "writes_of",
]

_PREFIX = NAMESPACE + ":"
# How the identifiers of a mapper over a join or a select start: "alkey:(" quoted.
_VIEW_START: Final = _PREFIX + "%28"
_EMPTY_VALUE = "~"
_ESCAPED = r"(?:%[0-9A-F]{2})"
_NAME = rf"(?:[A-Za-z0-9_-]|{_ESCAPED})+"
_VALUE = rf"(?:(?:[A-Za-z0-9_.-]|{_ESCAPED})+|~null|~)"
_IDENTIFIER_RE = re.compile(
    rf"alkey:(?P<table>{_NAME}(?:\.{_NAME})?)#"
    rf"(?P<row>\*|{_VALUE}(?:,{_VALUE})*)(?:@(?P<token>{_NAME}))?"
)
#: Separates a row's key from the identity token of the shard it lives in.
TOKEN_SEPARATOR: Final = "@"


@dataclass(frozen=True, slots=True)
class Identifier:
    """A parsed identifier (:func:`parse_identifier`); ``str()`` writes it back."""

    #: The table's name (``None`` for the global token).
    table: str | None
    #: The decoded primary-key values of a row (``None`` for a table or the global token;
    #: a ``None`` among them is a NULL part of a composite key).
    key: tuple[str | None, ...] | None
    #: The table's schema, if the identifier is qualified.
    schema: str | None = None
    #: The row's identity token (its shard, under horizontal sharding), if any.
    token: str | None = None

    def __str__(self) -> str:
        if self.table is None:
            return GLOBAL_WRITE_TOKEN
        part = _quote_name(self.table)
        if self.schema is not None:
            part = f"{_quote_name(self.schema)}.{part}"
        if self.key is None:
            return f"{_PREFIX}{part}{ROW_SEPARATOR}{ALL_ROWS}"
        row = _format(
            part, [NULL_VALUE if value is None else _quote_value(value) for value in self.key]
        )
        return row if self.token is None else f"{row}{TOKEN_SEPARATOR}{_quote_name(self.token)}"


def _quoter(safe_characters: str) -> Callable[[str], str]:
    """A function escaping every character outside ``safe_characters`` as ``%XX``."""
    safe = frozenset(safe_characters.encode("ascii"))
    already_safe = re.compile(f"[{re.escape(safe_characters)}]+").fullmatch

    def quote(text: str) -> str:
        if not text:
            return _EMPTY_VALUE
        if already_safe(text):
            return text
        raw = text.encode("utf-8", "surrogatepass")
        return "".join(chr(byte) if byte in safe else f"%{byte:02X}" for byte in raw)

    return quote


_quote_name = _quoter(string.ascii_letters + string.digits + "_-")
_quote_value = _quoter(string.ascii_letters + string.digits + "_.-")


def _unquote(text: str) -> str:
    if text == _EMPTY_VALUE:
        return ""
    raw = bytearray()
    index = 0
    while index < len(text):
        if text[index] == "%":
            raw.append(int(text[index + 1 : index + 3], 16))
            index += 3
        else:
            raw.append(ord(text[index]))
            index += 1
    return raw.decode("utf-8", "surrogatepass")


def encode_table(table: str | FromClause) -> str:
    """The encoded table part of an identifier: ``name`` or ``schema.name``."""
    if isinstance(table, str):
        parts = table.split(".")
        if len(parts) > 2 or not all(parts):
            raise ValueError(
                f"{table!r} is not 'table' or 'schema.table'; pass the Table object itself "
                "for a name that contains dots"
            )
        return ".".join(_quote_name(part) for part in parts)
    name = getattr(table, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{table!r} is not a named table; pass a Table or a mapped class")
    return table_part(getattr(table, "schema", None), name)


def _encode_value(value: Any) -> str:
    """One primary-key value as text: the same row always gives the same text.

    Values that drivers and sessions spell differently for one row get one spelling: an
    aware datetime is the same instant in UTC, written without an offset (a naive one is
    taken to be UTC already, as a database session in UTC stores and returns it);
    ``Decimal('1.50')``, ``Decimal('1.5')`` and ``1.5`` are ``1.5``, and ``1``, ``1.0`` and
    ``Decimal('1')`` are ``1``. The column's own type settles the rest (see
    :func:`_coercer`).
    """
    if isinstance(value, bool):
        text = str(int(value))
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    elif isinstance(value, uuid.UUID):
        text = str(value)
    elif isinstance(value, decimal.Decimal):
        text = _decimal_text(value)
    elif isinstance(value, float):
        text = _decimal_text(decimal.Decimal(repr(value)))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).hex()
    elif isinstance(value, datetime.datetime):
        if value.utcoffset() is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        text = value.isoformat()
    elif isinstance(value, (datetime.date, datetime.time)):
        text = value.isoformat()
    elif isinstance(value, enum.Enum):
        return _encode_value(value.value)
    elif value is None:
        # A NULL part of a composite key (mappers allow them by default): a spelling that
        # no value has, since a lone '~' is the empty string and '~' is otherwise escaped.
        return NULL_VALUE
    else:
        text = str(value)
    return _quote_value(text)


def _decimal_text(value: decimal.Decimal) -> str:
    if value.is_finite():
        # Decimal('1.0') and Decimal('1.00') name the same row; '1E+1' is written '10'.
        return format(value.normalize(), "f")
    return str(value)


#: How a NULL part of a composite primary key is spelled in an identifier.
NULL_VALUE: Final = "~null"


def _coercer(column: Any) -> Callable[[Any], Any] | None:
    """A function giving a primary-key value the Python type the column loads it as.

    A session may write ``Document(id='1234ABCD-...')`` or ``User(id='7')`` and read the
    row back as a :class:`uuid.UUID` or an ``int``; both must name one token. ``None``
    when the column's type does not say (then values are taken as they are).
    """
    kind = column.type
    if isinstance(kind, Uuid):
        return _to_uuid  # also for as_uuid=False, whose text may be in any case or form
    if isinstance(kind, Enum):
        # The text the database stores, whether the value is given as a member or as it.
        stored = getattr(kind, "_valid_lookup", None)
        if isinstance(stored, dict):
            return lambda value: stored.get(value, value) if _hashable(value) else value
        return None
    if isinstance(kind, (CHAR, NCHAR)):
        return _unpadded  # a fixed-width column compares (and PostgreSQL returns) padded
    try:
        python_type = column.type.python_type
    except (NotImplementedError, AttributeError):
        return None
    if python_type is uuid.UUID:
        return _to_uuid
    if python_type is int:
        return _to_int
    if python_type is decimal.Decimal:
        return _to_decimal
    if python_type is datetime.date:
        return _to_date
    return None


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _unpadded(value: Any) -> Any:
    return value.rstrip(" ") if isinstance(value, str) else value


def _to_uuid(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            return value
    if isinstance(value, bytes) and len(value) == 16:
        return uuid.UUID(bytes=value)
    return value


def _to_int(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    if isinstance(value, (decimal.Decimal, float)):
        try:
            integral = int(value)
        except (ValueError, OverflowError):  # NaN, infinity
            return value
        return integral if integral == value else value
    return value


def _to_decimal(value: Any) -> Any:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return decimal.Decimal(repr(value) if isinstance(value, float) else value)
        except decimal.InvalidOperation:
            return value
    return value


def _to_date(value: Any) -> Any:
    return value.date() if isinstance(value, datetime.datetime) else value


def _format(table_part: str, encoded_key: Sequence[str]) -> str:
    return f"{_PREFIX}{table_part}{ROW_SEPARATOR}{','.join(encoded_key)}"


def table_identifier(table: str | FromClause) -> str:
    """The identifier of a table's token, e.g. ``table_identifier('users') == 'alkey:users#*'``.

    Accepts a table name (``'schema.table'`` when qualified) or a :class:`~sqlalchemy.schema.Table`.
    """
    return f"{_PREFIX}{encode_table(table)}{ROW_SEPARATOR}{ALL_ROWS}"


def row_identifier(table: str | FromClause, *key: Any, identity_token: Any = None) -> str:
    """The identifier of one row's token, e.g. ``row_identifier('users', 1) == 'alkey:users#1'``.

    Pass every primary-key value, in the order of the table's primary-key columns, for a
    composite key, and the ``identity_token`` of a row loaded from a shard (horizontal
    sharding), which rows of other shards with the same key must not share. Use this
    instead of formatting strings by hand whenever a table name or key value may contain
    characters that need escaping.
    """
    part = encode_table(table)
    if not key:
        raise ValueError(f"row_identifier({table!r}) needs the row's primary-key value(s)")
    if isinstance(table, Table):
        # Typed as the columns load them, as for a mapped class's rows.
        coercers = [_coercer(column) for column in table.primary_key.columns]
        if len(coercers) == len(key):
            key = tuple(
                value if coerce is None else coerce(value)
                for coerce, value in zip(coercers, key, strict=True)
            )
    if all(value is None for value in key):
        raise ValueError(
            f"row_identifier({table!r}, ...): every primary-key value is None, which names "
            "no row; for an instance not flushed yet, use its table identifier "
            "(alkey.identity.table_identifier) to stand for it"
        )
    return _format(part, [_encode_value(value) for value in key]) + _token_suffix(identity_token)


def row_identifiers(table: Table, key: Sequence[Any]) -> list[str]:
    """Every identifier a write of ``table``'s row with primary key ``key`` must bump: its
    own, and the one a reader may load if the database changes the value as it stores it
    (an aware datetime in a column without time zone; see ``_spellings()``)."""
    identifiers = [row_identifier(table, *key)]
    columns = list(table.primary_key.columns)
    wall = [
        value.replace(tzinfo=None)
        if isinstance(value, datetime.datetime)
        and value.utcoffset() is not None
        and isinstance(column.type, DateTime)
        and not column.type.timezone
        else value
        for column, value in zip(columns, key, strict=False)
    ]
    if len(columns) == len(key) and wall != list(key):
        identifiers.append(row_identifier(table, *wall))
    return identifiers


def _token_suffix(token: Any) -> str:
    """``'@<token>'`` for a row of the shard ``token`` names, else nothing."""
    return "" if token is None else TOKEN_SEPARATOR + _quote_name(str(token))


def is_identifier(value: object) -> bool:
    """True when ``value`` is a string in the alkey namespace (valid or not).

    Such strings are always treated as identifiers, never as plain values, so that a typo
    raises instead of silently producing a key that never invalidates.
    """
    return isinstance(value, str) and value.startswith(_PREFIX)


def parse_identifier(text: str) -> Identifier:
    """Parse and validate an identifier; raise :class:`ValueError` naming the problem."""
    if text == GLOBAL_WRITE_TOKEN:
        return Identifier(None, None)
    match = _IDENTIFIER_RE.fullmatch(text)
    problem = None
    if match is None:
        problem = (
            "it must look like 'alkey:table#id', 'alkey:table#id@shard', 'alkey:table#*' "
            "or 'alkey:*#*'"
        )
    else:
        try:
            *schema, table = [_unquote(part) for part in match["table"].split(".")]
            row = match["row"]
            key = (
                None
                if row == ALL_ROWS
                else tuple(None if v == NULL_VALUE else _unquote(v) for v in row.split(","))
            )
            token = match["token"]
            if token is not None and key is None:
                raise ValueError("a table has no identity token")
            parsed = Identifier(
                table,
                key,
                schema[0] if schema else None,
                None if token is None else _unquote(token),
            )
        except UnicodeDecodeError:
            problem = "its %XX escapes are not UTF-8"
        except ValueError as error:
            problem = str(error)
        else:
            canonical = str(parsed)
            if canonical == text:
                return parsed
            problem = f"its canonical spelling is {canonical!r}"
    raise ValueError(
        f"{text!r} is not a valid alkey identifier: {problem}. Build identifiers with "
        "alkey.identity.row_identifier() / table_identifier() to get the escaping right."
    )


#: A ``schema_translate_map``, frozen: its ``(schema, translated)`` pairs, sorted. Rows
#: read or written through one live in other tables than the mapped ones (one schema per
#: tenant), so their identifiers name the translated tables.
SchemaMap: TypeAlias = tuple[tuple[str | None, str | None], ...]

_SCHEMAS_ATTRIBUTE: Final = "_alkey_schemas"


def freeze_schema_map(mapping: Mapping[Any, Any] | None) -> SchemaMap | None:
    """A ``schema_translate_map`` as a :data:`SchemaMap`; ``None`` when it changes nothing."""
    if not mapping:
        return None
    # SQLAlchemy keeps the default schema's entry under None and under '_none'.
    pairs = {
        (None if schema == "_none" else schema, target)
        for schema, target in mapping.items()
        if (None if schema == "_none" else schema) != target
    }
    if not pairs:
        return None
    return tuple(sorted(pairs, key=lambda pair: "" if pair[0] is None else "~" + pair[0]))


def translated(schema: str | None, schemas: SchemaMap | None) -> str | None:
    """The schema that ``schema`` is translated to under ``schemas``."""
    if schemas is not None:
        for original, target in schemas:
            if original == schema:
                return target
    return schema


def record_schemas(state: InstanceState[Any], schemas: SchemaMap | None) -> None:
    """Remember the schema map an instance was loaded or written with.

    Kept on the state itself (its ``__dict__``, never the instance's): the key generator
    reads it on its hot path, and it dies with the state.
    """
    if schemas is None:
        state.__dict__.pop(_SCHEMAS_ATTRIBUTE, None)
    else:
        state.__dict__[_SCHEMAS_ATTRIBUTE] = schemas


def schemas_of(state: InstanceState[Any]) -> SchemaMap | None:
    """The schema map recorded by :func:`record_schemas`, if any."""
    schemas: SchemaMap | None = state.__dict__.get(_SCHEMAS_ATTRIBUTE)
    return schemas


def _part(table: Any, schemas: SchemaMap | None) -> str:
    if schemas is None:
        return encode_table(table)
    return table_part(translated(table.schema, schemas), table.name)


def mapped_part(mapper: Mapper[Any], schemas: SchemaMap | None = None) -> str:
    """The encoded table part that names ``mapper``'s rows: its table's, translated by
    ``schemas``.

    A mapper over a join or a select has no table of its own: its rows are named after
    the tables it reads, as ``(a+b)`` quoted, which no table of its own can be mistaken
    for, and the keys that name them depend on each of those tables' tokens, so that a
    write to any of them changes them however it names rows.
    """
    table = mapper.local_table
    if isinstance(table, Table):
        return _part(table, schemas)
    parts = sorted({_part(member, schemas) for member in mapper.tables})
    return _quote_name("(" + "+".join(parts) + ")")


def maps_view(mapper: Mapper[Any]) -> bool:
    """Whether ``mapper`` maps a join or a select rather than a table."""
    return not isinstance(mapper.local_table, Table)


def view_writes(mapper: Mapper[Any], schemas: SchemaMap | None = None) -> set[str]:
    """What a write through ``mapper``, or an invalidation of it, changes besides its own
    rows when it or a subclass maps a join or a select: every row of every table it reads
    (its key need not be theirs), translated by ``schemas``. Empty for table mappers."""
    parts = {
        _part(table, schemas)
        for member in mapper.self_and_descendants
        if maps_view(member)
        for table in member.tables
    }
    if not parts:
        return set()
    identifiers = table_write_identifiers(sorted(parts))
    if schemas is not None:
        # A tenant's write changes the mapped table's key too (see _write_plan).
        identifiers.update(
            table_identifier(table)
            for member in mapper.self_and_descendants
            if maps_view(member)
            for table in member.tables
        )
    return identifiers


# Mappers live as long as their classes, normally the whole process: a plain dict is the
# fastest cache for this hot path.
_row_prefixes: dict[Mapper[Any], str] = {}
_translated_prefixes: dict[tuple[Mapper[Any], SchemaMap], str] = {}


def _row_prefix(mapper: Mapper[Any], schemas: SchemaMap | None = None) -> str:
    """``'alkey:<table>#'`` for the table that maps ``mapper``'s class (translated by
    ``schemas``), computed once."""
    if schemas is None:
        prefix = _row_prefixes.get(mapper)
        if prefix is None:
            part = mapped_part(mapper)
            prefix = _row_prefixes[mapper] = f"{_PREFIX}{part}{ROW_SEPARATOR}"
        return prefix
    prefix = _translated_prefixes.get((mapper, schemas))
    if prefix is None:
        _learn(mapper, schemas=schemas)
        part = mapped_part(mapper, schemas)
        prefix = _translated_prefixes[(mapper, schemas)] = f"{_PREFIX}{part}{ROW_SEPARATOR}"
    return prefix


def _learn(
    mapper: Mapper[Any], class_: type | None = None, *, schemas: SchemaMap | None = None
) -> None:
    """Record what a mapper's inheritance means for invalidation (``mapper_configured``,
    and for each schema map its rows are first seen with).

    A row of a joined-table subclass lives in every table of its hierarchy, so its keys
    depend on each of their unknown-rows tokens, and a write to a base table that does not
    name its rows changes the subclasses' table keys too. A table seen translated is a
    tenant's copy of the mapped one: a write to it changes the mapped table's key too,
    which stands for the table in every schema. An instance or the class of a mapper over
    a join or a select depends on the table token of every table it reads: its key does
    not follow any one table's, so only those tokens, which every write to a table bumps,
    are sure to change with its data.
    """
    with _learn_lock:  # a read-modify-write of shared maps: one learner at a time
        _learn_locked(mapper, schemas)


_learn_lock = threading.Lock()


def _learn_locked(mapper: Mapper[Any], schemas: SchemaMap | None) -> None:
    global _view_prefixes
    own = mapped_part(mapper, schemas)
    parts = sorted({_part(table, schemas) for table in mapper.tables})
    prefix = f"{_PREFIX}{own}{ROW_SEPARATOR}"
    if maps_view(mapper):
        # Every write to a table bumps its table token; a select of no table (textual
        # SQL) could read any, so the token every write bumps.
        reads = [f"{_PREFIX}{part}{ROW_SEPARATOR}{ALL_ROWS}" for part in parts]
        _unknown_rows_of_prefix[prefix] = (prefix + UNKNOWN_ROWS, *(reads or [GLOBAL_WRITE_TOKEN]))
        _view_prefixes = _view_prefixes | {prefix}
        _view_parts[own] = tuple(parts)
    else:
        _unknown_rows_of_prefix[prefix] = tuple(
            f"{_PREFIX}{part}{ROW_SEPARATOR}{UNKNOWN_ROWS}" for part in parts
        )
    for part in parts:
        # Replaced, never changed in place: other threads iterate these without a lock.
        _family_tables[part] = _family_tables.get(part, frozenset()) | {own}
    if schemas is not None:
        note_schema_map(schemas)


#: The row part of a table's unknown-rows token. A write that reaches a table without
#: saying which rows (a bulk UPDATE without RETURNING, raw SQL) bumps ``alkey:users#?``;
#: every key that names a row of ``users`` also depends on it, fetched in the same round
#: trip. These tokens are internal: identifiers that users pass never end in ``#?``.
UNKNOWN_ROWS: Final = constants.UNKNOWN_ROWS

#: Bumped by a write whose tables are unknown (raw SQL that cannot be parsed, a stored
#: procedure); every key that names any token also depends on it.
UNKNOWN_WRITES: Final = constants.UNKNOWN_WRITES

_unknown_rows_of_prefix: dict[str, tuple[str, ...]] = {}
# Row prefixes of mappers over a join or a select, whose table identifiers (the class in
# a key) have dependencies too (replaced, never changed in place).
_view_prefixes: frozenset[str] = frozenset()
# The encoded part of each mapper over a join or a select -> the tables it reads.
_view_parts: dict[str, tuple[str, ...]] = {}
# Table part -> the own tables of every mapper whose row lives (partly) in that table.
_family_tables: dict[str, frozenset[str]] = {}
# The schema maps seen so far in this process (replaced, never changed in place).
_schema_maps: frozenset[SchemaMap] = frozenset()


def note_schema_map(schemas: SchemaMap | None) -> None:
    """Remember a schema translate map met on a load, a write or a connection, so that
    raw SQL naming the tables it makes is known for a tenant's copy of mapped tables."""
    global _schema_maps
    if schemas is not None and schemas not in _schema_maps:
        _schema_maps = _schema_maps | {schemas}


def translations_of(part: str) -> frozenset[tuple[str, SchemaMap]]:
    """The tables that the encoded table ``part`` is a translated copy of, under each
    schema map seen so far, with that map (``'tenant_a.items'`` -> ``{('items',
    ((None, 'tenant_a'),))}``): a write to the copy is a write to the original in that
    tenant. Worked out from the maps, whatever rows of it this process has seen."""
    schema, dot, name = part.rpartition(".")
    if not dot:
        return frozenset()
    target = _unquote(schema)
    return frozenset(
        (table_part(original, _unquote(name)), schemas)
        for schemas in _schema_maps
        for original, translated_to in schemas
        if translated_to == target
    )


def translate_identifiers(identifiers: Iterable[str], schemas: SchemaMap | None) -> set[str]:
    """``identifiers`` of mapped tables, named in the tenant's tables ``schemas`` makes.

    Rows and unknown-rows tokens move to the translated table; a table token is kept too,
    since a class or ``Table`` in a key stands for the table in every schema.
    """
    if schemas is None:
        return set(identifiers)
    result: set[str] = set()
    for identifier in identifiers:
        prefix, _, row = identifier.rpartition(ROW_SEPARATOR)
        part = prefix.removeprefix(_PREFIX)
        if part == ALL_ROWS:  # the global and unknown-writes tokens
            result.add(identifier)
            continue
        *schema, name = [_unquote(piece) for piece in part.split(".")]
        original = schema[0] if schema else None
        target = translated(original, schemas)
        if target == original or row == ALL_ROWS:
            result.add(identifier)
        if target != original:
            result.add(f"{_PREFIX}{table_part(target, name)}{ROW_SEPARATOR}{row}")
    return result


def family_identifiers(identifier: str) -> set[str]:
    """``identifier`` and the same row or table in the tables of subclasses whose rows
    live partly in its table, e.g. ``alkey:employees#3`` -> also ``alkey:managers#3``."""
    prefix, _, row = identifier.rpartition(ROW_SEPARATOR)
    part = prefix.removeprefix(_PREFIX)
    configure_mappers()
    members = _family_tables.get(part, ())
    return {identifier, *(f"{_PREFIX}{member}{ROW_SEPARATOR}{row}" for member in members)}


def dependencies(identifiers: Iterable[str]) -> list[str]:
    """The other tokens that a key naming ``identifiers`` also depends on, sorted.

    A row depends on its table's (and, for an instance of a joined-table subclass, on
    every table of its hierarchy's) unknown-rows token, and a row of a shard
    (``alkey:items#1@east``) on the same row without its shard. Tables and the global
    token need none: every write to a table bumps its table token.
    """
    identifiers = list(identifiers)
    prefixes = {i[: i.rindex(ROW_SEPARATOR) + 1] for i in identifiers if i[-1] != ALL_ROWS}
    if _view_prefixes:
        # The class of a mapper over a join or a select: it reads its tables.
        prefixes.update(
            i[:-1] for i in identifiers if i[-1] == ALL_ROWS and i[:-1] in _view_prefixes
        )
    # A row of a shard also depends on the row without its shard: the token that writes
    # bump when they name the row but cannot know its shard (Core and raw SQL).
    unsharded = {i[: i.rindex(TOKEN_SEPARATOR)] for i in identifiers if TOKEN_SEPARATOR in i}
    if not prefixes.issubset(_unknown_rows_of_prefix):
        # An identifier string of a table whose mapper may not be configured yet: do it
        # now, so that the answer does not depend on what the process did before.
        configure_mappers()
    needs: set[str] = unsharded
    for prefix in prefixes:
        known = _unknown_rows_of_prefix.get(prefix)
        needs.update(known if known is not None else (prefix + UNKNOWN_ROWS,))
    return sorted(needs)


def instance_identifier(state: InstanceState[Any]) -> str:
    """The identifier of a model instance, given its state (the key generator's hot path).

    An instance loaded or written through a ``schema_translate_map`` names its tenant's
    table, and one loaded from a shard carries the shard's identity token, so that two
    tenants' rows with the same primary key never share a token.
    """
    schemas = state.__dict__.get(_SCHEMAS_ATTRIBUTE)
    prefix = _row_prefix(state.mapper, schemas)
    key = state.key
    if key is None:
        # Pending or transient: no row yet, so it stands for its table (as in alkey 0.3).
        return prefix + ALL_ROWS
    row = prefix + _encode_key(state.mapper, key[1])
    return row if key[2] is None else row + _token_suffix(key[2])


def instance_identifiers(states: Iterable[InstanceState[Any]]) -> list[str]:
    """:func:`instance_identifier` of each state: the same answers, from one loop whose
    common case -- a row of one table, keyed by one integer, without a tenant or a shard
    -- costs no call, because a key may name a thousand instances."""
    identifiers: list[str] = []
    append = identifiers.append
    seen: Mapper[Any] | None = None
    prefix = ""
    for state in states:
        key = state.key
        if key is None or key[2] is not None or _SCHEMAS_ATTRIBUTE in state.__dict__:
            append(instance_identifier(state))
            continue
        mapper = state.mapper
        if mapper is not seen:
            prefix, seen = _row_prefix(mapper), mapper
        values = key[1]
        if len(values) == 1 and type(values[0]) is int:
            append(prefix + str(values[0]))
        else:
            append(prefix + _encode_key(mapper, values))
    return identifiers


def learn_dependencies(identifier: str) -> None:
    """Configure the mappers before a key names ``identifier`` of a mapper over a join or
    a select (see :func:`mapper_identifier`), given as a string."""
    if identifier.startswith(_VIEW_START):
        configure_mappers()


def mapper_identifier(mapper: Mapper[Any]) -> str:
    """The identifier a mapped class stands for in a key: its table's token (for a mapper
    over a join or a select, see :func:`mapped_part`)."""
    if not mapper.configured and maps_view(mapper):
        # A class is a key's argument before any of its instances exists (the mappers
        # configure then): the dependencies of one over a join or a select are learnt
        # as it configures, and a key built without them would never change.
        configure_mappers()
    return _row_prefix(mapper) + ALL_ROWS


def identifier_for(obj: object) -> str:
    """The identifier that ``obj`` stands for in a cache key.

    * a persistent model instance: its row (``alkey:users#1``), identified by the mapper's
      identity and the table that maps its class (for joined-table inheritance, the
      subclass's own table);
    * an instance without a primary key yet, a mapped class or a
      :class:`~sqlalchemy.schema.Table`: the table;
    * an identifier string: itself, once validated.

    Raises :class:`TypeError` for anything else, so callers can tell values from tokens.
    """
    if isinstance(obj, str):
        if is_identifier(obj):
            parse_identifier(obj)
            learn_dependencies(obj)
            return obj
        raise TypeError(f"{obj!r} is not an alkey identifier")
    if isinstance(obj, Table):
        return table_identifier(obj)
    insp = inspect(obj, raiseerr=False)
    if isinstance(insp, InstanceState):
        return instance_identifier(insp)
    if isinstance(insp, Mapper):
        return mapper_identifier(insp)
    raise TypeError(f"{type(obj).__qualname__} is neither a mapped class, an instance nor a table")


@dataclass(frozen=True, slots=True)
class _WritePlan:
    """What a write of one mapper's instances touches, worked out once per mapper."""

    key_attributes: tuple[str, ...]
    row_prefixes: tuple[str, ...]
    table_identifiers: frozenset[str]


_write_plans: dict[tuple[Mapper[Any], SchemaMap | None], _WritePlan] = {}


def _write_plan(mapper: Mapper[Any], schemas: SchemaMap | None) -> _WritePlan:
    plan = _write_plans.get((mapper, schemas))
    if plan is None:
        if schemas is not None:
            _row_prefix(mapper, schemas)  # learns the translated tables
        parts = sorted({_part(table, schemas) for table in mapper.tables})
        tables = {f"{_PREFIX}{part}{ROW_SEPARATOR}{ALL_ROWS}" for part in parts}
        prefixes = [f"{_PREFIX}{part}{ROW_SEPARATOR}" for part in parts]
        if maps_view(mapper):
            # A mapper over a join or a select: its key need not be any table's, so its
            # tables' rows are not named by it -- every row of each changes -- and its
            # own rows are.
            tables.update(view_writes(mapper, schemas))
            own = _row_prefix(mapper, schemas)
            tables.add(own + ALL_ROWS)
            prefixes = [own]
        if schemas is not None:
            # A tenant's write changes the mapped table's key too: a class or Table in a
            # key stands for the table in every schema.
            tables.update(table_identifier(table) for table in mapper.tables)
        plan = _write_plans[(mapper, schemas)] = _WritePlan(
            key_attributes=tuple(
                mapper.get_property_by_column(column).key for column in mapper.primary_key
            ),
            row_prefixes=tuple(prefixes),
            table_identifiers=frozenset(tables),
        )
    return plan


def _encode_key(mapper: Mapper[Any], values: Sequence[Any]) -> str:
    """The row part of an identifier for the primary-key ``values`` of ``mapper``'s row,
    each first given the type its column loads it as."""
    if len(values) == 1 and type(values[0]) is int:
        return str(values[0])
    coercers = _key_coercers.get(mapper)
    if coercers is None:
        coercers = _key_coercers[mapper] = tuple(_coercer(c) for c in mapper.primary_key)
    if len(coercers) != len(values):  # pragma: no cover - SQLAlchemy's identities match
        coercers = (None,) * len(values)
    return ",".join(
        [
            _encode_value(value if coerce is None else coerce(value))
            for coerce, value in zip(coercers, values, strict=True)
        ]
    )


_key_coercers: dict[Mapper[Any], tuple[Callable[[Any], Any] | None, ...]] = {}


def _spellings(mapper: Mapper[Any], values: Sequence[Any]) -> list[str]:
    """Every row part a write of the row with key ``values`` must bump: its own, and the
    one a reader may load when the database changes the value as it stores it.

    That is an aware datetime in a column without time zone: PostgreSQL stores the
    instant in the session's time zone (UTC: alkey's own spelling), SQLite the wall time,
    dropping the offset. Both are bumped; the first spelling is the instance's own.
    """
    spellings = [_encode_key(mapper, values)]
    positions = _naive_datetimes.get(mapper)
    if positions is None:
        positions = _naive_datetimes[mapper] = tuple(
            index
            for index, column in enumerate(mapper.primary_key)
            if isinstance(column.type, DateTime) and not column.type.timezone
        )
    if positions and len(values) == len(mapper.primary_key):
        wall = list(values)
        for index in positions:
            value = values[index]
            if isinstance(value, datetime.datetime) and value.utcoffset() is not None:
                wall[index] = value.replace(tzinfo=None)
        if wall != list(values):
            spellings.append(_encode_key(mapper, wall))
    return spellings


_naive_datetimes: dict[Mapper[Any], tuple[int, ...]] = {}


def _family_prefixes(mapper: Mapper[Any], schemas: SchemaMap | None) -> tuple[str, ...]:
    """Row prefixes of every table of ``mapper`` and of all its subclasses' mappers; of a
    mapper over a join or a select, its own: its key need not be its tables' (a write
    through it is also a write of its tables' rows unknown, which its caller adds)."""
    if schemas is not None:
        for member in mapper.self_and_descendants:
            _row_prefix(member, schemas)  # learns the translated tables
    prefixes = set()
    for member in mapper.self_and_descendants:
        if maps_view(member):
            prefixes.add(_row_prefix(member, schemas))
        else:
            prefixes.update(f"{_PREFIX}{_part(t, schemas)}{ROW_SEPARATOR}" for t in member.tables)
    return tuple(sorted(prefixes))


def bulk_identifiers(
    mapper: Mapper[Any],
    keys: Iterable[Sequence[Any]] | None,
    *,
    schemas: SchemaMap | None = None,
    identity_token: Any = None,
) -> set[str]:
    """What a bulk statement against ``mapper`` invalidates.

    ``keys`` are the primary keys of the rows it wrote, when known (``RETURNING``, or
    given in the parameters); ``None`` when not, and then the unknown-rows token of every
    table the statement can reach -- including the tables of subclasses, whose rows the
    base table's rows are -- changes every row key of those tables. ``schemas`` is the
    statement's schema translate map, ``identity_token`` the shard of the rows, if known.
    """
    prefixes = _family_prefixes(mapper, schemas)
    identifiers = {GLOBAL_WRITE_TOKEN, *(prefix + ALL_ROWS for prefix in prefixes)}
    if schemas is not None:
        identifiers.update(
            table_identifier(t) for m in mapper.self_and_descendants for t in m.tables
        )
    if keys is None:
        identifiers.update(prefix + UNKNOWN_ROWS for prefix in prefixes)
    else:
        suffix = _token_suffix(identity_token)
        for key in keys:
            for row in _spellings(mapper, key):
                identifiers.update(prefix + row + suffix for prefix in prefixes)
    return identifiers


def table_write_identifiers(table_parts: Iterable[str] | None) -> set[str]:
    """What a write to these encoded table parts, rows unknown, invalidates.

    ``None`` means the tables are unknown too: then everything changes.
    """
    if table_parts is None:
        return {GLOBAL_WRITE_TOKEN, UNKNOWN_WRITES}
    identifiers = {GLOBAL_WRITE_TOKEN}
    for part in table_parts:
        prefix = f"{_PREFIX}{part}{ROW_SEPARATOR}"
        identifiers.update((prefix + ALL_ROWS, prefix + UNKNOWN_ROWS))
        # A class mapped to a join or a select (its identifier, given as a string):
        # every row of the tables it reads.
        for read in _view_parts.get(part, ()):
            identifiers.update(
                (
                    f"{_PREFIX}{read}{ROW_SEPARATOR}{ALL_ROWS}",
                    f"{_PREFIX}{read}{ROW_SEPARATOR}{UNKNOWN_ROWS}",
                )
            )
        # Subclasses whose rows live partly in this table: their tables changed too.
        for member in _family_tables.get(part, ()):
            identifiers.add(f"{_PREFIX}{member}{ROW_SEPARATOR}{ALL_ROWS}")
        # A tenant's copy of a mapped table: the mapped table's key changes too.
        for original, _ in translations_of(part):
            identifiers.add(f"{_PREFIX}{original}{ROW_SEPARATOR}{ALL_ROWS}")
    return identifiers


def table_part(schema: str | None, name: str) -> str:
    """The encoded table part of an identifier for ``schema.name`` (``name`` alone if no
    schema), for callers that know a table only by its name, such as parsed SQL."""
    return f"{_quote_name(schema)}.{_quote_name(name)}" if schema else _quote_name(name)


def write_identifiers(states: Iterable[InstanceState[Any]]) -> set[str]:
    """Every identifier that writing these instances invalidates (see :func:`writes_of`),
    as a set of strings of the caller's own."""
    return set(writes_of(states).identifiers())


def writes_of(states: Iterable[InstanceState[Any]]) -> Written:
    """Every identifier that writing these instances invalidates, held compactly (a flush
    keeps them until its transaction ends, see :mod:`alkey.written`).

    For each instance: its row in each table of its inheritance hierarchy (a joined-table
    subclass row lives in several tables) under its old and, when the key changed or was
    just assigned by an INSERT, its new primary key; each of those tables. And the global
    token, once any instance was written.
    """
    named: set[str] = set()  # identifiers spelled out: tables, and rows of other keys
    add = named.add
    tables: set[frozenset[str]] = set()  # each plan's table identifiers, added at the end
    # Rows of one integer key, per tuple of row prefixes: numbers, not strings.
    numbered: dict[tuple[str, ...], list[int]] = {}
    seen: tuple[Mapper[Any], SchemaMap | None] | None = None
    plan: _WritePlan | None = None
    numbers: list[int] = []
    single: str | None = None  # the key attribute of a plan whose key is one column
    for state in states:
        mapper = state.mapper
        schemas = state.__dict__.get(_SCHEMAS_ATTRIBUTE)
        if seen is None or seen[0] is not mapper or seen[1] is not schemas:
            seen = (mapper, schemas)
            plan = _write_plans.get(seen) or _write_plan(mapper, schemas)
            tables.add(plan.table_identifiers)
            numbers = numbered.setdefault(plan.row_prefixes, [])
            single = plan.key_attributes[0] if len(plan.key_attributes) == 1 else None
        assert plan is not None
        key = state.key
        if single is not None:
            current = state.dict.get(single)
            if key is None:
                # A new row of one integer key (assigned by now, in after_flush), outside
                # any shard: its one spelling is the number.
                if type(current) is int and state.identity_token is None:
                    numbers.append(current)
                    continue
            elif key[2] is None:
                # The commonest write: a row of one integer key, not renamed by the flush
                # (its key attribute holds the same number, or nothing loaded).
                old = key[1][0]
                if type(old) is int and (
                    current is None or (type(current) is int and current == old)
                ):
                    numbers.append(old)
                    continue
        # A new row of a sharded session knows its shard before it has an identity.
        suffix = _token_suffix(key[2] if key is not None else state.identity_token)
        rows = _spellings(mapper, key[1]) if key is not None else []
        current = [state.dict.get(attribute) for attribute in plan.key_attributes]
        # Unset parts of a key the INSERT has not assigned yet: no new row to name (a
        # composite key may have NULL parts, but not all of them).
        if any(value is not None for value in current) and (
            None not in current or state.key is not None
        ):
            rows += _spellings(mapper, current)
        for prefix in plan.row_prefixes:
            for row in rows:
                add(prefix + row + suffix)
    named.update(*tables)
    if named:
        add(GLOBAL_WRITE_TOKEN)
    written = Written(named)
    for prefixes, keys in numbered.items():
        if keys:
            for prefix in prefixes:
                written.add_rows(prefix, keys)
    return written


# Learn every mapper as SQLAlchemy configures it, and those configured before alkey was
# imported, so that keys never depend on what the process happened to do first.
event.listen(Mapper, "mapper_configured", _learn)
for _registry in list(getattr(mapperlib, "_mapper_registries", ())):
    for _mapper in list(getattr(_registry, "mappers", ())):
        if _mapper.configured:
            _learn(_mapper)

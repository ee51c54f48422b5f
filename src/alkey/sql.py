"""Which tables a raw SQL string writes, found with a real SQL parser (sqlglot).

Used for SQL that alkey cannot see as ORM or Core constructs: ``text("UPDATE ...")``,
``exec_driver_sql``. The answer errs on the side of invalidating:

* reads (``SELECT``, ``SHOW``, ``EXPLAIN`` without ``ANALYZE``, ``DESCRIBE``) write nothing;
* ``INSERT`` / ``UPDATE`` / ``DELETE`` / ``MERGE`` -- also inside CTEs (``WITH ... UPDATE``,
  ``WITH d AS (DELETE ... RETURNING ...) SELECT ...``), with ``ON CONFLICT``, in any
  statement of a multi-statement string -- write their target tables;
* DDL (``CREATE``, ``ALTER``, ``DROP``, ``TRUNCATE``) writes the tables it names;
* anything else, or SQL the parser cannot read (``CALL``, ``DO``, ``COPY``, vendor
  commands), writes unknown tables: ``None``, which bumps every key.

An unquoted name is folded to lower case as PostgreSQL does, and also kept as written
(SQLite and MySQL compare names without case); a name without a schema is also taken in
the connection's default schema, and one in the default schema also without it. So the
table a statement reaches is always among those bumped.

Requires ``pip install 'alkey[sql]'``; without sqlglot every raw write counts as unknown.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Final, NamedTuple

from alkey.identity import table_part

__all__ = ["Write", "reads_only", "writes", "written_tables"]

log = logging.getLogger("alkey.sql")

_READ_COMMANDS = frozenset(
    {"SHOW", "DESCRIBE", "DESC", "SET", "RESET", "BEGIN", "START", "COMMIT", "END", "ROLLBACK",
     "SAVEPOINT", "RELEASE", "LISTEN", "UNLISTEN", "NOTIFY", "VACUUM", "ANALYZE", "LOCK",
     "DISCARD", "PRAGMA", "CHECKPOINT", "USE"}
)  # fmt: skip
#: Databases that match table names without regard to case, quoted or not.
_CASELESS = frozenset({"sqlite", "mysql", "mariadb", "mssql"})
_DIALECTS = {"postgresql": "postgres", "sqlite": "sqlite", "mysql": "mysql", "mariadb": "mysql",
             "mssql": "tsql", "oracle": "oracle"}  # fmt: skip

try:
    import sqlglot
    from sqlglot import exp
except ImportError:  # pragma: no cover - exercised only without the extra
    sqlglot = None  # type: ignore[assignment]


_UNKNOWN_COMMANDS = frozenset({"CALL", "DO", "COPY", "EXEC", "EXECUTE", "LOAD"})


class Write(NamedTuple):
    """One table that a statement writes, and how.

    ``parts`` are the encoded table parts it may be (see ``_spellings()``), ``names``
    its name as written and folded, ``qualified`` whether a schema was named. ``kind`` is
    ``insert``, ``update``, ``delete``, ``write`` (may be any of them: ``MERGE``,
    ``INSERT OR REPLACE``) or ``ddl``; ``columns`` the lower-case columns an ``update``
    sets, ``None`` when not known.
    """

    parts: frozenset[str]
    names: frozenset[str]
    qualified: bool
    kind: str
    columns: frozenset[str] | None = None


def written_tables(
    sql: str, dialect: str = "", default_schema: str | None = None
) -> frozenset[str] | None:
    """The encoded table parts (see :func:`alkey.identity.table_part`) that ``sql`` writes.

    An empty set for reads, ``None`` when the written tables cannot be told. Answers are
    cached (applications run the same SQL strings again and again), up to a size.
    """
    found = writes(sql, dialect, default_schema)
    if found is None:
        return None
    return frozenset(part for write in found for part in write.parts)


def writes(
    sql: str, dialect: str = "", default_schema: str | None = None
) -> tuple[Write, ...] | None:
    """Each table that ``sql`` writes, with the kind of write (see :class:`Write`).

    Empty for reads, ``None`` when the written tables cannot be told. Cached like
    :func:`written_tables`.
    """
    if len(sql) > _PARSED_LENGTH:
        return () if _plain_read(sql) else None
    return _writes(sql, dialect, default_schema)


#: Longer statements (bulk literals) are neither parsed nor cached: unless they read,
#: they count as writing unknown tables.
_PARSED_LENGTH: Final = 16_384


def reads_only(sql: str) -> bool:
    """Whether ``sql`` is a single plain read, which writes nothing: no parsing needed,
    and the answer cached. The question asked of every statement that reaches the cursor,
    so that reading -- what most statements do -- costs next to nothing."""
    if len(sql) > _PARSED_LENGTH:
        return _plain_read(sql)
    return _cached_plain_read(sql)


def _plain_read(sql: str) -> bool:
    """A single SELECT (or a read command): no parsing needed."""
    if ";" in sql.rstrip().rstrip(";"):
        return False  # several statements: each must be looked at
    words = sql.split(None, 1)
    first = words[0].upper() if words else ""
    if first == "EXPLAIN":
        upper = sql.upper()
        return "ANALYZE" not in upper and "ANALYSE" not in upper  # those run the statement
    return first == "SELECT" or first in _READ_COMMANDS


@functools.lru_cache(maxsize=1024)
def _cached_plain_read(sql: str) -> bool:
    return _plain_read(sql)


@functools.lru_cache(maxsize=1024)
def _writes(sql: str, dialect: str, default_schema: str | None) -> tuple[Write, ...] | None:
    if _plain_read(sql):
        return ()
    first = sql.split(None, 1)[0].upper() if sql.strip() else ""
    if first in _UNKNOWN_COMMANDS or sqlglot is None:
        return None
    try:
        statements = sqlglot.parse(sql, read=_DIALECTS.get(dialect))
    except Exception:  # sqlglot raises several error types for unreadable SQL
        return None
    found: list[Write] = []
    caseless = dialect in _CASELESS
    for statement in statements:
        if statement is None:
            continue
        if isinstance(statement, exp.Command):
            if not _is_read_command(statement):
                return None
            continue
        nodes = list(statement.find_all(
            exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter,
            exp.TruncateTable,
        ))  # fmt: skip
        if not nodes and not isinstance(statement, _READ_STATEMENTS):
            return None  # parsed, but as nothing alkey knows to be a read
        for node in nodes:
            targets = _targets(node)
            if targets is None:
                return None
            kind, columns = _kind(node)
            for target in targets:
                found.append(
                    Write(
                        frozenset(_spellings(target, default_schema, caseless)),
                        frozenset(_names(target.this, caseless)),
                        bool(target.args.get("db")),
                        kind,
                        columns,
                    )
                )
    return tuple(found)


def _kind(node: Any) -> tuple[str, frozenset[str] | None]:
    """What a write node does to its target, and which columns an UPDATE sets."""
    if isinstance(node, exp.Update):
        columns: set[str] = set()
        for assignment in node.expressions:
            target = assignment.this if isinstance(assignment, exp.EQ) else None
            if not isinstance(target, exp.Column):
                return "update", None  # SET (a, b) = ...: not worth telling apart
            columns.add(target.name.lower())
        return "update", frozenset(columns)
    if isinstance(node, exp.Insert):
        if node.args.get("alternative") or node.args.get("replace"):
            return "write", None  # INSERT OR REPLACE deletes the row it replaces
        conflict = node.args.get("conflict")
        if conflict is not None and "NOTHING" not in str(conflict.args.get("action") or ""):
            return "update", None
        return "insert", None
    if isinstance(node, (exp.Delete, exp.TruncateTable)):
        return "delete", None
    if isinstance(node, exp.Merge):
        return "write", None
    return "ddl", None


_READ_STATEMENTS: tuple[type, ...] = (
    (exp.Query, exp.Values, exp.Describe, exp.Show, exp.Set, exp.Transaction, exp.Commit,
     exp.Rollback, exp.Use, exp.Pragma, exp.Analyze)
    if sqlglot is not None
    else ()
)  # fmt: skip


def _is_read_command(command: Any) -> bool:
    keyword = str(command.this).upper()
    if keyword == "EXPLAIN":
        # EXPLAIN ANALYZE (or ANALYSE) runs the statement it explains.
        rest = str(command.expression or "").upper()
        return "ANALYZE" not in rest and "ANALYSE" not in rest
    return keyword in _READ_COMMANDS


def _targets(node: Any) -> list[Any] | None:
    if isinstance(node, exp.TruncateTable):
        if str(node.args.get("option") or "").upper() == "CASCADE" or node.args.get("cascade"):
            return None  # also empties every table that references these: unknown
        tables = [t for t in node.expressions if isinstance(t, exp.Table)]
        return tables or None
    joined = node.this.args.get("joins") if isinstance(node.this, exp.Table) else None
    if isinstance(node, (exp.Update, exp.Delete)) and (
        joined or node.args.get("joins") or node.args.get("tables")
    ):
        return None  # MySQL's multi-table UPDATE/DELETE may write any table it joins
    if isinstance(node, exp.Drop) and node.args.get("tables"):
        return [t for t in node.args["tables"] if isinstance(t, exp.Table)]
    target = node.this
    if isinstance(target, exp.Schema):
        target = target.this
    if isinstance(node, (exp.Create, exp.Drop)) and not isinstance(target, exp.Table):
        return []  # CREATE INDEX / DROP FUNCTION ...: no table's rows change
    if target is None and isinstance(node, (exp.Update, exp.Delete, exp.Insert)):
        return []  # the WHEN MATCHED branch of a MERGE: its target is the MERGE's
    if not isinstance(target, exp.Table) or not target.name:
        return None
    return [target]


def _spellings(table: Any, default_schema: str | None, caseless: bool) -> set[str]:
    names = _names(table.this, caseless)
    db = table.args.get("db")
    schemas: set[str | None] = set(_names(db, caseless)) if db else {None}
    if default_schema is not None:
        if None in schemas:
            schemas.add(default_schema)
        if default_schema in schemas:
            schemas.add(None)
    return {table_part(schema, name) for name in names for schema in schemas}


def _names(identifier: Any, caseless: bool = False) -> set[str]:
    """An identifier as written, and folded to lower case unless it was quoted on a
    database that tells quoted names apart by case."""
    text = str(identifier.name if hasattr(identifier, "name") else identifier)
    if getattr(identifier, "quoted", False) and not caseless:
        return {text}
    return {text, text.lower()}

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
from typing import Any, Final

from alkey.identity import table_part

__all__ = ["written_tables"]

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


def written_tables(
    sql: str, dialect: str = "", default_schema: str | None = None
) -> frozenset[str] | None:
    """The encoded table parts (see :func:`alkey.identity.table_part`) that ``sql`` writes.

    An empty set for reads, ``None`` when the written tables cannot be told. Answers are
    cached (applications run the same SQL strings again and again), up to a size.
    """
    if len(sql) > _PARSED_LENGTH:
        return frozenset() if _plain_read(sql) else None
    return _written_tables(sql, dialect, default_schema)


#: Longer statements (bulk literals) are neither parsed nor cached: unless they read,
#: they count as writing unknown tables.
_PARSED_LENGTH: Final = 16_384


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
def _written_tables(sql: str, dialect: str, default_schema: str | None) -> frozenset[str] | None:
    if _plain_read(sql):
        return frozenset()
    first = sql.split(None, 1)[0].upper() if sql.strip() else ""
    if first in _UNKNOWN_COMMANDS or sqlglot is None:
        return None
    try:
        statements = sqlglot.parse(sql, read=_DIALECTS.get(dialect))
    except Exception:  # sqlglot raises several error types for unreadable SQL
        return None
    tables: set[str] = set()
    for statement in statements:
        if statement is None:
            continue
        if isinstance(statement, exp.Command):
            if not _is_read_command(statement):
                return None
            continue
        writes = list(statement.find_all(
            exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter,
            exp.TruncateTable,
        ))  # fmt: skip
        if not writes and not isinstance(statement, _READ_STATEMENTS):
            return None  # parsed, but as nothing alkey knows to be a read
        for node in writes:
            targets = _targets(node)
            if targets is None:
                return None
            for target in targets:
                tables.update(_spellings(target, default_schema, dialect in _CASELESS))
    return frozenset(tables)


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

"""Writes from outside the application, without replication privileges: a trigger outbox.

Why: :mod:`alkey.cdc` reads PostgreSQL's logical decoding, which needs
``wal_level = logical`` and a role with ``REPLICATION`` -- not every database grants
them (some managed plans, a shared server, an ``ALTER SYSTEM`` nobody may run).
Triggers need neither: each table gets one that, *in the writing transaction itself*,
records the keys of the rows it writes in an outbox table, and notifies a channel. An
:class:`OutboxListener` drains the outbox and bumps the same tokens
:class:`alkey.cdc.ChangeListener` would::

    outbox = OutboxListener("postgresql+psycopg://owner@db/app", metadata=Base.metadata)
    outbox.install()  # once: the outbox table, the trigger function, a trigger per table
    outbox.run()  # drains and bumps; until stopped

(or ``alkey install-triggers postgresql://...`` and ``alkey listen --outbox ...``).

Nothing is lost: an outbox row is written by the transaction whose write it records (a
rolled-back write leaves none), and the listener deletes a batch in a transaction that
commits only after its bump reached Redis -- a listener that dies or a Redis outage
leaves the rows for the next drain. While no listener runs the outbox only grows; it
costs a row per written row until drained.

What it costs instead: an extra insert per written row, in the writer's transaction (the
logical decoding listener costs the writers nothing); ``install()`` must run again for a
table created later. Identifiers are those of :class:`alkey.cdc.Naming`: the keys are
recorded as text, with their PostgreSQL types read from the catalog when drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Engine, MetaData, text

from alkey.cdc import (
    Column,
    Naming,
    Relation,
    _arun,
    _bump_taken,
    _checked_store,
    _engine,
    _report,
    _round,
)
from alkey.constants import GLOBAL_WRITE_TOKEN
from alkey.tokens import TokenStore

__all__ = ["CHANNEL", "OUTBOX", "OutboxListener"]

log = logging.getLogger("alkey.outbox")

#: The outbox table (in the database's default schema).
OUTBOX = "alkey_outbox"
#: The channel the triggers ``NOTIFY`` on.
CHANNEL = "alkey_outbox"
#: The trigger function, and each table's triggers.
_FUNCTION = "alkey_outbox_capture"
_TRIGGER = "alkey_outbox"
_TRUNCATE_TRIGGER = "alkey_outbox_truncate"


def _install_statements(schema: str) -> tuple[str, ...]:
    """The outbox table and the trigger function, in ``schema`` (quoted).

    The function runs with its owner's rights (``SECURITY DEFINER``) and a fixed
    ``search_path``: a writer needs no privilege on the outbox, and no ``search_path``
    of a writer's can send its rows elsewhere. It also fixes how it prints key values,
    which would otherwise follow the writer's session: ``extra_float_digits`` (at 0 or
    less a ``float8`` key prints rounded, naming another row) and ``bytea_output``."""
    outbox = f"{schema}.{OUTBOX}"
    return (
        f"""
CREATE TABLE IF NOT EXISTS {outbox} (
    id bigserial PRIMARY KEY,
    table_oid oid NOT NULL,
    key text[]
)""",
        f"""
CREATE OR REPLACE FUNCTION {schema}.{_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET extra_float_digits = 3
SET bytea_output = hex
AS $$
DECLARE
    old_key text[];
    new_key text[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO {outbox} (table_oid, key) VALUES (TG_RELID, NULL);
    ELSE
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            old_key := ARRAY(SELECT to_jsonb(OLD) ->> name FROM unnest(TG_ARGV) AS name);
            INSERT INTO {outbox} (table_oid, key) VALUES (TG_RELID, old_key);
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            new_key := ARRAY(SELECT to_jsonb(NEW) ->> name FROM unnest(TG_ARGV) AS name);
            -- An update that keeps the key: one row names it.
            IF new_key IS DISTINCT FROM old_key THEN
                INSERT INTO {outbox} (table_oid, key) VALUES (TG_RELID, new_key);
            END IF;
        END IF;
    END IF;
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END
$$""",
    )


class OutboxListener:
    """Drains the trigger outbox and bumps the tokens of the writes it records (see the
    module).

    The arguments are :class:`alkey.cdc.ChangeListener`'s, less the slot and the
    publication: ``database`` (a URL or ``Engine``), ``tokens`` (the default store by
    default), ``metadata`` and ``default_schema`` (how tables are named), ``batch`` (rows
    per drain), ``poll_interval`` (the longest pause when idle: a ``NOTIFY`` ends it
    early, on psycopg 3) and ``retry_interval``.
    """

    def __init__(
        self,
        database: str | Engine,
        *,
        tokens: TokenStore | None = None,
        metadata: MetaData | None = None,
        default_schema: str = "public",
        batch: int = 10_000,
        poll_interval: float = 0.05,
        retry_interval: float = 1.0,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch={batch!r}: a drain takes at least one row")
        self.engine, self._own_engine = _engine(database, "the outbox listener")
        self.tokens = _checked_store(tokens)
        self.naming = Naming(metadata, default_schema)
        self.batch = batch
        self.poll_interval = poll_interval
        self.retry_interval = retry_interval
        self._relations: dict[int, Relation] = {}
        self._failing: str | None = None
        self._waiter: Any = None
        self._wakeups = self.engine.dialect.driver == "psycopg"

    def close(self) -> None:
        """Close the connections this listener made (an ``Engine`` it was given is the
        caller's)."""
        self.close_waiter()
        if self._own_engine:
            self.engine.dispose()

    def __enter__(self) -> OutboxListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- set-up ------------------------------------------------------------------------------

    def install(self, tables: Iterable[str] | None = None) -> list[str]:
        """Create the outbox, its trigger function and each table's triggers (again: it
        replaces them, so it also picks up tables created since); the tables that have
        them. ``tables`` (``"name"`` or ``"schema.name"``): those, else every table with
        a primary key outside PostgreSQL's own schemas."""
        installed = []
        with self._transaction() as connection:
            schema = self._schema(connection)
            for statement in _install_statements(schema):
                connection.exec_driver_sql(statement)
            keyed = connection.execute(
                text(
                    "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), "
                    "n.nspname || '.' || c.relname, "
                    "ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY AS k(num, "
                    "pos) JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.num "
                    "ORDER BY k.pos) "
                    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary "
                    "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
                    "AND c.relpersistence IN ('p', 'u') "
                    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                    "AND n.nspname NOT LIKE 'pg_toast%' AND c.relname <> :outbox "
                    "ORDER BY 2"
                ),
                {"outbox": OUTBOX},
            ).all()
            default = self.naming.default_schema
            wanted = None if tables is None else {_plain(name, default) for name in tables}
            for _, quoted, plain, key in keyed:
                if wanted is not None and plain not in wanted:
                    continue
                arguments = ", ".join(_literal(column) for column in key)
                connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {_TRIGGER} ON {quoted}")
                connection.exec_driver_sql(
                    f"CREATE TRIGGER {_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {quoted} "
                    f"FOR EACH ROW EXECUTE FUNCTION {schema}.{_FUNCTION}({arguments})"
                )
                connection.exec_driver_sql(
                    f"DROP TRIGGER IF EXISTS {_TRUNCATE_TRIGGER} ON {quoted}"
                )
                connection.exec_driver_sql(
                    f"CREATE TRIGGER {_TRUNCATE_TRIGGER} AFTER TRUNCATE ON {quoted} "
                    f"FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{_FUNCTION}()"
                )
                _fire_always(connection, quoted)
                installed.append(plain)
                # A partition emptied on its own fires no trigger of its root's: each
                # partition gets the TRUNCATE trigger (its rows' triggers are cloned).
                for (partition,) in connection.execute(
                    text(
                        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) "
                        "FROM pg_partition_tree(CAST(:root AS regclass)) t "
                        "JOIN pg_class c ON c.oid = t.relid "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.level > 0"
                    ),
                    {"root": quoted},
                ):
                    connection.exec_driver_sql(
                        f"DROP TRIGGER IF EXISTS {_TRUNCATE_TRIGGER} ON {partition}"
                    )
                    connection.exec_driver_sql(
                        f"CREATE TRIGGER {_TRUNCATE_TRIGGER} AFTER TRUNCATE ON {partition} "
                        f"FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{_FUNCTION}()"
                    )
                    _fire_always(connection, partition)
        return installed

    def uninstall(self) -> None:
        """Drop every table's triggers, the function and the outbox (with what it holds:
        drain it first)."""
        with self._transaction() as connection:
            schema = self._schema(connection)
            connection.exec_driver_sql(f"DROP FUNCTION IF EXISTS {schema}.{_FUNCTION}() CASCADE")
            connection.exec_driver_sql(f"DROP TABLE IF EXISTS {schema}.{OUTBOX}")

    # -- draining ----------------------------------------------------------------------------

    def drain(self) -> int:
        """Take up to ``batch`` rows of the outbox, bump the tokens of the writes they
        record, and delete them -- the deletion commits only once the bump reached Redis;
        the number of rows drained (0: the outbox was empty).

        Raises alkey's :class:`~alkey.errors.TokenStoreError` when Redis did not take the
        bump (the rows stay for the next drain), and SQLAlchemy's errors when the database
        did not answer.
        """
        with self._transaction() as connection:
            outbox = f"{self._schema(connection)}.{OUTBOX}"
            rows = connection.execute(
                text(
                    f"DELETE FROM {outbox} WHERE id IN (SELECT id FROM {outbox} ORDER BY id "
                    "LIMIT :batch FOR UPDATE SKIP LOCKED) RETURNING table_oid, key"
                ),
                {"batch": self.batch},
            ).all()
            if not rows:
                return 0
            identifiers: set[str] = {GLOBAL_WRITE_TOKEN}
            for table_oid, key in rows:
                relation = self._relation(connection, int(table_oid))
                if relation is None:
                    continue  # a table dropped since: no row of it can be read any more
                identifiers |= self.naming(relation, None if key is None else list(key))
            _bump_taken(self.tokens, identifiers, "the outbox keeps its rows")
        return len(rows)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A transaction -- even on an engine of the caller's in autocommit, where a
        drain's DELETE would otherwise commit before its bump."""
        with (
            self.engine.connect().execution_options(isolation_level="READ COMMITTED") as connection,
            connection.begin(),
        ):
            yield connection

    def _schema(self, connection: Any) -> str:
        """The outbox's schema, quoted: ``default_schema``."""
        quoted: str = connection.dialect.identifier_preparer.quote(self.naming.default_schema)
        return quoted

    def _relation(self, connection: Any, table_oid: int) -> Relation | None:
        """The table of ``table_oid`` as :class:`~alkey.cdc.Naming` reads it: its key's
        columns, in the key's order, as the trigger recorded them."""
        relation = self._relations.get(table_oid)
        if relation is None:
            # A partition's row is spelled as its partitioned table's, as the application
            # maps that; a domain's value is read as its base type's.
            found = connection.execute(
                text(
                    "SELECT n.nspname, c.relname, ARRAY(SELECT a.attname || ':' || "
                    "(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END)::int "
                    "FROM unnest(i.indkey) WITH ORDINALITY AS k(num, pos) "
                    "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num "
                    "JOIN pg_type t ON t.oid = a.atttypid ORDER BY k.pos) "
                    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary "
                    "WHERE c.oid = coalesce(pg_partition_root(:oid), :oid)"
                ),
                {"oid": table_oid},
            ).first()
            if found is None:
                return None
            schema, name, columns = found
            key = [entry.rpartition(":") for entry in columns or ()]
            relation = Relation(
                schema,
                name,
                tuple(Column(column, True, int(oid)) for column, _, oid in key),
                tuple(column for column, _, _ in key),
            )
            self._relations[table_oid] = relation
        return relation

    def run(self, stop: threading.Event | None = None) -> None:
        """Drain until ``stop`` is set (forever without one): at once while there is more,
        else after a ``NOTIFY`` or ``poll_interval``, every ``retry_interval`` while Redis
        or the database fails (each failure logged once, and its end, on
        ``alkey.outbox``)."""
        stop = stop if stop is not None else threading.Event()
        while not stop.is_set():
            pause = self._round()
            if pause and not stop.is_set():
                self._wait(pause)

    async def arun(self, stop: asyncio.Event | None = None) -> None:
        """:meth:`run` for an asyncio application: each drain runs in a worker thread,
        the pauses on the loop (``poll_interval``; no ``NOTIFY`` wake-up here)."""
        await _arun(self._round, stop)

    def _round(self) -> float:
        """One drain; how long to pause before the next (0: there may be more now)."""
        return _round(self, self.drain, log, "outbox listener")

    def _wait(self, seconds: float) -> None:
        """Pause up to ``seconds``, ending early on the triggers' ``NOTIFY`` when the
        driver is psycopg 3.2 or later (else a plain pause)."""
        if not self._wakeups:
            threading.Event().wait(seconds)
            return
        try:
            waiter = self._waiter
            if waiter is None:
                import psycopg

                waiter = psycopg.connect(**_libpq_options(self.engine.url), autocommit=True)
                self._waiter = waiter
                waiter.execute(f"LISTEN {CHANNEL}")
            for _ in waiter.notifies(timeout=seconds, stop_after=1):
                pass
        except TypeError:  # psycopg before 3.2: notifies() has no timeout
            self._wakeups = False
            self.close_waiter()
            threading.Event().wait(seconds)
        except Exception:  # psycopg missing, the database away: the drains say so
            self._wakeups = False  # and pauses are plain from now on, no reconnecting
            self.close_waiter()
            threading.Event().wait(seconds)

    def close_waiter(self) -> None:
        """Close the connection that waits for ``NOTIFY``, if any."""
        if self._waiter is not None:
            with contextlib.suppress(Exception):
                self._waiter.close()
            self._waiter = None

    def _failed(self, what: str, error: BaseException) -> None:
        _report(self, what, error, log, "outbox listener", "the outbox keeps its rows")


def _fire_always(connection: Any, table: str) -> None:
    """Make ``table``'s outbox triggers fire in every session, also those with
    ``session_replication_role = replica`` -- a logical replication subscription's
    apply worker, a bulk loader that sets it to skip foreign keys -- whose writes
    ordinary triggers do not see. (On a partitioned table, PostgreSQL before 15 does
    not pass this on to the partitions' clones: :meth:`OutboxListener.install` visits
    each partition too.)"""
    for trigger in (_TRIGGER, _TRUNCATE_TRIGGER):
        exists = connection.execute(
            text(
                "SELECT 1 FROM pg_trigger WHERE tgrelid = CAST(:table AS regclass) "
                "AND tgname = :name"
            ),
            {"table": table, "name": trigger},
        ).first()
        if exists:
            connection.exec_driver_sql(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}")


def _plain(name: str, schema: str) -> str:
    return name if "." in name else f"{schema}.{name}"


def _literal(value: str) -> str:
    """``value`` as a SQL string literal (a trigger argument)."""
    return "'" + value.replace("'", "''") + "'"


def _libpq_options(url: Any) -> dict[str, Any]:
    """psycopg's connection options for a SQLAlchemy URL."""
    options: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    options.update({k: v for k, v in url.query.items() if isinstance(v, str)})
    return {k: v for k, v in options.items() if v is not None}

"""Core and raw SQL on an Engine's connections: ``alkey.bind_engine(engine)``.

Writes that never pass through a Session -- ``conn.execute(users.update()...)``,
``conn.execute(text("DELETE ..."))``, ``conn.exec_driver_sql(...)``, DDL -- are recorded
per connection transaction, with the same rules as a session's: a released savepoint
counts, a rolled-back savepoint drops only its own writes, a rollback drops everything,
and the bump happens once the database COMMIT has returned.

SQLAlchemy has no event *after* a connection's COMMIT (``ConnectionEvents.commit`` fires
before it, and bumping then would let a reader cache the old row under the new key), so
``bind_engine`` wraps the engine's ``dialect.do_commit`` to bump right after it.

Statements a bound Session runs on its own connections are left to the session's
listeners, which know the rows; anything else on such a connection -- Core through
``session.connection().execute(...)`` -- is recorded into the session's transaction.
A connection in ``AUTOCOMMIT`` isolation commits each statement: its writes are bumped
right after they run.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session
from sqlalchemy.schema import DDLElement, Table
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause

from alkey.client import get_redis_client
from alkey.identity import encode_table, table_write_identifiers
from alkey.tokens import RedisClient, TokenStore, store_for
from alkey.tracking import changes_of
from alkey.writes import raw_sql_writes

__all__ = [
    "EngineBinding",
    "bind_engine",
    "claim_connection",
    "release_connections",
    "session_statement",
    "unbind_engine",
]

_SESSION_KEY: Final = "alkey.session"
_CONNECTIONS_KEY: Final = "alkey.connections"
_BULK_KEY: Final = "alkey.bulk"


def claim_connection(session: Session, connection: Connection) -> None:
    """Note that ``session`` runs its transaction on ``connection`` (its ``after_begin``)."""
    connection.info[_SESSION_KEY] = weakref.ref(session)
    # The info dict itself: by the time the transaction ends, the Connection is closed.
    session.info.setdefault(_CONNECTIONS_KEY, []).append(connection.info)


def release_connections(session: Session) -> None:
    """Forget the connections of ``session``'s ended root transaction."""
    for info in session.info.pop(_CONNECTIONS_KEY, ()):
        owner = info.get(_SESSION_KEY)
        if owner is not None and owner() is session:
            del info[_SESSION_KEY]


def _session_of(connection: Connection) -> Session | None:
    owner = connection.info.get(_SESSION_KEY)
    session = owner() if owner is not None else None
    return session if isinstance(session, Session) and session.in_transaction() else None


@contextlib.contextmanager
def session_statement(session: Session) -> Iterator[None]:
    """Mark the bulk statement ``session`` runs now as recorded by the session itself."""
    session.info[_BULK_KEY] = True
    try:
        yield
    finally:
        session.info.pop(_BULK_KEY, None)


def written_by(statement: Any, connection: Connection) -> set[str]:
    """What one statement run on ``connection`` writes (empty for reads)."""
    if isinstance(statement, UpdateBase):
        table = getattr(statement, "table", None)
        return table_write_identifiers([encode_table(table)] if isinstance(table, Table) else None)
    if isinstance(statement, (TextClause, str)):
        return raw_sql_writes(statement, connection.dialect)
    if isinstance(statement, DDLElement):
        target = getattr(statement, "element", None)
        if isinstance(target, Table):
            return table_write_identifiers([encode_table(target)])
        return set()
    return set()


class EngineBinding:
    """The listeners alkey attached to one Engine, and the store they bump."""

    def __init__(self, engine: Engine, tokens: TokenStore | None) -> None:
        self.engine = engine
        self._tokens = tokens
        # Per connection: the changes of the root transaction and of each open savepoint.
        self._levels: dict[Connection, list[set[str]]] = {}
        # Changes whose COMMIT is under way, by DBAPI connection.
        self._committing: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    @property
    def tokens(self) -> TokenStore:
        if self._tokens is None:
            self._tokens = store_for(get_redis_client())
        return self._tokens

    @tokens.setter
    def tokens(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    def after_execute(
        self,
        connection: Connection,
        statement: Any,
        multiparams: Any,
        params: Any,
        execution_options: Any,
        result: Any,
    ) -> None:
        self._record(connection, statement)

    def after_cursor_execute(
        self,
        connection: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        # exec_driver_sql() fires no after_execute; its statements are the ones that
        # reach the cursor without a compiled construct behind them.
        if context is not None and context.compiled is None:
            self._record(connection, statement)

    def _record(self, connection: Connection, statement: Any) -> None:
        session = _session_of(connection)
        # Session._flushing: SQLAlchemy's own flag for "this statement is the flush's".
        if session is not None and (
            getattr(session, "_flushing", False) or session.info.get(_BULK_KEY)
        ):
            return  # the session's own listeners record these, with their rows
        written = written_by(statement, connection)
        if not written:
            return
        if session is not None:
            changes_of(session).record(session, written)
        elif _autocommits(connection):
            self.tokens.bump(written)
        else:
            with self._lock:
                levels = self._levels.setdefault(connection, [set()])
                levels[-1] |= written

    def savepoint(self, connection: Connection, name: str) -> None:
        with self._lock:
            if connection in self._levels:
                self._levels[connection].append(set())

    def release_savepoint(self, connection: Connection, name: str, context: Any) -> None:
        with self._lock:
            levels = self._levels.get(connection)
            if levels and len(levels) > 1:
                released = levels.pop()
                levels[-1] |= released

    def rollback_savepoint(self, connection: Connection, name: str, context: Any) -> None:
        with self._lock:
            levels = self._levels.get(connection)
            if levels and len(levels) > 1:
                levels.pop()

    def commit(self, connection: Connection) -> None:
        with self._lock:
            levels = self._levels.pop(connection, None)
            if levels:
                self._committing[id(connection.connection)] = set().union(*levels)

    def rollback(self, connection: Connection) -> None:
        with self._lock:
            self._levels.pop(connection, None)

    def after_commit(self, dbapi_connection: Any) -> None:
        """Run by the wrapped ``do_commit`` once the database COMMIT returned (or failed:
        then the outcome is unknown, and bumping is the safe side)."""
        with self._lock:
            written = self._committing.pop(id(dbapi_connection), None)
        if written:
            self.tokens.bump(written)

    def listen(self) -> None:
        for name in _EVENTS:
            event.listen(self.engine, name, getattr(self, name))
        dialect = self.engine.dialect
        original = dialect.do_commit

        def do_commit(dbapi_connection: Any) -> None:
            try:
                original(dbapi_connection)
            finally:
                self.after_commit(dbapi_connection)

        dialect.do_commit = do_commit  # type: ignore[method-assign]
        self._original_do_commit = original

    def remove(self) -> None:
        for name in _EVENTS:
            event.remove(self.engine, name, getattr(self, name))
        self.engine.dialect.do_commit = self._original_do_commit  # type: ignore[method-assign]


_EVENTS = (
    "after_execute",
    "after_cursor_execute",
    "savepoint",
    "release_savepoint",
    "rollback_savepoint",
    "commit",
    "rollback",
)


def _autocommits(connection: Connection) -> bool:
    level = connection.get_execution_options().get("isolation_level")
    if level is None:
        level = connection.engine.dialect._on_connect_isolation_level
    return bool(level == "AUTOCOMMIT")


_engine_bindings: dict[Engine, EngineBinding] = {}
_engine_lock = threading.Lock()


def bind_engine(
    engine: Engine,
    *,
    redis_client: RedisClient | None = None,
    tokens: TokenStore | None = None,
) -> EngineBinding:
    """Invalidate tokens for Core and raw SQL writes on ``engine``'s connections.

    Binding again adds nothing; it returns the existing :class:`EngineBinding`, switched to
    the new ``redis_client`` or ``tokens`` if one is given. Session writes need
    :func:`alkey.events.bind` as well: that is where their rows are known.
    """
    if tokens is not None and redis_client is not None:
        raise ValueError("pass either redis_client or tokens, not both")
    if redis_client is not None:
        tokens = store_for(redis_client)
    with _engine_lock:
        binding = _engine_bindings.get(engine)
        if binding is None:
            binding = _engine_bindings[engine] = EngineBinding(engine, tokens)
            binding.listen()
        elif tokens is not None:
            binding.tokens = tokens
    return binding


def unbind_engine(engine: Engine) -> None:
    """Undo :func:`bind_engine` (no-op if ``engine`` is not bound)."""
    with _engine_lock:
        binding = _engine_bindings.pop(engine, None)
    if binding is not None:
        binding.remove()

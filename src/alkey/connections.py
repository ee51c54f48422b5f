"""Core and raw SQL on an Engine's connections: ``alkey.bind_engine(engine)``.

Writes that never pass through a Session's unit of work -- ``conn.execute(users.update())``,
``text("DELETE ...")``, ``exec_driver_sql(...)``, DDL, and DML hidden in a ``select()``
(``from_statement(text("UPDATE ... RETURNING"))``, a data-modifying CTE) -- are recorded
from the SQL that reaches the cursor, read by :mod:`alkey.sql`, per connection transaction,
with the same rules as a session's, from the same code (:class:`alkey.transactions.ChangeStack`):
a released savepoint counts, a rolled-back savepoint drops only its own writes, a rollback
drops everything, and the bump happens once the database COMMIT has returned -- where a
failing token store is logged, never raised (:class:`alkey.transactions.inside_commit`).

SQLAlchemy has no event *after* a connection's COMMIT (``ConnectionEvents.commit`` fires
before it, and bumping then would let a reader cache the old row under the new key), so
``bind_engine`` wraps ``dialect.do_commit`` to bump right after it -- once per dialect,
however many engines share it: ``engine.execution_options(...)`` makes an engine that
shares its parent's dialect, and an application may make one per request or tenant.
A session on such an option engine is watched through the engine it derives from, whose
listeners SQLAlchemy runs for the option engine's connections too.

A bound Session watches the engines it uses by itself. On its connections, the statements
of its own unit of work and bulk statements are left to its listeners, which know the
rows; everything else -- raw SQL through ``session.execute``, Core through
``session.connection()``, statements run by flush hooks -- is recorded into the session's
transaction. A connection in ``AUTOCOMMIT`` isolation commits each statement: its writes
are bumped right after they run.

Not covered: two-phase commits (``commit_twophase``), and a Session joined to a
transaction that its caller commits later (see the README).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Collection, Iterator
from typing import Any, Final

from redis.exceptions import RedisError
from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import Session

from alkey.client import UsesDefaultStore
from alkey.identity import freeze_schema_map, note_schema_map
from alkey.sql import reads_only
from alkey.tokens import RedisClient, TokenStore, bump, store_for
from alkey.transactions import ChangeStack, changes_of, inside_commit
from alkey.writes import in_flush, raw_sql_writes

__all__ = [
    "ENGINE_EVENTS",
    "EngineBinding",
    "bind_engine",
    "claim_connection",
    "record_intent",
    "release_connections",
    "session_statement",
    "unbind_engine",
    "watch_engine",
]

log = logging.getLogger("alkey.connections")
# Intents are the token store's business: their failures are logged where they always were.
_intent_log = logging.getLogger("alkey.tokens")

_SESSION_KEY: Final = "alkey.session"
_CONNECTIONS_KEY: Final = "alkey.connections"
_BULK_KEY: Final = "alkey.bulk"
_BEFORE_COMMIT_KEY: Final = "alkey.before_commit"
_TOUCH_PARENTS_KEY: Final = "alkey.touch_parents"


def claim_connection(
    session: Session,
    connection: Connection,
    before_commit: Callable[[Session], None],
    touch_parents: bool = True,
) -> None:
    """Note that ``session`` runs its transaction on ``connection`` (its ``after_begin``),
    that ``before_commit(session)`` is to run just before the connection's COMMIT, and
    whether the session's binding touches parents (for the statements recorded here)."""
    info = connection.info
    info[_SESSION_KEY] = weakref.ref(session)
    in_flush(session)  # drops the mark of a flush that raised, if any
    session_info = session.info
    session_info[_BEFORE_COMMIT_KEY] = before_commit
    session_info[_TOUCH_PARENTS_KEY] = touch_parents
    # The info dict itself: by the time the transaction ends, the Connection is closed.
    session_info.setdefault(_CONNECTIONS_KEY, []).append(info)


def record_intent(binding: UsesDefaultStore, identifiers: Collection[str]) -> str | None:
    """Let ``binding``'s store record that ``identifiers`` are about to be bumped, if it
    is durable (:class:`alkey.tokens.DurableTokenStore`); return the intent's id.

    Called just before a database COMMIT, from inside SQLAlchemy's commit -- for a
    session's transaction and for a Core connection's alike -- so it never raises
    (:class:`alkey.transactions.inside_commit`): a failure is logged and the commit goes
    ahead without an intent. Its bump follows as usual; a Redis error met here is met
    again there, and reported then (raised by a session's commit under
    ``on_error="raise"``), so it is only logged at debug level here.
    """
    store = binding._tokens  # None until the default store is looked up (that may fail)
    if store is not None and getattr(store, "intend", None) is None:
        return None  # not durable: nothing to record, nothing that can fail
    with inside_commit(
        _intent_log,
        "alkey could not record the bumps of a commit; it goes ahead without",
        reported_later=(RedisError,),
    ):
        record = getattr(binding.tokens, "intend", None)
        intent: str | None = record(identifiers) if record is not None else None
        return intent
    return None


def release_connections(session: Session) -> None:
    """Forget the connections of ``session``'s ended root transaction."""
    session.info.pop(_BEFORE_COMMIT_KEY, None)
    session.info.pop(_TOUCH_PARENTS_KEY, None)
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


def _is_unit_of_work(session: Session, context: Any) -> bool:
    """Whether a statement is one the session's flush emits itself (it records their rows).

    SQLAlchemy's persistence code runs them with the mapper's ``compiled_cache``; a
    statement that a flush hook runs on the same connection has none, and is recorded.
    ``bulk_save_objects`` and ``bulk_*_mappings`` run the same persistence code outside
    any flush, with no flush events: their statements are recorded here.
    """
    if not in_flush(session):
        return False
    options = getattr(context, "execution_options", None) or {}
    return "compiled_cache" in options


def _touches_parents(session: Session | None) -> bool:
    """Whether writes recorded for ``session`` touch their parents (its binding's
    ``touch_parents``; always, for a connection outside any bound session)."""
    return session is None or bool(session.info.get(_TOUCH_PARENTS_KEY, True))


class EngineBinding(UsesDefaultStore):
    """The listeners alkey attached to one Engine, and the store they bump."""

    def __init__(
        self, engine: Engine, tokens: TokenStore | None, all_connections: bool = True
    ) -> None:
        # Weak: the engine's own listeners and dialect hold this binding, not the reverse.
        self._engine = weakref.ref(engine)
        self._tokens = tokens
        #: False while only bound sessions watch the engine: then statements on other
        #: connections (Core code, unbound sessions) are not alkey's business.
        self.all_connections = all_connections
        # Per connection outside any session: the changes of its transaction, a level per
        # open savepoint (the rules are alkey.transactions'). Weak: a connection abandoned
        # without commit or rollback must still be collected and returned to its pool.
        self._changes: weakref.WeakKeyDictionary[Connection, ChangeStack] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._dialect: Dialect | None = None

    def after_cursor_execute(
        self,
        connection: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        """Every statement, as the SQL the database receives: Core, text(), driver SQL,
        DDL, and DML hidden inside a select all end up here."""
        # A tenant's connection or statement: its schema map tells raw SQL naming the
        # tenant's tables which mapped tables they are copies of.
        options = getattr(context, "execution_options", None) or {}
        translate = options.get("schema_translate_map")
        if translate:
            note_schema_map(freeze_schema_map(translate))
        if reads_only(statement):
            return  # the commonest statement, a read: nothing more to look at
        session = _session_of(connection)
        if session is None and not self.all_connections:
            return
        if session is not None and (
            session.info.get(_BULK_KEY) or _is_unit_of_work(session, context)
        ):
            return  # the session's own listeners record these, with their rows
        # The association rows a flush writes for changed many-to-many collections touch
        # no sides: the flush's own listeners touch the partners that changed, precisely.
        # (Flush hooks' statements touch their parents as any other statement does.)
        flushing = session is not None and in_flush(session)
        written = raw_sql_writes(
            statement,
            connection.dialect,
            context,
            touch_parents=_touches_parents(session),
            association_sides=not flushing,
        )
        if not written:
            return
        if _autocommits(connection):
            self._bump(written)
        elif session is not None:
            changes_of(session).record(session, written)
        else:
            with self._lock:
                changes = self._changes.get(connection)
                if changes is None:
                    changes = self._changes[connection] = ChangeStack()
                changes.record(written)

    def savepoint(self, connection: Connection, name: str) -> None:
        """A SAVEPOINT on a connection outside any session: open a level for what is
        written under it, so that rolling it back drops only that."""
        with self._lock:
            changes = self._changes.get(connection)
            if changes is None:
                changes = self._changes[connection] = ChangeStack()
            changes.push()

    def release_savepoint(self, connection: Connection, name: str, context: Any) -> None:
        """RELEASE SAVEPOINT: what was written under it joins the enclosing level, and
        is bumped only if the transaction commits."""
        with self._lock:
            changes = self._changes.get(connection)
            if changes is not None:
                changes.release()

    def rollback_savepoint(self, connection: Connection, name: str, context: Any) -> None:
        """ROLLBACK TO SAVEPOINT: drop what was written under it -- the database undid
        it, so those rows keep their keys."""
        with self._lock:
            changes = self._changes.get(connection)
            if changes is not None:
                changes.rollback()

    def commit(self, connection: Connection) -> None:
        """Just before the connection's COMMIT: set its writes aside for
        ``_after_commit()``, and let a durable store record them as an intent -- for a
        session's connection, everything the session's transaction wrote."""
        session = _session_of(connection)
        if session is not None:
            before_commit = session.info.get(_BEFORE_COMMIT_KEY)
            if before_commit is not None:
                before_commit(session)
        if not self._changes:
            return  # this thread recorded nothing for its connection (it would see it)
        with self._lock:
            changes = self._changes.pop(connection, None)
        if changes is not None:
            written = changes.written()
            if written:
                intent = record_intent(self, written)
                with _committing_lock:
                    _committing.setdefault(id(connection.connection), []).append(
                        (self, written, intent)
                    )

    def rollback(self, connection: Connection) -> None:
        """The connection's ROLLBACK: forget its writes, which the database undid: no
        token is bumped for them."""
        if not self._changes:
            return
        with self._lock:
            self._changes.pop(connection, None)

    def _bump(self, written: set[str], intent: str | None = None) -> None:
        # Inside SQLAlchemy's commit machinery (or a statement, under AUTOCOMMIT) an
        # exception would be taken for a database error: whatever the store's policy, a
        # failure here is logged, never raised.
        with inside_commit(log, "alkey could not bump %d token(s) after a COMMIT", len(written)):
            bump(self.tokens, written, intent)

    def listen(self, engine: Engine) -> None:
        """Attach the listeners to ``engine``, and wrap its dialect's ``do_commit``: the
        bump must follow the database COMMIT, which no engine event reports."""
        for name in ENGINE_EVENTS:
            event.listen(engine, name, getattr(self, name))
        self._dialect = engine.dialect
        _hook_commit(engine.dialect)

    def remove(self) -> None:
        """Detach the listeners (:func:`unbind_engine`), and unwrap ``do_commit`` once
        no binding of the dialect needs it: the engine's statements cost nothing more."""
        engine = self._engine()
        if engine is not None:
            for name in ENGINE_EVENTS:
                event.remove(engine, name, getattr(self, name))
        if self._dialect is not None:
            _unhook_commit(self._dialect)
            self._dialect = None


# Changes whose COMMIT is under way, by DBAPI connection: each binding that recorded some,
# its changes and their intent. One table for every binding, so that the hook finds the
# few a COMMIT concerns without asking every binding of the dialect.
_committing: dict[int, list[tuple[EngineBinding, set[str], str | None]]] = {}
_committing_lock = threading.Lock()


def _after_commit(dbapi_connection: Any) -> None:
    """Run by the wrapped ``do_commit`` once the database COMMIT returned (or failed:
    then the outcome is unknown, and bumping is the safe side)."""
    if not _committing:
        return  # the common COMMIT: nothing of this connection's (this thread put it there)
    with _committing_lock:
        committing = _committing.pop(id(dbapi_connection), ())
    for binding, written, intent in committing:
        binding._bump(written, intent)


class _CommitHook:
    """The one wrapper alkey puts around a dialect's ``do_commit``, and how many bindings
    use it. Wrapping once per dialect keeps the call depth of a COMMIT constant however
    many engines share the dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.users = 0
        self.own_attribute = "do_commit" in vars(dialect)
        original = self.original = dialect.do_commit

        def do_commit(dbapi_connection: Any) -> None:
            try:
                original(dbapi_connection)
            finally:
                _after_commit(dbapi_connection)

        self.wrapper = do_commit
        dialect.do_commit = do_commit  # type: ignore[method-assign]

    def restore(self, dialect: Dialect) -> bool:
        """Put the original back, unless someone wrapped ours since (then ours stays, a
        pass-through, for the next binding to reuse). Whether it was put back."""
        if vars(dialect).get("do_commit") is not self.wrapper:
            return False
        if self.own_attribute:
            dialect.do_commit = self.original  # type: ignore[method-assign]
        else:
            del dialect.do_commit
        return True


_commit_hooks: weakref.WeakKeyDictionary[Dialect, _CommitHook] = weakref.WeakKeyDictionary()


def _hook_commit(dialect: Dialect) -> None:
    with _engine_lock:
        hook = _commit_hooks.get(dialect)
        if hook is None:
            hook = _commit_hooks[dialect] = _CommitHook(dialect)
        hook.users += 1


def _unhook_commit(dialect: Dialect) -> None:
    with _engine_lock:
        hook = _commit_hooks.get(dialect)
        if hook is None:
            return
        hook.users -= 1
        if hook.users <= 0 and hook.restore(dialect):
            del _commit_hooks[dialect]


#: The engine events an :class:`EngineBinding` listens to.
ENGINE_EVENTS = (
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


_engine_bindings: weakref.WeakKeyDictionary[Engine, EngineBinding] = weakref.WeakKeyDictionary()
_engine_lock = threading.RLock()


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
    return _bind_engine(engine, tokens, all_connections=True)


def _bind_engine(engine: Engine, tokens: TokenStore | None, all_connections: bool) -> EngineBinding:
    with _engine_lock:
        binding = _engine_bindings.get(engine)
        if binding is None:
            binding = _engine_bindings[engine] = EngineBinding(engine, tokens, all_connections)
            binding.listen(engine)
        else:
            binding.all_connections |= all_connections
            if tokens is not None and all_connections:
                binding.tokens = tokens
    return binding


def _lineage(engine: Engine) -> list[Engine]:
    """``engine`` and the engines it derives from by ``execution_options()``, root last."""
    engines = [engine]
    while isinstance(getattr(engines[-1], "_proxied", None), Engine):
        engines.append(engines[-1]._proxied)  # type: ignore[attr-defined]
    return engines


def watch_engine(engine: Engine, tokens: TokenStore | None) -> None:
    """Watch the statements a bound session runs on ``engine``'s connections.

    An option engine is watched through its root engine, whose listeners run for every
    engine derived from it: one binding however many option engines an application makes.
    """
    if engine in _engine_bindings:
        return  # every transaction asks: the common answer first
    lineage = _lineage(engine)
    if not any(known in _engine_bindings for known in lineage):
        _bind_engine(lineage[-1], tokens, all_connections=False)


def unbind_engine(engine: Engine) -> None:
    """Undo :func:`bind_engine` (no-op if ``engine`` is not bound)."""
    with _engine_lock:
        binding = _engine_bindings.pop(engine, None)
    if binding is not None:
        binding.remove()

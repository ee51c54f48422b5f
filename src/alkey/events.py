"""Bind alkey to SQLAlchemy sessions: record writes at flush, bump tokens at commit.

Write path: ``after_flush`` records the identifiers of every inserted, updated or deleted
instance (and of its related parents), ``do_orm_execute`` those of bulk statements and raw
SQL run through the session -- see :mod:`alkey.writes` -- against the session's current
transaction, in process memory (:mod:`alkey.transactions`). ``after_commit`` and
``after_transaction_end`` decide what survived, and the outermost commit bumps it all with
one call to the token store. A flush costs no Redis round trip, and a transaction that
wrote nothing costs none at its commit.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import (
    ORMExecuteState,
    Session,
    SessionTransaction,
    UOWTransaction,
    scoped_session,
    sessionmaker,
)
from sqlalchemy.orm.attributes import instance_state

from alkey import _canonical
from alkey.client import CHECK_TIMEOUT, UsesDefaultStore, check_redis
from alkey.connections import (
    claim_connection,
    record_intent,
    release_connections,
    session_statement,
    watch_engine,
)
from alkey.tenants import record_flushed
from alkey.tokens import RedisClient, TokenStore, bump, store_for
from alkey.transactions import changes_of
from alkey.writes import flushed, modified_before_flush, statement_writes

__all__ = [
    "SESSION_EVENTS",
    "Binding",
    "UnboundSessionWarning",
    "bind",
    "bound_stores",
    "is_bound",
    "support_asyncio",
    "unbind",
]

_bindings: weakref.WeakKeyDictionary[Any, Binding] = weakref.WeakKeyDictionary()
_bindings_lock = threading.Lock()


#: How to bind asyncio session objects: the sync target whose events an asyncio target
#: fires, and the token store of an asyncio binding. Registered by :mod:`alkey.asyncio`
#: as it is imported, so that the core never imports it (nor greenlet, which it needs).
_asyncio_support: tuple[Callable[[object], object], Callable[[], TokenStore]] | None = None
#: How ``bind(..., fail_fast=...)`` checks an asyncio store (also :mod:`alkey.asyncio`'s).
_asyncio_check: Callable[[TokenStore, float], None] | None = None


def support_asyncio(
    sync_target: Callable[[object], object],
    default_store: Callable[[], TokenStore],
    *,
    check: Callable[[TokenStore, float], None] | None = None,
) -> None:
    """Teach :func:`bind` asyncio session objects (called by :mod:`alkey.asyncio`), and
    how ``fail_fast`` checks their stores (``check(store, timeout)``)."""
    global _asyncio_support, _asyncio_check
    _asyncio_support = (sync_target, default_store)
    if check is not None:
        _asyncio_check = check


def _asyncio() -> tuple[Callable[[object], object], Callable[[], TokenStore]] | None:
    """The asyncio support, loaded once asyncio session objects can exist."""
    if _asyncio_support is None and "sqlalchemy.ext.asyncio" in sys.modules:
        # An asyncio session object may be given: load the integration, which registers
        # itself. By name, as a plugin: importing it before would make greenlet a
        # requirement of the core.
        importlib.import_module("alkey.asyncio")
    return _asyncio_support


def _resolve(target: object) -> Session | type[Session]:
    support = _asyncio()
    if support is not None:
        target = support[0](target)
    if isinstance(target, scoped_session):
        target = target.session_factory
    if isinstance(target, sessionmaker):
        target = target.class_
    if isinstance(target, Session) or (isinstance(target, type) and issubclass(target, Session)):
        return target
    raise TypeError(
        f"alkey.events.bind() takes a Session class, a sessionmaker, a scoped_session or a "
        f"Session instance (or their asyncio forms), not {type(target).__qualname__}"
    )


class Binding(UsesDefaultStore):
    """The listeners alkey attached to one session target, and the store they bump.

    Created by :func:`bind`; one per target however often ``bind`` is called.
    """

    def __init__(
        self, target: Session | type[Session], tokens: TokenStore | None, touch_parents: bool
    ) -> None:
        # Weak: a binding must not keep a bound Session instance alive.
        self._target = weakref.ref(target)
        self._tokens = tokens
        #: Whether writing a child invalidates its many-to-one parents (and many-to-many
        #: partners); per relationship, ``info={"alkey_touch": False}`` opts out.
        self.touch_parents = touch_parents

    @property
    def target(self) -> Session | type[Session] | None:
        """What was bound (``None`` once a bound Session instance is gone)."""
        return self._target()

    def _owns(self, session: Session) -> bool:
        # A session may match several bindings (its own, its class's, a base class's);
        # the most specific one acts, so that each write is bumped exactly once.
        return _binding_for(session) is self

    def before_flush(self, session: Session, flush_context: UOWTransaction, instances: Any) -> None:
        """Note which instances the flush changes, and how, while that can still be seen
        (``alkey.writes.modified_before_flush()``)."""
        if self._owns(session):
            modified_before_flush(session)

    def after_flush(self, session: Session, flush_context: UOWTransaction) -> None:
        """Record what the flush wrote against the session's transaction: nothing is
        bumped before the commit, and a rollback drops it."""
        if not self._owns(session):
            return
        if session.new:
            record_flushed(session, [instance_state(obj) for obj in session.new])
        written = flushed(session, flush_context, self.touch_parents)
        if written:
            changes_of(session).record(session, written)

    def do_orm_execute(self, state: ORMExecuteState) -> Any:
        """Bulk DML run through ``Session.execute``, recorded with the rows it reports.

        Raw SQL and everything else is read from the cursor (:mod:`alkey.connections`).
        """
        session = state.session
        if not (state.is_update or state.is_delete or state.is_insert) or not self._owns(session):
            return None
        with session_statement(session):
            result = state.invoke_statement()
        # Recorded after it ran: a statement that fails writes nothing, and the session's
        # transaction has begun by now.
        changes_of(session).record(session, statement_writes(state, result, self.touch_parents))
        return result

    def after_begin(
        self, session: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        """Claim the connection the transaction runs on, and watch its engine: raw SQL
        and Core statements run through the session are recorded as its writes."""
        if self._owns(session):
            claim_connection(session, connection, self.before_database_commit, self.touch_parents)
            watch_engine(connection.engine, self._tokens)

    def before_database_commit(self, session: Session) -> None:
        """Run by the connection just before its COMMIT: a durable store records what
        the commit is about to bump (see :class:`alkey.tokens.DurableTokenStore`).

        Inside SQLAlchemy's commit, where nothing may raise: the store is only called
        through :func:`alkey.connections.record_intent`, which logs a failure instead.
        """
        changes = changes_of(session)
        identifiers = changes.to_be_committed(session)
        if identifiers:
            changes.intended(session, record_intent(self, identifiers))

    def before_commit(self, session: Session) -> None:
        """Note that the root transaction began to commit: if it then ends without the
        confirmation, its writes still count as committed (see :mod:`alkey.transactions`)."""
        if self._owns(session):
            changes_of(session).committing(session)

    def after_commit(self, session: Session) -> None:
        """A savepoint's writes join its parent's; the root transaction's are set aside
        to be bumped once it has ended."""
        if self._owns(session):
            changes_of(session).committed(session)

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        """Bump what a committed root transaction wrote, in one call to the store; drop
        what an ended savepoint or a rolled-back transaction recorded."""
        if not self._owns(session):
            return
        if transaction.parent is None:
            release_connections(session)
        handover = changes_of(session).ended(transaction)
        if handover is not None:
            # After the COMMIT, the session clean: unlike the connection's bump, this one
            # raises under on_error="raise", to the caller of commit().
            bump(self.tokens, *handover)

    def listen(self) -> None:
        """Attach the listeners (:data:`SESSION_EVENTS`) to the bound target."""
        for name in SESSION_EVENTS:
            event.listen(self.target, name, getattr(self, name))

    def remove(self) -> None:
        """Detach the listeners (:func:`unbind`), if the bound target still exists."""
        target = self.target
        if target is not None:
            for name in SESSION_EVENTS:
                event.remove(target, name, getattr(self, name))


#: The session events a :class:`Binding` listens to.
SESSION_EVENTS = (
    "after_begin",
    "before_flush",
    "after_flush",
    "do_orm_execute",
    "before_commit",
    "after_commit",
    "after_transaction_end",
)


def _binding_for(session: Session) -> Binding | None:
    """The binding that acts for ``session``: its own, else its class's nearest.

    Every session event asks, so the answer for a class is kept, stamped with the
    generation of the bindings it was worked out from: :func:`bind` and :func:`unbind`
    start a new generation, which makes every kept answer stale at once (an answer worked
    out while another thread binds is stamped with the generation it started from).
    """
    if _bound_instances:
        binding = _bindings.get(session)
        if binding is not None:
            return binding
    kind = type(session)
    generation = _generation
    known = _class_bindings.get(kind)
    if known is not None and known[0] == generation:
        return known[1]
    for cls in kind.__mro__:
        binding = _bindings.get(cls)
        if binding is not None:
            break
    if len(_class_bindings) >= _MOST_CLASSES:
        _class_bindings.clear()  # session classes made on the fly: keep a bounded few
    _class_bindings[kind] = (generation, binding)
    return binding


def _changed_bindings() -> None:
    """Make every kept answer of :func:`_binding_for` stale (under ``_bindings_lock``,
    after the change)."""
    global _generation, _bound_instances
    _bound_instances = any(not isinstance(target, type) for target in _bindings)
    _generation += 1
    # A session found unbound may be bound now (and the reverse): look again.
    _canonical.checked_session = None
    # Kept answers hold their session classes: let those of unbound sessionmakers go.
    _class_bindings.clear()


#: :func:`_binding_for`'s answers by session class, each with its generation.
_class_bindings: dict[type, tuple[int, Binding | None]] = {}
_MOST_CLASSES: Final = 256
_generation = 0
#: Whether a Session instance (rather than a class) is bound: only then is a session
#: looked up by itself.
_bound_instances = False


def is_bound(session: Session) -> bool:
    """Whether a binding (its own, or its class's) covers ``session``."""
    return _binding_for(session) is not None


def _is_asyncio(target: object) -> bool:
    return type(target).__module__.startswith("sqlalchemy.ext.asyncio") or (
        isinstance(target, type) and target.__module__.startswith("sqlalchemy.ext.asyncio")
    )


def bind(
    target: object,
    *,
    redis_client: RedisClient | None = None,
    tokens: TokenStore | None = None,
    touch_parents: bool = True,
    fail_fast: bool | float = False,
) -> Binding:
    """Invalidate alkey tokens when sessions made from ``target`` commit writes.

    ``target`` is a Session class (``bind(Session)`` covers every session), a
    ``sessionmaker``, a ``scoped_session`` or a single Session instance. Binding the
    same target again adds no listeners; it returns the existing :class:`Binding`, switched
    to the new ``redis_client`` or ``tokens`` if one is given.

    Tokens live in ``tokens``, else in ``redis_client``, else in the client from
    :func:`alkey.client.get_redis_client`, looked up at the first commit that writes --
    or, for an asyncio target, in each event loop's redis.asyncio client
    (:func:`alkey.asyncio.store_for`).

    With ``touch_parents`` (the default), writing a row also invalidates the rows it
    references many-to-one -- the old and the new one when the reference moves -- and both
    sides of a changed many-to-many association.

    With ``fail_fast``, the binding's store is checked now (:func:`alkey.check_redis`,
    for up to :data:`~alkey.client.CHECK_TIMEOUT` seconds, or ``fail_fast`` seconds if it
    is a number), and a Redis it cannot use -- unreachable, a wrong password, an ACL that
    lacks a command, scripts that cannot run -- raises
    :class:`~alkey.errors.ConfigurationError` naming the server and the problem, with
    the binding undone: the application refuses to start rather than run with keys that
    never hit. An asyncio store is checked on an event loop of its own, which only works
    where no loop runs yet; inside one, await :func:`alkey.asyncio.acheck_redis` instead.
    """
    if tokens is not None and redis_client is not None:
        raise ValueError("pass either redis_client or tokens, not both")
    if redis_client is not None:
        tokens = store_for(redis_client)
    resolved = _resolve(target)
    _watch_sessions()
    created = False
    with _bindings_lock:
        binding = _bindings.get(resolved)
        if binding is None:
            created = True
            support = _asyncio()
            if tokens is None and resolved is not target and _is_asyncio(target) and support:
                # An asyncio session bumps through redis.asyncio, so that a commit never
                # blocks the event loop for its round trip.
                tokens = support[1]()
            binding = _bindings[resolved] = Binding(resolved, tokens, touch_parents)
            _changed_bindings()
            binding.listen()
        else:
            binding.touch_parents = touch_parents
            if tokens is not None:
                binding.tokens = tokens
    if fail_fast is not False:
        try:
            _check(binding.tokens, CHECK_TIMEOUT if fail_fast is True else float(fail_fast))
        except BaseException:
            if created:
                unbind(resolved)
            raise
    return binding


def _check(store: TokenStore, timeout: float) -> None:
    """``fail_fast``'s check of a binding's store, sync or asyncio."""
    if callable(getattr(store, "afetch", None)) and _asyncio_check is not None:
        _asyncio_check(store, timeout)
    else:
        check_redis(store, timeout=timeout)


def bound_stores() -> list[TokenStore]:
    """The token store of each binding in force, each store once, in no set order.

    Why: :func:`alkey.invalidate` without ``tokens=`` bumps in the stores the
    application's sessions bump in, whichever Redis and ``key_prefix`` they use.
    """
    with _bindings_lock:
        bindings = list(_bindings.values())
    stores: dict[int, TokenStore] = {}
    for binding in bindings:
        store = binding.tokens
        stores.setdefault(id(store), store)
    return list(stores.values())


class UnboundSessionWarning(UserWarning):
    """A key was built for an instance of a session that alkey does not watch.

    Why a warning: the session's commits bump nothing, so keys built for its instances
    change only when the instance's own loaded state does -- a write through that session
    (or a rollback of one) leaves them as they were, and the cache serves what it held.
    Either bind it (:func:`bind` its class, its ``sessionmaker`` or the session), or, if
    its writes are bumped some other way, filter this warning. Issued once per session
    class, and only once :func:`bind` has been called in the process: a process that
    never binds may only read, and pays nothing for the check.
    """


# Session classes already warned about: once each.
_warned: set[type] = set()
_ALKEY_DIRECTORY: Final = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _check_session(state: Any) -> None:
    """Warn once per session class if ``state``'s session is not bound (the hook that
    key generation calls for the first instance of each new session it sees)."""
    _canonical.checked_session = state.session_id
    session = state.session
    if session is None or _binding_for(session) is not None:
        return
    kind = type(session)
    if kind in _warned:
        return
    _warned.add(kind)
    name = f"{kind.__module__}.{kind.__qualname__}"
    warnings.warn(
        f"alkey: a cache key was built for a {state.class_.__qualname__} of a {name} "
        "session that alkey does not watch: commits through "
        "it bump no token, so keys for its instances change only when the instance's "
        "own loaded state does. Bind it with alkey.bind(<its sessionmaker or class>) "
        "(issued once per session class)",
        UnboundSessionWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside alkey: the code building the key."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_ALKEY_DIRECTORY):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def _watch_sessions() -> None:
    """Have key generation check sessions from now on (the first :func:`bind` does)."""
    if _canonical.check_session is None:
        _canonical.check_session = _check_session


def unbind(target: object) -> None:
    """Remove the listeners that :func:`bind` attached to ``target`` (no-op if none)."""
    resolved = _resolve(target)
    with _bindings_lock:
        binding = _bindings.pop(resolved, None)
        _changed_bindings()
    if binding is not None:
        binding.remove()

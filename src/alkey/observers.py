"""Observers: what a token store tells the application about its incidents.

Why: an application that wants metrics (outages, kept bumps, recoveries, misses) should
not have to parse log lines. A store reports every incident to its observers, objects
whose class derives from :class:`StoreObserver` and overrides the events it cares about;
the log lines alkey has always written come from one such observer,
:class:`LoggingObserver`, installed by default::

    class Metrics(StoreObserver):
        def outage_began(self, *, action, error, pending, dropped, max_pending):
            outages.inc()

    store = RedisTokenStore(client, observers=[LoggingObserver(), Metrics()])
    # or later: store.add_observer(Metrics())

Every event is called with keyword arguments only, so an observer names what it reads
and ignores the rest. Events come from whichever thread or task made the store call, so
an observer must be quick and thread-safe. An observer that raises never breaks a store
call or a commit: the error is logged once (per observer and event) on the
``alkey.observers`` logger and the store goes on.

Cost: an event that no installed observer overrides is never dispatched -- in
particular :meth:`StoreObserver.fetched`, :meth:`StoreObserver.bumped` and
:meth:`StoreObserver.round_trip`, the events of the success path, cost one attribute test
per call (not per identifier) with only the :class:`LoggingObserver` installed; round
trips are not even timed then.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from alkey.constants import UNKNOWN_WRITES
from alkey.errors import TokenStoreConfigurationError, redacted

__all__ = ["EVENTS", "LoggingObserver", "ObserverGroup", "StoreObserver"]

#: The logger of the store's own lines (the one alkey has always used).
store_log = logging.getLogger("alkey.tokens")
#: Where an observer that raised is reported.
log = logging.getLogger("alkey.observers")


class StoreObserver:
    """The events of a token store, as methods that do nothing: subclass it and override
    the ones you need (the others cost nothing, see the module).

    Counts are of identifiers (``alkey:users#1``) unless said otherwise; ``error`` is
    alkey's error (:class:`~alkey.errors.TokenStoreError`), whose ``__cause__`` is the
    client library's own.
    """

    def fetched(self, *, identifiers: Sequence[str], missed: bool) -> None:
        """A fetch answered, with Redis's tokens, or, if ``missed``, with fresh random
        ones: a forced miss (Redis down or recovering, no connection, a recovery of due
        intents running). Do not keep or change ``identifiers``."""

    def bumped(self, *, count: int, replayed: int) -> None:
        """``count`` identifiers got new tokens in Redis in one round trip, ``replayed``
        of them bumps kept from an outage (or intents of a dead writer, recovered)."""

    def round_trip(self, *, operation: str, seconds: float, failed: bool) -> None:
        """One round trip to Redis took ``seconds`` (wall clock, from handing its calls to
        the client to reading the last reply, or to the error): for ``operation``
        ``"fetch"`` (a key's tokens), ``"intend"`` (durable mode, just before a COMMIT) or
        ``"bump"`` (after one, or a replay of kept bumps). ``failed``: it ended in an
        error (a timeout, a refused or lost connection, an error answer).

        What the span holds besides the network: a wait for a free connection of the
        pool (when it had none; a call that got none at all is no round trip, and is
        :meth:`pool_exhausted`'s to tell), the one extra round trip of a server that
        forgot alkey's scripts, the client's own connecting, and under asyncio the event
        loop's delay in resuming the call. Kept bumps and due intents that ride along
        belong to the operation they ride on, and so do the further round trips of a
        recovery of due intents that a fetch or bump runs.

        Why an event of its own: a round trip is the one cost alkey adds that grows with
        the network, so latency is what a dashboard should show (see
        :mod:`alkey.metrics.prometheus`). Calls that go without Redis (an outage's forced
        misses, the local token cache's hits) make no round trip and no event."""

    def bump_kept(self, *, count: int, pending: int) -> None:
        """A bump of ``count`` identifiers could not reach Redis and was kept for replay;
        ``pending`` identifiers are now kept in all."""

    def dropped(self, *, count: int, max_pending: int) -> None:
        """``count`` identifiers of a kept bump did not fit under ``max_pending``: the
        token every key depends on is kept for replay in their place (every key misses
        once after the replay; nothing is lost)."""

    def outage_began(
        self, *, action: str, error: BaseException, pending: int, dropped: int, max_pending: int
    ) -> None:
        """The first failure of an outage (once per incident, under ``on_error="degrade"``):
        the store could not ``action`` (e.g. ``"fetch tokens"``); ``pending`` identifiers
        are kept for replay, ``dropped`` more went past ``max_pending``.

        ``error`` tells an outage from a misconfiguration: a
        :class:`~alkey.errors.TokenStoreConfigurationError` (a refused TLS certificate or
        password, an ACL refusal, ``CROSSSLOT``...) will not end by waiting. Both are one
        event, because both make keys miss and bumps wait, and a metric of incidents
        should count both; when the cause changes within an incident (Redis comes back
        from a restart with a password alkey lacks), this is called again with the new
        error before :meth:`outage_ended`."""

    def outage_ended(self, *, replayed: int, dropped: int) -> None:
        """Redis answers again: ``replayed`` kept bumps were sent, and the token every key
        depends on was bumped for ``dropped`` more (past ``max_pending``)."""

    def pool_exhausted(self, *, action: str, error: BaseException, pending: int) -> None:
        """A call found no free connection in its pool even after waiting, and went
        without Redis (once per incident; Redis is not marked down)."""

    def pool_recovered(self, *, starved: int) -> None:
        """A call got a connection again; ``starved`` calls went without one meanwhile."""

    def intents_claimed(self, *, count: int) -> None:
        """Durable mode: this store claimed ``count`` intents older than the lease -- their
        writers died, or could not reach Redis, between COMMIT and bump -- to bump them."""

    def recovery_began(self, *, claimed: int, lease: float, backlog: bool) -> None:
        """A recovery of due intents begins, with ``claimed`` in its first batch;
        ``backlog``: more are due, and keys miss until they are all bumped."""

    def recovery_ended(self, *, total: int, lease: float, backlog: bool) -> None:
        """The recovery that :meth:`recovery_began` announced is over: ``total`` intents
        were bumped (``backlog`` as it began)."""

    def local_lookup(self, *, hits: int, misses: int) -> None:
        """A fetch looked in the local token cache (``local_cache``): ``hits`` identifiers
        were answered from it and ``misses`` went to Redis, in one round trip (none at all
        when ``misses`` is 0)."""

    def local_invalidated(self, *, count: int, evicted: int) -> None:
        """Redis announced that ``count`` token keys changed, or this process bumped them;
        ``evicted`` of them were in the local token cache and are gone from it."""

    def local_flushed(self, *, reason: str, entries: int) -> None:
        """The local token cache was emptied of its ``entries`` tokens: its tracking
        connection was lost or came back, Redis flushed its data, a fetch saw another
        server (a failover), or the store closed it."""


#: The names of the events, :class:`StoreObserver`'s methods.
EVENTS = tuple(name for name in vars(StoreObserver) if not name.startswith("_"))


class LoggingObserver(StoreObserver):
    """The log lines alkey writes on the ``alkey.tokens`` logger: one line when an outage
    begins (with the error and how many bumps are kept) and one when it ends (how many
    were replayed), the same for an exhausted pool, and for recoveries of due intents.

    A misconfiguration (:class:`~alkey.errors.TokenStoreConfigurationError`: a refused
    TLS certificate or password, an ACL refusal, ``CROSSSLOT``...) is logged as what it
    is, at ``ERROR``, once per incident: "alkey cannot use Redis at host:port: <what is
    wrong>: <what to fix>. Keys miss until this is fixed...", not as "Redis unavailable".

    Installed by default; leave it out of a store's ``observers`` to silence them.
    Passwords never appear: client errors name host and port, and anything that looks
    like a password in them is masked (:func:`~alkey.errors.redacted`).
    """

    def outage_began(
        self, *, action: str, error: BaseException, pending: int, dropped: int, max_pending: int
    ) -> None:
        cause = _cause(error)
        if isinstance(error, TokenStoreConfigurationError):
            # Not an outage: say what is wrong and what to fix, as an error -- it lasts.
            store_log.error(
                "alkey cannot use %s: %s: %s. Keys miss until this is fixed (alkey could "
                "not %s; nothing is lost: %d bump(s) kept for replay, %d over "
                "max_pending=%d). The client's error: %s: %s",
                error.server,
                error.problem,
                error.fix,
                action,
                pending,
                dropped,
                max_pending,
                type(cause).__name__,
                redacted(str(cause)),
            )
            return
        store_log.warning(
            "Redis unavailable, alkey could not %s: %s: %s. Keys miss until it answers; "
            "%d bump(s) kept for replay, %d over max_pending=%d.",
            action,
            type(cause).__name__,
            redacted(str(cause)),
            pending,
            dropped,
            max_pending,
        )

    def outage_ended(self, *, replayed: int, dropped: int) -> None:
        store_log.log(
            logging.WARNING if dropped else logging.INFO,
            "Redis answers again; alkey replayed %d bump(s)%s.",
            replayed,
            f", and bumped {UNKNOWN_WRITES} for {dropped} more past max_pending" if dropped else "",
        )

    def pool_exhausted(self, *, action: str, error: BaseException, pending: int) -> None:
        cause = _cause(error)
        store_log.warning(
            "alkey could not %s: %s: %s, even after waiting for a connection of its "
            "Redis pool (max_connections). Redis is not marked down: this call goes "
            "without it (a miss, or a bump kept for replay; %d kept) and the next "
            "ones use it as usual.",
            action,
            type(cause).__name__,
            redacted(str(cause)),
            pending,
        )

    def pool_recovered(self, *, starved: int) -> None:
        store_log.info(
            "alkey gets Redis connections from its pool again; %d call(s) went without "
            "one meanwhile.",
            starved,
        )

    def recovery_began(self, *, claimed: int, lease: float, backlog: bool) -> None:
        if not backlog:
            store_log.warning(
                "alkey bumps the tokens of %d commit(s) whose own bump did not arrive "
                "within the %gs lease: their process died between the database COMMIT "
                "and the bump, or could not reach Redis.",
                claimed,
                lease,
            )
        else:
            store_log.warning(
                "alkey bumps the tokens of %d commit(s) so far, and more are due, whose own "
                "bump did not arrive within the %gs lease: their process died between the "
                "database COMMIT and the bump, or could not reach Redis. Keys miss until "
                "they are all bumped.",
                claimed,
                lease,
            )

    def recovery_ended(self, *, total: int, lease: float, backlog: bool) -> None:
        if backlog:  # a small recovery was said in one line, as it began
            store_log.info(
                "alkey has bumped the tokens of every commit whose own bump did not arrive "
                "within the %gs lease: %d in all.",
                lease,
                total,
            )


def _cause(error: BaseException) -> BaseException:
    """The client library's error behind alkey's, which the log lines have always named."""
    return error.__cause__ if error.__cause__ is not None else error


def _overrides(observer: StoreObserver, event: str) -> bool:
    return getattr(type(observer), event, None) is not getattr(StoreObserver, event)


class ObserverGroup(StoreObserver):
    """A store's observers, as one observer: each event goes to those that override it.

    Why a group rather than a loop at each call site: it keeps, per event, only the
    observers that override it, so an event nobody listens to costs nothing (the store
    tests :attr:`fetched_hooks` and :attr:`bumped_hooks` before building the event on
    its success path), and it isolates the store from observers that raise.
    """

    def __init__(self, observers: Sequence[StoreObserver] = ()) -> None:
        self._lock = threading.Lock()
        self._reported: set[tuple[int, str]] = set()
        self.observers: tuple[StoreObserver, ...] = ()
        self._hooks: dict[str, tuple[Callable[..., None], ...]] = {}
        #: The observers' ``fetched`` methods (empty: nobody listens; skip the event).
        self.fetched_hooks: tuple[Callable[..., None], ...] = ()
        #: The observers' ``bumped`` methods (empty: nobody listens; skip the event).
        self.bumped_hooks: tuple[Callable[..., None], ...] = ()
        #: The observers' ``round_trip`` methods (empty: nobody listens; time nothing).
        self.round_trip_hooks: tuple[Callable[..., None], ...] = ()
        #: The observers' ``local_lookup`` methods (empty: nobody listens; skip the event).
        self.local_lookup_hooks: tuple[Callable[..., None], ...] = ()
        #: The observers' ``local_invalidated`` methods (empty: skip the event).
        self.local_invalidated_hooks: tuple[Callable[..., None], ...] = ()
        self._install(tuple(observers))

    def add(self, observer: StoreObserver) -> None:
        """Report the events from now on to ``observer`` too."""
        if not isinstance(observer, StoreObserver):
            raise TypeError(f"an observer derives from StoreObserver, not {observer!r}")
        with self._lock:
            self._install((*self.observers, observer))

    def _install(self, observers: tuple[StoreObserver, ...]) -> None:
        for observer in observers:
            if not isinstance(observer, StoreObserver):
                raise TypeError(f"an observer derives from StoreObserver, not {observer!r}")
        hooks = {
            event: tuple(
                getattr(observer, event) for observer in observers if _overrides(observer, event)
            )
            for event in EVENTS
        }
        # Each name is rebound in one step: a concurrent event sees the old set or the new.
        self._hooks = hooks
        self.fetched_hooks = hooks["fetched"]
        self.bumped_hooks = hooks["bumped"]
        self.round_trip_hooks = hooks["round_trip"]
        self.local_lookup_hooks = hooks["local_lookup"]
        self.local_invalidated_hooks = hooks["local_invalidated"]
        self.observers = observers

    def _emit(self, event: str, arguments: dict[str, Any]) -> None:
        for hook in self._hooks[event]:
            try:
                hook(**arguments)
            except Exception:
                key = (id(getattr(hook, "__self__", hook)), event)
                if key not in self._reported:
                    self._reported.add(key)
                    log.exception(
                        "alkey's observer %r raised in %s(); the store goes on (reported "
                        "once per observer and event)",
                        getattr(hook, "__self__", hook),
                        event,
                    )

    def fetched(self, *, identifiers: Sequence[str], missed: bool) -> None:
        self._emit("fetched", {"identifiers": identifiers, "missed": missed})

    def bumped(self, *, count: int, replayed: int) -> None:
        self._emit("bumped", {"count": count, "replayed": replayed})

    def round_trip(self, *, operation: str, seconds: float, failed: bool) -> None:
        self._emit("round_trip", {"operation": operation, "seconds": seconds, "failed": failed})

    def bump_kept(self, *, count: int, pending: int) -> None:
        self._emit("bump_kept", {"count": count, "pending": pending})

    def dropped(self, *, count: int, max_pending: int) -> None:
        self._emit("dropped", {"count": count, "max_pending": max_pending})

    def outage_began(
        self, *, action: str, error: BaseException, pending: int, dropped: int, max_pending: int
    ) -> None:
        self._emit(
            "outage_began",
            {
                "action": action,
                "error": error,
                "pending": pending,
                "dropped": dropped,
                "max_pending": max_pending,
            },
        )

    def outage_ended(self, *, replayed: int, dropped: int) -> None:
        self._emit("outage_ended", {"replayed": replayed, "dropped": dropped})

    def pool_exhausted(self, *, action: str, error: BaseException, pending: int) -> None:
        self._emit("pool_exhausted", {"action": action, "error": error, "pending": pending})

    def pool_recovered(self, *, starved: int) -> None:
        self._emit("pool_recovered", {"starved": starved})

    def intents_claimed(self, *, count: int) -> None:
        self._emit("intents_claimed", {"count": count})

    def recovery_began(self, *, claimed: int, lease: float, backlog: bool) -> None:
        self._emit("recovery_began", {"claimed": claimed, "lease": lease, "backlog": backlog})

    def recovery_ended(self, *, total: int, lease: float, backlog: bool) -> None:
        self._emit("recovery_ended", {"total": total, "lease": lease, "backlog": backlog})

    def local_lookup(self, *, hits: int, misses: int) -> None:
        self._emit("local_lookup", {"hits": hits, "misses": misses})

    def local_invalidated(self, *, count: int, evicted: int) -> None:
        self._emit("local_invalidated", {"count": count, "evicted": evicted})

    def local_flushed(self, *, reason: str, entries: int) -> None:
        self._emit("local_flushed", {"reason": reason, "entries": entries})

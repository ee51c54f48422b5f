"""What a token store owes Redis while Redis is unreachable, and the recoveries of intents
that dead writers left behind: the bookkeeping of incidents, without I/O.

Why a module of its own: the sync and asyncio stores (and any store to come) must behave
identically in an outage, so the policy -- keep, drop past a bound, skip while down,
miss while others replay, report each incident once -- is written here once. It reports
incidents to an :class:`OutageEvents` (the store's observers, see :mod:`alkey.observers`),
never to a logger of its own, so metrics and logs see the same incidents.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from typing import Protocol

from alkey.constants import UNKNOWN_WRITES
from alkey.errors import TokenStoreConfigurationError, TokenStoreError
from alkey.options import ErrorPolicy, StoreOptions

__all__ = ["RECOVERY_BUDGET", "OutageEvents", "OutageLedger", "Recoveries", "Replay"]

#: Seconds one call may spend claiming further batches of a backlog of due intents, on
#: top of its own round trip and the bump of the last batch it claimed (see
#: ``ScriptStore._recover`` in :mod:`alkey.tokens`): a few dozen batches of
#: :data:`~alkey.scripts.CLAIM_LIMIT` on a local Redis. The rest is left to the next
#: calls, which claim at once.
RECOVERY_BUDGET = 0.05


class OutageEvents(Protocol):
    """The incidents :class:`OutageLedger` and :class:`Recoveries` report (the methods of
    :class:`alkey.observers.StoreObserver` of the same names)."""

    def bump_kept(self, *, count: int, pending: int) -> None:
        """A bump could not reach Redis and was kept for replay
        (:meth:`alkey.observers.StoreObserver.bump_kept`)."""

    def dropped(self, *, count: int, max_pending: int) -> None:
        """Kept bumps went past ``max_pending``: the token every key depends on is kept in
        their place (:meth:`alkey.observers.StoreObserver.dropped`)."""

    def outage_began(
        self, *, action: str, error: BaseException, pending: int, dropped: int, max_pending: int
    ) -> None:
        """The first failure of an outage
        (:meth:`alkey.observers.StoreObserver.outage_began`)."""

    def outage_ended(self, *, replayed: int, dropped: int) -> None:
        """Redis answers again; the kept bumps were replayed
        (:meth:`alkey.observers.StoreObserver.outage_ended`)."""

    def pool_exhausted(self, *, action: str, error: BaseException, pending: int) -> None:
        """A call found no free connection in its pool and went without Redis
        (:meth:`alkey.observers.StoreObserver.pool_exhausted`)."""

    def pool_recovered(self, *, starved: int) -> None:
        """A call got a connection again
        (:meth:`alkey.observers.StoreObserver.pool_recovered`)."""

    def recovery_began(self, *, claimed: int, lease: float, backlog: bool) -> None:
        """A recovery of due intents begins
        (:meth:`alkey.observers.StoreObserver.recovery_began`)."""

    def recovery_ended(self, *, total: int, lease: float, backlog: bool) -> None:
        """A recovery of due intents is over
        (:meth:`alkey.observers.StoreObserver.recovery_ended`)."""


class _Unheard:
    """Reports to nobody: a ledger made on its own, outside a store."""

    def bump_kept(self, *, count: int, pending: int) -> None:
        pass

    def dropped(self, *, count: int, max_pending: int) -> None:
        pass

    def outage_began(
        self, *, action: str, error: BaseException, pending: int, dropped: int, max_pending: int
    ) -> None:
        pass

    def outage_ended(self, *, replayed: int, dropped: int) -> None:
        pass

    def pool_exhausted(self, *, action: str, error: BaseException, pending: int) -> None:
        pass

    def pool_recovered(self, *, starved: int) -> None:
        pass

    def recovery_began(self, *, claimed: int, lease: float, backlog: bool) -> None:
        pass

    def recovery_ended(self, *, total: int, lease: float, backlog: bool) -> None:
        pass


class Replay(frozenset[str]):
    """Identifiers to bump again, remembering which failure of each is being replayed."""

    generations: dict[str, int]

    def __new__(cls, generations: dict[str, int]) -> Replay:
        replay = super().__new__(cls, generations)
        replay.generations = dict(generations)
        return replay


#: The replay of a ledger that owes nothing.
NOTHING = Replay({})


class OutageLedger:
    """What a token store owes Redis while it is unreachable, and the policy for it.

    Shared by the sync and asyncio stores, so they behave identically in an outage:

    * ``on_error="degrade"``: :meth:`failed` reports the first failure of an incident
      (``outage_began``) and returns; the store then answers with fresh random tokens (a
      guaranteed miss) or keeps the bump with :meth:`keep`, up to ``max_pending``
      identifiers, for :meth:`replay`;
    * ``on_error="raise"``: :meth:`failed` re-raises the error.

    A store sends :meth:`replay` in front of its next call, in the same round trip, and
    reports with :meth:`succeeded`, which reports the end of the incident
    (``outage_ended``).

    While Redis is known to be down, a degrading store does not wait for it: for
    ``retry_interval`` seconds after each failure, :meth:`skip` tells it to answer at once
    (a miss, a kept bump) instead of paying a socket timeout on every call; the first call
    after that probes Redis again.

    Past ``max_pending`` identifiers, a kept bump is replaced by a bump of
    :data:`~alkey.identity.UNKNOWN_WRITES`, which every key depends on: memory stays
    bounded and nothing is lost, at the price of a miss for every key once it is replayed.

    For ``recovery_window`` seconds after an outage ends (``2 * retry_interval``, plus
    the store's socket timeout), :meth:`recovering` tells
    the store to answer fetches with misses: other processes may still owe Redis bumps of
    writes they committed during the outage. They replay them from the background as soon
    as Redis answers -- at most a socket timeout plus ``retry_interval`` after it is back,
    when configured alike -- so a key made before then could still use a token from before
    one of those writes.

    A connection pool with no connection left (``max_connections``) is no outage: Redis
    answers every other caller. The transport has already waited for a connection by then
    (:func:`alkey.transports.pool_waits`); :meth:`exhausted` only lets that one call go
    without Redis -- a miss, a kept bump -- and marks nothing down, so the other calls go
    on using Redis, and the next call that gets a connection replays the kept bump in
    front.

    ``events`` hears of each incident (a store passes its observers); by default nobody.
    """

    def __init__(
        self,
        on_error: ErrorPolicy = "degrade",
        max_pending: int = 100_000,
        retry_interval: float = 1.0,
        *,
        events: OutageEvents | None = None,
    ) -> None:
        StoreOptions(on_error=on_error, max_pending=max_pending, retry_interval=retry_interval)
        self.on_error: ErrorPolicy = on_error
        self.max_pending = max_pending
        self.retry_interval = retry_interval
        self.events: OutageEvents = events if events is not None else _Unheard()
        #: Seconds after an outage during which fetches answer misses (see the class); the
        #: stores add their client's socket timeout.
        self.recovery_window = 2 * retry_interval
        self._next_probe = 0.0
        # identifier -> generation of its latest failed bump. A replay only clears the
        # generations it sent, so a bump that failed meanwhile stays owed.
        self._pending: dict[str, int] = {}
        self._generation = 0
        self._dropped = 0
        self._failing = False
        # The misconfigurations the open incident has reported (by the fix each calls
        # for, TokenStoreConfigurationError.fix): each is reported once per incident.
        self._kinds: set[str] = set()
        self._recovering_until = 0.0
        # Calls that went without Redis because the pool had no connection for them, since
        # the last call that had one (0: no such incident).
        self._starved = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> frozenset[str]:
        """Identifiers whose bump is waiting for Redis to answer again."""
        with self._lock:
            return frozenset(self._pending)

    def replay(self) -> Replay:
        """The bumps to send in front of the next call (usually none: no lock taken)."""
        if not self._pending:
            return NOTHING
        with self._lock:
            return Replay(self._pending)

    def skip(self) -> bool:
        """Whether to answer without Redis now: it failed less than ``retry_interval`` ago."""
        return self._failing and self.on_error == "degrade" and time.monotonic() < self._next_probe

    def probe_now(self) -> None:
        """Let the next call try Redis even if it failed less than ``retry_interval`` ago:
        for a last attempt, when no later call will come (interpreter exit)."""
        self._next_probe = 0.0

    def recovering(self) -> bool:
        """Whether an outage ended less than ``recovery_window`` ago: answer misses."""
        return self._recovering_until > 0.0 and time.monotonic() < self._recovering_until

    def keep(self, identifiers: Collection[str]) -> None:
        """Keep a bump that could not reach Redis, for :meth:`replay`."""
        dropped = 0
        with self._lock:
            self._generation += 1
            for identifier in identifiers:
                if len(self._pending) >= self.max_pending and identifier not in self._pending:
                    dropped += 1
                    # In its place, the token every key depends on (one slot over the bound).
                    self._pending[UNKNOWN_WRITES] = self._generation
                else:
                    self._pending[identifier] = self._generation
            self._dropped += dropped
            pending = len(self._pending)
        if identifiers:
            self.events.bump_kept(count=len(identifiers), pending=pending)
        if dropped:
            self.events.dropped(count=dropped, max_pending=self.max_pending)

    def failed(self, error: TokenStoreError, action: str) -> None:
        """A call could not reach Redis: raise ``error`` under ``on_error="raise"``, else
        mark Redis down for ``retry_interval`` (reported once per incident).

        A misconfiguration (:class:`~alkey.errors.TokenStoreConfigurationError`: a TLS
        certificate or a password refused, ``NOPERM``, ``CROSSSLOT``...) takes this way
        too, on purpose: it is reported as what it is (by the observers, from the error),
        but keys miss and bumps are kept exactly as in an outage -- nothing is lost, the
        database work never breaks -- and the store uses the same fast-fail window. Why
        the window: a refused handshake costs a connection attempt (TLS: several round
        trips) per call, and every call would pay it for as long as the setting stays
        wrong; probing every ``retry_interval`` still notices the fix within that time
        (the server's ACL or certificate changed) and replays the kept bumps. The
        incident is reported again, once, when a misconfiguration it has not reported yet
        turns up -- an outage that ends in a restart with a new password, say -- so that
        the log says what is wrong now; a cause that flaps between the two is not reported
        again, so that ``outage_began`` stays about once per incident for metrics."""
        if self.on_error == "raise":
            raise error
        kind = error.fix if isinstance(error, TokenStoreConfigurationError) else ""
        with self._lock:
            if not self._failing:
                self._kinds.clear()
            first = not self._failing or (bool(kind) and kind not in self._kinds)
            self._failing = True
            if kind:
                self._kinds.add(kind)
            self._next_probe = time.monotonic() + self.retry_interval
            pending, dropped = len(self._pending), self._dropped
        if first:
            self.events.outage_began(
                action=action,
                error=error,
                pending=pending,
                dropped=dropped,
                max_pending=self.max_pending,
            )

    def exhausted(self, error: TokenStoreError, action: str) -> None:
        """A call waited in vain for a connection from its pool: it goes without Redis
        (a miss, a kept bump), and the next calls try Redis as usual.

        Unlike :meth:`failed`, this marks nothing down: Redis answers, only this process
        ran out of connections, so turning the cache off for every call (and asking every
        fetch to miss for a recovery window) would be wrong. Reported once per incident --
        until a call gets a connection again -- and raised under ``on_error="raise"``.
        """
        if self.on_error == "raise":
            raise error
        with self._lock:
            self._starved += 1
            first = self._starved == 1
            pending = len(self._pending)
        if first:
            self.events.pool_exhausted(action=action, error=error, pending=pending)

    def succeeded(self, replayed: Replay) -> int:
        """A call reached Redis, sending ``replayed`` in front: forget those kept bumps,
        and end the incident if one was open.

        Returns how many of them this call settled: two calls may send the same kept
        bump at once (the background replay and the application's next call), and only
        the first to come back settles it, so that each kept bump is reported replayed
        once -- the second sending was one more bump, harmless (one more miss)."""
        if not self._failing and not replayed and not self._starved:
            return 0
        settled = 0
        with self._lock:
            for identifier, generation in replayed.generations.items():
                if self._pending.get(identifier) == generation:
                    del self._pending[identifier]
                    settled += 1
            recovered, self._failing = self._failing, False
            dropped, self._dropped = self._dropped, 0
            starved, self._starved = self._starved, 0
            if recovered:
                self._recovering_until = time.monotonic() + self.recovery_window
        if starved:
            self.events.pool_recovered(starved=starved)
        if recovered:
            self.events.outage_ended(replayed=settled, dropped=dropped)
        return settled


class Recoveries:
    """The recoveries a store runs -- bumps of due intents on behalf of writers that died
    between their COMMIT and their bump -- seen as incidents.

    A backlog of due intents is drained in batches of :data:`~alkey.scripts.CLAIM_LIMIT`,
    possibly over several calls and by several threads or tasks at once, yet it is one
    incident, reported once: ``recovery_began`` with its first batch's count (``backlog``
    if that batch was full, or others run), and ``recovery_ended`` with the total. While a
    recovery runs, or one left intents due (a full last batch), :meth:`busy` tells fetches
    to miss: a token read then may be one that the recovery is about to replace.
    """

    def __init__(self, lease: float, events: OutageEvents | None = None) -> None:
        self.lease = lease
        self.events: OutageEvents = events if events is not None else _Unheard()
        self._lock = threading.Lock()
        self._running = 0  # recoveries in progress in this store
        self._backlog = False  # the last batch was full, and nobody claimed after it
        self._incident = False  # a backlog was reported as begun, and not as ended
        self._open = False  # a recovery was reported as begun, and not as ended
        self._total = 0  # commits bumped since the last incident ended

    def busy(self) -> bool:
        """Whether a fetch must miss: a recovery runs here, or left intents due."""
        return self._backlog or self._running > 0

    def began(self, claimed: int, full: bool = False) -> None:
        """A recovery of ``claimed`` intents starts (its first batch; ``full``: as many as
        one claim takes, so more may be due)."""
        with self._lock:
            self._running += 1
            if self._incident:
                return
            alone = not full and self._running == 1 and not self._backlog
            self._incident = not alone
            self._open = True
        self.events.recovery_began(claimed=claimed, lease=self.lease, backlog=not alone)

    def applied(self, claimed: int) -> None:
        """A batch of ``claimed`` intents was bumped and cleared."""
        with self._lock:
            self._total += claimed

    def ended(self, more_due: bool) -> None:
        """A recovery stops, leaving intents due (``more_due``) or not."""
        with self._lock:
            self._running -= 1
            self._backlog = more_due
        self._close()

    def none_due(self) -> None:
        """A claim found nothing due: no backlog left."""
        if self._backlog or self._incident:  # without the lock: the usual case is neither
            with self._lock:
                self._backlog = False
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._running or self._backlog:
                return
            total, self._total = self._total, 0
            backlog, self._incident = self._incident, False
            began, self._open = self._open, False
        if began:
            self.events.recovery_ended(total=total, lease=self.lease, backlog=backlog)

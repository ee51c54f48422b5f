"""Token stores: where the random tokens behind cache keys live.

:class:`TokenStore` is the seam: the key generator and the session listeners only ever
call ``fetch`` and ``bump``, so an asyncio, cluster or in-process store can stand in for
:class:`RedisTokenStore` without touching them.

Why no MULTI/WATCH is needed (the reasoning of alkey 0.3's ``invalidate_tokens``, kept):
every bump replaces a token by a *fresh random value*, independently for each key. Two
writers bumping the same token in any interleaving both leave a value that differs from
every value a reader saw before either commit, and that is all a cache key needs. A
missing token is created inside the fetch script, which Redis runs atomically, so
concurrent readers agree on the first one written; a token lost to eviction, expiry or a
Redis restart comes back as a new random value: keys built on it change, they never
revert to an old key.

The store is built in layers (README, "Architecture"): :mod:`alkey.scripts` (what each
call sends), :mod:`alkey.outages` (what an outage owes, and recoveries),
:mod:`alkey.observers` (who hears of incidents), :mod:`alkey.transports` (how calls
travel, and which client errors mean what), and here :class:`ScriptStore`, the calls
themselves, written once for the sync and asyncio stores. The names that lived here
before the split are still importable from here.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection, Generator, Sequence
from typing import Any, ClassVar, Protocol, TypeAlias, TypeVar, runtime_checkable

from alkey.errors import TokenStoreError, TokenStorePoolExhaustedError
from alkey.invalidations import ClusterListeners, Listener, marked, tracking_options
from alkey.localcache import LocalTokens
from alkey.observers import LoggingObserver, ObserverGroup, StoreObserver
from alkey.options import DEFAULT_LEASE, ErrorPolicy, StoreOptions
from alkey.outages import NOTHING, OutageLedger, Recoveries, Replay
from alkey.outages import RECOVERY_BUDGET as RECOVERY_BUDGET
from alkey.scripts import CHUNK_SIZE, Call, ScriptCalls, fresh, new_token
from alkey.scripts import CLAIM_LIMIT as CLAIM_LIMIT
from alkey.transports import POOL_WAIT as POOL_WAIT
from alkey.transports import AsyncRedisTransport, ClusterClient, RedisTransport, transport_for
from alkey.transports import RedisClient as RedisClient
from alkey.transports import checked_socket_timeout as checked_socket_timeout

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_LEASE",
    "DurableTokenStore",
    "ErrorPolicy",
    "Exchange",
    "OutageLedger",
    "RedisTokenStore",
    "Replay",
    "ScriptCalls",
    "ScriptStore",
    "TokenStore",
    "intend",
    "new_token",
    "store_for",
]

log = logging.getLogger("alkey.tokens")

_R = TypeVar("_R")
#: One call of a store (a fetch, a bump, an intent) as the round trips it needs: the
#: generator yields the script calls of each round trip and is sent their results, or
#: thrown the :class:`~alkey.errors.TokenStoreError` that stopped them; it returns the
#: call's answer. :class:`ScriptStore` writes each call once, as such a generator, and
#: the sync and asyncio stores only differ in how they wait for the round trips.
Exchange: TypeAlias = "Generator[list[Call], list[Any], _R]"


@runtime_checkable
class TokenStore(Protocol):
    """What alkey needs from a place that keeps tokens."""

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        """Return the current token of each identifier, creating missing ones, in order."""
        ...

    def bump(self, identifiers: Collection[str]) -> None:
        """Give each identifier a new random token."""
        ...


@runtime_checkable
class DurableTokenStore(TokenStore, Protocol):
    """A token store that can survive the death of a process between commit and bump.

    The listeners call :meth:`intend` just before the database COMMIT and pass what it
    returned to :meth:`bump` right after it. A store that wrote the intent down somewhere
    shared can bump on behalf of a process that died in between (see
    :class:`RedisTokenStore`'s ``durable`` mode).
    """

    def intend(self, identifiers: Collection[str]) -> str | None:
        """Record that ``identifiers`` are about to be bumped; return the record's id
        (``None`` when nothing was recorded)."""
        ...

    def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        """Give each identifier a new random token, and forget ``intent``."""
        ...


def intend(tokens: TokenStore, identifiers: Collection[str]) -> str | None:
    """``tokens.intend(identifiers)`` if ``tokens`` is a :class:`DurableTokenStore`, else
    ``None``: what a wrapper store (Pyramid's application store, say) forwards.

    It may raise like the store. The listeners call it just before the database COMMIT
    only through :func:`alkey.connections.record_intent`, the one place that keeps a
    failure there from breaking SQLAlchemy's commit.
    """
    record = getattr(tokens, "intend", None)
    if record is None or not identifiers:
        return None
    intent: str | None = record(identifiers)
    return intent


def bump(tokens: TokenStore, identifiers: Collection[str], intent: str | None) -> None:
    """Bump ``identifiers`` in ``tokens``, clearing ``intent`` (from :func:`intend`)."""
    if intent is None:
        tokens.bump(identifiers)
    else:
        assert isinstance(tokens, DurableTokenStore)
        tokens.bump(identifiers, intent=intent)


def store_options(options: StoreOptions | None = None, **settings: Any) -> StoreOptions:
    """``options`` (default: the defaults) with the ``settings`` a caller gave as keyword
    arguments (``None``: not given) applied over it, and checked
    (:class:`~alkey.errors.ConfigurationError`)."""
    base = options if options is not None else StoreOptions()
    given = {name: value for name, value in settings.items() if value is not None}
    return base.replace(**given) if given else base


# Where a store is shared through its key (a transport's share_key: redis-py's connection
# pool, a cluster client): an attribute on the key, named by the store kind's
# pool_attribute, so that key and store live and die together (the store holds its client,
# which holds the key: a registry holding either strongly would never let them go). A key
# that takes no attribute (__slots__) falls back to this registry, which holds the store
# weakly: it is shared as long as something uses it.
_shared: dict[str, weakref.WeakKeyDictionary[Any, weakref.ref[ScriptStore]]] = {}
_stores_lock = threading.RLock()


class ScriptStore:
    """What the sync and asyncio Redis stores share: options, outage ledger, observers,
    how a store is shared through its transport's share key, and each call itself --
    fetch, intend, bump and recovery -- written once as an :data:`Exchange`, with no I/O.

    The stores differ only in how they wait for Redis: they drive these generators,
    sending each yielded round trip through their transport, which raises only alkey's
    errors (:func:`alkey.transports.store_error`). So this core never sees a client
    library's exceptions.

    ``options`` (checked already: the stores' own keyword arguments are applied over it
    by ``store_options()``) set the behaviour; ``observers`` hear of incidents (default:
    one :class:`~alkey.observers.LoggingObserver`); ``transport`` carries the round trips.
    """

    #: Which registry of shared stores this kind lives in (see ``shared_store()``).
    pool_attribute: ClassVar[str]

    def __init__(
        self,
        options: StoreOptions,
        observers: Sequence[StoreObserver] | None,
        transport: RedisTransport | AsyncRedisTransport,
    ) -> None:
        #: The store's options (read-only: make a new store to change them).
        self.options = options
        self._observe = ObserverGroup(observers if observers is not None else (LoggingObserver(),))
        self.calls = ScriptCalls(options.ttl, options.key_prefix, clustered=transport.clustered)
        self.outage = OutageLedger(
            options.on_error, options.max_pending, options.retry_interval, events=self._observe
        )
        self.outage.recovery_window += transport.socket_timeout
        #: The recoveries of due intents this store runs (durable mode).
        self.recoveries = Recoveries(options.lease, self._observe)
        self._next_claim = 0.0
        self._epoch_hidden = False
        self._listen_failed = False
        #: The local token cache (``local_cache`` option), or ``None`` when it is off.
        self.local: LocalTokens | None = (
            LocalTokens(options.local_cache, options.key_prefix, self._observe)
            if options.local_cache
            else None
        )

    @property
    def durable(self) -> bool:
        """Whether commits record their intended bumps in Redis before the COMMIT."""
        return self.options.durable

    @property
    def lease(self) -> float:
        """Seconds after which any process bumps an intent that its writer did not clear."""
        return self.options.lease

    @property
    def observers(self) -> tuple[StoreObserver, ...]:
        """Who hears of this store's incidents (see :mod:`alkey.observers`)."""
        return self._observe.observers

    def add_observer(self, observer: StoreObserver) -> None:
        """Report this store's events to ``observer`` too, from now on (for metrics)."""
        self._observe.add(observer)

    @property
    def pending(self) -> frozenset[str]:
        """Identifiers whose bump is waiting for Redis to answer again."""
        return self.outage.pending

    def _share_through(self, key: object | None) -> None:
        """Become the store that ``shared_store()`` returns for ``key`` (a transport's
        share key; ``None``: nothing to share through)."""
        if key is None:
            return
        with _stores_lock:
            try:
                setattr(key, self.pool_attribute, self)
            except AttributeError:
                registry = _shared.setdefault(self.pool_attribute, weakref.WeakKeyDictionary())
                registry[key] = weakref.ref(self)

    def _replay_soon(self) -> None:
        """Replay the kept bumps without waiting for this process's next call (each store
        does it its own way: a thread, a task)."""
        raise NotImplementedError

    def _failed(self, error: TokenStoreError, action: str) -> None:
        """A call could not reach Redis: an outage, or only an exhausted pool."""
        if isinstance(error, TokenStorePoolExhaustedError):
            self.outage.exhausted(error, action)
        else:
            self.outage.failed(error, action)

    def _missed(self, identifiers: Sequence[str]) -> list[str]:
        """A fetch's answer without Redis's tokens: fresh ones, a guaranteed miss."""
        if self._observe.fetched_hooks:
            self._observe.fetched(identifiers=identifiers, missed=True)
        return fresh(identifiers)

    def _bumped(self, count: int, replayed: int) -> None:
        if count and self._observe.bumped_hooks:
            self._observe.bumped(count=count, replayed=replayed)

    def _cached(
        self, local: LocalTokens, identifiers: Sequence[str]
    ) -> tuple[list[str] | None, list[str | None] | None]:
        """What the local cache knows of ``identifiers``, for ``fetch``: ``(tokens, None)``
        when it holds every token (no round trip), else ``(None, known)``, ``known`` the
        tokens it holds (``None`` where it has none) for :meth:`_fetching` to fill in,
        or ``None`` to fetch them all -- it holds none, it is not serving (its listeners
        are started then), or Redis has something to say first: bumps kept from an
        outage, the window after one, a recovery of due intents, or durable mode's
        regular claim of them."""
        if (
            self.outage.skip()
            or self.outage.replay()
            or self.outage.recovering()
            or self.recoveries.busy()
            or (self.options.durable and time.monotonic() >= self._next_claim)
        ):
            return None, None
        found = local.lookup(identifiers)
        if found is None:
            self._listen()
            return None, None
        misses = found.count(None)
        if self._observe.local_lookup_hooks:
            self._observe.local_lookup(hits=len(found) - misses, misses=misses)
        if not misses:
            if self._observe.fetched_hooks:
                self._observe.fetched(identifiers=identifiers, missed=False)
            return found, None  # type: ignore[return-value]
        if self.calls.clustered:
            self._listen()  # the primaries may have changed: see ClusterListeners
        return None, (found if misses < len(found) else None)

    def _listen(self) -> None:
        """Start the local cache's listeners unless they run. Never raises: the cache's
        upkeep must not break a key (it is reported once, and the cache stays off)."""
        try:
            self._start_listening()
        except Exception:
            if not self._listen_failed:
                self._listen_failed = True
                log.exception(
                    "alkey's local token cache could not start its listener; keys go to "
                    "Redis as without the cache (reported once)"
                )

    def _start_listening(self) -> None:
        """Start the local cache's listeners unless they run (each store its own way)."""
        raise NotImplementedError

    def _fetching(
        self, identifiers: Sequence[str], known: list[str | None] | None = None
    ) -> Exchange[list[str]]:
        """``fetch``: the current tokens, in one round trip unless a recovery comes first.

        Fresh random tokens (a guaranteed miss) instead while Redis is down or was until
        lately (see :class:`~alkey.outages.OutageLedger`), when the pool had no connection
        for this call, and while a recovery of due intents runs in this store or has left
        some due: the tokens Redis holds then may be about to be replaced.

        ``known``: the local cache's answer (:meth:`_cached`); only the identifiers it
        lacks are fetched, and what comes back is kept in it.
        """
        if self.outage.skip():
            return self._missed(identifiers)
        claim = self._claim()
        if claim:
            known = None  # a recovery may replace any token: fetch them all behind it
        ask = (
            identifiers
            if known is None
            else [
                identifier
                for identifier, token in zip(identifiers, known, strict=True)
                if token is None
            ]
        )
        local = self.local
        fetch = local.begin() if local is not None else None
        try:
            replay = self.outage.replay()
            try:
                results = yield [*claim, *self.calls.fetch(ask, replay)]
            except TokenStoreError as error:
                self._failed(error, "fetch tokens")
                return self._missed(identifiers)
            settled = self.outage.succeeded(replay)
            if replay:
                self._evict(replay)
                self._bumped(len(replay), settled)
            if claim:
                claimed = self._claimed(results[0])
                if claimed:
                    # Fetched again behind the recovery's last bump: the tokens it replaced.
                    after = yield from self._recover(claimed, self.calls.fetch(ask, ()))
                    if after is None:
                        return self._missed(identifiers)
                    results = after
            if self.outage.recovering() or self.recoveries.busy():
                return self._missed(identifiers)
            if self._observe.fetched_hooks:
                self._observe.fetched(identifiers=identifiers, missed=False)
            if not results[-1][0] and not self._epoch_hidden:
                self._hidden_epoch()
            tokens = self.calls.tokens(results, ask)
            if local is None:
                return tokens
            if self.calls.clustered:
                # The client may have learnt of a new primary in this round trip (MOVED):
                # listen to it first; a change of primaries keeps these tokens out.
                self._listen()
            local.fill(fetch, ask, tokens, one_server=not self.calls.clustered)
            fetch = None  # filled: nothing to abandon
            if known is None:
                return tokens
            fetched = iter(tokens)
            return [token if token is not None else next(fetched) for token in known]
        finally:
            if fetch is not None:
                local.abandon(fetch)  # type: ignore[union-attr]

    def _evict(self, identifiers: Collection[str]) -> None:
        """Drop what this process bumped (or could not bump) from its local cache."""
        local = self.local
        if local is not None and identifiers:
            local.evict(identifiers)

    def _hidden_epoch(self) -> None:
        """Redis answered without its replication id: say once what that costs."""
        self._epoch_hidden = True
        log.warning(
            "alkey's Redis does not show its replication id (INFO replication): a proxy "
            "in front of it, or an ACL without +info. Keys then cannot tell a failover or "
            "a restart that lost writes, and may come back to their values from before "
            "the lost bumps. Allow +info for alkey's user, or connect to Redis directly."
        )

    def _intending(self, identifiers: Collection[str]) -> Exchange[str | None]:
        """``intend``: in durable mode, record the bumps a commit is about to make."""
        if not self.options.durable or not identifiers or self.outage.skip():
            return None
        intent = new_token()
        replay = self.outage.replay()
        try:
            yield [*self.calls.bump(replay), *self.calls.intend(intent, identifiers)]
        except TokenStoreError as error:
            self._failed(error, "record the bumps a commit intends")
            return None
        settled = self.outage.succeeded(replay)
        self._bumped(len(replay), settled)
        return intent

    def _bump_plan(self, identifiers: Collection[str]) -> tuple[Replay, Collection[str]] | None:
        """What a bump sends -- the kept bumps it replays, and everything to bump -- or
        ``None`` if it sends nothing: nothing to bump, or Redis is known to be down (then
        the bump is kept for the replay)."""
        if self.outage.skip():
            self.outage.keep(identifiers)
            self._evict(identifiers)
            self._replay_soon()
            return None
        replay = self.outage.replay()
        todo = replay.union(identifiers) if replay else identifiers
        return (replay, todo) if todo else None

    def _bumping(
        self,
        identifiers: Collection[str],
        intents: Collection[str],
        replay: Replay,
        todo: Collection[str],
    ) -> Exchange[None]:
        """``bump``, as planned by :meth:`_bump_plan`; clears ``intents`` with it."""
        claim = self._claim()
        try:
            results = yield [*claim, *self.calls.bump(todo, intents)]
        except TokenStoreError as error:
            self.outage.keep(identifiers)
            self._evict(todo)
            self._replay_soon()
            self._failed(error, f"bump {len(todo)} token(s)")
            return
        self._evict(todo)
        settled = self.outage.succeeded(replay)
        self._bumped(len(todo), settled)
        if claim:
            claimed = self._claimed(results[0])
            if claimed:
                yield from self._recover(claimed, [])

    def _claim(self) -> list[Call]:
        """A claim of the due intents, to send in front of this call: in durable mode, at
        most once per half lease (so a crashed writer's bump is at most 1.5 leases late
        while the application makes calls), else never -- except that after a recovery
        that left intents due, the next call claims at once."""
        if not self.options.durable:
            return []
        now = time.monotonic()
        if now < self._next_claim:
            return []
        lease = self.options.lease
        self._next_claim = now + lease / 2
        return [self.calls.claim(lease)]

    def _claimed(self, result: list[Any]) -> dict[str, list[str]]:
        """The intents a claim took over (rarely any: a writer died)."""
        claimed = ScriptCalls.claimed(result)
        if not claimed:
            self.recoveries.none_due()
        else:
            self._observe.intents_claimed(count=len(claimed))
        return claimed

    def _recover(
        self, claimed: dict[str, list[str]], then: list[Call]
    ) -> Exchange[list[Any] | None]:
        """Bump the intents a claim took over and clear them; while the claims come back
        full, claim and bump the next batch, for up to
        :data:`~alkey.outages.RECOVERY_BUDGET` seconds.

        One round trip per batch, each carrying the bump of one batch, the claim of the
        next, and ``then`` (a fetch's calls): in a loop, so that a backlog of any size
        costs a bounded stack, and at most the budget plus one round trip per call -- the
        next calls claim at once and go on (see :meth:`_claim`). Returns the results of
        the last round trip, whose ``then`` ran after the recovery's last bump with
        nothing more due, or ``None`` if intents may remain due (the budget ran out, or
        Redis failed): ``then``'s tokens could be about to be replaced.
        """
        deadline = time.monotonic() + RECOVERY_BUDGET
        self.recoveries.began(len(claimed), full=len(claimed) >= CLAIM_LIMIT)
        more_due = True
        try:
            while True:
                identifiers: set[str] = set().union(*claimed.values())
                more_due = len(claimed) >= CLAIM_LIMIT
                again = more_due and time.monotonic() < deadline
                calls = self.calls.bump(identifiers, claimed.keys())
                if again:
                    calls.append(self.calls.claim(self.options.lease))
                try:
                    results = yield [*calls, *then] if again or not more_due else calls
                except TokenStoreError as error:
                    self.outage.keep(identifiers)
                    self._evict(identifiers)
                    self._replay_soon()
                    self._failed(error, f"bump {len(identifiers)} token(s)")
                    return None
                self._evict(identifiers)
                self.outage.succeeded(NOTHING)
                self.recoveries.applied(len(claimed))
                self._bumped(len(identifiers), len(identifiers))
                if not again:
                    return None if more_due else results
                claimed = self._claimed(results[len(calls) - 1])
                if not claimed:
                    more_due = False
                    return results
        finally:
            if more_due:
                self._next_claim = 0.0  # the next call claims at once
            self.recoveries.ended(more_due)


_Store = TypeVar("_Store", bound=ScriptStore)


def shared_store(key: Any, kind: type[_Store], make: Callable[[], _Store]) -> _Store:
    """The store of ``kind`` most recently created on ``key`` (a transport's share key:
    redis-py's connection pool), else ``make()``'s."""
    store = _shared_on(key, kind)
    if isinstance(store, kind):
        return store
    with _stores_lock:  # reentrant: the new store shares itself under it
        store = _shared_on(key, kind)
        return store if isinstance(store, kind) else make()


def _shared_on(key: Any, kind: type[ScriptStore]) -> ScriptStore | None:
    store = getattr(key, kind.pool_attribute, None)
    if store is None:
        registry = _shared.get(kind.pool_attribute)
        reference = registry.get(key) if registry is not None else None
        store = reference() if reference is not None else None
    return store if isinstance(store, ScriptStore) else None


class RedisTokenStore(ScriptStore):
    """Tokens in Redis, one string key per identifier, one round trip per call.

    ``fetch`` runs one small Lua script over all the keys: existing tokens are returned
    untouched, missing ones are created atomically (``SET`` inside the script, so
    concurrent readers agree on the first one written). ``bump`` runs another that gives
    every key a new random token. The first call of each script sends its source
    (``EVAL``, which also loads it), later ones only its SHA (``EVALSHA``); after a Redis
    restart or ``SCRIPT FLUSH`` one call is answered ``NOSCRIPT`` and sent again with the
    source. No call ever pays for a ``SCRIPT EXISTS`` round trip.

    ``client`` may be a ``redis.cluster.RedisCluster``: scripts need all their keys in one
    hash slot, so each call is then split by slot, and the calls of each node go out in
    one pipeline, to every node at once (:class:`~alkey.transports.ClusterTransport`): a
    call costs one round trip per node it touches, in parallel -- the latency of one.

    With ``on_error="degrade"`` (the default), a Redis error never reaches the caller:

    * ``fetch`` returns fresh random tokens, so the key is a guaranteed cache miss;
    * ``bump`` keeps the identifiers (up to ``max_pending``) and sends them again in front
      of the next ``fetch`` or ``bump`` of this store, in the same round trip. A key this
      process generates after Redis recovers therefore never reuses a token from before
      a write that committed during the outage.

    With ``on_error="raise"``, calls raise alkey's errors
    (:class:`~alkey.errors.TokenStoreUnavailableError`,
    :class:`~alkey.errors.TokenStorePoolExhaustedError`,
    :class:`~alkey.errors.TokenStoreError`; all still redis-py ``RedisError`` subclasses), with
    redis-py's error as ``__cause__``.

    Each outage is reported once when it starts and once when it ends to the store's
    ``observers``; the default :class:`~alkey.observers.LoggingObserver` logs it on the
    ``alkey.tokens`` logger, with counts (see :class:`~alkey.outages.OutageLedger`).

    A connection pool with no free connection (``max_connections``) is no outage: the
    call waits for one, at most the client's socket timeout
    (:func:`alkey.transports.pool_waits`), and only if none comes does that call alone go
    without Redis, as above, marking nothing down (:meth:`~alkey.outages.OutageLedger.exhausted`).

    ``durable=True`` closes the one gap memory cannot: a process that dies (or loses
    Redis for good) between the database COMMIT and the bump. Just before the COMMIT the
    listeners call :meth:`intend`, which records the identifiers about to be bumped under
    a random intent id, stamped with Redis's clock (one more round trip per writing
    commit); the bump clears the intent in its own round trip. Any process using a
    durable store claims the intents older than ``lease`` seconds, at most once per half
    lease, in the pipeline of a call it makes anyway, and bumps them. A key therefore
    never outlives a committed write by more than about 1.5 leases while some process
    generates keys or commits. Read-only commits still cost nothing. A backlog of due
    intents (many writers died) is drained in batches, one round trip each, for at most
    :data:`~alkey.outages.RECOVERY_BUDGET` seconds per call, the next calls going on at
    once; meanwhile fetches miss (see ``ScriptStore._recover()``).

    ``options`` (:class:`~alkey.options.StoreOptions`) holds all of these settings in one
    object; keyword arguments given as well are applied over it.

    Share one store per Redis (``store_for(client)`` does this) so that the key generator
    sees the bumps that the session listeners could not send yet.
    """

    pool_attribute = "_alkey_token_store"

    def __init__(
        self,
        client: RedisClient | ClusterClient,
        *,
        options: StoreOptions | None = None,
        observers: Sequence[StoreObserver] | None = None,
        ttl: int | None = None,
        key_prefix: str | None = None,
        on_error: ErrorPolicy | None = None,
        max_pending: int | None = None,
        retry_interval: float | None = None,
        durable: bool | None = None,
        lease: float | None = None,
        local_cache: int | None = None,
    ) -> None:
        # Checked first: a store that cannot work is refused before its client is looked at.
        options = store_options(
            options,
            ttl=ttl,
            key_prefix=key_prefix,
            on_error=on_error,
            max_pending=max_pending,
            retry_interval=retry_interval,
            durable=durable,
            lease=lease,
            local_cache=local_cache,
        )
        transport = transport_for(client)
        super().__init__(options, observers, transport)
        #: The client given. Typed as ``redis.Redis``, as before clusters, so that code
        #: reaching through it (``store.client.connection_pool``) still type-checks; a
        #: cluster store's is the ``RedisCluster`` it was given (``transport.cluster``).
        self.client: RedisClient = client  # type: ignore[assignment]
        #: How this store's calls travel to Redis (and which errors mean what).
        self.transport: RedisTransport = transport
        self._replayer: threading.Thread | None = None
        self._replayer_lock = threading.Lock()
        self._replays_at_exit = False
        self._listener: Listener | ClusterListeners | None = None
        if self.local is not None and transport.clustered:
            self._listener = ClusterListeners(
                self.local,
                client,
                lambda node: tracking_connector(node.redis_connection.connection_pool),
                retry_interval=options.retry_interval,
            )
        elif self.local is not None:
            pool: Any = getattr(client, "connection_pool", None)
            self._listener = Listener(
                self.local,
                tracking_connector(pool),
                retry_interval=options.retry_interval,
                where=_where(pool),
            )
        self._share_through(transport.share_key)

    @property
    def pool_wait(self) -> float:
        """Seconds a call waits for a connection when the pool has none free."""
        return self.transport.pool_wait

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        """The current token of each of ``identifiers``, in order, created if missing:
        those the local token cache holds from it, the others from Redis in one round
        trip. Fresh random tokens -- a miss -- when Redis cannot answer (see above)."""
        if not identifiers:
            return []
        local = self.local
        if local is None:
            return self._exchange(self._fetching(identifiers), "fetch")
        tokens, known = self._cached(local, identifiers)
        if tokens is not None:
            return tokens
        return self._exchange(self._fetching(identifiers, known), "fetch")

    def _start_listening(self) -> None:
        if self._listener is not None:
            self._listener.ensure_running()

    def close_local_cache(self) -> None:
        """Turn the local token cache off for good: empty it, and end its listener (which
        closes its connection). For a graceful shutdown, or a test; without it, both go
        with the store."""
        if self.local is not None:
            self.local.close()

    def intend(self, identifiers: Collection[str]) -> str | None:
        """In durable mode, record in Redis that ``identifiers`` are about to be bumped
        (one round trip, just before the database COMMIT); return the intent's id for
        :meth:`bump`. Without durable mode, or while Redis is down: ``None``."""
        return self._exchange(self._intending(identifiers), "intend")

    def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        """Give each of ``identifiers`` a new random token, in one round trip that also
        clears ``intent`` (from :meth:`intend`). Kept for replay when Redis cannot take it
        (see above)."""
        self._bump(identifiers, () if intent is None else (intent,))

    def _bump(self, identifiers: Collection[str], intents: Collection[str]) -> None:
        plan = self._bump_plan(identifiers)
        if plan is not None:
            self._exchange(self._bumping(identifiers, intents, *plan), "bump")

    def _exchange(self, exchange: Exchange[_R], operation: str) -> _R:
        """Carry out one of :class:`ScriptStore`'s calls: send each round trip it yields,
        hand it back the results or the error. Each round trip is timed for the observers
        as ``operation`` when one of them listens."""
        run: Callable[[list[Call]], list[Any]] = self.transport.run
        if self._observe.round_trip_hooks:
            run = self._timed(run, operation)
        try:
            calls = next(exchange)
            while True:
                try:
                    results = run(calls)
                except TokenStoreError as error:
                    calls = exchange.throw(error)
                else:
                    calls = exchange.send(results)
        except StopIteration as done:
            answer: _R = done.value
            return answer
        finally:
            exchange.close()

    def _timed(
        self, run: Callable[[list[Call]], list[Any]], operation: str
    ) -> Callable[[list[Call]], list[Any]]:
        """``run``, telling the observers how long each round trip took
        (:meth:`~alkey.observers.StoreObserver.round_trip`)."""
        report = self._observe.round_trip

        def timed(calls: list[Call]) -> list[Any]:
            began = time.perf_counter()
            try:
                results = run(calls)
            except TokenStoreError as error:
                # No connection at all reached Redis: that is pool_exhausted's to tell.
                if not isinstance(error, TokenStorePoolExhaustedError):
                    report(operation=operation, seconds=time.perf_counter() - began, failed=True)
                raise
            report(operation=operation, seconds=time.perf_counter() - began, failed=False)
            return results

        return timed

    def _replay_soon(self) -> None:
        """Replay the kept bumps from a daemon thread, probing every ``retry_interval``,
        instead of waiting for this process's next call: other processes must not go on
        using the old tokens because this one fell idle after the outage."""
        with self._replayer_lock:
            if self._replayer is not None and self._replayer.is_alive():
                return
            self._replayer = threading.Thread(
                target=self._replay_until_done, name="alkey-replay", daemon=True
            )
            self._replayer.start()
            if not self._replays_at_exit:
                self._replays_at_exit = True
                atexit.register(_replay_at_exit, weakref.ref(self))

    def _replay_until_done(self) -> None:
        while True:
            # Deciding to stop and saying so happen under the lock that _replay_soon
            # takes after keeping a bump: a bump kept meanwhile either keeps this thread
            # going or starts the next one, never neither.
            with self._replayer_lock:
                if not self.outage.pending:
                    self._replayer = None
                    return
            time.sleep(max(self.outage.retry_interval, 0.01))
            self._replay_now()

    def _replay_now(self) -> None:
        # on_error="raise": nobody to raise to here; the next round retries.
        with contextlib.suppress(TokenStoreError):
            self._bump((), ())

    def wait_replayed(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the bumps kept during an outage to reach
        Redis; whether none is left. For a graceful shutdown, or a test. (A process that
        exits normally also tries once more by itself, from an ``atexit`` hook.)"""
        replayer = self._replayer
        if replayer is not None:
            replayer.join(timeout)
        return not self.outage.pending


def _replay_at_exit(store: weakref.ref[RedisTokenStore]) -> None:
    live = store()
    if live is None or not live.outage.pending:
        return
    # There is no later call to wait for: probe now, even within retry_interval of the
    # last failure (a job that exits right after Redis came back must not lose its bumps).
    live.outage.probe_now()
    # Best effort at interpreter exit: a failure must not print a traceback (starting the
    # background replay, for one, is refused this late).
    with contextlib.suppress(Exception):
        live._replay_now()


def tracking_connector(pool: Any) -> Callable[[], Any]:
    """What a listener connects with: :func:`tracking_connection` of ``pool``, held
    weakly -- the pool holds the store (see :func:`store_for`), and a listener must not
    keep either alive."""
    reference = weakref.ref(pool)

    def connect() -> Any:
        live = reference()
        if live is None:
            raise ConnectionError("the client's connection pool is gone")
        return tracking_connection(live)

    return connect


def tracking_connection(pool: Any) -> Any:
    """A new connection made with ``pool``'s options but outside it, speaking RESP2: the
    local cache's tracking connection (see :mod:`alkey.invalidations`)."""
    connection = marked(pool.connection_class(**tracking_options(pool.connection_kwargs)))
    connection.connect()
    return connection


def _where(pool: Any) -> str:
    """The server ``pool`` connects to, for log lines (never its password)."""
    if pool is None:
        return "Redis"
    options = getattr(pool, "connection_kwargs", {})
    if "path" in options:
        return str(options["path"])
    if "service_name" in options or "connection_pool" in options:
        return f"the primary of {getattr(pool, 'service_name', 'a Sentinel service')}"
    return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"


def store_for(client: RedisClient | ClusterClient) -> RedisTokenStore:
    """The process's shared :class:`RedisTokenStore` for ``client``'s connection pool.

    That is the store most recently created on this pool -- so a store configured with
    ``RedisTokenStore(client, ttl=..., key_prefix=...)`` is the one that
    ``CacheKeyGenerator(client)``, ``get_token(client, ...)`` and
    ``bind(..., redis_client=client)`` use too -- or a new one with default settings.
    Clients created per request from one pool share it, and with it the bumps that wait
    for an outage to end. A ``redis.cluster.RedisCluster`` (which owns a pool per node)
    shares its store through the client itself.
    """
    return shared_store(share_key(client), RedisTokenStore, lambda: RedisTokenStore(client))


def share_key(client: Any) -> object:
    """What stores of ``client`` are shared through: its connection pool, or a cluster
    client itself (it has a pool per node, and none of its own)."""
    pool = getattr(client, "connection_pool", None)
    return pool if pool is not None else client

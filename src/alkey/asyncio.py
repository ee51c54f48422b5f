"""alkey under asyncio: AsyncSession, async_sessionmaker and redis.asyncio.

Requires ``pip install 'alkey[asyncio]'`` (SQLAlchemy's greenlet support). The core never
imports this module: as it is imported, it registers :func:`sync_target` and
:func:`store_for` with :func:`alkey.events.support_asyncio`, and :func:`alkey.events.bind`
loads it by name only once ``sqlalchemy.ext.asyncio`` has been imported.

The guarantees are the sync ones. SQLAlchemy runs an
:class:`~sqlalchemy.ext.asyncio.AsyncSession`'s work, and the session events that alkey
listens to, in a greenlet of the task that awaits it. From there
:class:`AsyncRedisTokenStore` awaits ``redis.asyncio`` with SQLAlchemy's ``await_()``, so
the bump has reached Redis when ``await session.commit()`` returns (a request that saves
and then renders sees the new key), while the event loop runs other tasks during the
round trip.

* :func:`bind` -- :func:`alkey.events.bind` with an asyncio token store;
* :class:`AsyncCacheKeyGenerator` -- ``await key_generator(user, 'sidebar')``, one round
  trip, the same key as :class:`~alkey.keys.CacheKeyGenerator` for the same tokens;
* :func:`get_async_redis_client` -- each event loop's default client, configured like
  the sync one (:func:`alkey.client.get_redis_config`) and closed when its loop shuts
  down.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Coroutine, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar, runtime_checkable

import redis.asyncio
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn

from alkey import events
from alkey.client import (
    CHECK_IDENTIFIER,
    CHECK_TIMEOUT,
    RedisConfig,
    _check_rounds,
    _epoch_problem,
    _failed,
    _log_default_redis,
    _retry_after,
    _server,
)
from alkey.errors import (
    ConfigurationError,
    TokenStoreError,
    TokenStorePoolExhaustedError,
    redacted,
)
from alkey.invalidations import AsyncListener, ClusterListeners, marked, tracking_options
from alkey.keys import CacheKeyGenerator
from alkey.manual import invalidation_plan
from alkey.observers import StoreObserver
from alkey.options import ErrorPolicy, StoreOptions
from alkey.scripts import Call
from alkey.settings import (
    DEFAULT_CLIENT_OPTIONS,
    REDIS_SCHEMES,
    SENTINEL_SCHEMES,
    Configuration,
    async_sentinel_client,
    configure,
    configured_store,
    register_scheme,
)
from alkey.tokens import (
    Exchange,
    ScriptStore,
    TokenStore,
    _where,
    share_key,
    shared_store,
    store_options,
)
from alkey.transports import AsyncClusterClient, AsyncRedisTransport, async_transport_for

try:  # SQLAlchemy 2.1 renamed await_only() to await_(); 2.0 only has the old name.
    from sqlalchemy.util.concurrency import await_
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util.concurrency import await_only as await_

__all__ = [
    "AsyncCacheKeyGenerator",
    "AsyncRedisClient",
    "AsyncRedisTokenStore",
    "AsyncTokenStore",
    "acheck_redis",
    "ainvalidate",
    "bind",
    "close_async_redis_client",
    "get_async_redis_client",
    "store_for",
    "sync_target",
]

#: The asyncio redis-py client type alkey works with.
AsyncRedisClient: TypeAlias = "redis.asyncio.Redis"

_T = TypeVar("_T")


def sync_target(target: object) -> object:
    """The synchronous session target whose events an async ``target`` fires.

    SQLAlchemy runs an :class:`~sqlalchemy.ext.asyncio.AsyncSession`'s work in a synchronous
    :class:`~sqlalchemy.orm.Session` (its ``sync_session``), and its events fire there.
    An ``async_sessionmaker`` without a ``sync_session_class`` of its own is given a
    dedicated subclass, so that binding it never binds every ``Session`` of the process
    (sessions it made before being bound keep the plain class, and are not bound).
    Anything that is not an asyncio session object is returned unchanged.
    """
    if isinstance(target, async_scoped_session):
        target = target.session_factory
    if isinstance(target, async_sessionmaker):
        sync_class: type[Session] | None = target.kw.get("sync_session_class")
        if sync_class is None:
            base = target.class_.sync_session_class
            sync_class = type(f"Alkey{base.__name__}", (base,), {"__module__": __name__})
            target.kw["sync_session_class"] = sync_class
        return sync_class
    if isinstance(target, AsyncSession):
        return target.sync_session
    if isinstance(target, type) and issubclass(target, AsyncSession):
        sync: Any = target.sync_session_class
        return sync
    return target


# -- the default client of each event loop --------------------------------------------------

# A redis.asyncio connection belongs to the loop that opened it, so the default client is
# one per loop. Each entry's generator closes its client when the loop shuts down.
_loop_clients: dict[
    asyncio.AbstractEventLoop, tuple[AsyncRedisClient, AsyncGenerator[None, None]]
] = {}
_loop_clients_lock = threading.Lock()


def async_client(configuration: Configuration) -> AsyncRedisClient:
    """A new asyncio client with its own pool, as :func:`alkey.settings.redis_client`
    builds the sync one: the configuration's URL, database, pool size and client options
    (socket timeouts, so that an unreachable Redis costs seconds, never a hang); for a
    Sentinel URL, the primary's ``master_for`` client, which follows a failover."""
    if configuration.scheme in SENTINEL_SCHEMES:
        return async_sentinel_client(configuration)
    options: dict[str, Any] = dict(configuration.client_options)
    if configuration.max_connections is not None:
        options["max_connections"] = configuration.max_connections
    pool = redis.asyncio.ConnectionPool.from_url(configuration.url, **options)
    # As for the sync client: the configured database (the environment's REDIS_DB, say)
    # has been resolved and must win over the URL's path.
    pool.connection_kwargs["db"] = configuration.db
    return redis.asyncio.Redis.from_pool(pool)


def async_client_from_config(config: RedisConfig) -> AsyncRedisClient:
    """A new asyncio client from :func:`alkey.client.get_redis_config`'s answer, with
    alkey's default client options (kept for code written against it; see
    :func:`async_client`)."""
    return async_client(
        configure(
            url=config["url"],
            db=config["db"],
            max_connections=config["max_connections"],
            env={},
        )
    )


async def _closed_at_loop_shutdown(client: AsyncRedisClient) -> AsyncGenerator[None, None]:
    # An async generator is the one thing an event loop finalises before it closes:
    # asyncio.run(), asyncio.Runner, uvicorn and pytest's asyncio plugins all call
    # loop.shutdown_asyncgens(), which resumes this one at its yield, on the loop, while
    # the client's connections can still be closed.
    try:
        yield
    finally:
        with _loop_clients_lock:
            loop = asyncio.get_running_loop()
            entry = _loop_clients.get(loop)
            if entry is not None and entry[0] is client:
                del _loop_clients[loop]
        await client.aclose()


async def get_async_redis_client() -> AsyncRedisClient:
    """The running event loop's default asyncio client, created on first use.

    Configured from the environment like :func:`alkey.client.get_redis_client`
    (``REDIS_URL`` and friends, read when the loop first needs a client), with the same
    pool settings. It is closed when the loop shuts down through
    ``loop.shutdown_asyncgens()`` -- as ``asyncio.run()``, uvicorn and pytest's asyncio
    plugins do -- or earlier by :func:`close_async_redis_client`, so no connection
    outlives its loop.
    """
    loop = asyncio.get_running_loop()
    entry = _loop_clients.get(loop)
    if entry is not None:
        return entry[0]
    configuration = configure()
    client = async_client(configuration)
    _log_once(configuration)
    closer = _closed_at_loop_shutdown(client)
    with _loop_clients_lock:
        # Forget the clients of loops that were closed without shutting down their async
        # generators (their connections cannot be closed any more): no unbounded growth.
        for stale in [other for other in _loop_clients if other.is_closed()]:
            del _loop_clients[stale]
        _loop_clients[loop] = (client, closer)
    await anext(closer)  # registers it with the loop; runs to its yield without I/O
    return client


# What the default asyncio clients were said to use: a client is made per event loop, and
# the log says it once per configuration rather than once per loop.
_logged: set[str] = set()


def _log_once(configuration: Configuration) -> None:
    described = configuration.describe()
    if described not in _logged:
        _logged.add(described)
        _log_default_redis(configuration, "asyncio client")


async def close_async_redis_client() -> None:
    """Close the running loop's default client now (e.g. in an ASGI lifespan's shutdown).

    The next :func:`get_async_redis_client` on this loop creates a new one.
    """
    with _loop_clients_lock:
        entry = _loop_clients.pop(asyncio.get_running_loop(), None)
    if entry is not None:
        await entry[1].aclose()


# -- the token store ----------------------------------------------------------------------

_default_lock = threading.Lock()


@runtime_checkable
class AsyncTokenStore(Protocol):
    """What :class:`AsyncCacheKeyGenerator` needs from a place that keeps tokens."""

    async def afetch(self, identifiers: Sequence[str]) -> list[str]:
        """Return the current token of each identifier, creating missing ones, in order."""
        ...

    async def abump(self, identifiers: Collection[str]) -> None:
        """Give each identifier a new random token."""
        ...


class AsyncRedisTokenStore(ScriptStore):
    """Tokens in Redis through ``redis.asyncio``: :class:`~alkey.tokens.RedisTokenStore`'s
    scripts, round trips and outage policy, without blocking the event loop.

    ``afetch`` and ``abump`` are the asyncio calls. The synchronous
    :class:`~alkey.tokens.TokenStore` methods ``fetch`` and ``bump`` are what the session
    listeners call at commit: inside an :class:`~sqlalchemy.ext.asyncio.AsyncSession`
    operation they run in SQLAlchemy's greenlet and await ``afetch``/``abump`` on the
    loop with ``await_()``, so the commit returns after the bump reached Redis and other
    tasks run meanwhile. Outside such a greenlet (a plain sync
    :class:`~sqlalchemy.orm.Session`) there is no loop to await on, and they raise
    :class:`RuntimeError`: bind sync sessions to a :class:`~alkey.tokens.RedisTokenStore`.

    Outages behave exactly as with the sync store (the same
    :class:`~alkey.tokens.OutageLedger`): with ``on_error="degrade"`` fetches return fresh
    random tokens, bumps are kept and replayed in front of the next call in its round trip,
    and each incident is reported once when it starts and once when it ends to the
    store's ``observers`` (by default, logged); ``on_error="raise"`` raises alkey's
    :class:`~alkey.errors.TokenStoreError` and its kinds, as the sync store does. A pool
    without a free connection is no outage either: the call waits for one, and at worst
    goes without Redis alone. The calls themselves -- fetch, intent, bump, the recovery
    of due intents -- are :class:`~alkey.tokens.ScriptStore`'s, shared with the sync
    store; this class only awaits their round trips.

    ``durable=True`` records each commit's bumps before its COMMIT, as the sync store
    does (:meth:`aintend`).

    A bump runs to its end even if the task awaiting it is cancelled (a client that hung
    up mid-request): the database has committed by then, and a lost bump would leave keys
    stale until their tokens expire.

    ``client`` is a ``redis.asyncio.Redis`` or a ``redis.asyncio.cluster.RedisCluster``
    (each call split by hash slot, one pipeline per node, all nodes at once: see
    :class:`~alkey.transports.AsyncClusterTransport`); without one, each call uses the running
    loop's :func:`get_async_redis_client`, so one store serves every loop of the process
    and keeps its pending bumps across them. Share one store per client
    (:func:`store_for` does this).
    """

    pool_attribute = "_alkey_async_token_store"

    def __init__(
        self,
        client: AsyncRedisClient | AsyncClusterClient | None = None,
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
        if client is not None:
            transport = async_transport_for(client)
        else:  # each loop's default client, with its options
            transport = AsyncRedisTransport(
                get_client=get_async_redis_client,
                socket_timeout=DEFAULT_CLIENT_OPTIONS["socket_timeout"],
            )
        super().__init__(options, observers, transport)
        #: As :attr:`RedisTokenStore.client <alkey.tokens.RedisTokenStore.client>`: typed
        #: as before clusters; a cluster store's is its ``RedisCluster``.
        self.client: AsyncRedisClient | None = client  # type: ignore[assignment]
        #: How this store's calls travel to Redis (and which errors mean what).
        self.transport: AsyncRedisTransport = transport
        # Bumps that outlived a cancelled caller; referenced until done (asyncio only
        # keeps weak references to tasks).
        self._finishing: set[asyncio.Task[None]] = set()
        self._replayer: asyncio.Task[None] | None = None
        self._listener: AsyncListener | ClusterListeners | None = None
        if self.local is not None and transport.clustered:
            self._listener = ClusterListeners(
                self.local,
                client,
                _node_tracking_connector,
                retry_interval=options.retry_interval,
                asynchronous=True,
            )
        elif self.local is not None:
            self._listener = AsyncListener(
                self.local,
                _tracking_connector(client),
                retry_interval=options.retry_interval,
                where=_where(getattr(client, "connection_pool", None)),
            )
        self._share_through(transport.share_key)

    @property
    def pool_wait(self) -> float:
        """Seconds a call waits for a connection when the pool has none free."""
        return self.transport.pool_wait

    async def afetch(self, identifiers: Sequence[str]) -> list[str]:
        """The current token of each identifier, creating missing ones, in one round trip.

        Bumps kept during an outage go first, in the same round trip.
        """
        if not identifiers:
            return []
        local = self.local
        if local is None:
            return await self._exchange(self._fetching(identifiers), "fetch")
        tokens, known = self._cached(local, identifiers)
        if tokens is not None:
            return tokens
        return await self._exchange(self._fetching(identifiers, known), "fetch")

    def _start_listening(self) -> None:
        if self._listener is not None:
            self._listener.ensure_running()

    def close_local_cache(self) -> None:
        """As :meth:`RedisTokenStore.close_local_cache
        <alkey.tokens.RedisTokenStore.close_local_cache>`."""
        if self.local is not None:
            self.local.close()

    async def aintend(self, identifiers: Collection[str]) -> str | None:
        """:meth:`RedisTokenStore.intend <alkey.tokens.RedisTokenStore.intend>`: in
        durable mode, record the bumps a commit is about to make."""
        return await self._exchange(self._intending(identifiers), "intend")

    async def abump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        """Give each identifier a new random token, in one round trip, and clear
        ``intent`` (from :meth:`aintend`).

        Runs to its end in a task of its own, so that cancelling the caller cannot lose it.
        """
        await self._abump(identifiers, () if intent is None else (intent,))

    async def _abump(self, identifiers: Collection[str], intents: Collection[str]) -> None:
        plan = self._bump_plan(identifiers)
        if plan is None:
            return
        task = asyncio.ensure_future(
            self._exchange(self._bumping(identifiers, intents, *plan), "bump")
        )
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        await asyncio.shield(task)

    async def _exchange(self, exchange: Exchange[_T], operation: str) -> _T:
        """Carry out one of :class:`~alkey.tokens.ScriptStore`'s calls: await each round
        trip it yields, hand it back the results or the error (see
        ``RedisTokenStore._exchange``), timing each as ``operation`` when an observer
        listens."""
        run: Callable[[list[Call]], Awaitable[list[Any]]] = self.transport.run
        if self._observe.round_trip_hooks:
            run = self._timed(run, operation)
        try:
            calls = next(exchange)
            while True:
                try:
                    results = await run(calls)
                except TokenStoreError as error:
                    calls = exchange.throw(error)
                else:
                    calls = exchange.send(results)
        except StopIteration as done:
            answer: _T = done.value
            return answer
        finally:
            exchange.close()

    def _timed(
        self, run: Callable[[list[Call]], Awaitable[list[Any]]], operation: str
    ) -> Callable[[list[Call]], Awaitable[list[Any]]]:
        """``run``, telling the observers how long each round trip took (see
        ``RedisTokenStore._timed``)."""
        report = self._observe.round_trip

        async def timed(calls: list[Call]) -> list[Any]:
            began = time.perf_counter()
            try:
                results = await run(calls)
            except TokenStoreError as error:
                # No connection at all reached Redis: that is pool_exhausted's to tell.
                if not isinstance(error, TokenStorePoolExhaustedError):
                    report(operation=operation, seconds=time.perf_counter() - began, failed=True)
                raise
            report(operation=operation, seconds=time.perf_counter() - began, failed=False)
            return results

        return timed

    def _replay_soon(self) -> None:
        """Replay the kept bumps from a task on this loop, probing every
        ``retry_interval`` (see ``RedisTokenStore._replay_soon``)."""
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.get_running_loop().create_task(self._replay_until_done())

    async def _replay_until_done(self) -> None:
        while self.outage.pending:
            await asyncio.sleep(max(self.outage.retry_interval, 0.01))
            # on_error="raise": nobody to raise to here; the next round retries.
            with contextlib.suppress(TokenStoreError):
                await self._abump((), ())

    async def wait_replayed(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the bumps kept during an outage to reach
        Redis; whether none is left.

        Await it when the application shuts down (a FastAPI lifespan, say): the replay
        task lives on the event loop, and ends with it -- unlike the sync store, nothing
        tries again at interpreter exit. It also restarts a replay on this loop if the
        loop that ran the last one has closed.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.outage.pending:
            self._replay_soon()
            if deadline is not None and loop.time() >= deadline:
                return False
            pause = 0.01 if deadline is None else min(0.01, deadline - loop.time())
            await asyncio.sleep(max(pause, 0.0))
        return True

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        """:meth:`afetch`, awaited from SQLAlchemy's greenlet (see the class)."""
        return self._await(self.afetch(identifiers), "fetch")

    def intend(self, identifiers: Collection[str]) -> str | None:
        """:meth:`aintend`, awaited from SQLAlchemy's greenlet (see the class)."""
        if not self.options.durable:
            return None
        return self._await(self.aintend(identifiers), "intend")

    def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        """:meth:`abump`, awaited from SQLAlchemy's greenlet (see the class)."""
        self._await(self.abump(identifiers, intent), "bump")

    @staticmethod
    def _await(call: Coroutine[Any, Any, _T], name: str) -> _T:
        try:
            return await_(call)
        except MissingGreenlet:
            raise RuntimeError(
                f"AsyncRedisTokenStore.{name}() was called outside an AsyncSession "
                "operation, with no event loop to await Redis on: bind synchronous "
                "sessions with alkey.bind(..., redis_client=<a redis.Redis>), and use "
                f"'await store.a{name}(...)' in asyncio code"
            ) from None


def _tracking_connector(
    client: AsyncRedisClient | AsyncClusterClient | None,
) -> Callable[[], Awaitable[Any]]:
    """What an asyncio listener connects with: a new RESP2 connection with the client's
    options, outside its pool (see :func:`alkey.tokens.tracking_connection`) -- the
    client's pool held weakly (it holds the store), or, without a client, each loop's
    default client."""
    reference = weakref.ref(client.connection_pool) if client is not None else None  # type: ignore[union-attr]

    async def connect() -> Any:
        if reference is None:
            pool: Any = (await get_async_redis_client()).connection_pool
        else:
            pool = reference()
            if pool is None:
                raise ConnectionError("the client's connection pool is gone")
        connection = marked(pool.connection_class(**tracking_options(pool.connection_kwargs)))
        await connection.connect()
        return connection

    return connect


def _node_tracking_connector(node: Any) -> Callable[[], Awaitable[Any]]:
    """What the listener of one node of an asyncio cluster connects with (see
    :func:`alkey.tokens.tracking_connection`): the node's connection class and options,
    taken now, without what refers back to its client."""
    connection_class = node.connection_class
    options = tracking_options(node.connection_kwargs)

    async def connect() -> Any:
        connection = marked(connection_class(**options))
        await connection.connect()
        return connection

    return connect


_default_store: AsyncRedisTokenStore | None = None


def store_for(client: AsyncRedisClient | AsyncClusterClient | None = None) -> AsyncRedisTokenStore:
    """The process's shared :class:`AsyncRedisTokenStore` for ``client``'s pool.

    As :func:`alkey.tokens.store_for`: the store most recently created on this pool (so a
    store configured with ``AsyncRedisTokenStore(client, ttl=...)`` is the one that
    ``AsyncCacheKeyGenerator(client)`` and ``bind(..., redis_client=client)`` use), or a
    new one with default settings. Without ``client``: the one store on each event loop's
    default client (:func:`get_async_redis_client`). Sharing lets a key generator replay
    the bumps that a commit could not send during an outage.
    """
    global _default_store
    if client is None:
        with _default_lock:
            if _default_store is None:
                # The environment's store options (ALKEY_TTL...), as for the sync default.
                _default_store = AsyncRedisTokenStore(options=configure().store_options)
            return _default_store
    return shared_store(
        share_key(client), AsyncRedisTokenStore, lambda: AsyncRedisTokenStore(client)
    )


# -- binding and keys -----------------------------------------------------------------------


def bind(
    target: object,
    *,
    redis_client: AsyncRedisClient | None = None,
    tokens: TokenStore | None = None,
    fail_fast: bool | float = False,
) -> events.Binding:
    """:func:`alkey.events.bind` for asyncio sessions, bumping through ``redis.asyncio``.

    ``target`` is an ``async_sessionmaker``, an ``async_scoped_session``, an
    :class:`~sqlalchemy.ext.asyncio.AsyncSession` (class or instance) or any target
    :func:`alkey.events.bind` takes. Tokens live in ``tokens``, else in ``redis_client``
    (a ``redis.asyncio.Redis``), else in each loop's default client (:func:`store_for`).
    ``alkey.events.bind`` with a sync ``redis_client`` works too, but then each commit
    blocks the loop for its round trip.

    Binding the ``AsyncSession`` class binds ``sqlalchemy.orm.Session``, the sync class
    behind it, and with it every sync session of the process, which cannot bump through
    asyncio: bind an ``async_sessionmaker`` instead.

    ``fail_fast`` is :func:`alkey.events.bind`'s: the store is checked now, on an event
    loop of its own, so bind before the application's loop runs; inside a running loop,
    await :func:`acheck_redis` in the application's startup instead.
    """
    if tokens is not None and redis_client is not None:
        raise ValueError("pass either redis_client or tokens, not both")
    return events.bind(
        target,
        tokens=tokens if tokens is not None else store_for(redis_client),
        fail_fast=fail_fast,
    )


async def ainvalidate(
    *targets: object,
    tokens: TokenStore | AsyncTokenStore | None = None,
    session: AsyncSession | Session | None = None,
) -> None:
    """:func:`alkey.invalidate` for asyncio code: invalidate ``targets`` now, without
    blocking the event loop.

    The same targets and choice of stores -- ``tokens``, else ``session``'s binding's (an
    :class:`~sqlalchemy.ext.asyncio.AsyncSession` or a sync session), else every bound
    store, else this loop's default store (:func:`store_for`) -- except that the stores
    of asyncio bindings, which the sync :func:`alkey.invalidate` has to leave out, are
    awaited here; a sync store's bump runs in a worker thread.
    """
    if isinstance(session, AsyncSession):
        session = session.sync_session
    identifiers, stores = invalidation_plan(
        targets, tokens, session, caller="alkey.asyncio.ainvalidate"
    )
    if not identifiers:
        return
    chosen: list[TokenStore | AsyncTokenStore] = list(stores)
    if tokens is not None:
        chosen = [tokens]
    elif not chosen:
        chosen = [store_for(None)]
    for store in chosen:
        if isinstance(store, AsyncTokenStore):
            await store.abump(identifiers)
        else:
            await asyncio.to_thread(store.bump, identifiers)


class AsyncCacheKeyGenerator:
    """``await key_generator(user, 'sidebar')``: :class:`~alkey.keys.CacheKeyGenerator`
    for asyncio code.

    The same arguments, errors and keys: the arguments are encoded by
    :meth:`CacheKeyGenerator.plan <alkey.keys.CacheKeyGenerator.plan>` and the key is
    finished by :meth:`~alkey.keys.KeyPlan.finish`, so for the same tokens both
    generators return the same key, and caches can be shared between sync and asyncio
    code. One call costs one round trip however many instances it names (none when it
    names none), and never blocks the event loop: an instance whose attributes its
    session expired is loaded again with ``await``, as reading it would.

    ``redis_client`` (a ``redis.asyncio.Redis``) or ``tokens`` choose where tokens live;
    with neither, each loop's default client (:func:`store_for`).
    """

    def __init__(
        self,
        redis_client: AsyncRedisClient | None = None,
        *,
        tokens: AsyncTokenStore | None = None,
        prefix: str = "",
    ) -> None:
        if tokens is not None and redis_client is not None:
            raise ValueError("pass either redis_client or tokens, not both")
        self.tokens: AsyncTokenStore = tokens if tokens is not None else store_for(redis_client)
        # Only its plan() is used, which does no I/O: it never looks up a sync client.
        self._planner = CacheKeyGenerator(prefix=prefix)
        self.prefix = self._planner.prefix

    async def __call__(self, *args: object) -> str:
        try:
            plan = self._planner.plan(*args)
        except MissingGreenlet:
            # An instance expired by its commit or rollback: its key needs the state a
            # fresh load gives (alkey.snapshot), which an AsyncSession loads only from
            # inside a greenlet, as its own awaitable methods do.
            plan = await greenlet_spawn(self._planner.plan, *args)
        return plan.finish(await self.tokens.afetch(plan.identifiers))


def _configured_store(
    configuration: Configuration, client: AsyncRedisClient | None
) -> AsyncRedisTokenStore:
    """The asyncio store factory of ``redis://``, ``rediss://``, ``unix://`` and Sentinel
    URLs (``configure(...).store(flavour="asyncio")``): :func:`async_client` builds the
    client each scheme needs."""
    chosen = client if client is not None else async_client(configuration)
    return configured_store(
        chosen.connection_pool,
        AsyncRedisTokenStore,
        configuration,
        lambda options: AsyncRedisTokenStore(chosen, options=options),
        lambda: store_for(chosen),
    )


for _scheme in (*REDIS_SCHEMES, *SENTINEL_SCHEMES):
    register_scheme(_scheme, asyncio=_configured_store)

# -- the startup check ------------------------------------------------------------------------


async def acheck_redis(
    target: object = None, *, timeout: float = CHECK_TIMEOUT, require_epoch: bool = True
) -> None:
    """:func:`alkey.check_redis` for asyncio: refuse to start on a Redis alkey cannot use.

    Await it in the application's startup (a FastAPI lifespan, say). ``target`` is an
    :class:`AsyncRedisTokenStore`, a ``redis.asyncio.Redis`` (its shared store), a
    :class:`~alkey.events.Binding`, or ``None`` for the process's default asyncio store
    (:func:`store_for`, on the running loop's :func:`get_async_redis_client`). The same
    calls, retries, and :class:`~alkey.errors.ConfigurationError` naming the server and
    the problem as the sync check, awaited without blocking the loop.
    """
    configuration = None
    if target is None:
        target, configuration = store_for(), configure()
    elif isinstance(target, (redis.asyncio.Redis, redis.asyncio.RedisCluster)):
        target = store_for(target)
    while not isinstance(target, ScriptStore):
        inner = getattr(target, "store", None) or getattr(target, "tokens", None)
        if inner is None or inner is target:
            break
        target = inner
    server = _server(target, configuration)
    if not isinstance(target, AsyncRedisTokenStore):
        if isinstance(target, ScriptStore):
            raise TypeError("acheck_redis() checks asyncio stores: use alkey.check_redis()")
        try:
            await target.afetch([CHECK_IDENTIFIER])  # type: ignore[attr-defined]
            await target.abump([CHECK_IDENTIFIER])  # type: ignore[attr-defined]
        except Exception as error:
            raise _failed(server, f"its token store failed ({redacted(str(error))})") from error
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await _check_once(target, require_epoch)
        except Exception as error:
            await asyncio.sleep(_retry_after(error, target, server, deadline - loop.time()))
        else:
            return


async def _check_once(store: AsyncRedisTokenStore, require_epoch: bool) -> None:
    client = store.client if store.client is not None else await get_async_redis_client()
    await client.ping()
    answers = [await store.transport.run(calls) for calls in _check_rounds(store)]
    problem = _epoch_problem(answers[0]) if require_epoch else None
    if problem is not None:
        raise ConfigurationError(problem)


def _check_at_bind(store: TokenStore, timeout: float) -> None:
    """``bind(..., fail_fast=...)`` of an asyncio session: :func:`acheck_redis` on an
    event loop of its own, whose connections are closed with it. Inside a running loop
    (whose thread must not block) it cannot: it says to await :func:`acheck_redis`."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise TypeError(
            "bind(..., fail_fast=...) cannot check an asyncio token store from inside a "
            "running event loop: bind without fail_fast, and await "
            "alkey.asyncio.acheck_redis() in the application's startup"
        )

    async def check() -> None:
        try:
            await acheck_redis(store, timeout=timeout)
        finally:
            client = getattr(store, "client", None)
            if client is not None:  # its connections belong to this loop: close them
                await client.connection_pool.disconnect()

    asyncio.run(check())


events.support_asyncio(sync_target, store_for, check=_check_at_bind)

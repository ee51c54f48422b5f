"""The workers of the stale-read checker (tests/test_stale_reads.py), for threads and processes.

An :class:`App` is what one application process has: an engine, a Redis client, a token
store, a sessionmaker bound to alkey and a key generator. The checker's own threads share
one; each worker process builds its own from URLs (:func:`run_process`, the entry point
for ``multiprocessing``'s spawn context), so that what one process keeps in memory (such as
bumps waiting for Redis) is invisible to the others, as in production.

Writers publish each version to a :class:`Floor` in shared memory only after ``commit()``
returned; readers sample the floor before they start a read. So the floor is a lower bound
on what any read must return, across threads and processes alike. The floor also keeps
when and by which process each recent version was published, so that a stale read tells
which commits it missed (:attr:`StaleRead.missed`) and how long after the first of them
it began: the measure of a bound such as the local token cache's.

What readers read (:data:`Data`): the counters themselves; a part of each counter that the
*database* rewrites when the counter's code changes (``ON UPDATE CASCADE``), declared in
the metadata or not (the control); or the counters of two tenants, one schema each
(``schema_translate_map``, PostgreSQL), where serving one tenant's value to the other is
as wrong as serving an old one.

This module imports no pytest, so that spawned processes start quickly.
"""

from __future__ import annotations

import contextlib
import multiprocessing.context
import multiprocessing.queues
import multiprocessing.synchronize
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any, Literal, NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from sqlalchemy import (
    Column,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    create_engine,
    event,
    insert,
    text,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.identity import row_identifier
from alkey.localcache import CacheStats
from alkey.settings import SENTINEL_SCHEMES, configure
from alkey.settings import redis_client as configured_client
from alkey.tokens import RedisTokenStore

COUNTERS = 5
#: In a crashed-writer scenario, the counter that only the dying commit writes, so that
#: no later commit of another writer bumps its token and hides a missed bump.
CRASH_COUNTER = COUNTERS - 1
#: In a scenario that loses Redis writes (a failover, a restart from a snapshot), the
#: counter whose bumps are lost: while Redis is losing writes (:data:`LOSING`) every writer
#: writes it alone, and after they were lost (:data:`LOST`) none writes it again -- a
#: later bump would hide a lost one. Its key must then change, never revert.
LOST_COUNTER = COUNTERS - 1
#: Writer phases (:attr:`Floor.phase`): all counters; only :data:`LOST_COUNTER`; all but it.
NORMAL, LOSING, LOST = 0, 1, 2
#: How long a worker process may take to start before the checker gives up on it.
START_TIMEOUT = 60.0
#: What a load-first reader does between loading a row and keying it (rendering, say):
#: the window in which a writer's commit and bump can slip in.
RENDER_TIME = 0.001

#: The order in which a reader loads a row and builds its key:
#: ``key_first`` keys by identifier, then loads on a miss; ``load_first`` loads the
#: instance, then keys on it (the pattern of most applications); ``load_first_by_identifier``
#: loads, then keys by identifier, which no loaded state protects (the checker's control).
ReadOrder = Literal["key_first", "load_first", "load_first_by_identifier"]

#: What readers serve: ``counters``; ``cascade``, the part of each counter that the
#: database updates by itself (``ON UPDATE CASCADE`` from the counter's code, declared in
#: the metadata); ``undeclared_cascade``, the same through a foreign key the metadata does
#: not declare (the control: alkey cannot know); ``tenants``, the counters of two tenant
#: schemas (PostgreSQL), read ``by_tenant`` identifiers or by the mapped table's
#: identifier, which tenants would share (``tenants_shared``, the control).
Data = Literal["counters", "cascade", "undeclared_cascade", "tenants", "tenants_shared"]
#: The tenants' schemas, and how many slots of the floor each counter may take.
TENANTS = ("alkey_stale_t0", "alkey_stale_t1")
SLOTS = COUNTERS * len(TENANTS)
#: A counter's code is ``index * CODE_BASE + version``: unique, and changed by every write.
CODE_BASE = 1_000_000
#: How many versions of each slot the floor remembers (when and by whom each was
#: published): far more than a run writes within any bound a scenario excuses.
HISTORY = 1024


class Base(DeclarativeBase):
    metadata = MetaData()


class Counter(Base):
    __tablename__ = "stale_counters"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(default=0)
    code: Mapped[int] = mapped_column(unique=True)


class Part(Base):
    """A row the database rewrites when its counter's code changes."""

    __tablename__ = "stale_parts"
    id: Mapped[int] = mapped_column(primary_key=True)
    counter_code: Mapped[int] = mapped_column(ForeignKey("stale_counters.code", onupdate="CASCADE"))


#: The same, with the foreign key only in the database (created by :func:`create_schema`).
undeclared_parts = Table(
    "stale_parts_undeclared",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("counter_code", Integer),
)


class UndeclaredPart(Base):
    __table__ = undeclared_parts


def create_schema(engine: Engine) -> None:
    """Drop and create the checker's tables (and, on PostgreSQL, the tenants' schemas),
    each counter at version 0 with its parts."""
    drop_schema(engine)
    Base.metadata.create_all(engine, tables=_tables("stale_counters", "stale_parts"))
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE stale_parts_undeclared (id INTEGER PRIMARY KEY, counter_code "
                "INTEGER REFERENCES stale_counters (code) ON UPDATE CASCADE)"
            )
        )
        connection.execute(insert(Counter), _counters())
        for table in (*_tables("stale_parts"), undeclared_parts):
            connection.execute(
                insert(table),
                [{"id": index, "counter_code": index * CODE_BASE} for index in range(COUNTERS)],
            )
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            for schema in TENANTS:
                connection.execute(text(f"CREATE SCHEMA {schema}"))
        for schema in TENANTS:
            tenant = engine.execution_options(schema_translate_map={None: schema})
            Base.metadata.create_all(tenant, tables=_tables("stale_counters"))
            with tenant.begin() as connection:
                connection.execute(insert(Counter), _counters())


def _counters() -> list[dict[str, int]]:
    return [{"id": index, "version": 0, "code": index * CODE_BASE} for index in range(COUNTERS)]


def drop_schema(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS stale_parts_undeclared"))
        if engine.dialect.name == "postgresql":
            for schema in TENANTS:
                connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    Base.metadata.drop_all(engine, tables=_tables("stale_parts", "stale_counters"))


def _tables(*names: str) -> list[Table]:
    return [Base.metadata.tables[name] for name in names]


def checker_engine(url: str) -> Engine:
    """An engine for the checker: on SQLite, with foreign keys enforced, so that the
    database cascades as PostgreSQL does."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def enforce_foreign_keys(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.execute("PRAGMA foreign_keys=ON")

    return engine


class Committed(NamedTuple):
    """The newest committed version of a counter, when and by which process."""

    version: int
    at: float  # time.monotonic(): one clock for all processes of the machine
    pid: int


@dataclass(frozen=True)
class StaleRead:
    reader: str
    reader_pid: int
    counter: int  # the slot: a counter of one tenant
    read: int
    committed: Committed  # the newest version committed before the read began
    began: float  # time.monotonic() when the read began
    other_tenant: bool = False  # served a value cached for another tenant's counter
    #: The versions newer than the one read whose ``commit()`` had returned when the read
    #: began: the commits it missed. None if the floor no longer remembers them all.
    missed: tuple[Committed, ...] | None = None

    @property
    def lateness(self) -> float | None:
        """Seconds from the first missed commit's return to the read's beginning: how
        long the read went on missing it (None if the missed commits are not known)."""
        if not self.missed:
            return None
        return self.began - min(commit.at for commit in self.missed)

    @property
    def missed_only_other_processes(self) -> bool:
        """Whether every commit the read missed was made by another process than the
        reader's (one whose bumps its process heard of only through Redis)."""
        return bool(self.missed) and all(
            commit.pid != self.reader_pid for commit in self.missed or ()
        )

    def __str__(self) -> str:
        if self.other_tenant:
            return f"{self.reader}, counter {self.counter}: served another tenant's value"
        lag = self.began - self.committed.at
        missed = ""
        if self.missed is not None and len(self.missed) > 1 and self.lateness is not None:
            missed = f" ({len(self.missed)} commits missed, the first {self.lateness:.3f} s before)"
        return (
            f"{self.reader}, counter {self.counter}: read {self.read}, but "
            f"{self.committed.version} was committed {lag:.3f} s before the read began"
            f"{'' if self.committed.pid == self.reader_pid else ' by another process'}{missed}"
        )


@dataclass
class Tally:
    """What a worker saw; picklable, so that processes send theirs back."""

    reads: int = 0
    hits: int = 0
    commits: int = 0
    lock_timeouts: int = 0  # SQLite's: commits given up, not errors
    stale: list[StaleRead] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Per application process (named by its workers) whose store has a local token
    #: cache: that cache's stats at the end of the run.
    local: list[tuple[str, CacheStats]] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.reads += other.reads
        self.hits += other.hits
        self.commits += other.commits
        self.lock_timeouts += other.lock_timeouts
        self.stale += other.stale
        self.errors += other.errors
        self.local += other.local

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.reads, 1)


@dataclass
class Floor:
    """Per counter, the newest version whose ``commit()`` returned, in shared memory.

    Made before the worker processes start and handed to them as an argument (shared
    memory can only be passed while spawning).
    """

    versions: SynchronizedArray[int]
    published_at: SynchronizedArray[float]
    writer_pids: SynchronizedArray[int]
    #: Which counters writers write, set by a scenario that loses writes (see
    #: :data:`LOSING`): :data:`NORMAL`, :data:`LOSING` or :data:`LOST`.
    phase: SynchronizedArray[int]
    #: Every version published, when and by which process: a ring of :data:`HISTORY`
    #: entries per slot, indexed by version (the version is kept too, to tell an entry
    #: from the one that overwrote it).
    history_versions: SynchronizedArray[int]
    history_at: SynchronizedArray[float]
    history_pids: SynchronizedArray[int]

    @classmethod
    def create(cls, context: multiprocessing.context.BaseContext) -> Floor:
        versions, published_at, writer_pids = (
            context.Array(code, SLOTS) for code in ("q", "d", "q")
        )
        history = (context.Array(code, SLOTS * HISTORY) for code in ("q", "d", "q"))
        return cls(versions, published_at, writer_pids, context.Array("q", 1), *history)

    def set_phase(self, phase: int) -> None:
        self.phase[0] = phase

    def publish(self, counter: int, version: int) -> None:
        with self.versions.get_lock():
            now, pid = time.monotonic(), os.getpid()
            entry = counter * HISTORY + version % HISTORY
            self.history_versions[entry] = version
            self.history_at[entry] = now
            self.history_pids[entry] = pid
            if version > self.versions[counter]:
                self.versions[counter] = version
                self.published_at[counter] = now
                self.writer_pids[counter] = pid

    def missed(
        self, counter: int, read: int, newest: int, began: float
    ) -> tuple[Committed, ...] | None:
        """The versions of ``counter`` after ``read`` up to ``newest`` that were published
        by ``began``; None if the history no longer holds one of them."""
        if newest - read > HISTORY:
            return None
        found = []
        with self.versions.get_lock():
            for version in range(read + 1, newest + 1):
                entry = counter * HISTORY + version % HISTORY
                kept = self.history_versions[entry]
                if kept > version:  # overwritten by a newer version: forgotten
                    return None
                if kept == version and self.history_at[entry] <= began:
                    found.append(
                        Committed(version, self.history_at[entry], self.history_pids[entry])
                    )
        return tuple(found)

    def sample(self, counter: int) -> Committed:
        with self.versions.get_lock():
            return Committed(
                self.versions[counter], self.published_at[counter], self.writer_pids[counter]
            )


@dataclass(frozen=True)
class App:
    """One application process's view of the world."""

    factory: sessionmaker[Session]
    #: The token store's client, which readers cache through too: a cluster's
    #: ``RedisCluster`` routes each cache key to the node that serves its slot.
    client: redis.Redis | redis.RedisCluster
    store: RedisTokenStore
    key_generator: CacheKeyGenerator
    sqlite: bool  # whose writers may time out waiting for the database lock
    #: What readers serve, and (for tenants) one bound sessionmaker per tenant schema.
    data: Data = "counters"
    tenants: tuple[sessionmaker[Session], ...] = ()

    def session_for(self, slot: int) -> sessionmaker[Session]:
        """The sessionmaker of the tenant whose counters take ``slot`` of the floor."""
        return self.tenants[slot // COUNTERS] if self.tenants else self.factory


def redis_client(url: str) -> redis.Redis:
    """A client that fails fast when Redis or the link to it does: every call gives up
    after 0.5 s. (``from_url`` gives no retries; ``redis.Redis()``'s default policy would
    retry a timed-out call three times with backoff, about 9 s in all.)

    A Sentinel URL (``redis+sentinel://``) gets the client alkey's configuration builds
    for it -- ``master_for``, no retries -- with the same timeouts, so that the cache and
    the tokens follow a failover together, as in an application configured by URL."""
    if url.startswith(SENTINEL_SCHEMES):
        timeouts = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
        return configured_client(configure(url=url, env={}, client_options=timeouts))
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


#: Tries to reach each node of a cluster at start: the workers' timeouts are short, for
#: the disruptions, and a machine busy spawning them may miss one.
CONNECT_ATTEMPTS = 5
#: What a reader's cache call may raise when Redis does not answer: a ``RedisError``, or,
#: from a cluster client whose slot map changes under it, a ``RedisClusterException``
#: (``SlotNotCoveredError``...), which is not one. Before redis-py 6 the cluster client
#: also lets a failover's reset of its connections reach a call another thread is making
#: as the socket layer's own error (``ValueError: I/O operation on closed file``, an
#: ``AttributeError`` of a buffer gone, ``OSError``); alkey's cluster transport fails
#: closed on those (``transports._cluster_failure``), and so does this application.
CACHE_ERRORS = (redis.RedisError, RedisClusterException, OSError, ValueError, AttributeError)


def redis_cluster_client(url: str) -> redis.RedisCluster:
    """A Redis Cluster client with the same short timeouts as :func:`redis_client` and no
    retries (a node that died is not waited for: its calls fail, the cluster's new map
    is read, and ``MOVED``/``ASK`` are followed as they come), connected to every node."""
    client = redis.RedisCluster.from_url(
        url,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    for node in client.get_nodes():  # type: ignore[no-untyped-call]
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                client.ping(target_nodes=node)
                break
            except redis.TimeoutError:
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
    return client


@contextlib.contextmanager
def open_app(
    engine: Engine,
    redis_url: str,
    *,
    with_alkey: bool = True,
    store_options: Mapping[str, Any] | None = None,
    data: Data = "counters",
    cluster: bool = False,
    deaf_local_cache: bool = False,
) -> Iterator[App]:
    """An :class:`App` on ``engine`` and the Redis at ``redis_url`` (with ``cluster``, a
    node of a Redis Cluster); ``store_options`` are extra keyword arguments for its
    :class:`RedisTokenStore`. ``deaf_local_cache``: the store's local token cache (see
    ``store_options``) ignores Redis's invalidations, and serves as long as its listener
    hears Redis (the control of the local cache's scenarios)."""
    client = redis_cluster_client(redis_url) if cluster else redis_client(redis_url)
    options: dict[str, Any] = {"retry_interval": 0.05, **(store_options or {})}
    store = RedisTokenStore(client, **options)
    if deaf_local_cache:
        assert store.local is not None, "a deaf local cache needs the local_cache option"
        store.local.invalidated = _ignore_invalidation  # type: ignore[method-assign]
    factory = sessionmaker(engine, expire_on_commit=False)
    tenants = tuple(
        sessionmaker(
            engine.execution_options(schema_translate_map={None: schema}),
            expire_on_commit=False,
        )
        for schema in (TENANTS if data.startswith("tenants") else ())
    )
    factories = (factory, *tenants)
    if with_alkey:
        for bound in factories:
            alkey.bind(bound, tokens=store)
    try:
        yield App(
            factory,
            client,
            store,
            CacheKeyGenerator(tokens=store),
            engine.dialect.name == "sqlite",
            data,
            tenants,
        )
    finally:
        if with_alkey:
            for bound in factories:
                alkey.unbind(bound)
        store.close_local_cache()
        client.close()


def _ignore_invalidation(*args: Any, **kwargs: Any) -> None:
    """What a deaf local cache does with Redis's invalidations: nothing (the listener's
    pings still prove it current)."""


def local_stats(app: App, name: str) -> list[tuple[str, CacheStats]]:
    """``app``'s local token cache stats under ``name``, if its store has one."""
    local = app.store.local
    return [] if local is None else [(name, local.stats())]


def is_lock_timeout(error: Exception) -> bool:
    """Whether ``error`` is SQLite giving up on its database lock: the one error a writer
    may meet under contention. Anything else counts as an error."""
    return isinstance(error, OperationalError) and "database is locked" in str(error)


def write(
    app: App,
    floor: Floor,
    stop: threading.Event | multiprocessing.synchronize.Event,
    name: str,
    seed: int,
    tally: Tally,
    *,
    kill_after_commits: int | None = None,
    spare_crash_counter: bool = False,
    pause: float = 0.002,
) -> None:
    """Commit increments of random counters until ``stop``, publishing each version and
    waiting ``pause`` seconds after each.

    With ``kill_after_commits``, the process SIGKILLs itself inside its Nth commit, after
    the database COMMIT and before alkey's bump: the crash that durable mode is for. It dies
    in an ``after_commit`` listener put before alkey's (which bump later still, when the
    transaction ends), and publishes the version first, since it is committed. That commit
    writes :data:`CRASH_COUNTER`, which writers told to ``spare_crash_counter`` (all
    writers of such a scenario) never write.
    """
    rng = random.Random(seed)
    writing: list[int] = []  # the counter and version of the commit under way
    if kill_after_commits is not None:
        last_commit = kill_after_commits

        def die_between_commit_and_bump(session: Session) -> None:
            if tally.commits + 1 >= last_commit:
                floor.publish(*writing)
                os.kill(os.getpid(), signal.SIGKILL)

        event.listen(app.factory, "after_commit", die_between_commit_and_bump, insert=True)
    while not stop.is_set():
        phase = floor.phase[0]
        if kill_after_commits is not None and tally.commits + 1 >= kill_after_commits:
            index = CRASH_COUNTER  # the commit this process dies in
        elif phase == LOSING:
            index = LOST_COUNTER
        else:
            spared = spare_crash_counter or phase == LOST
            index = rng.randrange(CRASH_COUNTER if spared else COUNTERS)
        slot = index + COUNTERS * rng.randrange(len(app.tenants) or 1)
        try:
            with app.session_for(slot)() as session:
                counter = session.get_one(Counter, index)
                # In SQL, so that concurrent writers never lose an increment (SQLite has no
                # row locks): versions only ever grow.
                counter.version = Counter.version + 1
                if app.data.endswith("cascade"):
                    counter.code = Counter.code + 1  # the database rewrites the parts
                session.flush()
                session.refresh(counter)
                version = counter.version
                writing[:] = [slot, version]
                session.commit()
        except Exception as error:
            if app.sqlite and is_lock_timeout(error):  # SQLite's, under contention
                tally.lock_timeouts += 1
            else:  # anything else, a Redis error above all, fails the check
                tally.errors.append(f"{name}: {error!r}")
            continue
        finally:
            writing.clear()
        tally.commits += 1
        floor.publish(slot, version)
        time.sleep(pause)


def read(
    app: App,
    floor: Floor,
    stop: threading.Event | multiprocessing.synchronize.Event,
    name: str,
    seed: int,
    tally: Tally,
    order: ReadOrder = "key_first",
) -> None:
    """Serve random counters (or their parts, or a tenant's) through the cache until
    ``stop``, checking each read against the floor sampled before it began. A miss reads
    the database (or, loading first, uses what it loaded) and caches the value, with the
    slot it belongs to."""
    rng = random.Random(seed)
    while not stop.is_set():
        index = rng.randrange(COUNTERS)
        slot = index + COUNTERS * rng.randrange(len(app.tenants) or 1)
        committed = floor.sample(slot)
        began = time.monotonic()
        if order == "key_first":
            key = app.key_generator(_identifier(app, slot), "page")
            cached = _cached(app, key)
            if cached is None:
                with app.session_for(slot)() as session:
                    version = _version(app, session.get_one(_model(app), index), index)
        else:
            with app.session_for(slot)() as session:
                row = session.get_one(_model(app), index)
                version = _version(app, row, index)
                time.sleep(RENDER_TIME)
                keyed_on: object = row
                if order == "load_first_by_identifier":
                    keyed_on = _identifier(app, slot)
                key = app.key_generator(keyed_on, "page")
            cached = _cached(app, key)
        served = slot
        if cached is not None:
            served, version = (int(part) for part in cached.split(b":"))
        else:
            with contextlib.suppress(*CACHE_ERRORS):
                app.client.set(key, f"{slot}:{version}", ex=60)
        tally.reads += 1
        tally.hits += cached is not None
        if version < committed.version or served != slot:
            missed = floor.missed(slot, version, committed.version, began)
            tally.stale.append(
                StaleRead(
                    name, os.getpid(), slot, version, committed, began, served != slot, missed
                )
            )


def _model(app: App) -> type[Base]:
    """What readers serve: the counter, or the part the database rewrites with it."""
    if app.data == "cascade":
        return Part
    if app.data == "undeclared_cascade":
        return UndeclaredPart
    return Counter


def _version(app: App, row: Any, index: int) -> int:
    if isinstance(row, Counter):
        return row.version
    return int(row.counter_code) - index * CODE_BASE


def _identifier(app: App, slot: int) -> str:
    """The identifier a key-first reader names: of its tenant's table, or (the tenants'
    control) of the mapped table, which every tenant would share."""
    index = slot % COUNTERS
    if app.data == "tenants":
        return row_identifier(f"{TENANTS[slot // COUNTERS]}.{Counter.__tablename__}", index)
    return row_identifier(_model(app).__table__, index)


def _cached(app: App, key: str) -> Any:
    """The cached value under ``key``; None on a miss, or when Redis does not answer."""
    try:
        return app.client.get(key)
    except CACHE_ERRORS:
        return None


Role = Literal["writer", "reader"]


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is to do, and where: everything it needs, picklable."""

    role: Role
    seed: int
    database_url: str
    redis_url: str
    with_alkey: bool = True
    #: Extra keyword arguments for the process's RedisTokenStore, e.g. ``{"durable": True}``.
    store_options: Mapping[str, Any] = field(default_factory=dict)
    #: A writer SIGKILLs itself between its Nth database COMMIT and alkey's bump.
    kill_after_commits: int | None = None
    #: A writer leaves :data:`CRASH_COUNTER` to the commit that a writer dies in.
    spare_crash_counter: bool = False
    #: How a reader orders loading and keying.
    read_order: ReadOrder = "key_first"
    #: What readers serve.
    data: Data = "counters"
    #: Seconds a writer waits between its commits.
    writer_pause: float = 0.002
    #: ``redis_url`` names a node of a Redis Cluster: the process builds a ``RedisCluster``.
    cluster: bool = False
    #: The store's local token cache ignores invalidations (see :func:`open_app`).
    deaf_local_cache: bool = False

    @property
    def name(self) -> str:
        return f"{self.role} process {self.seed}"


def run_loop(
    name: str,
    role: Role,
    app: App,
    floor: Floor,
    stop: threading.Event | multiprocessing.synchronize.Event,
    seed: int,
    *,
    kill_after_commits: int | None = None,
    spare_crash_counter: bool = False,
    read_order: ReadOrder = "key_first",
    writer_pause: float = 0.002,
) -> Tally:
    """Run a writer or reader until ``stop``; an unexpected exception ends it as an error."""
    tally = Tally()
    try:
        if role == "writer":
            write(
                app,
                floor,
                stop,
                name,
                seed,
                tally,
                kill_after_commits=kill_after_commits,
                spare_crash_counter=spare_crash_counter,
                pause=writer_pause,
            )
        else:
            read(app, floor, stop, name, seed, tally, read_order)
    except Exception:
        tally.errors.append(f"{name}: {traceback.format_exc()}")
    return tally


def run_process(
    spec: WorkerSpec,
    floor: Floor,
    start: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    results: multiprocessing.queues.Queue[tuple[str, Tally | None]],
) -> None:
    """A worker process: build an App from the URLs, say it is ready (``None``), run from
    ``start`` until ``stop``, and send its tally back."""
    engine = checker_engine(spec.database_url)
    try:
        with open_app(
            engine,
            spec.redis_url,
            with_alkey=spec.with_alkey,
            store_options=spec.store_options,
            data=spec.data,
            cluster=spec.cluster,
            deaf_local_cache=spec.deaf_local_cache,
        ) as app:
            with app.factory() as session:  # connect now, not on the clock
                session.get_one(Counter, 0)
            results.put((spec.name, None))
            if start.wait(START_TIMEOUT):
                tally = run_loop(
                    spec.name,
                    spec.role,
                    app,
                    floor,
                    stop,
                    spec.seed,
                    kill_after_commits=spec.kill_after_commits,
                    spare_crash_counter=spec.spare_crash_counter,
                    read_order=spec.read_order,
                    writer_pause=spec.writer_pause,
                )
            else:
                tally = Tally(errors=[f"{spec.name}: never told to start"])
            tally.local += local_stats(app, spec.name)
    except Exception:
        tally = Tally(errors=[f"{spec.name}: {traceback.format_exc()}"])
    finally:
        engine.dispose()
    results.put((spec.name, tally))

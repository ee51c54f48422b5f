"""The workers of the stale-read checker (tests/test_stale_reads.py), for threads and processes.

An :class:`App` is what one application process has: an engine, a Redis client, a token
store, a sessionmaker bound to alkey and a key generator. The checker's own threads share
one; each worker process builds its own from URLs (:func:`run_process`, the entry point
for ``multiprocessing``'s spawn context), so that what one process keeps in memory (such as
bumps waiting for Redis) is invisible to the others, as in production.

Writers publish each version to a :class:`Floor` in shared memory only after ``commit()``
returned; readers sample the floor before they start a read. So the floor is a lower bound
on what any read must return, across threads and processes alike.

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
from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.identity import row_identifier
from alkey.tokens import RedisTokenStore

COUNTERS = 5
#: In a crashed-writer scenario, the counter that only the dying commit writes, so that
#: no later commit of another writer bumps its token and hides a missed bump.
CRASH_COUNTER = COUNTERS - 1
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


class Base(DeclarativeBase):
    metadata = MetaData()


class Counter(Base):
    __tablename__ = "stale_counters"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(default=0)


class Committed(NamedTuple):
    """The newest committed version of a counter, when and by which process."""

    version: int
    at: float  # time.monotonic(): one clock for all processes of the machine
    pid: int


@dataclass(frozen=True)
class StaleRead:
    reader: str
    reader_pid: int
    counter: int
    read: int
    committed: Committed  # the newest version committed before the read began
    began: float  # time.monotonic() when the read began

    def __str__(self) -> str:
        lag = self.began - self.committed.at
        return (
            f"{self.reader}, counter {self.counter}: read {self.read}, but "
            f"{self.committed.version} was committed {lag:.3f} s before the read began"
            f"{'' if self.committed.pid == self.reader_pid else ' by another process'}"
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

    def add(self, other: Tally) -> None:
        self.reads += other.reads
        self.hits += other.hits
        self.commits += other.commits
        self.lock_timeouts += other.lock_timeouts
        self.stale += other.stale
        self.errors += other.errors

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

    @classmethod
    def create(cls, context: multiprocessing.context.BaseContext) -> Floor:
        return cls(*(context.Array(code, COUNTERS) for code in ("q", "d", "q")))

    def publish(self, counter: int, version: int) -> None:
        with self.versions.get_lock():
            if version > self.versions[counter]:
                self.versions[counter] = version
                self.published_at[counter] = time.monotonic()
                self.writer_pids[counter] = os.getpid()

    def sample(self, counter: int) -> Committed:
        with self.versions.get_lock():
            return Committed(
                self.versions[counter], self.published_at[counter], self.writer_pids[counter]
            )


@dataclass(frozen=True)
class App:
    """One application process's view of the world."""

    factory: sessionmaker[Session]
    client: redis.Redis
    key_generator: CacheKeyGenerator
    sqlite: bool  # whose writers may time out waiting for the database lock


def redis_client(url: str) -> redis.Redis:
    """A client that fails fast when Redis or the link to it does: every call gives up
    after 0.5 s. (``from_url`` gives no retries; ``redis.Redis()``'s default policy would
    retry a timed-out call three times with backoff, about 9 s in all.)"""
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


@contextlib.contextmanager
def open_app(
    engine: Engine,
    redis_url: str,
    *,
    with_alkey: bool = True,
    store_options: Mapping[str, Any] | None = None,
) -> Iterator[App]:
    """An :class:`App` on ``engine`` and the Redis at ``redis_url``; ``store_options`` are
    extra keyword arguments for its :class:`RedisTokenStore`."""
    client = redis_client(redis_url)
    options: dict[str, Any] = {"retry_interval": 0.05, **(store_options or {})}
    store = RedisTokenStore(client, **options)
    factory = sessionmaker(engine, expire_on_commit=False)
    if with_alkey:
        alkey.bind(factory, tokens=store)
    try:
        yield App(factory, client, CacheKeyGenerator(tokens=store), engine.dialect.name == "sqlite")
    finally:
        if with_alkey:
            alkey.unbind(factory)
        client.close()


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
) -> None:
    """Commit increments of random counters until ``stop``, publishing each version.

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
        if kill_after_commits is not None and tally.commits + 1 >= kill_after_commits:
            index = CRASH_COUNTER  # the commit this process dies in
        else:
            index = rng.randrange(CRASH_COUNTER if spare_crash_counter else COUNTERS)
        try:
            with app.factory() as session:
                counter = session.get_one(Counter, index)
                # In SQL, so that concurrent writers never lose an increment (SQLite has no
                # row locks): versions only ever grow.
                counter.version = Counter.version + 1
                session.flush()
                session.refresh(counter)
                version = counter.version
                writing[:] = [index, version]
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
        floor.publish(index, version)
        time.sleep(0.002)


def read(
    app: App,
    floor: Floor,
    stop: threading.Event | multiprocessing.synchronize.Event,
    name: str,
    seed: int,
    tally: Tally,
    order: ReadOrder = "key_first",
) -> None:
    """Serve random counters through the cache until ``stop``, checking each read against
    the floor sampled before it began. A miss reads the database (or, loading first, uses
    what it loaded) and caches the value."""
    rng = random.Random(seed)
    while not stop.is_set():
        index = rng.randrange(COUNTERS)
        committed = floor.sample(index)
        began = time.monotonic()
        if order == "key_first":
            key = app.key_generator(row_identifier(Counter.__table__, index), "page")
            cached = _cached(app, key)
            if cached is None:
                with app.factory() as session:
                    version = session.get_one(Counter, index).version
        else:
            with app.factory() as session:
                counter = session.get_one(Counter, index)
                version = counter.version
                time.sleep(RENDER_TIME)
                keyed_on: object = counter
                if order == "load_first_by_identifier":
                    keyed_on = row_identifier(Counter.__table__, index)
                key = app.key_generator(keyed_on, "page")
            cached = _cached(app, key)
        if cached is not None:
            version = int(cached)
        else:
            with contextlib.suppress(redis.RedisError):
                app.client.set(key, version, ex=60)
        tally.reads += 1
        tally.hits += cached is not None
        if version < committed.version:
            tally.stale.append(StaleRead(name, os.getpid(), index, version, committed, began))


def _cached(app: App, key: str) -> Any:
    """The cached value under ``key``; None on a miss, or when Redis does not answer."""
    try:
        return app.client.get(key)
    except redis.RedisError:
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
    engine = create_engine(spec.database_url)
    try:
        with open_app(
            engine, spec.redis_url, with_alkey=spec.with_alkey, store_options=spec.store_options
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
                )
            else:
                tally = Tally(errors=[f"{spec.name}: never told to start"])
    except Exception:
        tally = Tally(errors=[f"{spec.name}: {traceback.format_exc()}"])
    finally:
        engine.dispose()
    results.put((spec.name, tally))

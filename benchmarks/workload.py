"""What the benchmark runs: one mapped class, its databases, and the operations on them.

Shared by the timed run (``python -m benchmarks``) and the call counts of its smoke
(:mod:`benchmarks.calls`), so that what CI guards is exactly what the report measures.
Every operation is a plain callable without arguments, ready to be called in a batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from sqlalchemy import Engine, String, create_engine, event, insert, make_url, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.orm.attributes import instance_state

from alkey.connections import ENGINE_EVENTS
from alkey.constants import (
    ALL_ROWS,
    DEFAULT_TOKEN_TTL,
    GLOBAL_WRITE_TOKEN,
    NAMESPACE,
    ROW_SEPARATOR,
    UNKNOWN_ROWS,
    UNKNOWN_WRITES,
)
from alkey.events import SESSION_EVENTS
from alkey.identity import write_identifiers
from alkey.keys import CacheKeyGenerator
from alkey.scripts import BUMP, CHUNK_SIZE, FETCH, new_token
from alkey.testing import CountingConnection

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

#: How far apart the variants' rows start (on PostgreSQL they share one table): at least
#: as many as any variant writes in one commit.
MAX_ROWS = 10_000


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


TABLE = f"{NAMESPACE}:{Item.__tablename__}{ROW_SEPARATOR}"


def label(database: str) -> str:
    """The database's name in the tables: "SQLite" for the default, else its dialect's."""
    if database == "sqlite":
        return "SQLite"
    name = make_url(database).get_backend_name()
    return {"postgresql": "PostgreSQL", "sqlite": "SQLite", "mysql": "MySQL"}.get(name, name)


def postgres_available() -> bool:
    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


def engine_for(database: str, workdir: Path, name: str) -> Engine:
    """A new engine of its own: on SQLite a database file of its own too, so that no two
    variants share a connection pool, a page cache or a file lock."""
    if database == "sqlite":
        return create_engine(f"sqlite:///{workdir / (name.replace(' ', '_') + '.db')}")
    return create_engine(database)


def seed(engine: Engine, first: int, count: int, *, fresh: bool = True) -> None:
    """Rows ``first .. first + count - 1`` in ``bench_items``; ``fresh``: a new table."""
    if fresh:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
    rows = [{"id": n, "name": "x"} for n in range(first, first + count)]
    with engine.begin() as connection:
        connection.execute(insert(Item), rows)


def load(session: Session, first: int, count: int) -> list[Item]:
    """Rows ``first .. first + count - 1``, loaded into ``session`` (ids are contiguous)."""
    query = select(Item).where(Item.id >= first, Item.id < first + count).order_by(Item.id)
    return list(session.scalars(query).all())


# -- key generation ------------------------------------------------------------------------


def key_token_keys(items: Sequence[Item]) -> list[str]:
    """The Redis keys a key of ``items`` reads its tokens from, spelled from alkey's naming
    rules (:mod:`alkey.constants`; a store without ``key_prefix``): each row's token, then
    the table's unknown-rows token and the unknown-writes token, which every row key also
    depends on.

    Why spelled out rather than asked from alkey: the floor must be what any client would
    send, not alkey's own work; :func:`check_key_names` holds the two to the same keys.
    """
    return [*(f"{TABLE}{item.id}" for item in items), TABLE + UNKNOWN_ROWS, UNKNOWN_WRITES]


def check_key_names(generator: CacheKeyGenerator, items: Sequence[Item], fragment: str) -> None:
    """Fail unless alkey's key of ``items`` reads exactly the keys the floor reads.

    :meth:`CacheKeyGenerator.plan` lists them without I/O.
    """
    planned = generator.plan(*items, fragment).identifiers
    spelled = key_token_keys(items)
    if sorted(planned) != sorted(spelled):
        raise RuntimeError(
            f"the bare MGET would read other keys than alkey's key: {planned[-3:]} ... vs "
            f"{spelled[-3:]}; update benchmarks/workload.py"
        )


def bare_mget(client: redis.Redis, keys: list[str]) -> Callable[[], object]:
    """The floor of a key: one ``MGET`` of the same token keys, nothing else."""
    mget = client.mget

    def call() -> object:
        return mget(keys)

    return call


def bare_script(client: redis.Redis, keys: list[str]) -> Callable[[], object]:
    """What a key's one round trip costs Redis and redis-py without alkey's Python: the
    ``EVALSHA``s of alkey's fetch script that alkey sends for the same keys (one per
    :data:`~alkey.scripts.CHUNK_SIZE` keys, in one pipeline beyond that), each with a
    fresh random base -- the atomic read of the tokens and of the server's epoch, creating
    missing tokens, that an ``MGET`` cannot do."""
    sha = client.script_load(FETCH.source)
    evalsha, pipeline = client.evalsha, client.pipeline
    chunks = [keys[start : start + CHUNK_SIZE] for start in range(0, len(keys), CHUNK_SIZE)]

    def call() -> object:
        if len(chunks) == 1:
            return evalsha(sha, len(keys), *keys, DEFAULT_TOKEN_TTL, new_token())
        pipe = pipeline(transaction=False)
        for chunk in chunks:
            pipe.evalsha(sha, len(chunk), *chunk, DEFAULT_TOKEN_TTL, new_token())
        return pipe.execute()

    return call


# -- commits ---------------------------------------------------------------------------------


def bump_keys(items: Sequence[Item]) -> list[str]:
    """The token keys a commit that updated ``items`` bumps: each row's, the table's and
    the global one (spelled from the naming rules, like :func:`key_token_keys`)."""
    return [*(f"{TABLE}{item.id}" for item in items), TABLE + ALL_ROWS, GLOBAL_WRITE_TOKEN]


def check_bump_names(items: Sequence[Item]) -> None:
    """Fail unless alkey bumps exactly the keys the floor sets."""
    written = write_identifiers(instance_state(item) for item in items)
    if written != set(bump_keys(items)):
        raise RuntimeError(
            "the floor's pipeline would set other keys than alkey bumps: "
            f"{sorted(written ^ set(bump_keys(items)))[:5]}; update benchmarks/workload.py"
        )


def bare_bump(client: redis.Redis, keys: list[str]) -> Callable[[], None]:
    """The floor of a bump: what alkey's bump sends, without alkey -- one pipeline (no
    MULTI) of ``EVALSHA``s of its bump script, one per :data:`~alkey.scripts.CHUNK_SIZE`
    keys, each setting a fresh token derived from one random argument, with alkey's
    expiry. (A pipeline of one ``SET`` per key, each token drawn in Python, costs several
    times more from a hundred keys on: it would flatter alkey.)"""
    sha = client.script_load(BUMP.source)
    pipeline = client.pipeline
    chunks = [keys[start : start + CHUNK_SIZE] for start in range(0, len(keys), CHUNK_SIZE)]

    def call() -> None:
        pipe = pipeline(transaction=False)
        for chunk in chunks:
            pipe.evalsha(sha, len(chunk), *chunk, DEFAULT_TOKEN_TTL, new_token())
        pipe.execute()

    return call


class Transaction:
    """Update rows, flush, commit: the write transaction every commit variant times.

    One session per variant, kept across calls (``expire_on_commit=False``, so its rows
    stay loaded and each call writes all of them again with a new value). The flush and
    the commit are timed inside the call too, and their round trips counted, into
    :attr:`laps`, which the timing loop reads per batch: that splits a commit's cost
    into the flush's and the commit's without a second run. ``after_commit`` is the
    floor's bare bump, timed as part of the commit.
    """

    def __init__(
        self,
        session: Session,
        items: Sequence[Item],
        tag: str,
        after_commit: Callable[[], None] | None = None,
    ) -> None:
        self.session = session
        self.items = items
        self.tag = tag
        self.after_commit = after_commit
        self.calls = 0
        self.laps: dict[str, float] = {}
        self.most_flush_trips = 0
        self.most_commit_trips = 0

    def __call__(self) -> None:
        self.calls += 1
        value = f"{self.tag}{self.calls}"
        for item in self.items:
            item.name = value
        clock, laps = time.perf_counter, self.laps
        trips = CountingConnection.requests
        started = clock()
        self.session.flush()
        flushed = clock()
        flush_trips = CountingConnection.requests
        self.session.commit()
        if self.after_commit is not None:
            self.after_commit()
        committed = clock()
        laps["flush"] = laps.get("flush", 0.0) + flushed - started
        laps["commit"] = laps.get("commit", 0.0) + committed - flushed
        flush_trips, commit_trips = flush_trips - trips, CountingConnection.requests - flush_trips
        laps["flush trips"] = laps.get("flush trips", 0.0) + flush_trips
        laps["commit trips"] = laps.get("commit trips", 0.0) + commit_trips
        # The most of any one call, for the round-trip targets: an average over a batch
        # could hide a call with none and one with two.
        self.most_flush_trips = max(self.most_flush_trips, flush_trips)
        self.most_commit_trips = max(self.most_commit_trips, commit_trips)


def _nothing(*args: object, **kwargs: object) -> None:
    return None


def listening(factory: sessionmaker[Session], engine: Engine) -> None:
    """Listeners that do nothing on every event alkey listens to, on ``factory``'s sessions
    and on ``engine``: what SQLAlchemy's event dispatch costs any library that learns of
    writes through its events, before that library does anything."""
    for name in SESSION_EVENTS:
        event.listen(factory, name, _nothing)
    for name in ENGINE_EVENTS:
        event.listen(engine, name, _nothing)


def read_only(factory: sessionmaker[Session]) -> Callable[[], None]:
    """A read-only transaction: a new session, one SELECT of one row, commit, close."""
    query = select(Item).limit(1)

    def call() -> None:
        with factory() as session:
            session.scalars(query).all()
            session.commit()

    return call

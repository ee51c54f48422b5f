"""What the benchmark runs: one mapped class, its databases, and the operations on them.

Shared by the timed run (``python -m benchmarks``) and the call counts of its smoke
(:mod:`benchmarks.calls`), so that what CI guards is exactly what the report measures.
Every operation is a plain callable without arguments, ready to be called in a batch.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from sqlalchemy import Engine, String, create_engine, event, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.orm.attributes import instance_state

from alkey.connections import ENGINE_EVENTS
from alkey.constants import (
    ALL_ROWS,
    DEFAULT_TOKEN_TTL,
    GLOBAL_WRITE_TOKEN,
    NAMESPACE,
    ROW_SEPARATOR,
    TOKEN_BYTES,
    UNKNOWN_ROWS,
    UNKNOWN_WRITES,
)
from alkey.events import SESSION_EVENTS
from alkey.identity import write_identifiers
from alkey.keys import CacheKeyGenerator
from alkey.scripts import FETCH
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
    return "PostgreSQL" if database.startswith("postgresql") else "SQLite"


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
    """What a key's one round trip costs Redis and redis-py without alkey's Python: one
    ``EVALSHA`` of alkey's fetch script on the same keys -- the atomic read of the tokens
    and of the server's epoch, creating missing tokens, that an ``MGET`` cannot do."""
    sha = client.script_load(FETCH.source)
    evalsha = client.evalsha
    arguments = (DEFAULT_TOKEN_TTL, "base")

    def call() -> object:
        return evalsha(sha, len(keys), *keys, *arguments)

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
    """The floor of a bump: one pipeline (no MULTI) that sets a fresh random token, with
    alkey's expiry, on each key -- the least any client could send for the commit."""
    pipeline = client.pipeline

    def call() -> None:
        pipe = pipeline(transaction=False)
        for key in keys:
            pipe.set(key, secrets.token_hex(TOKEN_BYTES), ex=DEFAULT_TOKEN_TTL)
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
        laps["flush trips"] = laps.get("flush trips", 0.0) + flush_trips - trips
        laps["commit trips"] = (
            laps.get("commit trips", 0.0) + CountingConnection.requests - flush_trips
        )


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

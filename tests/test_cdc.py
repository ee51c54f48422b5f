"""Writes from outside the application change keys: PostgreSQL's logical decoding, read by
:class:`alkey.cdc.ChangeListener`, bumps the tokens those writes invalidate.

Each module starts a PostgreSQL of its own with ``wal_level=logical`` (the machine's runs
with ``replica``, and a test must not change it). The writers here never use alkey: a
``psql`` process, and raw psycopg. What the listener bumps is checked against the keys the
application builds with alkey for the same rows.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
import redis
from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Uuid,
    create_engine,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import alkey.cdc
import alkey.client
from alkey.cdc import ChangeListener, ListenerStoppedError
from alkey.constants import UNKNOWN_WRITES
from alkey.embedded import EmbeddedRedis
from alkey.errors import TokenStoreError
from alkey.identity import identifier_for, row_identifier
from alkey.keys import CacheKeyGenerator
from alkey.outbox import OUTBOX, OutboxListener
from alkey.tokens import RedisClient, RedisTokenStore

from .support.docs import docs_page, python_blocks
from .support.postgres import LogicalPostgres, postgres_binaries
from .support.replication import wait_until

pytestmark = pytest.mark.skipif(
    postgres_binaries() is None, reason="needs PostgreSQL's server programs (initdb)"
)


class Base(DeclarativeBase):
    metadata = MetaData()


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Document(Base):
    __tablename__ = "documents"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))


class Reading(Base):
    """A composite key of a timestamp with time zone and a numeric."""

    __tablename__ = "readings"
    taken: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    sensor: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


class Note(Base):
    """In a schema of its own: spelled ``audit.notes``."""

    __tablename__ = "notes"
    __table_args__ = {"schema": "audit"}  # noqa: RUF012
    code: Mapped[str] = mapped_column(String(10), primary_key=True)
    body: Mapped[str] = mapped_column(String(50))


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Book(Base):
    """Its writes touch its author, as alkey's own writes of a book do."""

    __tablename__ = "books"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    author_id: Mapped[int | None] = mapped_column(ForeignKey("authors.id"))
    author: Mapped[Author | None] = relationship()


class Surrogate(DeclarativeBase):
    """Models of a metadata the listeners are not given: named by the catalog's keys."""

    metadata = MetaData()


seats = Table(
    "cdc_seats",
    Surrogate.metadata,
    Column("id", Integer, primary_key=True),
    Column("room", String(10), nullable=False),
    Column("number", Integer, nullable=False),
    Column("label", String(50)),
)


class Seat(Surrogate):
    """A natural key mapped over the table's surrogate one: keyed ``cdc_seats#room,number``."""

    __table__ = seats
    __mapper_args__ = {"primary_key": [seats.c.room, seats.c.number]}  # noqa: RUF012


class ById(DeclarativeBase):
    """Another registry, mapping a table of :class:`Surrogate`'s by the table's own key."""


class SeatById(ById):
    """The same table as :class:`Seat`, keyed by its own key: ``cdc_seats#id``."""

    __table__ = seats


staff = Table(
    "cdc_staff",
    Surrogate.metadata,
    Column("id", Integer, primary_key=True),
    Column("code", String(10), nullable=False, unique=True),
    Column("kind", String(10), nullable=False),
)
engineers = Table(
    "cdc_engineers",
    Surrogate.metadata,
    Column("id", Integer, ForeignKey("cdc_staff.id"), primary_key=True),
    Column("level", Integer),
)


class Staff(Surrogate):
    """Keyed by ``code``; its joined subclass's table has no ``code`` column."""

    __table__ = staff
    __mapper_args__ = {  # noqa: RUF012
        "primary_key": [staff.c.code],
        "polymorphic_on": staff.c.kind,
        "polymorphic_identity": "staff",
    }


class Engineer(Staff):
    __table__ = engineers
    __mapper_args__ = {"polymorphic_identity": "engineer"}  # noqa: RUF012


emps = Table(
    "cdc_emps",
    Surrogate.metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(10), nullable=False),
)
engs = Table(
    "cdc_engs",
    Surrogate.metadata,
    Column("id", Integer, ForeignKey("cdc_emps.id"), primary_key=True),
)
mgrs = Table(
    "cdc_mgrs",
    Surrogate.metadata,
    Column("id", Integer, ForeignKey("cdc_engs.id"), primary_key=True),
)


class Emp(Surrogate):
    """Three levels of joined inheritance, keyed by the base's ``id`` throughout."""

    __table__ = emps
    __mapper_args__ = {"polymorphic_on": emps.c.kind, "polymorphic_identity": "emp"}  # noqa: RUF012


class Eng(Emp):
    __table__ = engs
    __mapper_args__ = {"polymorphic_identity": "eng"}  # noqa: RUF012


class Mgr(Eng):
    __table__ = mgrs
    __mapper_args__ = {"polymorphic_identity": "mgr"}  # noqa: RUF012


@pytest.fixture(scope="module")
def postgres() -> Iterator[LogicalPostgres]:
    with LogicalPostgres() as server:
        yield server


@pytest.fixture
def database(postgres: LogicalPostgres) -> str:
    """The private server's URL, with alkey's test tables (and an unkeyed one) created
    afresh, and no slot or publication left from another test."""
    engine = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        for (slot,) in connection.execute(text("SELECT slot_name FROM pg_replication_slots")):
            connection.execute(text("SELECT pg_drop_replication_slot(:s)"), {"s": slot})
        for (name,) in connection.execute(text("SELECT pubname FROM pg_publication")):
            connection.execute(text(f"DROP PUBLICATION {name}"))
        connection.execute(text("DROP FUNCTION IF EXISTS alkey_outbox_capture() CASCADE"))
        connection.execute(text(f"DROP TABLE IF EXISTS {OUTBOX}"))
        connection.execute(text("CREATE SCHEMA IF NOT EXISTS audit"))
        Base.metadata.drop_all(connection)
        connection.execute(
            text(
                "DROP TABLE IF EXISTS events_log, full_t, idx_t, meas, scratch, late_t, "
                "old_stuff, bin_t, flt_t"
            )
        )
        Surrogate.metadata.drop_all(connection)
        Base.metadata.create_all(connection)
        connection.execute(text("CREATE TABLE events_log (happened text)"))  # no key
    engine.dispose()
    return postgres.url


@pytest.fixture
def store(redis_client: RedisClient) -> RedisTokenStore:
    return RedisTokenStore(redis_client)


_opened: list[ChangeListener | OutboxListener] = []


@pytest.fixture(autouse=True)
def _close_listeners() -> Iterator[None]:
    """Each listener a test made closes its connections after the test."""
    yield
    while _opened:
        _opened.pop().close()


def listener_for(database: str, store: Any, **options: Any) -> ChangeListener:
    listener = ChangeListener(database, tokens=store, metadata=Base.metadata, **options)
    _opened.append(listener)
    listener.create()
    return listener


class Drained:
    """An :class:`OutboxListener` behind :class:`ChangeListener`'s ``poll``."""

    def __init__(self, outbox: OutboxListener) -> None:
        self.outbox = outbox

    def poll(self) -> int:
        return self.outbox.drain()

    def close(self) -> None:
        self.outbox.close()


def outbox_for(database: str, store: Any, **options: Any) -> Any:
    outbox = OutboxListener(database, tokens=store, metadata=Base.metadata, **options)
    _opened.append(outbox)
    outbox.install()
    return Drained(outbox)


def psql(database: str, *statements: str) -> None:
    """Run ``statements`` with the ``psql`` program: a writer that knows nothing of alkey."""
    binaries = postgres_binaries()
    program = shutil.which("psql") or str(binaries / "psql" if binaries else "psql")
    dsn = database.replace("postgresql+psycopg://", "postgresql://")
    subprocess.run(
        [program, dsn, "-v", "ON_ERROR_STOP=1", "-q", "-c", "; ".join(statements)],
        check=True,
        capture_output=True,
    )


def raw(database: str, statement: str, *params: Any) -> None:
    """Run ``statement`` with raw psycopg, committed."""
    with psycopg.connect(database.replace("postgresql+psycopg://", "postgresql://")) as c:
        c.execute(statement, params)


def drain(listener: ChangeListener | Drained) -> int:
    total = 0
    while found := listener.poll():
        total += found
    return total


def confirmed(database: str, slot: str = "alkey") -> str:
    engine = create_engine(database)
    with engine.connect() as connection:
        position = connection.execute(
            text("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = :s"),
            {"s": slot},
        ).scalar_one()
    engine.dispose()
    return str(position)


# -- what changes ------------------------------------------------------------------------------


def test_a_psql_insert_update_and_delete_change_the_row_table_and_global_keys_only(
    database: str, store: RedisTokenStore
) -> None:
    listener = listener_for(database, store)
    rows = ["alkey:accounts#1", "alkey:accounts#2"]
    others = ["alkey:documents#*", "alkey:accounts#3"]
    everything = [*rows, "alkey:accounts#*", "alkey:*#*", *others]

    before = dict(zip(everything, store.fetch(everything), strict=True))
    psql(database, "INSERT INTO accounts VALUES (1, 'ada')")
    assert drain(listener) == 1
    after = dict(zip(everything, store.fetch(everything), strict=True))
    changed = {i for i in everything if after[i] != before[i]}
    assert changed == {"alkey:accounts#1", "alkey:accounts#*", "alkey:*#*"}

    for statement in (
        "UPDATE accounts SET name = 'grace' WHERE id = 1",
        "UPDATE accounts SET id = 2 WHERE id = 1",  # a new key: both rows change
        "DELETE FROM accounts WHERE id = 2",
    ):
        before = after
        psql(database, statement)
        drain(listener)
        after = dict(zip(everything, store.fetch(everything), strict=True))
        changed = {i for i in everything if after[i] != before[i]}
        expected = {"alkey:accounts#*", "alkey:*#*", "alkey:accounts#2"}
        if "SET name" in statement:
            expected = {"alkey:accounts#1", "alkey:accounts#*", "alkey:*#*"}
        elif "SET id" in statement:
            expected |= {"alkey:accounts#1"}
        assert changed == expected, statement


@pytest.mark.parametrize("mechanism", ["slot", "outbox"])
def test_an_outside_write_changes_the_key_the_application_built_for_the_row(
    database: str, store: RedisTokenStore, mechanism: str
) -> None:
    """Identifiers are spelled as alkey's own writes spell them, for keys of every kind:
    an integer, a UUID, a composite of a timestamp with time zone and a numeric, and a
    table in a schema of its own -- read from logical decoding or from the trigger
    outbox alike."""
    listener = listener_for(database, store) if mechanism == "slot" else outbox_for(database, store)
    document_id = uuid.uuid4()
    taken = datetime.datetime(2026, 11, 30, 12, 0, 0, 250000, tzinfo=datetime.timezone.utc)
    raw(database, "INSERT INTO accounts VALUES (7, 'ada')")
    raw(database, "INSERT INTO documents VALUES (%s, 'draft')", document_id)
    raw(database, "INSERT INTO readings VALUES (%s, %s, 1)", taken, decimal.Decimal("3.50"))
    raw(database, "INSERT INTO audit.notes VALUES ('n-1', 'x')")
    drain(listener)
    keys = CacheKeyGenerator(tokens=store)
    engine = create_engine(database)
    with Session(engine) as session:
        loaded = [
            session.get_one(Account, 7),
            session.get_one(Document, document_id),
            session.get_one(Reading, (taken, decimal.Decimal("3.5"))),
            session.get_one(Note, "n-1"),
        ]
        # Keyed on the rows' identifiers, as the application spells them from what it
        # loaded: only their tokens can change these keys.
        identifiers = [identifier_for(instance) for instance in loaded]
    engine.dispose()
    before = [keys(identifier, "page") for identifier in identifiers]
    raw(database, "UPDATE accounts SET name = 'grace' WHERE id = 7")
    raw(database, "UPDATE documents SET title = 'final' WHERE id = %s", document_id)
    raw(database, "UPDATE readings SET value = 2")
    raw(database, "UPDATE audit.notes SET body = 'y'")
    # Four transactions, or four outbox rows: an update that keeps its key records one.
    assert drain(listener) == 4
    after = [keys(identifier, "page") for identifier in identifiers]
    unchanged = [i for i, old, new in zip(identifiers, before, after, strict=True) if old == new]
    assert unchanged == [], f"keys the outside writes did not change: {unchanged}"


def test_a_truncate_changes_every_row_key_of_the_table(
    database: str, store: RedisTokenStore
) -> None:
    listener = listener_for(database, store)
    raw(database, "INSERT INTO accounts VALUES (1, 'ada'), (2, 'bob')")
    drain(listener)
    keys = CacheKeyGenerator(tokens=store)
    engine = create_engine(database)
    with Session(engine, expire_on_commit=False) as session:
        account = session.get_one(Account, 2)
        before = keys(account)
        session.commit()  # ends the read, which would hold TRUNCATE's lock up
        psql(database, "TRUNCATE accounts")
        drain(listener)
        assert keys(account) != before, "a row of a truncated table names no live row"
    engine.dispose()


def test_a_table_without_a_primary_key_is_left_out_so_its_updates_still_work(
    database: str, store: RedisTokenStore
) -> None:
    """PostgreSQL refuses UPDATE and DELETE on a published table without a replica
    identity: publishing such a table would break the writers."""
    listener = listener_for(database, store)
    published = listener.create()
    assert "public.events_log" not in published
    assert {"public.accounts", "public.documents", "audit.notes"} <= set(published)
    psql(database, "INSERT INTO events_log VALUES ('a')", "UPDATE events_log SET happened = 'b'")
    psql(database, "DELETE FROM events_log")


# -- nothing lost ------------------------------------------------------------------------------


def test_a_redis_outage_confirms_nothing_and_the_changes_are_bumped_once_it_answers(
    database: str,
) -> None:
    with EmbeddedRedis() as redis_server:
        client = redis.Redis.from_url(redis_server.url, socket_timeout=0.5, retry=None)
        store = RedisTokenStore(client, retry_interval=0)
        listener = listener_for(database, store)
        before = store.fetch(["alkey:accounts#5"])
        position = confirmed(database)

        redis_server.stop()
        raw(database, "INSERT INTO accounts VALUES (5, 'ada')")
        with pytest.raises(TokenStoreError, match="not confirmed"):
            listener.poll()
        with pytest.raises(TokenStoreError):
            listener.poll()
        assert confirmed(database) == position, "nothing confirmed while Redis is down"

        redis_server.start()
        assert store.wait_replayed(timeout=5)  # the store's own replay may land first
        assert drain(listener) == 1
        assert confirmed(database) != position
        assert store.fetch(["alkey:accounts#5"]) != before
        client.close()


def test_a_listener_killed_mid_stream_and_restarted_loses_no_change(
    database: str, redis_url: str, store: RedisTokenStore
) -> None:
    """``alkey listen`` in a process of its own, killed with SIGKILL while a writer commits
    row after row, then started again: every row's token changed."""
    with ChangeListener(database, tokens=store) as setting_up:
        setting_up.create()
    identifiers = [f"alkey:accounts#{n}" for n in range(1, 201)]
    before = store.fetch(identifiers)
    command = [sys.executable, "-m", "alkey", "listen", database, "--url", redis_url]
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    listening = subprocess.Popen(command, env=environment, stderr=subprocess.DEVNULL)
    try:
        for n in range(1, 201):
            raw(database, "INSERT INTO accounts VALUES (%s, 'x')", n)
            if n == 100:
                listening.send_signal(signal.SIGKILL)
                listening.wait(timeout=10)
                listening = subprocess.Popen(command, env=environment, stderr=subprocess.DEVNULL)

        def all_bumped() -> bool:
            after = store.fetch(identifiers)
            return all(a != b for a, b in zip(after, before, strict=True))

        wait_until(all_bumped, 30, "every inserted row's token to change", 0.05)
    finally:
        listening.send_signal(signal.SIGINT)
        try:
            listening.wait(timeout=10)
        except subprocess.TimeoutExpired:
            listening.kill()
            listening.wait()


def test_listen_once_bumps_what_the_slot_holds_and_drop_slot_removes_slot_and_publication(
    database: str, redis_url: str, store: RedisTokenStore
) -> None:
    base = [sys.executable, "-m", "alkey", "listen", database, "--url", redis_url]
    first = subprocess.run([*base, "--once"], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    before = store.fetch(["alkey:accounts#9"])
    raw(database, "INSERT INTO accounts VALUES (9, 'ada')")
    again = subprocess.run(
        [*base, "--once", "--metadata", "tests.test_cdc:Base.metadata"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert "bumped the tokens of 1 transaction(s)" in again.stdout
    assert store.fetch(["alkey:accounts#9"]) != before

    wrong = subprocess.run(
        [*base, "--once", "--metadata", "tests.test_cdc:Account"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 2
    assert "not a MetaData" in wrong.stderr
    dropped = subprocess.run([*base, "--drop-slot"], capture_output=True, text=True, timeout=60)
    assert dropped.returncode == 0, dropped.stderr
    engine = create_engine(database)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM pg_replication_slots")).scalar() == 0
        assert connection.execute(text("SELECT count(*) FROM pg_publication")).scalar() == 0
    engine.dispose()


def test_listen_says_in_one_line_when_the_database_refuses(redis_url: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "alkey",
            "listen",
            "postgresql://nobody:s3cret@127.0.0.1:1/none",
            "--url",
            redis_url,
            "--once",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("alkey: the database postgresql+psycopg://nobody:***@")
    assert "s3cret" not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_listener_refuses_a_database_that_is_not_postgresql_and_bad_names() -> None:
    with pytest.raises(ValueError, match="reads PostgreSQL's changes; 'sqlite://' is sqlite"):
        ChangeListener("sqlite://", tokens=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slot name 'My-Slot'"):
        ChangeListener("postgresql+psycopg://x@h/d", tokens=object(), slot="My-Slot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one message"):
        ChangeListener("postgresql+psycopg://x@h/d", tokens=object(), batch=0)  # type: ignore[arg-type]


def test_the_lag_from_a_psql_commit_to_the_changed_key_is_under_a_second_when_running(
    database: str, store: RedisTokenStore
) -> None:
    import threading

    listener = listener_for(database, store, poll_interval=0.01)
    stop = threading.Event()
    running = threading.Thread(target=listener.run, args=(stop,), daemon=True)
    running.start()
    try:
        before = store.fetch(["alkey:accounts#11"])
        committed = time.monotonic()
        psql(database, "INSERT INTO accounts VALUES (11, 'ada')")
        wait_until(
            lambda: store.fetch(["alkey:accounts#11"]) != before,
            5,
            "the listener to bump the row",
            0.002,
        )
        assert time.monotonic() - committed < 1.0
    finally:
        stop.set()
        running.join(timeout=10)


def test_the_guides_example_runs_against_a_real_listener_and_its_assertions_hold(
    database: str,
    redis_url: str,
    environment_redis: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/outside-writes.md's Python example, on the default store (``REDIS_URL``)."""
    environment_redis(redis_url)
    monkeypatch.setattr(alkey.client, "_default_configuration", None)
    namespace: dict[str, Any] = {
        "DATABASE_URL": database,
        "Base": Base,
        "key_generator": CacheKeyGenerator(tokens=alkey.client.default_store()),
        "row_identifier": row_identifier,
        "outside_write": lambda statement: psql(database, statement),
        "wait_for": lambda check: wait_until(check, 5, "the guide's check", 0.005),
    }
    [block] = python_blocks(docs_page("outside-writes.md"))
    exec(compile(block, "docs/outside-writes.md", "exec"), namespace)
    _opened.append(namespace["listener"])


def test_arun_bumps_from_an_event_loop_and_stops_when_its_event_is_set(
    database: str, store: RedisTokenStore
) -> None:
    listener = listener_for(database, store, poll_interval=0.01)
    before = store.fetch(["alkey:accounts#12"])

    async def scenario() -> float:
        stop = asyncio.Event()
        running = asyncio.ensure_future(listener.arun(stop))
        await asyncio.to_thread(psql, database, "INSERT INTO accounts VALUES (12, 'ada')")
        began = time.monotonic()
        while store.fetch(["alkey:accounts#12"]) == before:
            assert time.monotonic() - began < 5, "the listener never bumped the row"
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.wait_for(running, 5)  # it ends once its event is set
        return time.monotonic() - began

    assert asyncio.run(scenario()) < 5


# -- the trigger outbox ------------------------------------------------------------------------


def outbox_rows(database: str) -> int:
    with psycopg.connect(database.replace("postgresql+psycopg://", "postgresql://")) as c:
        found = c.execute(f"SELECT count(*) FROM {OUTBOX}").fetchone()
    assert found is not None
    return int(found[0])


def test_the_outbox_records_psql_writes_in_their_transaction_and_drains_them_to_the_same_keys(
    database: str, store: RedisTokenStore
) -> None:
    outbox = outbox_for(database, store)
    everything = ["alkey:accounts#1", "alkey:accounts#2", "alkey:accounts#*", "alkey:*#*"]
    everything += ["alkey:documents#*", "alkey:accounts#3"]
    # Each write, the rows it changes, and the outbox rows that record it: one per key
    # (an update that moves a row to a new key records both, one that keeps it, one).
    steps = [
        ("INSERT INTO accounts VALUES (1, 'ada')", {"alkey:accounts#1"}, 1),
        ("UPDATE accounts SET name = 'grace' WHERE id = 1", {"alkey:accounts#1"}, 1),
        ("UPDATE accounts SET id = 2 WHERE id = 1", {"alkey:accounts#1", "alkey:accounts#2"}, 2),
        ("DELETE FROM accounts WHERE id = 2", {"alkey:accounts#2"}, 1),
    ]
    for statement, rows, recorded in steps:
        before = dict(zip(everything, store.fetch(everything), strict=True))
        psql(database, statement)
        assert outbox_rows(database) == recorded, "recorded by the writing transaction"
        drain(outbox)
        assert outbox_rows(database) == 0, "drained"
        after = dict(zip(everything, store.fetch(everything), strict=True))
        changed = {i for i in everything if after[i] != before[i]}
        assert changed == rows | {"alkey:accounts#*", "alkey:*#*"}, statement

    psql(database, "BEGIN", "INSERT INTO accounts VALUES (3, 'x')", "ROLLBACK")
    assert outbox_rows(database) == 0, "a rolled-back write leaves no record"

    keys = CacheKeyGenerator(tokens=store)
    before_truncate = keys(identifier_for_row(database, 2))
    psql(database, "TRUNCATE accounts")
    drain(outbox)
    assert keys(identifier_for_row(database, 2)) != before_truncate, "every row of the table"


def identifier_for_row(database: str, row: int) -> str:
    """What a key of an ``Account`` of key ``row`` depends on: its row identifier (a key
    built on it also depends on the table's unknown-rows token)."""
    return row_identifier(Account.__table__, row)


def test_a_redis_outage_leaves_the_outbox_rows_until_redis_answers(database: str) -> None:
    with EmbeddedRedis() as redis_server:
        client = redis.Redis.from_url(redis_server.url, socket_timeout=0.5, retry=None)
        store = RedisTokenStore(client, retry_interval=0)
        outbox = outbox_for(database, store)
        before = store.fetch(["alkey:accounts#6"])
        redis_server.stop()
        raw(database, "INSERT INTO accounts VALUES (6, 'ada')")
        with pytest.raises(TokenStoreError, match="keeps its rows"):
            outbox.poll()
        assert outbox_rows(database) == 1, "nothing deleted while Redis is down"
        redis_server.start()
        assert store.wait_replayed(timeout=5)
        assert drain(outbox) == 1
        assert outbox_rows(database) == 0
        assert store.fetch(["alkey:accounts#6"]) != before
        client.close()


@pytest.mark.skipif(
    tuple(int(part) for part in psycopg.__version__.split(".")[:2]) < (3, 2),
    reason="waiting for a NOTIFY with a timeout needs psycopg 3.2 (before, it polls)",
)
def test_a_notify_wakes_an_idle_outbox_listener_before_its_poll_interval(
    database: str, store: RedisTokenStore
) -> None:
    import threading

    outbox = outbox_for(database, store, poll_interval=30.0).outbox
    stop = threading.Event()
    running = threading.Thread(target=outbox.run, args=(stop,), daemon=True)
    running.start()
    try:
        time.sleep(0.3)  # idle: waiting on its NOTIFY connection
        before = store.fetch(["alkey:accounts#13"])
        committed = time.monotonic()
        psql(database, "INSERT INTO accounts VALUES (13, 'ada')")
        wait_until(
            lambda: store.fetch(["alkey:accounts#13"]) != before, 5, "the NOTIFY's drain", 0.005
        )
        assert time.monotonic() - committed < 5
    finally:
        stop.set()
        raw(database, "NOTIFY alkey_outbox")  # ends its wait
        running.join(timeout=35)


def test_install_triggers_and_listen_outbox_once_from_the_command_line(
    database: str, redis_url: str, store: RedisTokenStore
) -> None:
    base = [sys.executable, "-m", "alkey"]
    installed = subprocess.run(
        [*base, "install-triggers", database, "--url", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert installed.returncode == 0, installed.stderr
    assert "installed alkey's outbox triggers on 6 table(s)" in installed.stdout
    before = store.fetch(["alkey:accounts#8"])
    raw(database, "INSERT INTO accounts VALUES (8, 'ada')")
    drained = subprocess.run(
        [*base, "listen", database, "--url", redis_url, "--outbox", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drained.returncode == 0, drained.stderr
    assert "bumped the tokens of 1 recorded write(s)" in drained.stdout
    assert store.fetch(["alkey:accounts#8"]) != before
    removed = subprocess.run(
        [*base, "install-triggers", database, "--url", redis_url, "--uninstall"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert removed.returncode == 0, removed.stderr
    raw(database, "INSERT INTO accounts VALUES (10, 'bob')")  # no trigger, no outbox


# -- what the review of the first version found ------------------------------------------------


class Recording(RedisTokenStore):
    """A real store that also notes what each bump carried."""

    def __init__(self, client: RedisClient) -> None:
        super().__init__(client)
        self.bumps: list[set[str]] = []

    def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        self.bumps.append(set(identifiers))
        super().bump(identifiers, intent)


def bumped_by(listener: ChangeListener | Drained, store: Recording) -> set[str]:
    store.bumps.clear()
    drain(listener)
    return set().union(*store.bumps)


def test_rows_are_named_by_their_primary_key_whatever_the_replica_identity(
    database: str, redis_client: RedisClient
) -> None:
    """Without metadata (as ``alkey listen`` runs): a table whose replica identity is
    FULL, or another unique index, names its rows by primary key, as the application
    does -- and an update whose log carries no old row, which may have moved the key,
    every row."""
    raw(database, "CREATE TABLE full_t (id int PRIMARY KEY, name text)")
    raw(database, "ALTER TABLE full_t REPLICA IDENTITY FULL")
    raw(database, "CREATE TABLE idx_t (id int PRIMARY KEY, code int NOT NULL UNIQUE)")
    raw(database, "ALTER TABLE idx_t REPLICA IDENTITY USING INDEX idx_t_code_key")
    store = Recording(redis_client)
    listener = ChangeListener(database, tokens=store)
    _opened.append(listener)
    listener.create()
    listener.create()  # again: nothing to add, no error
    for statement in ("INSERT INTO full_t VALUES (1, 'ada')", "INSERT INTO idx_t VALUES (1, 70)"):
        raw(database, statement)
    drain(listener)
    cases: list[tuple[str, set[str], str]] = [
        ("UPDATE full_t SET name = 'grace' WHERE id = 1", {"alkey:full_t#1"}, "full_t"),
        ("DELETE FROM full_t WHERE id = 1", {"alkey:full_t#1"}, "full_t"),
        # The log of an update that keeps the replica identity (code) carries no old
        # row: its key may have moved from any row (here from 1 to 2) -- every row.
        ("UPDATE idx_t SET id = 2 WHERE id = 1", {"alkey:idx_t#?"}, "idx_t"),
        ("UPDATE idx_t SET id = 1 WHERE id = 2", {"alkey:idx_t#?"}, "idx_t"),
        # The log of a change to the replica identity (code), and of a delete, carries
        # the old row's code alone, not its key: every row of the table, never none.
        ("UPDATE idx_t SET code = 71 WHERE id = 1", {"alkey:idx_t#1", "alkey:idx_t#?"}, "idx_t"),
        ("DELETE FROM idx_t WHERE id = 1", {"alkey:idx_t#?"}, "idx_t"),
    ]
    for statement, rows, table in cases:
        raw(database, statement)
        expected = rows | {f"alkey:{table}#*", "alkey:*#*"}
        assert bumped_by(listener, store) == expected, statement


@pytest.mark.parametrize("mechanism", ["slot", "outbox"])
def test_a_partitions_writes_and_its_own_truncate_are_named_as_the_partitioned_tables(
    database: str, redis_client: RedisClient, mechanism: str
) -> None:
    """The application maps the partitioned table: a partition's rows are its rows,
    whatever partition they live in (one attached later, its columns in another order,
    in another schema) or move to, and emptying one partition alone empties some rows
    of it -- every row key of the table changes."""
    raw(
        database,
        "CREATE TABLE meas (id int, day int, PRIMARY KEY (id, day)) PARTITION BY LIST (day)",
    )
    raw(database, "CREATE TABLE meas_1 PARTITION OF meas FOR VALUES IN (1)")
    raw(database, "CREATE TABLE audit.meas_2 (day int NOT NULL, id int NOT NULL)")
    raw(database, "ALTER TABLE meas ATTACH PARTITION audit.meas_2 FOR VALUES IN (2)")
    store = Recording(redis_client)
    if mechanism == "slot":
        listener: Any = ChangeListener(database, tokens=store)
        _opened.append(listener)
        listener.create()
    else:
        outbox = OutboxListener(database, tokens=store)
        _opened.append(outbox)
        outbox.install(["meas"])
        listener = Drained(outbox)
    drain(listener)
    # A partition made after the set-up: in the publication, and its rows' triggers
    # cloned, by PostgreSQL.
    raw(database, "CREATE TABLE meas_3 PARTITION OF meas FOR VALUES IN (3)")
    cases: list[tuple[str, set[str]]] = [
        ("INSERT INTO meas VALUES (7, 3)", {"alkey:meas#7,3"}),
        ("INSERT INTO meas VALUES (5, 1)", {"alkey:meas#5,1"}),
        ("UPDATE meas SET id = 5 WHERE day = 1", {"alkey:meas#5,1"}),
        ("INSERT INTO audit.meas_2 VALUES (2, 6)", {"alkey:meas#6,2"}),
        # A row moved to another partition: deleted from one, inserted into the other.
        ("UPDATE meas SET day = 2 WHERE id = 5", {"alkey:meas#5,1", "alkey:meas#5,2"}),
        # A partition emptied on its own: every row of the table it is part of.
        ("TRUNCATE audit.meas_2", {"alkey:meas#?"}),
        ("TRUNCATE meas", {"alkey:meas#?"}),
    ]
    for statement, rows in cases:
        raw(database, statement)
        assert bumped_by(listener, store) == rows | {"alkey:meas#*", "alkey:*#*"}, statement


def test_create_publishes_permanent_keyed_tables_and_adds_new_ones_when_run_again(
    database: str, store: RedisTokenStore
) -> None:
    raw(database, "CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY)")
    with ChangeListener(database, tokens=store) as listener:
        first = listener.create(tables=["accounts"])
        assert listener.create(tables=["accounts"]) == first == ["public.accounts"]
        with psycopg.connect(database.replace("postgresql+psycopg://", "postgresql://")) as c:
            c.execute("CREATE TEMPORARY TABLE mine (id int PRIMARY KEY)")
            published = listener.create()  # another session's temporary table: left out
        assert "public.scratch" not in published
        assert {"public.accounts", "public.documents", "audit.notes"} <= set(published)
        with pytest.raises(ValueError, match="no table 'nowhere'"):
            listener.create(tables=["nowhere"])


def test_a_new_slot_bumps_the_token_every_key_depends_on(
    database: str, store: RedisTokenStore
) -> None:
    """What was committed before a slot existed is in no slot: every key misses once."""
    keys = CacheKeyGenerator(tokens=store)
    before = keys("alkey:documents#1", "page")
    listener_for(database, store)
    assert keys("alkey:documents#1", "page") != before
    again = keys("alkey:documents#1", "page")
    listener_for(database, store).poll()  # the slot exists: nothing more
    assert keys("alkey:documents#1", "page") == again


def test_a_bump_that_set_up_owes_is_made_by_the_next_create_after_a_failure_in_between(
    database: str,
) -> None:
    """A new slot owes a bump of the token every key depends on, a newly published table
    a bump of every row. Between the change and its bump the process may die or Redis
    refuse: either way the database holds the change and a note of the owed bump on the
    publication (here Redis refuses, with nothing kept in the process to replay), and
    the next ``create()`` -- another process -- makes the bump, once."""
    with EmbeddedRedis() as redis_server:
        client = redis.Redis.from_url(redis_server.url, socket_timeout=0.5, retry=None)
        refusing = RedisTokenStore(client, on_error="raise")  # keeps nothing for replay
        redis_server.stop()
        with ChangeListener(database, tokens=refusing) as listener, pytest.raises(TokenStoreError):
            listener.create()
        assert slots(database) == ["alkey"]
        assert "every-key" in (note(database) or "")

        redis_server.start()
        store = Recording(client)
        with ChangeListener(database, tokens=store) as listener:
            listener.create()
        assert store.bumps == [{UNKNOWN_WRITES}]
        assert note(database) is None, "made, and the note cleared"

        raw(database, "CREATE TABLE late_t (id int PRIMARY KEY)")
        raw(database, "INSERT INTO late_t VALUES (1)")  # in no publication yet
        redis_server.stop()
        with ChangeListener(database, tokens=refusing) as listener, pytest.raises(TokenStoreError):
            listener.create()  # published, and its bump owed
        redis_server.start()
        store.bumps.clear()
        with ChangeListener(database, tokens=store) as listener:
            listener.create()  # a new process: makes the owed bump
            assert store.bumps == [{"alkey:late_t#?", "alkey:late_t#*", "alkey:*#*"}]
            store.bumps.clear()
            listener.create()
            assert store.bumps == [], "owed once"
        client.close()


def test_listeners_creating_at_once_take_turns_and_each_new_table_is_published_once(
    database: str, store: RedisTokenStore
) -> None:
    """Two listener processes starting together after a migration both find a new
    table: they take turns (an advisory lock), so neither fails on the other's
    ``ADD TABLE``."""
    listener_for(database, store)
    raw(database, "CREATE TABLE late_t (id int PRIMARY KEY)")
    listeners = [ChangeListener(database, tokens=store) for _ in range(4)]
    _opened.extend(listeners)
    with ThreadPoolExecutor(len(listeners)) as pool:
        published = list(pool.map(lambda listener: listener.create(), listeners))
    assert all("public.late_t" in tables for tables in published)
    assert note(database) is None


def note(database: str) -> str | None:
    """The comment on alkey's publication: the bumps set-up owes, if any."""
    engine = create_engine(database)
    with engine.connect() as connection:
        found = connection.execute(
            text(
                "SELECT obj_description(oid, 'pg_publication') FROM pg_publication "
                "WHERE pubname = 'alkey'"
            )
        ).scalar()
    engine.dispose()
    return found if isinstance(found, str) else None


def slots(database: str) -> list[str]:
    engine = create_engine(database)
    with engine.connect() as connection:
        names = connection.execute(text("SELECT slot_name FROM pg_replication_slots")).scalars()
        found = sorted(names)
    engine.dispose()
    return found


def test_the_slot_moves_past_writes_to_tables_it_does_not_publish(
    database: str, store: RedisTokenStore
) -> None:
    listener = listener_for(database, store)
    for n in range(20):
        raw(database, "INSERT INTO events_log VALUES (%s)", str(n))
    start = confirmed(database)
    assert listener.poll() == 0
    assert confirmed(database) != start, "PostgreSQL need not keep that log for the slot"


def test_a_dropped_slot_stops_the_listener_with_an_error_instead_of_retrying(
    database: str, store: RedisTokenStore
) -> None:
    listener = listener_for(database, store)
    raw(database, "SELECT pg_drop_replication_slot('alkey')")
    with pytest.raises(ListenerStoppedError, match="does not exist"):
        listener.run()


def test_a_table_dropped_before_its_write_was_read_names_every_row_and_the_listener_goes_on(
    database: str, redis_client: RedisClient
) -> None:
    """A migration writes a table and drops it while the listener is away: the write
    names every row of that table (its key is no longer in the catalog), and the
    writes after it are read as usual -- the listener does not stall on it."""
    raw(database, "CREATE TABLE old_stuff (id int PRIMARY KEY)")
    store = Recording(redis_client)
    with ChangeListener(database, tokens=store) as first:
        first.create()
    raw(database, "INSERT INTO old_stuff VALUES (1)")
    raw(database, "DROP TABLE old_stuff")
    raw(database, "INSERT INTO accounts VALUES (7, 'ada')")
    restarted = ChangeListener(database, tokens=store)  # a new process: nothing cached
    _opened.append(restarted)
    bumped = bumped_by(restarted, store)
    assert {"alkey:old_stuff#?", "alkey:old_stuff#*"} <= bumped
    assert "alkey:old_stuff#1" not in bumped, "no key read from a table that is gone"
    assert "alkey:accounts#7" in bumped


def test_a_database_in_another_encoding_names_its_rows_as_the_application_does(
    postgres: LogicalPostgres, database: str, redis_client: RedisClient
) -> None:
    """The log of a LATIN1 database carries its own bytes; the listener asks for UTF-8,
    so a key (and any other value) with accents reads as the application reads it."""
    admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text("DROP DATABASE IF EXISTS latin"))
        connection.execute(
            text(
                "CREATE DATABASE latin TEMPLATE template0 ENCODING 'LATIN1' "
                "LC_COLLATE 'C' LC_CTYPE 'C'"
            )
        )
    admin.dispose()
    url = postgres.url.rsplit("/", 1)[0] + "/latin"
    raw(url, "CREATE TABLE people (name text PRIMARY KEY, city text)")
    store = Recording(redis_client)
    with ChangeListener(url, tokens=store) as listener:
        try:
            listener.create()
            raw(url, "INSERT INTO people VALUES ('José', 'Málaga')")
            raw(url, "UPDATE people SET city = 'Sevilla' WHERE name = 'José'")
            assert bumped_by(listener, store) == {
                row_identifier("people", "José"),
                "alkey:people#*",
                "alkey:*#*",
            }
        finally:
            listener.drop()


def test_outbox_triggers_record_writes_of_sessions_in_replica_mode(
    database: str, store: RedisTokenStore
) -> None:
    """A subscription's apply worker, or a loader that sets ``session_replication_role``
    to skip foreign keys, does not fire ordinary triggers; the outbox's fire always."""
    outbox = outbox_for(database, store)
    psql(
        database,
        "SET session_replication_role = replica",
        "INSERT INTO accounts VALUES (4, 'ada')",
    )
    assert outbox_rows(database) == 1
    psql(database, "SET session_replication_role = replica", "TRUNCATE accounts")
    assert outbox_rows(database) == 2
    assert drain(outbox) == 2


def test_a_large_outside_transaction_names_its_table_rather_than_every_row(
    database: str, redis_client: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(alkey.cdc, "ROWS_PER_TABLE", 5)
    store = Recording(redis_client)
    listener = listener_for(database, store)
    raw(database, "INSERT INTO accounts SELECT g, 'x' FROM generate_series(1, 8) g")
    bumped = bumped_by(listener, store)
    assert "alkey:accounts#?" in bumped, "every row of the table"
    assert len([i for i in bumped if i.startswith("alkey:accounts#") and i[-1].isdigit()]) == 5


def test_a_store_that_cannot_tell_a_kept_bump_from_a_sent_one_is_refused(database: str) -> None:
    class Plain:
        def fetch(self, identifiers: Any) -> list[str]:
            return ["t"] * len(identifiers)

        def bump(self, identifiers: Any) -> None:
            pass

    with pytest.raises(ValueError, match="pass a RedisTokenStore"):
        ChangeListener(database, tokens=Plain())


def test_an_outside_write_of_a_child_touches_its_parent_as_the_applications_write_does(
    database: str, redis_client: RedisClient
) -> None:
    """With the application's models: a book inserted by ``psql`` changes its author's
    keys; one moved or deleted, whose old author the log does not carry (unless the table
    logs old rows whole), every author's."""
    raw(database, "INSERT INTO authors VALUES (1, 'ada'), (2, 'grace')")
    store = Recording(redis_client)
    listener = listener_for(database, store)
    raw(database, "INSERT INTO books VALUES (10, 1)")
    bumped = bumped_by(listener, store)
    assert {"alkey:books#10", "alkey:authors#1"} <= bumped
    assert "alkey:authors#2" not in bumped
    assert "alkey:authors#?" not in bumped
    raw(database, "UPDATE books SET author_id = 2 WHERE id = 10")
    bumped = bumped_by(listener, store)
    assert "alkey:authors#?" in bumped, "the old author, which the log does not name: all"
    raw(database, "ALTER TABLE books REPLICA IDENTITY FULL")  # old rows logged whole
    raw(database, "UPDATE books SET author_id = 1 WHERE id = 10")
    bumped = bumped_by(listener, store)
    assert {"alkey:authors#1", "alkey:authors#2"} <= bumped, "the old and the new author"
    assert "alkey:authors#?" not in bumped
    raw(database, "ALTER TABLE books REPLICA IDENTITY DEFAULT")
    raw(database, "DELETE FROM books WHERE id = 10")
    assert "alkey:authors#?" in bumped_by(listener, store), "every author: which is unknown"


@pytest.mark.parametrize("mechanism", ["slot", "outbox"])
def test_a_row_of_a_mapper_keyed_by_other_columns_than_its_tables_key_is_named_as_its_instances(
    database: str, redis_client: RedisClient, mechanism: str
) -> None:
    """``Seat`` is keyed by ``(room, number)`` over the table's ``id``: an outside write
    changes the keys of the seat it wrote, named as the application names it -- precisely
    for an insert (logical decoding reads the new row whole), and as every row of the table
    where the log or the outbox does not carry the mapper's columns (an update's old row,
    a delete, every outbox row) -- and by its table's key as well, as ``SeatById``'s
    instances are."""
    engine = create_engine(database)
    Surrogate.metadata.create_all(engine)  # this test's alone: dropped by `database`
    store = Recording(redis_client)
    listener = listener_for(database, store) if mechanism == "slot" else outbox_for(database, store)
    keys = CacheKeyGenerator(tokens=store)
    raw(database, "INSERT INTO cdc_seats VALUES (1, 'a', 1, 'aisle')")
    bumped = bumped_by(listener, store)
    with Session(engine) as session:
        seat = identifier_for(session.scalars(select(Seat)).one())
    engine.dispose()
    assert seat == "alkey:cdc_seats#a,1"
    moved_to = "alkey:cdc_seats#b,1"
    if mechanism == "slot":
        assert {seat, "alkey:cdc_seats#1"} <= bumped, "an insert: named by both mappers"
        assert "alkey:cdc_seats#?" not in bumped, "and not every row"
    else:
        assert "alkey:cdc_seats#?" in bumped, "the outbox records the table's key alone"
    for change in (
        "UPDATE cdc_seats SET label = 'window' WHERE id = 1",
        "UPDATE cdc_seats SET room = 'b' WHERE id = 1",  # the seat's own key moves
        "DELETE FROM cdc_seats WHERE id = 1",
    ):
        before = [keys(seat, "page"), keys(moved_to, "page")]
        raw(database, change)
        drain(listener)
        after = [keys(seat, "page"), keys(moved_to, "page")]
        assert before[0] != after[0], f"{change}: the seat's key did not change"
        assert before[1] != after[1], f"{change}: a key of the seat's next place did not"
    if mechanism == "slot":  # old rows logged whole: the old and the new seat, precisely
        raw(database, "ALTER TABLE cdc_seats REPLICA IDENTITY FULL")
        raw(database, "INSERT INTO cdc_seats VALUES (2, 'c', 2, 'aisle')")
        drain(listener)
        raw(database, "UPDATE cdc_seats SET room = 'd' WHERE id = 2")
        bumped = bumped_by(listener, store)
        assert {"alkey:cdc_seats#c,2", "alkey:cdc_seats#d,2"} <= bumped
        assert "alkey:cdc_seats#?" not in bumped


@pytest.mark.parametrize("mechanism", ["slot", "outbox"])
def test_a_joined_subclass_keyed_by_a_base_column_its_table_lacks_changes_with_its_table(
    database: str, store: RedisTokenStore, mechanism: str
) -> None:
    """An ``Engineer`` is keyed by its base's ``code`` (``cdc_engineers#E5``), which no
    row of ``cdc_engineers`` carries: a write to that table alone changes every row key
    of it, never just ``cdc_engineers#5``, which no key names."""
    engine = create_engine(database)
    Surrogate.metadata.create_all(engine)
    listener = listener_for(database, store) if mechanism == "slot" else outbox_for(database, store)
    raw(database, "INSERT INTO cdc_staff VALUES (5, 'E5', 'engineer')")
    raw(database, "INSERT INTO cdc_engineers VALUES (5, 1)")
    drain(listener)
    with Session(engine) as session:
        engineer = identifier_for(session.scalars(select(Engineer)).one())
    engine.dispose()
    assert engineer == "alkey:cdc_engineers#E5"
    keys = CacheKeyGenerator(tokens=store)
    before = keys(engineer, "badge")
    raw(database, "UPDATE cdc_engineers SET level = 2 WHERE id = 5")
    drain(listener)
    assert keys(engineer, "badge") != before


def test_the_outbox_reads_a_bytea_key_whichever_bytea_output_the_writer_set(
    database: str, redis_client: RedisClient
) -> None:
    """The outbox's trigger records a key as its text, in the writer's ``bytea_output``:
    escape output is read as such -- ``zz0123`` read as hex would name row ``\\x0123``
    -- and names the row the application names."""
    raw(database, "CREATE TABLE bin_t (id bytea PRIMARY KEY, label text)")
    store = Recording(redis_client)
    outbox = outbox_for(database, store)
    dsn = database.replace("postgresql+psycopg://", "postgresql://")
    for output, key in [("escape", b"zz0123"), ("escape", b"a\\b\x00\xff"), ("hex", b"zz0123")]:
        with psycopg.connect(dsn) as writer:
            writer.execute(f"SET bytea_output = '{output}'")
            writer.execute(
                "INSERT INTO bin_t VALUES (%s, 'x') ON CONFLICT (id) DO UPDATE SET label = 'y'",
                (key,),
            )
        bumped = bumped_by(outbox, store)
        assert row_identifier("bin_t", key) in bumped, f"{output}: {key!r}"
        assert "alkey:bin_t#?" not in bumped


@pytest.mark.parametrize("mechanism", ["slot", "outbox"])
def test_a_grandchild_of_joined_inheritance_is_named_by_its_own_tables_key(
    database: str, redis_client: RedisClient, mechanism: str
) -> None:
    """``Mgr`` is keyed by ``cdc_emps.id``, equal to ``cdc_mgrs.id`` through
    ``cdc_engs.id`` (SQLAlchemy equates each table's key to its parent's only): a change
    to its table names its row, not every row of the table."""
    engine = create_engine(database)
    Surrogate.metadata.create_all(engine)  # this test's alone: dropped by `database`
    store = Recording(redis_client)
    listener = listener_for(database, store) if mechanism == "slot" else outbox_for(database, store)
    raw(database, "INSERT INTO cdc_emps VALUES (7, 'mgr')")
    raw(database, "INSERT INTO cdc_engs VALUES (7)")
    raw(database, "INSERT INTO cdc_mgrs VALUES (7)")
    drain(listener)
    with Session(engine) as session:
        manager = identifier_for(session.scalars(select(Mgr)).one())
    engine.dispose()
    assert manager == "alkey:cdc_mgrs#7"
    for change in ("UPDATE cdc_mgrs SET id = 7 WHERE id = 7", "DELETE FROM cdc_mgrs"):
        raw(database, change)
        bumped = bumped_by(listener, store)
        assert manager in bumped, change
        assert "alkey:cdc_mgrs#?" not in bumped, change


@pytest.mark.parametrize("mechanism", ["slot", "outbox"])
def test_a_float_key_names_its_row_whatever_extra_float_digits_the_sessions_default_to(
    database: str, redis_client: RedisClient, mechanism: str
) -> None:
    """With ``extra_float_digits = 0`` as the database's default -- for the writer's
    session, whose trigger prints the outbox's keys, and for the listener's, which prints
    the decoded changes -- 0.1 + 0.2 would print as ``0.3`` and name another row: both
    print floats exactly, and the row the application names changes."""
    name = make_url(database).database
    raw(database, "CREATE TABLE flt_t (id float8 PRIMARY KEY, label text)")
    raw(database, f"ALTER DATABASE {name} SET extra_float_digits = 0")
    try:
        store = Recording(redis_client)
        listener = (
            listener_for(database, store) if mechanism == "slot" else outbox_for(database, store)
        )
        key = 0.1 + 0.2
        raw(database, "INSERT INTO flt_t VALUES (%s, 'x')", key)
        with psycopg.connect(database.replace("postgresql+psycopg://", "postgresql://")) as c:
            printed = c.execute("SELECT id::text FROM flt_t").fetchone()
        assert printed == ("0.3",), "the writer's session prints the key rounded"
        bumped = bumped_by(listener, store)
        assert row_identifier("flt_t", key) in bumped
        assert row_identifier("flt_t", 0.3) not in bumped
        assert "alkey:flt_t#?" not in bumped
    finally:
        raw(database, f"ALTER DATABASE {name} RESET extra_float_digits")


def test_a_tenants_copy_of_a_mapped_table_is_named_as_the_applications_tenant_writes_name_it(
    database: str, redis_client: RedisClient
) -> None:
    """A schema per tenant (``schema_translate_map``): the tenant's rows and table keep
    their own tokens, and the mapped table's token changes too, as with the
    application's own tenant writes."""
    raw(database, "DROP SCHEMA IF EXISTS tenant_a CASCADE")
    raw(database, "CREATE SCHEMA tenant_a")
    raw(database, "CREATE TABLE tenant_a.accounts (id int PRIMARY KEY, name text)")
    store = Recording(redis_client)
    listener = listener_for(database, store)
    raw(database, "INSERT INTO tenant_a.accounts VALUES (1, 'ada')")
    assert bumped_by(listener, store) == {
        "alkey:tenant_a.accounts#1",
        "alkey:tenant_a.accounts#*",
        "alkey:accounts#*",
        "alkey:*#*",
    }
    raw(database, "DROP SCHEMA tenant_a CASCADE")


def test_a_writer_with_no_privilege_on_the_outbox_writes_and_its_write_is_recorded(
    database: str, store: RedisTokenStore
) -> None:
    """The trigger function runs as its owner with a fixed search path: a writer role
    that may only insert into its table, with a search path of its own, is recorded."""
    outbox = outbox_for(database, store)
    raw(database, "DROP ROLE IF EXISTS plain_writer")
    raw(database, "CREATE ROLE plain_writer LOGIN")
    raw(database, "GRANT INSERT ON accounts TO plain_writer")
    try:
        as_writer = database.replace("postgres@", "plain_writer@").replace(
            "postgresql+psycopg://", "postgresql://"
        )
        with psycopg.connect(as_writer, autocommit=True) as connection:
            connection.execute("SET search_path = pg_catalog")
            connection.execute("INSERT INTO public.accounts VALUES (21, 'ada')")
        before = store.fetch(["alkey:accounts#21"])
        assert drain(outbox) == 1
        assert store.fetch(["alkey:accounts#21"]) != before
    finally:
        raw(database, "REVOKE ALL ON accounts FROM plain_writer")
        raw(database, "DROP ROLE plain_writer")

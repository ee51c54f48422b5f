"""Writes from outside the application change keys: PostgreSQL's logical decoding, read by
:class:`alkey.cdc.ChangeListener`, bumps the tokens those writes invalidate.

Each module starts a PostgreSQL of its own with ``wal_level=logical`` (the machine's runs
with ``replica``, and a test must not change it). The writers here never use alkey: a
``psql`` process, and raw psycopg. What the listener bumps is checked against the keys the
application builds with alkey for the same rows.
"""

from __future__ import annotations

import datetime
import decimal
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from sqlalchemy import (
    DateTime,
    Integer,
    MetaData,
    Numeric,
    String,
    Uuid,
    create_engine,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import alkey.client
from alkey.cdc import ChangeListener
from alkey.embedded import EmbeddedRedis
from alkey.errors import TokenStoreError
from alkey.identity import identifier_for, row_identifier
from alkey.keys import CacheKeyGenerator
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
        connection.execute(text("CREATE SCHEMA IF NOT EXISTS audit"))
        Base.metadata.drop_all(connection)
        connection.execute(text("DROP TABLE IF EXISTS events_log"))
        Base.metadata.create_all(connection)
        connection.execute(text("CREATE TABLE events_log (happened text)"))  # no key
    engine.dispose()
    return postgres.url


@pytest.fixture
def store(redis_client: RedisClient) -> RedisTokenStore:
    return RedisTokenStore(redis_client)


_opened: list[ChangeListener] = []


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


def drain(listener: ChangeListener) -> int:
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


def test_an_outside_write_changes_the_key_the_application_built_for_the_row(
    database: str, store: RedisTokenStore
) -> None:
    """Identifiers are spelled as alkey's own writes spell them, for keys of every kind:
    an integer, a UUID, a composite of a timestamp with time zone and a numeric, and a
    table in a schema of its own."""
    listener = listener_for(database, store)
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
    again = subprocess.run([*base, "--once"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "bumped the tokens of 1 transaction(s)" in again.stdout
    assert store.fetch(["alkey:accounts#9"]) != before

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
    with pytest.raises(ValueError, match="reads PostgreSQL's logical decoding"):
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

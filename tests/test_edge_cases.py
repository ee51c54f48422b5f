"""The promise at its edges: failing commits, orphans, time zones, records, lifetimes."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, create_engine, event
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

import alkey
from alkey.identity import parse_identifier, row_identifier, table_identifier
from alkey.keys import CacheKeyGenerator, get_token
from alkey.tokens import OutageLedger, RedisClient, RedisTokenStore, store_for

from .conftest import tokens_of
from .models import User


class Base(DeclarativeBase):
    metadata = MetaData()


class Parent(Base):
    __tablename__ = "edge_parents"
    id: Mapped[int] = mapped_column(primary_key=True)
    children: Mapped[list[Child]] = relationship(cascade="all, delete-orphan")


class Child(Base):
    __tablename__ = "edge_children"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("edge_parents.id"))
    name: Mapped[str] = mapped_column(String(20), default="")


@pytest.fixture
def edge_factory(tables: Any, redis_client: RedisClient) -> Iterator[sessionmaker[Session]]:
    Base.metadata.create_all(tables)
    factory = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(factory, redis_client=redis_client)
    yield factory
    alkey.unbind(factory)
    Base.metadata.drop_all(tables)


def test_a_commit_whose_other_after_commit_listener_raises_still_bumps(
    session_factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    with session_factory() as session:
        session.add(User(id=1, name="ada"))
        session.commit()
    before = get_token(redis_client, "alkey:users#1")

    def notify(session: Session) -> None:
        raise RuntimeError("notification service down")

    event.listen(session_factory, "after_commit", notify, insert=True)
    try:
        with session_factory() as session:
            session.get_one(User, 1).name = "grace"
            with pytest.raises(RuntimeError, match="notification service down"):
                session.commit()
    finally:
        event.remove(session_factory, "after_commit", notify)
    with session_factory() as session:
        assert session.get_one(User, 1).name == "grace", "the database committed"
    assert get_token(redis_client, "alkey:users#1") != before


def test_a_multi_database_commit_that_fails_half_way_bumps_what_was_committed(
    tmp_path: Path, redis_client: RedisClient
) -> None:
    metadata_a, metadata_b = MetaData(), MetaData()
    accounts = Table(
        "accounts", metadata_a, Column("id", Integer, primary_key=True), Column("v", String(10))
    )
    audits = Table(
        "audits", metadata_b, Column("id", Integer, primary_key=True), Column("v", String(10))
    )

    class Account(Base):
        __table__ = accounts

    class Audit(Base):
        __table__ = audits

    engine_a = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    engine_b = create_engine(f"sqlite:///{tmp_path / 'b.db'}")
    metadata_a.create_all(engine_a)
    metadata_b.create_all(engine_b)
    with engine_a.begin() as connection:
        connection.execute(accounts.insert(), {"id": 1, "v": "old"})
    with engine_b.begin() as connection:
        connection.execute(audits.insert(), {"id": 1, "v": "old"})
    committed: list[str] = []

    def second_commit_fails(name: str) -> Any:
        def commit(connection: Any) -> None:
            if committed:
                raise RuntimeError(f"{name}: COMMIT failed")
            committed.append(name)

        return commit

    event.listen(engine_a, "commit", second_commit_fails("accounts"))
    event.listen(engine_b, "commit", second_commit_fails("audits"))
    factory = sessionmaker(binds={Account: engine_a, Audit: engine_b})
    alkey.bind(factory, redis_client=redis_client)
    try:
        identifiers = ("alkey:accounts#1", "alkey:audits#1")
        before = {identifier: get_token(redis_client, identifier) for identifier in identifiers}
        with factory() as session:
            session.get_one(Account, 1).v = "new"  # type: ignore[attr-defined]
            session.get_one(Audit, 1).v = "new"  # type: ignore[attr-defined]
            with pytest.raises(RuntimeError, match="COMMIT failed"):
                session.commit()
    finally:
        alkey.unbind(factory)
    (first,) = committed
    identifier = f"alkey:{first}#1"
    assert get_token(redis_client, identifier) != before[identifier]
    engine_a.dispose()
    engine_b.dispose()


def test_deleting_an_orphan_bumps_the_orphans_row(
    edge_factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    with edge_factory() as session:
        parent = Parent(id=1, children=[Child(id=1), Child(id=2)])
        session.add(parent)
        session.commit()
        before = tokens_of(redis_client, "alkey:edge_children#1", "alkey:edge_children#2")
        parent.children.remove(parent.children[0])  # delete-orphan: child 1 goes
        session.commit()
    after = tokens_of(redis_client, "alkey:edge_children#1", "alkey:edge_children#2")
    assert after["alkey:edge_children#1"] != before["alkey:edge_children#1"]
    assert after["alkey:edge_children#2"] == before["alkey:edge_children#2"]


def test_one_instant_in_any_time_zone_names_one_row() -> None:
    utc = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    berlin = utc.astimezone(datetime.timezone(datetime.timedelta(hours=1)))
    assert row_identifier("events", berlin) == row_identifier("events", utc)


def test_a_dotted_table_name_and_a_schema_qualified_table_stay_apart() -> None:
    dotted = Table("shop.invoices", MetaData(), Column("id", Integer, primary_key=True))
    qualified = Table("invoices", MetaData(), Column("id", Integer), schema="shop")
    assert table_identifier(dotted) == "alkey:shop%2Einvoices#*"
    assert table_identifier(qualified) == "alkey:shop.invoices#*"
    assert parse_identifier(table_identifier(dotted)).table == "shop.invoices"
    assert parse_identifier(table_identifier(qualified)).schema == "shop"
    with pytest.raises(ValueError, match="pass the Table object itself"):
        table_identifier("a..b")


@dataclasses.dataclass(frozen=True)
class View:
    user: Any
    tags: frozenset[str]
    page: int


def test_a_dataclass_argument_is_keyed_field_by_field_and_sees_instances_inside(
    session_factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    session = session_factory()
    key_generator = CacheKeyGenerator(redis_client)
    user = User(id=1, name="ada")
    session.add(user)
    session.commit()
    key = key_generator(View(user, frozenset({"a", "b"}), 1))
    assert key == key_generator(View(user, frozenset({"b", "a"}), 1))
    assert key != key_generator(View(user, frozenset({"a", "b"}), 2))
    user.name = "grace"
    session.commit()
    assert key_generator(View(user, frozenset({"a", "b"}), 1)) != key
    session.close()


DATACLASS_KEY_SCRIPT = """
import dataclasses
from alkey.keys import CacheKeyGenerator

@dataclasses.dataclass(frozen=True)
class Filters:
    tags: frozenset

class NoTokens:
    def fetch(self, identifiers): return []
    def bump(self, identifiers): pass

print(CacheKeyGenerator(tokens=NoTokens())(Filters(frozenset(f"t{i}" for i in range(20)))))
"""


def test_a_dataclass_holding_a_set_keys_the_same_under_any_hash_seed() -> None:
    keys = {
        subprocess.run(
            [sys.executable, "-c", DATACLASS_KEY_SCRIPT],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(keys) == 1


def plain_function() -> None:  # pragma: no cover - never called
    pass


@pytest.mark.parametrize(
    "argument", [functools.partial(plain_function), Parent().__repr__, lambda: 0]
)
def test_a_value_whose_text_holds_a_memory_address_is_refused(
    redis_client: RedisClient, argument: object
) -> None:
    with pytest.raises(TypeError, match=r"argument 1: .* no stable text form"):
        CacheKeyGenerator(redis_client)(argument)


def test_a_configured_ttl_applies_to_created_and_bumped_tokens(redis_client: RedisClient) -> None:
    store = RedisTokenStore(redis_client, ttl=60)
    store.fetch(["alkey:users#1"])
    store.bump(["alkey:users#2"])
    assert 0 < redis_client.ttl("alkey:users#1") <= 60
    assert 0 < redis_client.ttl("alkey:users#2") <= 60


def test_the_store_configured_for_a_client_is_the_one_every_helper_uses(
    session_factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    store = RedisTokenStore(redis_client, key_prefix="app:")
    assert store_for(redis_client) is store
    alkey.bind(session_factory, redis_client=redis_client)
    key_generator = CacheKeyGenerator(redis_client)
    with session_factory() as session:
        user = User(id=1, name="ada")
        session.add(user)
        session.commit()
        key = key_generator(user)
        user.name = "grace"
        session.commit()
        assert key_generator(user) != key
    assert redis_client.exists("app:alkey:users#1") == 1
    assert redis_client.exists("alkey:users#1") == 0


def test_binding_a_session_instance_does_not_keep_it_alive(
    tables: Any, redis_client: RedisClient
) -> None:
    import weakref

    session = Session(tables)
    alkey.bind(session, redis_client=redis_client)
    alive = weakref.ref(session)
    del session
    gc.collect()
    assert alive() is None


def test_a_bump_that_failed_during_a_replay_stays_owed() -> None:
    ledger = OutageLedger()
    ledger.keep(["alkey:users#1"])  # thread 1's bump failed
    replay = ledger.replay()  # thread 2 starts replaying it
    ledger.keep(["alkey:users#1"])  # thread 3's new bump of the same row fails meanwhile
    ledger.succeeded(replay)  # thread 2's replay (sent before thread 3's commit) lands
    assert ledger.pending == {"alkey:users#1"}
    ledger.succeeded(ledger.replay())
    assert ledger.pending == frozenset()


def test_a_kept_bump_sent_by_two_calls_at_once_counts_as_replayed_once() -> None:
    ledger = OutageLedger()
    ledger.keep(["alkey:users#1"])  # kept during an outage
    background = ledger.replay()  # the background replay sends it...
    application = ledger.replay()  # ...and so does the application's next call
    assert background == application == frozenset({"alkey:users#1"})
    assert ledger.succeeded(background) == 1  # the first answer settles it
    assert ledger.succeeded(application) == 0  # the second was one more bump, not a replay
    assert ledger.pending == frozenset()


IMPORT_LATE_SCRIPT = """
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column

class Base(DeclarativeBase):
    pass

class Thing(Base):
    __tablename__ = "things"
    id: Mapped[int] = mapped_column(primary_key=True)

configure_mappers()  # the application used its models before importing alkey
import alkey.identity
print(alkey.identity.dependencies(["alkey:things#1"]))
"""


def test_alkey_can_be_imported_after_the_models_were_configured() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_LATE_SCRIPT], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "['alkey:things#?']"


def test_touching_through_an_unbound_session_is_refused(tables: Any) -> None:
    with Session(tables) as session, pytest.raises(ValueError, match="needs a session bound"):
        alkey.touch(session, "alkey:users#1")


def test_invalidating_a_base_table_row_by_identifier_reaches_the_subclass_instance(
    session_factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    from .models import Manager

    key_generator = CacheKeyGenerator(redis_client)
    with session_factory() as session:
        manager = Manager(name="m")
        session.add(manager)
        session.commit()
        before = key_generator(manager)
        alkey.invalidate(f"alkey:employees#{manager.id}", tokens=store_for(redis_client))
        assert key_generator(manager) != before

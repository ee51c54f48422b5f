"""Tenants and shards: rows with the same primary key in different tables never share a key.

Schema per tenant (``schema_translate_map``) runs on PostgreSQL, which has schemas; the
shards are two databases of the test PostgreSQL server, or two SQLite files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    ForeignKey,
    MetaData,
    String,
    create_engine,
    delete,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.identity import identifier_for
from alkey.tokens import RedisClient

TENANTS = ("alkey_tenant_a", "alkey_tenant_b")


class Base(DeclarativeBase):
    metadata = MetaData()


class Item(Base):
    __tablename__ = "tenant_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Part(Base):
    """A child the database deletes with its item (ON DELETE CASCADE)."""

    __tablename__ = "tenant_parts"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("tenant_items.id", ondelete="CASCADE"))
    item: Mapped[Item] = relationship()


@pytest.fixture
def tenant_engines(engine: Engine) -> Iterator[Mapping[str, Engine]]:
    """One option engine per tenant schema, each holding item 1 named after its tenant."""
    if engine.dialect.name != "postgresql":
        pytest.skip("schema per tenant needs PostgreSQL")
    engines = {
        tenant: engine.execution_options(schema_translate_map={None: tenant}) for tenant in TENANTS
    }
    with engine.begin() as connection:
        for tenant in TENANTS:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {tenant} CASCADE"))
            connection.execute(text(f"CREATE SCHEMA {tenant}"))
    for tenant, tenant_engine in engines.items():
        Base.metadata.create_all(tenant_engine)
        with Session(tenant_engine) as session:
            session.add_all([Item(id=1, name=tenant), Part(id=1, item_id=1)])
            session.commit()
    yield engines
    with engine.begin() as connection:
        for tenant in TENANTS:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {tenant} CASCADE"))


@pytest.fixture
def tenant_sessions(
    tenant_engines: Mapping[str, Engine], redis_client: RedisClient
) -> Iterator[dict[str, sessionmaker[Session]]]:
    factories = {
        tenant: sessionmaker(tenant_engine, expire_on_commit=False)
        for tenant, tenant_engine in tenant_engines.items()
    }
    for factory in factories.values():
        alkey.bind(factory, redis_client=redis_client)
    yield factories
    for factory in factories.values():
        alkey.unbind(factory)


def item_keys(
    factories: dict[str, sessionmaker[Session]], key_generator: CacheKeyGenerator
) -> dict[str, str]:
    """Each tenant's key of its item 1, loaded freshly."""
    keys = {}
    for tenant, factory in factories.items():
        with factory() as session:
            keys[tenant] = key_generator(session.get_one(Item, 1), "page")
    return keys


def test_two_tenants_rows_with_one_primary_key_have_their_own_tokens(
    tenant_sessions: dict[str, sessionmaker[Session]],
) -> None:
    identifiers = {}
    for tenant, factory in tenant_sessions.items():
        with factory() as session:
            identifiers[tenant] = identifier_for(session.get_one(Item, 1))
    assert identifiers == {tenant: f"alkey:{tenant}.tenant_items#1" for tenant in TENANTS}


#: Writes in tenant A's schema, by every path: each must change A's key of its item 1.
TENANT_WRITES: dict[str, Callable[[Session, str], object]] = {
    "flush": lambda session, tenant: setattr(session.get_one(Item, 1), "name", "renamed"),
    "bulk update": lambda session, tenant: session.execute(
        update(Item).where(Item.id == 1).values(name="bulk")
    ),
    "raw sql": lambda session, tenant: session.execute(
        text(f"UPDATE {tenant}.tenant_items SET name = 'raw'")
    ),
    # The item's child, written raw: its parent (the item) is touched, in that tenant.
    "raw sql on a child": lambda session, tenant: session.execute(
        text(f"UPDATE {tenant}.tenant_parts SET item_id = item_id")
    ),
}


@pytest.mark.parametrize("path", TENANT_WRITES)
def test_a_tenants_write_changes_its_keys_and_leaves_the_other_tenants_alone(
    tenant_sessions: dict[str, sessionmaker[Session]], redis_client: RedisClient, path: str
) -> None:
    key_generator = CacheKeyGenerator(redis_client)
    a, b = TENANTS
    before = item_keys(tenant_sessions, key_generator)
    class_key = key_generator(Item)
    with tenant_sessions[a]() as session:
        TENANT_WRITES[path](session, a)
        session.commit()
    after = item_keys(tenant_sessions, key_generator)
    assert after[a] != before[a]
    assert after[b] == before[b], "tenant B's page stays cached"
    assert key_generator(Item) != class_key, "the class stands for the table in every schema"


def test_a_statement_level_schema_translate_map_names_that_tenants_rows(
    tenant_sessions: dict[str, sessionmaker[Session]], engine: Engine, redis_client: RedisClient
) -> None:
    factory = sessionmaker(engine, expire_on_commit=False)
    alkey.bind(factory, redis_client=redis_client)
    key_generator = CacheKeyGenerator(redis_client)

    def keys() -> dict[str, str]:
        keys = {}
        for tenant in TENANTS:
            # A session of its own per tenant: one identity map would hand tenant B's query
            # tenant A's instance of the same primary key (unless an identity_token tells
            # them apart, which alkey honours too).
            with factory() as session:
                item = session.execute(
                    select(Item).execution_options(schema_translate_map={None: tenant})
                ).scalar_one()
                assert identifier_for(item) == f"alkey:{tenant}.tenant_items#1"
                keys[tenant] = key_generator(item)
        return keys

    a, b = TENANTS
    try:
        before = keys()
        with tenant_sessions[a]() as session:
            session.get_one(Item, 1).name = "renamed"
            session.commit()
        after = keys()
    finally:
        alkey.unbind(factory)
    assert after[a] != before[a]
    assert after[b] == before[b]


def part_keys(
    factories: dict[str, sessionmaker[Session]], key_generator: CacheKeyGenerator
) -> dict[str, str]:
    keys = {}
    for tenant, factory in factories.items():
        with factory() as session:
            keys[tenant] = key_generator(session.get_one(Part, 1))
    return keys


@pytest.mark.parametrize("path", ["bulk statement", "raw sql"])
def test_a_cascading_delete_in_one_tenant_changes_that_tenants_child_keys_only(
    tenant_sessions: dict[str, sessionmaker[Session]], redis_client: RedisClient, path: str
) -> None:
    key_generator = CacheKeyGenerator(redis_client)
    a, b = TENANTS
    before = part_keys(tenant_sessions, key_generator)
    by_identifier = key_generator(f"alkey:{a}.tenant_parts#1")
    item_keys(tenant_sessions, key_generator)  # this process has seen each tenant's items
    with tenant_sessions[a]() as session:
        if path == "bulk statement":
            session.execute(delete(Item).where(Item.id == 1))
        else:
            session.execute(text(f"DELETE FROM {a}.tenant_items WHERE id = 1"))
        session.commit()
        assert session.get(Part, 1) is None, "the database deleted the child"
    assert key_generator(f"alkey:{a}.tenant_parts#1") != by_identifier
    assert part_keys({b: tenant_sessions[b]}, key_generator) == {b: before[b]}


# -- horizontal sharding: two databases, one identity token each ----------------------------


@pytest.fixture
def shard_engines(engine: Engine, tmp_path: Path) -> Iterator[dict[str, Engine]]:
    """Two databases, one per shard: on the test PostgreSQL server, or two SQLite files."""
    names = ("east", "west")
    if engine.dialect.name != "postgresql":
        engines = {name: create_engine(f"sqlite:///{tmp_path / name}.db") for name in names}
        yield engines
        for shard in engines.values():
            shard.dispose()
        return
    databases = {name: f"alkey_shard_{name}" for name in names}
    server = engine.execution_options(isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        for database in databases.values():
            connection.execute(text(f"DROP DATABASE IF EXISTS {database}"))
            connection.execute(text(f"CREATE DATABASE {database}"))
    engines = {
        name: create_engine(engine.url.set(database=database))
        for name, database in databases.items()
    }
    yield engines
    for shard in engines.values():
        shard.dispose()
    with server.connect() as connection:
        for database in databases.values():
            connection.execute(text(f"DROP DATABASE IF EXISTS {database}"))


@pytest.fixture
def shards(
    shard_engines: dict[str, Engine], redis_client: RedisClient
) -> Iterator[sessionmaker[ShardedSession]]:
    """A ShardedSession factory over two databases, each holding item 1."""
    engines = shard_engines
    for name, shard in engines.items():
        Base.metadata.create_all(shard)
        with Session(shard) as session:
            session.add(Item(id=1, name=name))
            session.commit()

    def every_shard(*args: Any, **kwargs: Any) -> list[str]:
        return list(engines)

    factory = sessionmaker(
        class_=ShardedSession,
        shards=engines,
        shard_chooser=lambda mapper, instance, **kw: "east",
        identity_chooser=lambda *args, **kwargs: list(engines),
        execute_chooser=every_shard,
        expire_on_commit=False,
    )
    alkey.bind(factory, redis_client=redis_client)
    yield factory
    alkey.unbind(factory)


def test_sharded_rows_with_one_primary_key_have_their_own_tokens(
    shards: sessionmaker[ShardedSession], redis_client: RedisClient
) -> None:
    key_generator = CacheKeyGenerator(redis_client)
    with shards() as session:
        items = {item.name: item for item in session.scalars(select(Item))}
        assert {name: identifier_for(item) for name, item in items.items()} == {
            "east": "alkey:tenant_items#1@east",
            "west": "alkey:tenant_items#1@west",
        }
        before = {name: key_generator(item) for name, item in items.items()}
        assert before["east"] != before["west"]
        items["east"].name = "east, renamed"
        session.commit()
    with shards() as session:
        after = {
            item.name.split(",")[0]: key_generator(item) for item in session.scalars(select(Item))
        }
    assert after["east"] != before["east"]
    assert after["west"] == before["west"], "the other shard's row stays cached"


def test_a_core_update_naming_a_row_but_not_its_shard_changes_that_rows_key_on_every_shard(
    shards: sessionmaker[ShardedSession],
    shard_engines: dict[str, Engine],
    redis_client: RedisClient,
) -> None:
    key_generator = CacheKeyGenerator(redis_client)
    with shards() as session:
        before = {item.name: key_generator(item) for item in session.scalars(select(Item))}
    items = Base.metadata.tables["tenant_items"]
    alkey.bind_engine(shard_engines["east"], redis_client=redis_client)
    try:
        with shard_engines["east"].begin() as connection:
            # Row-precise Core, which cannot know that this engine is the shard "east".
            connection.execute(update(items).where(items.c.id == 1).values(name="east"))
    finally:
        alkey.unbind_engine(shard_engines["east"])
    with shards() as session:
        after = {item.name: key_generator(item) for item in session.scalars(select(Item))}
    assert after["east"] != before["east"]


def test_keying_an_expired_shard_row_loads_it_without_flushing_pending_changes(
    shards: sessionmaker[ShardedSession], redis_client: RedisClient
) -> None:
    key_generator = CacheKeyGenerator(redis_client)
    with shards() as session:
        east = next(item for item in session.scalars(select(Item)) if item.name == "east")
        key = key_generator(east)
        session.expire(east)  # loaded again, one by one, through its shard
        draft = Item(id=7, name="draft")
        session.add(draft)
        assert key_generator(east) == key
        assert draft in session.new, "building a key wrote nothing"
        session.rollback()


class Precedence(DeclarativeBase):
    metadata = MetaData()


class Versioned(Precedence):
    """One row, id 1, in the main database and in two attached ones: ``v`` says which
    copy was loaded (0: main, 1: ``t1``, 2: ``t2``)."""

    __tablename__ = "tenant_versioned"
    id: Mapped[int] = mapped_column(primary_key=True)
    v: Mapped[int]


T1 = {"schema_translate_map": {None: "t1"}}
T2 = {"schema_translate_map": {None: "t2"}}
NAMED = {
    0: "alkey:tenant_versioned#1",
    1: "alkey:t1.tenant_versioned#1",
    2: "alkey:t2.tenant_versioned#1",
}


@pytest.fixture
def copies(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite database with two attached ones, ``t1`` and ``t2``, each with its copy."""
    engine = create_engine(f"sqlite:///{tmp_path / 'main.db'}")

    @event.listens_for(engine, "connect")
    def attach(connection: Any, record: Any) -> None:
        for name in ("t1", "t2"):
            connection.execute(f"ATTACH DATABASE '{tmp_path / name}.db' AS {name}")

    with engine.begin() as connection:
        for v, options in enumerate(({}, T1, T2)):
            translated = connection.execution_options(**options)
            Precedence.metadata.create_all(translated)
            translated.execute(insert(Versioned).values(id=1, v=v))
    yield engine
    engine.dispose()


def _loads(engine: Engine, case: str, opened: list[Session]) -> Versioned:
    """The row as ``case`` loads it, in a session added to ``opened``."""
    plain = select(Versioned)
    if case == "connection t1, statement t2":
        session = Session(engine)
        opened.append(session)
        session.connection(execution_options=T1)
        return session.scalars(plain.execution_options(**T2)).one()
    if case == "connection t1, execute t2":
        session = Session(engine)
        opened.append(session)
        session.connection(execution_options=T1)
        return session.scalars(plain, execution_options=T2).one()
    if case == "connection t1, get":
        session = Session(engine)
        opened.append(session)
        session.connection(execution_options=T1)
        return session.get_one(Versioned, 1)
    if case == "engine t1, statement t2":
        session = Session(engine.execution_options(**T1))
        opened.append(session)
        return session.scalars(plain.execution_options(**T2)).one()
    if case == "engine t1, execute t2":
        session = Session(engine.execution_options(**T1))
        opened.append(session)
        return session.scalars(plain, execution_options=T2).one()
    assert case == "bound to t1, bind argument main"
    session = Session(binds={Versioned: engine.execution_options(**T1)})
    opened.append(session)
    return session.scalars(plain, bind_arguments={"bind": engine}).one()


@pytest.mark.parametrize(
    "case",
    [
        "connection t1, statement t2",
        "connection t1, execute t2",
        "connection t1, get",
        "engine t1, statement t2",
        "engine t1, execute t2",
        "bound to t1, bind argument main",
    ],
)
def test_a_row_is_named_after_the_copy_sqlalchemy_loaded_it_from_whichever_level_set_the_map(
    copies: Engine, case: str
) -> None:
    """SQLAlchemy's order: a map given to ``execute()``, then the connection's (its
    engine's, or given to ``Session.connection()``), then the statement's own; and the
    bind a statement's ``bind_arguments`` chose. The name follows the copy loaded (it
    followed the statement's own map over the connection's, and the session's bind for the
    class over the bind the statement chose)."""
    opened: list[Session] = []
    try:
        row = _loads(copies, case, opened)
        assert identifier_for(row) == NAMED[row.v]
        assert row.v != 0 or case == "bound to t1, bind argument main"
    finally:
        for session in opened:
            session.close()


def test_a_row_inserted_through_a_sessions_translated_connection_is_named_in_its_copy(
    copies: Engine, redis_client: RedisClient
) -> None:
    made = sessionmaker(copies)
    alkey.bind(made, redis_client=redis_client)
    try:
        with made() as session:
            session.connection(execution_options=T1)
            row = Versioned(id=5, v=1)
            session.add(row)
            session.flush()
            assert identifier_for(row) == "alkey:t1.tenant_versioned#5"
            session.commit()
    finally:
        alkey.unbind(made)
    with copies.connect() as connection:
        assert (
            connection.execution_options(**T1).scalar(select(Versioned.v).where(Versioned.id == 5))
            == 1
        )

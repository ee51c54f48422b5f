"""Loading before keying: a key built from data older than its token is never a fresh key.

A reader that loads a row, then builds its key, races every writer that commits between
the two. alkey keys an instance on its row's token *and* on what the instance holds
(see :mod:`alkey.snapshot`), so such a reader's key is one that no reader of the fresh row
builds: its stale render is never served to anyone else.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    ForeignKey,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    TypeDecorator,
    Uuid,
    event,
    select,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

import alkey
from alkey.asyncio import AsyncCacheKeyGenerator, AsyncRedisClient
from alkey.cache import CacheKeyGenerator
from alkey.tokens import RedisClient


class Opaque:
    """A value whose repr holds a memory address: no two loads encode alike."""

    def __init__(self, text: str) -> None:
        self.text = text


class OpaqueText(TypeDecorator[Opaque]):
    impl = String(50)
    cache_ok = True

    def process_bind_param(self, value: Opaque | None, dialect: Dialect) -> str | None:
        return None if value is None else value.text

    def process_result_value(self, value: str | None, dialect: Dialect) -> Opaque | None:
        return None if value is None else Opaque(value)


class Base(DeclarativeBase):
    metadata = MetaData()


class Author(Base):
    __tablename__ = "load_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    bio: Mapped[str] = mapped_column(String(200), default="")
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "load_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    author_id: Mapped[int] = mapped_column(ForeignKey("load_authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


class Record(Base):
    """Columns of many types, whose loaded values must encode alike in every process."""

    __tablename__ = "load_records"
    id: Mapped[int] = mapped_column(primary_key=True)
    amount: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))
    at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
    token: Mapped[uuid.UUID] = mapped_column(Uuid)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    note: Mapped[str | None] = mapped_column(String(50))


class Doc(Base):
    """A deferred column, which a plain load leaves unloaded (and may refuse to load)."""

    __tablename__ = "load_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    body: Mapped[str] = mapped_column(String(200), deferred=True, deferred_raiseload=True)


class Gadget(Base):
    __tablename__ = "load_gadgets"
    id: Mapped[int] = mapped_column(primary_key=True)
    blob: Mapped[Opaque] = mapped_column(OpaqueText)


@pytest.fixture
def factory(tables: Engine, redis_client: RedisClient) -> Iterator[sessionmaker[Session]]:
    Base.metadata.drop_all(tables)
    Base.metadata.create_all(tables)
    with Session(tables) as session:
        author = Author(id=1, name="Ada")
        session.add_all(
            [author, Book(id=1, title="Notes", author=author), Gadget(id=1, blob=Opaque("x"))]
        )
        session.add_all(
            [Doc(id=index, title=f"doc {index}", body="long text") for index in range(1, 6)]
        )
        session.add(
            Record(
                id=1,
                amount=decimal.Decimal("12.50"),
                at=datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.timezone.utc),
                token=uuid.UUID(int=7),
                data={"b": [1, 2.5, None], "a": {"z": "ünïcode", "y": True}},
                blob=b"\x00\xff",
                note=None,
            )
        )
        session.commit()
    made = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(made, redis_client=redis_client)
    yield made
    alkey.unbind(made)
    Base.metadata.drop_all(tables)


@pytest.fixture
def key_generator(redis_client: RedisClient) -> CacheKeyGenerator:
    return CacheKeyGenerator(redis_client)


def fresh_key(factory: sessionmaker[Session], key_generator: CacheKeyGenerator, *args: Any) -> str:
    """The key a reader that loads the author now builds for it."""
    with factory() as session:
        author = session.scalars(
            select(Author).where(Author.id == 1).options(selectinload(Author.books))
        ).one()
        return key_generator(author, *args)


def test_a_key_built_from_a_load_that_a_commit_overtook_is_never_a_fresh_readers_key(
    factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    with factory() as reader:
        author = reader.get_one(Author, 1)  # loaded: name "Ada"
        with factory() as writer:
            writer.get_one(Author, 1).name = "Ada Lovelace"
            writer.commit()  # commits and bumps between the reader's load and its key
        stale_key = key_generator(author, "page")  # new token, old name
    assert fresh_key(factory, key_generator, "page") != stale_key


def test_fresh_loads_of_an_unchanged_row_share_one_key(
    factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    assert fresh_key(factory, key_generator, "page") == fresh_key(factory, key_generator, "page")


def test_a_loaded_collection_whose_member_changed_keys_apart_from_a_fresh_load(
    factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    with factory() as reader:
        author = reader.scalars(select(Author).options(selectinload(Author.books))).one()
        with factory() as writer:
            writer.get_one(Book, 1).title = "Notes, revised"
            writer.commit()  # touches the author: its token changes, its columns do not
        stale_key = key_generator(author, "page")
        assert [book.title for book in author.books] == ["Notes"]
    assert fresh_key(factory, key_generator, "page") != stale_key


def test_an_instance_expired_by_its_commit_keys_like_a_fresh_load(
    tables: Engine, factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    expiring = sessionmaker(tables)  # expire_on_commit=True, SQLAlchemy's default
    alkey.bind(expiring, tokens=key_generator.tokens)
    try:
        with expiring() as session:
            author = session.get_one(Author, 1)
            author.bio = "mathematician"
            session.commit()  # expires every attribute
            key = key_generator(author)  # loads them again, as reading one would
            assert "bio" in author.__dict__
    finally:
        alkey.unbind(expiring)
    with factory() as session:
        assert key_generator(session.get_one(Author, 1)) == key


def test_rolled_back_changes_leave_an_instances_key_as_it_was(
    factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    with factory() as session:
        author = session.get_one(Author, 1)
        before = key_generator(author)
        author.name = "draft"
        session.flush()
        session.rollback()
        assert key_generator(author) == before


def test_an_instance_with_changes_not_committed_keys_apart_from_its_committed_row(
    factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    with factory() as session:
        author = session.get_one(Author, 1)
        author.name = "draft"  # a render of this must never reach other readers
        assert key_generator(author) != fresh_key(factory, key_generator)


def test_a_deferred_column_left_unloaded_is_part_of_the_key_as_not_loaded(
    factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    def partial_key() -> str:
        with factory() as session:
            return key_generator(session.scalars(select(Author).options(defer(Author.bio))).one())

    with factory() as session:
        full = key_generator(session.get_one(Author, 1))
    assert partial_key() == partial_key()
    assert partial_key() != full, "a render without the column is another value"


def test_an_identifier_string_keys_on_the_token_alone(
    factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    with factory() as session:
        author = session.get_one(Author, 1)
        assert key_generator("alkey:load_authors#1") != key_generator(author)
        assert key_generator("alkey:load_authors#1") == key_generator("alkey:load_authors#1")


def test_a_column_value_without_a_stable_text_makes_keys_miss_and_is_logged_once(
    factory: sessionmaker[Session],
    key_generator: CacheKeyGenerator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="alkey.snapshot")
    keys = set()
    for _ in range(3):
        with factory() as session:
            keys.add(key_generator(session.get_one(Gadget, 1)))
    assert len(keys) == 3, "never a key another load shares: a miss, never a stale hit"
    warnings = [record for record in caplog.records if record.name == "alkey.snapshot"]
    assert len(warnings) == 1
    assert "Gadget.blob" in warnings[0].getMessage()


def test_the_expired_instances_of_one_key_are_loaded_in_one_query(
    tables: Engine, factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    with factory() as session:
        session.add_all([Author(id=index, name=f"author {index}") for index in range(2, 102)])
        session.commit()
    statements: list[str] = []

    def count(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    expiring = sessionmaker(tables)  # expire_on_commit=True
    with expiring() as session:
        authors = session.scalars(select(Author).where(Author.id > 1)).all()
        session.commit()  # expires all 100
        event.listen(tables, "before_cursor_execute", count)
        try:
            key = key_generator(authors, "list")
        finally:
            event.remove(tables, "before_cursor_execute", count)
    assert len(statements) == 1, statements
    with factory() as session:
        fresh = session.scalars(select(Author).where(Author.id > 1).order_by(Author.id)).all()
        assert key_generator(fresh, "list") == key


def test_loading_expired_instances_for_a_key_does_not_flush_pending_changes(
    tables: Engine, factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    expiring = sessionmaker(tables)  # expire_on_commit=True
    with expiring() as session:
        author = session.get_one(Author, 1)
        session.commit()  # expires it
        draft = Author(id=99, name="draft")
        session.add(draft)
        key_generator([author])
        assert draft in session.new, "building a key wrote nothing"
        session.rollback()


def test_an_asyncio_key_generator_loads_expired_instances_with_await(
    factory: sessionmaker[Session],
    key_generator: CacheKeyGenerator,
    async_engine: AsyncEngine,
    async_redis_client: AsyncRedisClient,
    loop: asyncio.AbstractEventLoop,
) -> None:
    async_keys = AsyncCacheKeyGenerator(async_redis_client)

    async def key_after_commit() -> str:
        async with async_sessionmaker(async_engine)() as session:  # expire_on_commit=True
            author = await session.get_one(Author, 1)
            await session.commit()
            with pytest.raises(TypeError, match="AsyncCacheKeyGenerator"):
                key_generator(author)  # a sync generator cannot await the load
            return await async_keys(author)

    key = loop.run_until_complete(key_after_commit())
    with factory() as session:
        assert key == key_generator(session.get_one(Author, 1))


RECORD_KEY = """
import sys
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from alkey.cache import CacheKeyGenerator
from tests.test_stale_loads import Record

with Session(create_engine(sys.argv[1])) as session:
    plan = CacheKeyGenerator().plan(session.get_one(Record, 1), "page")
    print(plan.finish(["token"] * len(plan.identifiers)))
"""


def test_an_instance_keys_alike_in_every_process(factory: sessionmaker[Session]) -> None:
    url = factory.kw["bind"].url.render_as_string(hide_password=False)
    keys = {
        subprocess.run(
            [sys.executable, "-c", RECORD_KEY, url],
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in (1, 2)
    }
    with factory() as session:
        plan = CacheKeyGenerator().plan(session.get_one(Record, 1), "page")
        keys.add(plan.finish(["token"] * len(plan.identifiers)))
    assert len(keys) == 1, keys


def test_deferred_columns_are_neither_loaded_nor_refused_when_instances_are_keyed_after_a_commit(
    tables: Engine, factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    statements: list[str] = []

    def count(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    expiring = sessionmaker(tables)  # expire_on_commit=True
    with expiring() as session:
        docs = session.scalars(select(Doc).order_by(Doc.id)).all()
        session.commit()  # expires title and id, and marks body expired too
        event.listen(tables, "before_cursor_execute", count)
        try:
            key = key_generator(docs)  # body is deferred with raiseload: never loaded
        finally:
            event.remove(tables, "before_cursor_execute", count)
    assert len(statements) == 1, statements
    assert "body" not in statements[0]
    with factory() as session:
        assert key_generator(session.scalars(select(Doc).order_by(Doc.id)).all()) == key


def test_text_that_merely_mentions_a_memory_address_keys_alike_on_every_load(
    factory: sessionmaker[Session], key_generator: CacheKeyGenerator
) -> None:
    with factory() as session:
        record = session.get_one(Record, 1)
        record.data = {"log": ["segfault at 0x7f3a2c"]}
        record.blob = b"fault at 0xdeadbeef"
        session.commit()
    keys = set()
    for _ in range(2):
        with factory() as session:
            keys.add(key_generator(session.get_one(Record, 1)))
    assert len(keys) == 1

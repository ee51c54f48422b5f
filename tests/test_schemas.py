"""Raw SQL that names a table without its schema reaches the mapped table it resolves to.

The connection decides where an unqualified name leads -- PostgreSQL's ``search_path``,
SQLite's attached databases -- and SQL text cannot tell, so every known table of that
name is invalidated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import alkey
from alkey import catalog
from alkey.cache import CacheKeyGenerator
from alkey.identity import table_identifier
from alkey.tokens import RedisClient
from alkey.writes import raw_sql_writes

from .models import SCHEMA, Invoice


class ShopBase(DeclarativeBase):
    metadata = MetaData()


class Receipt(ShopBase):
    """A table in SQLite's attached database ``shop``."""

    __tablename__ = "receipts"
    __table_args__ = {"schema": "shop"}  # noqa: RUF012
    id: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[int] = mapped_column(default=0)


@pytest.fixture
def keys(redis_client: RedisClient) -> CacheKeyGenerator:
    return CacheKeyGenerator(redis_client)


def test_an_unqualified_name_reached_through_the_search_path_invalidates_the_schema_table(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    if session_factory.kw["bind"].dialect.name != "postgresql":
        pytest.skip("search_path is PostgreSQL's")
    with session_factory() as session:
        session.add(Invoice(id=1))
        session.commit()
    before = keys("alkey:alkey_test.invoices#1"), keys(Invoice)
    with session_factory() as session:
        session.execute(text(f"SET LOCAL search_path TO {SCHEMA}, public"))
        session.execute(text("UPDATE invoices SET total = 5"))
        session.commit()
    with session_factory() as session:
        assert session.get_one(Invoice, 1).total == 5  # the update did reach it
    assert keys("alkey:alkey_test.invoices#1") != before[0]
    assert keys(Invoice) != before[1]


@pytest.fixture
def shop(
    engine: Engine, tmp_path: Path, redis_client: RedisClient
) -> Iterator[sessionmaker[Session]]:
    if engine.dialect.name != "sqlite":
        pytest.skip("ATTACH DATABASE is SQLite's")
    attached = tmp_path / "shop.db"
    shop_engine = create_engine(engine.url)

    @event.listens_for(shop_engine, "connect")
    def attach(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute(f"ATTACH DATABASE '{attached}' AS shop")

    ShopBase.metadata.create_all(shop_engine)
    factory = sessionmaker(shop_engine, expire_on_commit=False)
    alkey.bind(factory, redis_client=redis_client)
    with factory() as session:
        session.add(Receipt(id=1))
        session.commit()
    yield factory
    alkey.unbind(factory)
    shop_engine.dispose()


def test_an_unqualified_name_reaching_an_attached_sqlite_database_invalidates_its_table(
    shop: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    before = keys("alkey:shop.receipts#1"), keys(Receipt)
    with shop() as session:
        session.execute(text("UPDATE receipts SET total = 5"))  # main has no receipts
        session.commit()
    with shop() as session:
        assert session.get_one(Receipt, 1).total == 5
    assert keys("alkey:shop.receipts#1") != before[0]
    assert keys(Receipt) != before[1]


@pytest.fixture
def namesakes() -> Iterator[None]:
    """``ledgers`` in two schemas and without one, and an unrelated table."""
    metadata = MetaData()
    for schema in ("north", "south", None):
        Table("ledgers", metadata, Column("id", Integer, primary_key=True), schema=schema)
    Table("ledger_notes", metadata, Column("id", Integer, primary_key=True), schema="north")
    catalog.register_metadata(metadata)
    yield
    catalog.unregister_metadata(metadata)


def test_a_name_whose_schema_cannot_be_known_invalidates_every_known_table_of_that_name(
    engine: Engine, namesakes: None
) -> None:
    written = raw_sql_writes("DELETE FROM ledgers WHERE id = 1", engine.dialect)
    for table in ("north.ledgers", "south.ledgers", "ledgers"):
        assert table_identifier(table) in written
    assert table_identifier("north.ledger_notes") not in written


def test_a_schema_qualified_name_reaches_its_own_schema_and_the_unqualified_table_only(
    engine: Engine, namesakes: None
) -> None:
    written = raw_sql_writes("UPDATE north.ledgers SET id = 2", engine.dialect)
    assert table_identifier("north.ledgers") in written
    assert table_identifier("ledgers") in written, "its schema is the connection's choice"
    assert table_identifier("south.ledgers") not in written

"""The test database: ``ALKEY_TEST_DATABASE_URL`` (e.g.
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), else a SQLite file. Each test that
uses ``tables`` starts with freshly created tables.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session

from ..models import SCHEMA, Base, User

DATABASE_URL = os.environ.get("ALKEY_TEST_DATABASE_URL", "")


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if DATABASE_URL:
        engine = create_engine(DATABASE_URL)
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    else:
        path = Path(tmp_path_factory.mktemp("db")) / "alkey.db"
        engine = create_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


@pytest.fixture
def tables(engine: Engine) -> Iterator[Engine]:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)


@pytest.fixture
def ada(tables: Engine) -> Engine:
    """The tables, holding one user: ada, id 1."""
    with Session(tables) as session:
        session.add(User(id=1, name="ada"))
        session.commit()
    return tables


def async_database_url(url: URL) -> URL:
    """The test database through an asyncio driver: aiosqlite, or psycopg's async mode."""
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    if url.get_driver_name() not in ("psycopg", "asyncpg"):
        return url.set(drivername=f"{url.get_backend_name()}+psycopg")
    return url


@pytest.fixture
def async_engine(tables: Engine, loop: asyncio.AbstractEventLoop) -> Iterator[AsyncEngine]:
    """The test database, with fresh tables, for AsyncSessions on ``loop``."""
    engine = create_async_engine(async_database_url(tables.url))
    yield engine
    loop.run_until_complete(engine.dispose())

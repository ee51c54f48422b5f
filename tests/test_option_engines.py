"""Option engines (``engine.execution_options(...)``) share their parent's dialect: alkey
wraps its ``do_commit`` once, however many there are, and unwraps it cleanly."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.tokens import RedisClient

from .models import Tag, User

USERS = User.__table__

MANY = 10_000


@pytest.fixture
def fresh(tables: Engine) -> Iterator[Engine]:
    """An engine of its own: its dialect starts unwrapped."""
    made = create_engine(tables.url)
    yield made
    made.dispose()


@pytest.fixture
def keys(redis_client: RedisClient) -> CacheKeyGenerator:
    return CacheKeyGenerator(redis_client)


def seed(engine: Engine) -> None:
    with Session(engine) as session:
        session.add_all([User(id=1, name="ada"), Tag(code="x")])
        session.commit()


def test_ten_thousand_bound_option_engines_each_commit_without_deepening_the_commit(
    fresh: Engine, redis_client: RedisClient, keys: CacheKeyGenerator
) -> None:
    seed(fresh)
    factory = sessionmaker(expire_on_commit=False)
    alkey.bind(factory, redis_client=redis_client)
    bound = []
    started = time.perf_counter()
    try:
        for number in range(MANY):
            option_engine = fresh.execution_options(logging_token=f"tenant-{number}")
            alkey.bind_engine(option_engine, redis_client=redis_client)
            bound.append(option_engine)
            with factory(bind=option_engine) as session:
                session.execute(select(1))
                session.commit()  # a RecursionError here would skip the database COMMIT
        before = keys("alkey:users#1")
        with factory(bind=bound[-1]) as session:
            session.get_one(User, 1).name = "grace"
            session.commit()
        assert keys("alkey:users#1") != before, "writes through an option engine still bump"
        with bound[-1].begin() as connection:  # and Core on one
            before = keys("alkey:users#1")
            connection.execute(USERS.update().values(name="x"))  # type: ignore[attr-defined]
        assert keys("alkey:users#1") != before
    finally:
        for option_engine in bound:
            alkey.unbind_engine(option_engine)
        alkey.unbind(factory)
    elapsed = time.perf_counter() - started
    assert "do_commit" not in vars(fresh.dialect), "unwrapped once the last one is unbound"
    print(f"{MANY} option engines bound, each committing: {elapsed:.2f}s")


def test_sessions_on_option_engines_are_watched_through_their_root_engine(
    fresh: Engine, redis_client: RedisClient, keys: CacheKeyGenerator
) -> None:
    seed(fresh)
    factory = sessionmaker(expire_on_commit=False)
    alkey.bind(factory, redis_client=redis_client)
    try:
        for number in range(MANY):
            with factory(bind=fresh.execution_options(logging_token=str(number))) as session:
                session.execute(select(1))
                session.commit()
        before = keys(Tag)
        with factory(bind=fresh.execution_options(logging_token="last")) as session:
            session.connection().exec_driver_sql("UPDATE tags SET label = 'y'")
            session.commit()
        assert keys(Tag) != before
    finally:
        alkey.unbind(factory)
        alkey.unbind_engine(fresh)


def test_unbinding_one_engine_leaves_the_others_on_its_dialect_bumping(
    fresh: Engine, redis_client: RedisClient, keys: CacheKeyGenerator
) -> None:
    seed(fresh)
    tenant_a = fresh.execution_options(logging_token="a")
    tenant_b = fresh.execution_options(logging_token="b")
    alkey.bind_engine(tenant_a, redis_client=redis_client)
    alkey.bind_engine(tenant_b, redis_client=redis_client)
    alkey.unbind_engine(tenant_b)
    try:
        before = keys(Tag)
        with tenant_a.begin() as connection:
            connection.exec_driver_sql("UPDATE tags SET label = 'y'")
        assert keys(Tag) != before
        before = keys(Tag)
        with tenant_b.begin() as connection:  # no longer bound
            connection.exec_driver_sql("UPDATE tags SET label = 'z'")
        assert keys(Tag) == before
        with tenant_a.connect() as connection:  # the COMMIT still reached the database
            assert connection.exec_driver_sql("SELECT label FROM tags").scalar() == "z"
    finally:
        alkey.unbind_engine(tenant_a)
    assert "do_commit" not in vars(fresh.dialect)


def test_a_wrapper_added_after_alkeys_survives_unbinding(
    fresh: Engine, redis_client: RedisClient, keys: CacheKeyGenerator
) -> None:
    alkey.bind_engine(fresh, redis_client=redis_client)
    inner = fresh.dialect.do_commit
    calls = []

    def outer(dbapi_connection: Any) -> None:
        calls.append(1)
        inner(dbapi_connection)

    fresh.dialect.do_commit = outer  # type: ignore[method-assign]
    alkey.unbind_engine(fresh)
    assert fresh.dialect.do_commit is outer, "another library's wrapper is left in place"
    alkey.bind_engine(fresh, redis_client=redis_client)  # reuses the pass-through
    try:
        seed(fresh)
        before = keys("alkey:users#1")
        with fresh.begin() as connection:
            connection.execute(USERS.update().values(name="x"))  # type: ignore[attr-defined]
        assert keys("alkey:users#1") != before
        assert calls
    finally:
        alkey.unbind_engine(fresh)

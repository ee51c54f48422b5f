"""Round trips, counted: one per key, none per flush, at most one per commit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.testing import RoundTrips, counting_client
from alkey.tokens import CHUNK_SIZE, RedisClient, RedisTokenStore

from .models import User


@pytest.fixture
def counted(redis_url: str, redis_client: RedisClient) -> Iterator[RedisClient]:
    client = counting_client(redis_url)
    yield client
    client.close()


@pytest.fixture
def counted_factory(tables: Engine, counted: RedisClient) -> Iterator[sessionmaker[Session]]:
    factory = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(factory, tokens=RedisTokenStore(counted))
    yield factory
    alkey.unbind(factory)


@pytest.mark.parametrize("instances", [1, 10, 100, 1000, 2 * CHUNK_SIZE + 1])
def test_a_key_costs_one_round_trip_however_many_instances_it_names(
    counted_factory: sessionmaker[Session], counted: RedisClient, instances: int
) -> None:
    with counted_factory() as session:
        session.add_all([User(name=str(index)) for index in range(instances)])
        session.commit()
        users = session.scalars(select(User)).all()
    key_generator = CacheKeyGenerator(counted)
    with RoundTrips() as creating:
        key = key_generator(*users, "page")
    with RoundTrips() as reading:
        assert key_generator(*users, "page") == key
    assert (creating.count, reading.count) == (1, 1)


def test_a_key_without_instances_or_identifiers_costs_no_round_trip(
    counted: RedisClient,
) -> None:
    with RoundTrips() as trips:
        CacheKeyGenerator(counted)("static", 1, {"a": [1, 2]})
    assert trips.count == 0


@pytest.mark.parametrize("rows", [1, 100, 2 * CHUNK_SIZE + 1])
def test_flushes_cost_nothing_and_a_commit_one_round_trip(
    counted_factory: sessionmaker[Session], rows: int
) -> None:
    with counted_factory() as session:
        with RoundTrips() as flushing:
            for index in range(rows):
                session.add(User(name=str(index)))
                if index % 50 == 0:
                    session.flush()
            session.flush()
        with RoundTrips() as committing:
            session.commit()
    assert (flushing.count, committing.count) == (0, 1)


def test_a_read_only_commit_costs_no_round_trip(
    counted_factory: sessionmaker[Session],
) -> None:
    with counted_factory() as session:
        session.add(User(name="ada"))
        session.commit()
        with RoundTrips() as trips:
            session.scalars(select(User)).all()
            session.commit()
    assert trips.count == 0


def test_after_redis_forgets_its_scripts_one_call_reloads_them(counted: RedisClient) -> None:
    key_generator = CacheKeyGenerator(counted)
    key_generator("alkey:users#1")
    counted.script_flush()
    with RoundTrips() as reloading:
        key = key_generator("alkey:users#1")
    with RoundTrips() as after:
        assert key_generator("alkey:users#1") == key
    assert (reloading.count, after.count) == (2, 1)

"""Durable mode: a process that dies between its COMMIT and its bump leaves no stale key.

``RedisTokenStore(client, durable=True, lease=...)`` records each writing commit's bumps
in Redis just before the database COMMIT, clears them with the bump, and any process
bumps the records older than the lease that nobody cleared.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, event, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import alkey
import alkey.asyncio
from alkey.asyncio import AsyncRedisClient, AsyncRedisTokenStore
from alkey.cache import CacheKeyGenerator
from alkey.embedded import EmbeddedRedis
from alkey.testing import RoundTrips, counting_client
from alkey.tokens import RedisClient, RedisTokenStore

from .models import User

ROOT = Path(__file__).resolve().parent.parent
LEASE = 0.5
INTENTS, INTENT_DATA = "alkey:{intents}", "alkey:{intents}:data"


def durable_store(client: RedisClient, **options: object) -> RedisTokenStore:
    return RedisTokenStore(client, durable=True, lease=LEASE, **options)  # type: ignore[arg-type]


def user_key(engine: Engine, key_generator: CacheKeyGenerator) -> tuple[str, str]:
    """(user 1's name, its cache key), as a reader would fetch them now.

    Keyed by identifier, the token alone: a key built on the loaded instance would change
    with the name it loaded, bump or no bump (see alkey.snapshot), and prove nothing here.
    """
    with Session(engine) as session:
        user = session.get_one(User, 1)
        return user.name, key_generator("alkey:users#1", "profile")


def crash_while_writing(engine: Engine, redis_url: str, path: str, durable: bool) -> float:
    """Run the crashing writer; return when it died (``time.monotonic()``)."""
    url = engine.url.render_as_string(hide_password=False)
    arguments = [url, redis_url, path, str(int(durable)), str(LEASE), "grace"]
    process = subprocess.run(
        [sys.executable, "-m", "tests.crashing_writer", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == -9, f"the writer must die by SIGKILL: {process.stderr}"
    return time.monotonic()


@pytest.mark.parametrize("path", ["session", "core"])
def test_a_writer_killed_between_commit_and_bump_has_its_keys_changed_within_the_lease(
    ada: Engine, redis_url: str, redis_client: RedisClient, path: str
) -> None:
    key_generator = CacheKeyGenerator(tokens=durable_store(redis_client))
    name, key = user_key(ada, key_generator)
    assert name == "ada"
    row_token = redis_client.get("alkey:users#1")

    died = crash_while_writing(ada, redis_url, path, durable=True)

    assert user_key(ada, key_generator)[0] == "grace", "the database committed"
    assert redis_client.get("alkey:users#1") == row_token, "the writer died before its bump"
    assert redis_client.zcard(INTENTS) == 1, "but its intent was recorded"
    while user_key(ada, key_generator)[1] == key:
        assert time.monotonic() - died < 1.5 * LEASE + 1.0, "the intent was never applied"
        time.sleep(0.02)
    print(f"{path}: key changed {time.monotonic() - died:.2f} s after the writer died")
    assert redis_client.zcard(INTENTS) == 0
    assert redis_client.hlen(INTENT_DATA) == 0


def test_without_durable_mode_a_killed_writer_leaves_its_key_stale(
    ada: Engine, redis_url: str, redis_client: RedisClient
) -> None:
    """The control: the crash test above fails when durable mode is off."""
    key_generator = CacheKeyGenerator(tokens=RedisTokenStore(redis_client))
    key = user_key(ada, key_generator)[1]
    crash_while_writing(ada, redis_url, "session", durable=False)
    time.sleep(1.5 * LEASE + 0.2)
    assert user_key(ada, key_generator) == ("grace", key), "stale: the new name, the old key"


def test_a_durable_commit_records_its_intent_before_the_database_commit_and_clears_it_after(
    ada: Engine, redis_client: RedisClient
) -> None:
    factory = sessionmaker(ada)
    alkey.bind(factory, tokens=durable_store(redis_client))
    seen_at_commit: list[dict[Any, Any]] = []

    def before_the_database_commit(connection: Connection) -> None:
        seen_at_commit.append(redis_client.hgetall(INTENT_DATA))

    try:
        with factory() as session:
            session.get_one(User, 1).name = "grace"
            session.add(User(id=2, name="alan"))
            # Now that the session began, alkey watches the engine: this runs after it.
            event.listen(ada, "commit", before_the_database_commit)
            session.commit()
    finally:
        event.remove(ada, "commit", before_the_database_commit)
        alkey.unbind(factory)
    [intents] = seen_at_commit
    [identifiers] = intents.values()
    assert set(identifiers.decode().split("\n")) >= {"alkey:users#1", "alkey:users#2"}
    assert redis_client.zcard(INTENTS) == 0
    assert redis_client.hlen(INTENT_DATA) == 0


def test_durable_mode_costs_one_more_round_trip_per_writing_commit_and_none_elsewhere(
    ada: Engine, redis_url: str, redis_client: RedisClient
) -> None:
    counted = counting_client(redis_url)
    store = durable_store(counted)
    factory = sessionmaker(ada, expire_on_commit=False)
    alkey.bind(factory, tokens=store)
    key_generator = CacheKeyGenerator(tokens=store)
    try:
        with factory() as session:
            user = session.get_one(User, 1)
            with RoundTrips() as first_key:  # carries the first claim in its pipeline
                key_generator(user)
            with RoundTrips() as key:
                key_generator(user)
            session.commit()
            with RoundTrips() as read_only:
                session.scalars(select(User)).all()
                session.commit()
            user.name = "grace"
            with RoundTrips() as flush:
                session.flush()
            with RoundTrips() as writing:
                session.commit()
    finally:
        alkey.unbind(factory)
        counted.close()
    assert (first_key.count, key.count, read_only.count, flush.count) == (1, 1, 0, 0)
    assert writing.count == 2, "the intent before the COMMIT, the bump and its clearing after"


def test_an_intent_nobody_cleared_is_applied_by_another_process_that_only_commits(
    redis_url: str, redis_client: RedisClient
) -> None:
    """Claims ride on bumps too, so a process that never generates keys recovers intents."""
    dead = durable_store(redis.Redis.from_url(redis_url))
    assert dead.intend(["alkey:orders#7"]) is not None  # ... and its process died here
    token = dead.fetch(["alkey:orders#7"])[0]
    writer = durable_store(redis_client)
    time.sleep(LEASE)
    writer.bump(["alkey:users#1"])
    assert writer.fetch(["alkey:orders#7"])[0] != token
    assert redis_client.zcard(INTENTS) == 0


def test_a_bump_refused_by_a_full_redis_leaves_its_intent_for_another_process() -> None:
    """The clearing rides in the bump's pipeline, which is no transaction: a full Redis
    (maxmemory, noeviction) refuses the bump, and must refuse the clearing as well."""
    with EmbeddedRedis(extra_args=("--maxmemory-policy", "noeviction")) as server:
        client: RedisClient = redis.Redis.from_url(server.url, socket_timeout=2, retry=None)
        # retry_interval=60: the writer's own replay stays out of the way, as if it died.
        writer = durable_store(client, retry_interval=60)
        [token] = writer.fetch(["alkey:users#1"])
        intent = writer.intend(["alkey:users#1"])  # just before the COMMIT
        client.config_set("maxmemory", client.info("memory")["used_memory"] - 1)
        writer.bump(["alkey:users#1"], intent)  # after it: Redis is full
        assert writer.pending == {"alkey:users#1"}, "refused: kept in memory"
        assert client.zcard(INTENTS) == 1, "and still recorded in Redis"
        client.config_set("maxmemory", 0)
        time.sleep(LEASE)
        other_client: RedisClient = redis.Redis.from_url(server.url, socket_timeout=2)
        other = durable_store(other_client)
        assert other.fetch(["alkey:users#1"])[0] != token, "another process bumped it"
        assert client.zcard(INTENTS) == 0
        other_client.close()
        client.close()


def test_a_recovery_is_logged_once_with_counts(
    redis_client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    dead = durable_store(redis_client)
    for order in range(3):
        dead.intend([f"alkey:orders#{order}"])
    time.sleep(LEASE)
    with caplog.at_level(logging.WARNING, logger="alkey"):
        durable_store(redis_client).fetch(["alkey:users#1"])
    [record] = caplog.records
    assert "3 commit(s)" in record.getMessage()


def test_a_durable_commit_goes_ahead_with_redis_down_under_either_policy(
    ada: Engine,
) -> None:
    """Recording the intent happens inside SQLAlchemy's commit, which must not break; the
    raise policy's error comes with the bump, after the COMMIT, as without durable mode."""
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=0.3, retry=None)
        server.stop()
        for on_error, name in (("degrade", "grace"), ("raise", "alan")):
            factory = sessionmaker(ada)
            alkey.bind(factory, tokens=durable_store(client, on_error=on_error))
            try:
                with factory() as session:
                    session.get_one(User, 1).name = name
                    if on_error == "raise":
                        with pytest.raises(redis.exceptions.ConnectionError):
                            session.commit()
                    else:
                        session.commit()
                with ada.connect() as connection:
                    query = text("SELECT name FROM users WHERE id = 1")
                    assert connection.execute(query).scalar() == name
            finally:
                alkey.unbind(factory)
        client.close()


def test_a_non_durable_store_records_no_intent(ada: Engine, redis_client: RedisClient) -> None:
    factory = sessionmaker(ada)
    alkey.bind(factory, tokens=RedisTokenStore(redis_client))
    try:
        with factory() as session:
            session.get_one(User, 1).name = "grace"
            session.commit()
    finally:
        alkey.unbind(factory)
    assert redis_client.keys("alkey:{intents}*") == []


def test_a_store_rejects_a_lease_that_cannot_work(redis_client: RedisClient) -> None:
    for lease in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"token store option lease=\S+ is invalid: use a pos"):
            RedisTokenStore(redis_client, durable=True, lease=lease)


def test_an_asyncio_durable_commit_records_its_intent_and_an_async_fetch_recovers_one(
    ada: Engine,
    async_engine: AsyncEngine,
    async_redis_client: AsyncRedisClient,
    redis_client: RedisClient,
    loop: asyncio.AbstractEventLoop,
) -> None:
    store = AsyncRedisTokenStore(async_redis_client, durable=True, lease=LEASE)
    factory = async_sessionmaker(async_engine)
    alkey.asyncio.bind(factory, tokens=store)
    seen_at_commit: list[dict[Any, Any]] = []

    def before_the_database_commit(connection: Connection) -> None:
        seen_at_commit.append(redis_client.hgetall(INTENT_DATA))

    async def commit_then_recover() -> tuple[str, str]:
        async with factory() as session:
            (await session.get_one(User, 1)).name = "grace"
            event.listen(async_engine.sync_engine, "commit", before_the_database_commit)
            await session.commit()
        dead = AsyncRedisTokenStore(async_redis_client, durable=True, lease=LEASE)
        await dead.aintend(["alkey:orders#7"])  # ... and its process died here
        [token] = await store.afetch(["alkey:orders#7"])
        await asyncio.sleep(LEASE)
        [recovered] = await store.afetch(["alkey:orders#7"])
        return token, recovered

    try:
        token, recovered = loop.run_until_complete(commit_then_recover())
    finally:
        event.remove(async_engine.sync_engine, "commit", before_the_database_commit)
        alkey.unbind(factory)
    [intents] = seen_at_commit
    [identifiers] = intents.values()
    assert set(identifiers.decode().split("\n")) == {"alkey:users#1", "alkey:users#*", "alkey:*#*"}
    assert recovered != token
    assert redis_client.zcard(INTENTS) == 0

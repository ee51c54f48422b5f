"""Durable mode under a backlog: many due intents are recovered in bounded batches.

Intents fall due in bulk when many writers die, or when Redis refused their bumps for a
while. A store recovers them in a loop of batches of ``CLAIM_LIMIT`` intents, each one
round trip, for at most ``RECOVERY_BUDGET`` seconds per call; the next calls go on. While
intents remain due, fetches miss, so no key is ever built on a token that a pending
recovery is about to replace; and a backlog is one incident in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from alkey.asyncio import AsyncRedisClient, AsyncRedisTokenStore
from alkey.tokens import CLAIM_LIMIT, RECOVERY_BUDGET, RedisClient, RedisTokenStore

from .support.inspection import stored

LEASE = 0.5
INTENTS, INTENT_DATA = "alkey:{intents}", "alkey:{intents}:data"
BACKLOG = 50_000


def orders(count: int) -> list[str]:
    return [f"alkey:orders#{n}" for n in range(count)]


def write_due_intents(client: RedisClient, identifiers: list[str]) -> None:
    """One intent per identifier, written as ``_INTEND_SCRIPT`` writes them (a sorted set
    of intent ids scored by Redis's clock, and their identifiers in a hash), but two
    leases in the past, in order: as if as many writers had died after their COMMIT."""
    seconds, microseconds = client.time()
    due = seconds + microseconds / 1e6 - 2 * LEASE
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(identifiers), 5000):
        batch = range(start, min(start + 5000, len(identifiers)))
        pipe.zadd(INTENTS, {f"dead-{n}": due + n * 1e-6 for n in batch})
        pipe.hset(INTENT_DATA, mapping={f"dead-{n}": identifiers[n] for n in batch})
    pipe.execute()


def tokens_in_redis(client: RedisClient, identifiers: list[str]) -> list[Any]:
    return [
        token
        for n in range(0, len(identifiers), 5000)
        for token in client.mget(identifiers[n : n + 5000])
    ]


def one_recovery(caplog: pytest.LogCaptureFixture, total: int) -> None:
    """The log holds one recovery incident: a warning when it began, a line with the
    total when it ended, and nothing else."""
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert caplog.records[0].levelno == logging.WARNING
    assert "so far, and more are due" in messages[0]
    assert f"{total} in all" in messages[1]


def test_a_backlog_of_50000_due_intents_is_drained_by_bounded_fetches_that_miss_meanwhile(
    redis_client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    identifiers = orders(BACKLOG)
    before = RedisTokenStore(redis_client).fetch(identifiers)
    write_due_intents(redis_client, identifiers)
    store = RedisTokenStore(redis_client, durable=True, lease=LEASE)
    calls, slowest = 0, 0.0
    with caplog.at_level(logging.INFO, logger="alkey"):
        while redis_client.zcard(INTENTS):
            started = time.monotonic()
            [token] = store.fetch(["alkey:orders#0"])  # recursed past the stack before
            slowest = max(slowest, time.monotonic() - started)
            calls += 1
            assert calls < BACKLOG // CLAIM_LIMIT, "every call drains at least one batch"
            if redis_client.zcard(INTENTS):
                assert stored(token) != redis_client.get("alkey:orders#0"), (
                    "intents are still due: a fetch must miss"
                )
        [token] = store.fetch(["alkey:orders#0"])
    assert stored(token) == redis_client.get("alkey:orders#0"), "drained: a real token"
    assert slowest < RECOVERY_BUDGET + 0.5, "one call's work is bounded"
    assert calls > 1, "the backlog took several calls, each within the budget"
    after = tokens_in_redis(redis_client, identifiers)
    assert all(stored(old) != new for old, new in zip(before, after, strict=True))
    assert redis_client.hlen(INTENT_DATA) == 0
    one_recovery(caplog, BACKLOG)


def test_an_asyncio_store_drains_a_backlog_of_50000_due_intents_the_same_way(
    redis_client: RedisClient,
    async_redis_client: AsyncRedisClient,
    loop: asyncio.AbstractEventLoop,
    caplog: pytest.LogCaptureFixture,
) -> None:
    identifiers = orders(BACKLOG)
    before = RedisTokenStore(redis_client).fetch(identifiers)
    write_due_intents(redis_client, identifiers)
    store = AsyncRedisTokenStore(async_redis_client, durable=True, lease=LEASE)

    async def drain() -> tuple[int, float, list[str]]:
        calls, slowest = 0, 0.0
        while await async_redis_client.zcard(INTENTS):
            started = time.monotonic()
            [token] = await store.afetch(["alkey:orders#0"])
            slowest = max(slowest, time.monotonic() - started)
            calls += 1
            assert calls < BACKLOG // CLAIM_LIMIT
            if await async_redis_client.zcard(INTENTS):
                assert stored(token) != await async_redis_client.get("alkey:orders#0")
        return calls, slowest, await store.afetch(["alkey:orders#0"])

    with caplog.at_level(logging.INFO, logger="alkey"):
        calls, slowest, [token] = loop.run_until_complete(drain())
    assert stored(token) == redis_client.get("alkey:orders#0")
    assert slowest < RECOVERY_BUDGET + 0.5
    assert calls > 1
    after = tokens_in_redis(redis_client, identifiers)
    assert all(stored(old) != new for old, new in zip(before, after, strict=True))
    one_recovery(caplog, BACKLOG)


def test_a_fetch_that_drains_the_backlog_itself_returns_the_tokens_after_the_recovery(
    redis_client: RedisClient,
) -> None:
    """Three batches, the last intent covering the very identifier fetched: drained
    within one call, whose answer is the token the recovery wrote, not the one before."""
    identifiers = [*orders(2 * CLAIM_LIMIT + 50), "alkey:users#1"]
    plain = RedisTokenStore(redis_client)
    [before] = plain.fetch(["alkey:users#1"])
    write_due_intents(redis_client, identifiers)
    store = RedisTokenStore(redis_client, durable=True, lease=LEASE)
    [token] = store.fetch(["alkey:users#1"])
    assert redis_client.zcard(INTENTS) == 0, "drained within the call's budget"
    assert token != before
    assert stored(token) == redis_client.get("alkey:users#1")


def test_a_bump_recovers_a_backlog_too_and_the_next_calls_finish_it(
    redis_client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A process that only commits recovers as well: bumps claim and drain batches the
    same way (one incident in the log), and keys miss until nothing is due."""
    identifiers = orders(BACKLOG // 5)
    before = RedisTokenStore(redis_client).fetch(identifiers)
    write_due_intents(redis_client, identifiers)
    store = RedisTokenStore(redis_client, durable=True, lease=LEASE)
    with caplog.at_level(logging.INFO, logger="alkey"):
        for _ in range(BACKLOG // CLAIM_LIMIT):
            store.bump(["alkey:users#1"])
            if not redis_client.zcard(INTENTS):
                break
        [token] = store.fetch(["alkey:orders#7"])
    assert redis_client.zcard(INTENTS) == 0
    assert stored(token) == redis_client.get("alkey:orders#7")
    after = tokens_in_redis(redis_client, identifiers)
    assert all(stored(old) != new for old, new in zip(before, after, strict=True))
    one_recovery(caplog, BACKLOG // 5)


def test_a_small_recovery_is_logged_in_one_line(
    redis_client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    write_due_intents(redis_client, orders(CLAIM_LIMIT - 1))
    store = RedisTokenStore(redis_client, durable=True, lease=LEASE)
    with caplog.at_level(logging.INFO, logger="alkey"):
        [token] = store.fetch(["alkey:orders#3"])
        store.fetch(["alkey:orders#3"])
    assert stored(token) == redis_client.get("alkey:orders#3")
    [record] = caplog.records
    assert f"{CLAIM_LIMIT - 1} commit(s) whose own bump" in record.getMessage()

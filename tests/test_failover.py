"""Keys change, they never revert: failovers, promotions, snapshots and replicas.

A bump is only as durable as the Redis that acknowledged it. A primary that dies before
its replica received a bump, or a Redis that restarts from a snapshot taken before it,
comes back with the token the bump had replaced -- and a key built on it would be the
pre-commit key, whose cached value is stale. Each test here makes that loss happen for
real (a replication link cut while the primary keeps acknowledging, SIGKILL, ``SAVE``
before the bump) and checks that the key built afterwards differs from every key built
before the lost commit: one miss, never a stale hit.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import pytest
import redis
from sqlalchemy import Engine, insert
from sqlalchemy.orm import Session, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.embedded import EmbeddedRedis
from alkey.errors import TokenStoreUnavailableError
from alkey.identity import row_identifier
from alkey.settings import configure
from alkey.tokens import RedisTokenStore, TokenStore

from .models import User
from .support.replication import replication_group, restart_from_snapshot, wait_until

ADA = row_identifier(User.__table__, 1)
#: Rows the failover test's writers pick from: enough that many written while replication
#: is cut are not written again later (a later write would hide a lost bump).
ROWS = 1000
#: Retry quickly after an error, so that each test measures Redis, not the back-off.
RETRY_INTERVAL = 0.1


def store_of(url: str, **options: object) -> TokenStore:
    """A store on ``url``, built by the configuration path an application uses."""
    return configure(url=url, env={}, retry_interval=RETRY_INTERVAL, **options).store()  # type: ignore[arg-type]


def close(store: TokenStore) -> None:
    assert isinstance(store, RedisTokenStore)
    store.client.close()


def settled_key(key_generator: Callable[[str], str], identifier: str) -> tuple[str, float]:
    """The key of ``identifier`` once the store serves real tokens again (two calls in a
    row agree: during an outage and its recovery window every call is a fresh miss), and
    how many seconds that took."""
    began = time.monotonic()
    previous: list[str] = []

    def agreed() -> str | None:
        key = key_generator(identifier)
        if previous and previous[-1] == key:
            return key
        previous.append(key)
        return None

    key = wait_until(agreed, 20, f"the key of {identifier} to settle", interval=0.02)
    return key, time.monotonic() - began


def rename(factory: sessionmaker[Session], row: int, name: str) -> None:
    with factory() as session:
        session.get_one(User, row).name = name
        session.commit()


def test_a_sentinel_failover_under_committing_writers_brings_no_pre_commit_key_back(
    tables: Engine,
) -> None:
    """Two writer threads commit renames through a session bound to a store configured
    with the Sentinel URL. Replication is cut, the writers go on (the primary
    acknowledges bumps the replica never gets), the primary is killed, Sentinel promotes
    the replica, and the writers go on through the failover. Afterwards each row's key
    differs from every key observed before each of its commits, and no commit raised."""
    with Session(tables) as session:
        session.execute(insert(User), [{"id": row, "name": "initial"} for row in range(ROWS)])
        session.commit()
    with replication_group(replicas=1, sentinels=1, through_proxy=True) as group:
        store = store_of(group.sentinel_url)
        key_generator = CacheKeyGenerator(tokens=store)
        factory = sessionmaker(tables)
        alkey.bind(factory, tokens=store)
        observed: defaultdict[int, set[str]] = defaultdict(set)
        errors: list[str] = []
        commits = [0]
        stop = threading.Event()

        def write(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                row = rng.randrange(ROWS)
                observed[row].add(key_generator(row_identifier(User.__table__, row)))
                try:
                    rename(factory, row, f"written by {seed}")
                except Exception as error:  # any error out of commit() fails the test
                    errors.append(repr(error))
                commits[0] += 1
                time.sleep(0.002)

        writers = [threading.Thread(target=write, args=(seed,)) for seed in range(2)]
        try:
            for writer in writers:
                writer.start()
            time.sleep(0.3)
            group.cut_replication()
            time.sleep(0.3)  # bumps acknowledged by the primary alone
            killed = time.monotonic()
            group.kill_primary()
            group.wait_for_failover()
            promoted = time.monotonic() - killed
            time.sleep(0.5)  # commits on the new primary
        finally:
            stop.set()
            for writer in writers:
                writer.join()
            alkey.unbind(factory)
        _, settled = settled_key(key_generator, ADA)
        print(
            f"\nSentinel failover: promoted {promoted:.2f} s after the kill; keys real again "
            f"{time.monotonic() - killed:.2f} s after it ({settled:.2f} s after the writers "
            f"stopped); {commits[0]} commits"
        )
        reverted = [
            row
            for row, keys in observed.items()
            if key_generator(row_identifier(User.__table__, row)) in keys
        ]
        close(store)
    assert errors == []
    assert len(observed) > 100, "the writers wrote many rows"
    assert reverted == [], f"{len(reverted)} rows got a key from before one of their commits"


def test_a_bump_the_promoted_replica_never_received_does_not_bring_the_pre_commit_key_back(
    ada: Engine,
) -> None:
    with replication_group(replicas=1, through_proxy=True) as group:
        [replica] = group.replicas
        store = store_of(group.url(group.primary))
        factory = sessionmaker(ada)
        alkey.bind(factory, tokens=store)
        try:
            # Settled: a first call that timed out on a busy machine answers a fresh miss
            # and stores no token, and then the replica would have none to serve.
            before, _ = settled_key(CacheKeyGenerator(tokens=store), ADA)
            group.wait_replicated()
            with group.client(group.primary) as primary, group.client(replica) as copy:
                # Until the replica has it: WAIT on a new connection, which has written
                # nothing, does not wait for the store's writes.
                wait_until(
                    lambda: copy.get(ADA) == primary.get(ADA) is not None or None,
                    5,
                    "the token to replicate",
                )
            group.cut_replication()
            rename(factory, 1, "ada lovelace")  # the primary acknowledges the bump
        finally:
            alkey.unbind(factory)
        with group.client(group.primary) as primary, group.client(replica) as lagging:
            assert primary.get(ADA) != lagging.get(ADA), "the replica missed the bump"
            lost = lagging.get(ADA)
        group.kill_primary()
        group.promote(replica)
        close(store)
        promoted = store_of(group.url(replica))
        after, _ = settled_key(CacheKeyGenerator(tokens=promoted), ADA)
        with group.client(replica) as client:
            assert client.get(ADA) == lost, "the promoted replica serves the pre-commit token"
        close(promoted)
    assert after != before, "the key after the promotion is not the pre-commit key"


def test_a_restart_from_a_snapshot_taken_before_a_bump_does_not_bring_the_pre_commit_key_back(
    ada: Engine,
) -> None:
    with EmbeddedRedis() as server:
        store = store_of(server.url)
        key_generator = CacheKeyGenerator(tokens=store)
        factory = sessionmaker(ada)
        alkey.bind(factory, tokens=store)
        raw = redis.Redis.from_url(server.url, socket_timeout=2)
        try:
            before = key_generator(ADA)
            snapshot = raw.get(ADA)
            raw.save()
            rename(factory, 1, "ada lovelace")
            bumped = key_generator(ADA)
            restart_from_snapshot(server)
            assert raw.get(ADA) == snapshot, "the restarted server serves the pre-commit token"
            after, _ = settled_key(key_generator, ADA)
        finally:
            alkey.unbind(factory)
            raw.close()
            close(store)
    assert before != bumped
    assert after != before, "the key after the restart is not the pre-commit key"


def test_a_store_pointed_at_a_replica_misses_rather_than_serve_its_tokens(ada: Engine) -> None:
    """A replica's tokens may lag the primary's acknowledged bumps, so a store on a
    replica (a misconfiguration, or a primary demoted under a plain client) must not
    build keys from them: every key is a fresh miss, and ``on_error="raise"`` says why."""
    with replication_group(replicas=1) as group:
        [replica] = group.replicas
        primary = store_of(group.url(group.primary))
        on_primary = CacheKeyGenerator(tokens=primary)(ADA)
        group.wait_replicated()
        degrading = store_of(group.url(replica))
        first, second = (CacheKeyGenerator(tokens=degrading)(ADA) for _ in range(2))
        raising = store_of(group.url(replica), on_error="raise")
        with pytest.raises(TokenStoreUnavailableError) as raised:
            raising.fetch([ADA])
        assert isinstance(raised.value.__cause__, redis.ReadOnlyError), "READONLY"
        for store in (primary, degrading, raising):
            close(store)
    assert on_primary not in (first, second)
    assert first != second, "fresh random tokens: a guaranteed miss"


def test_a_url_naming_three_sentinels_follows_their_failover_with_one_of_them_gone() -> None:
    """Three sentinels agree on a failover by a quorum of two; the URL lists all three,
    so the client still finds the new primary with the first one it names dead."""
    with replication_group(replicas=2, sentinels=3) as group:
        store = store_of(group.sentinel_url)
        key_generator = CacheKeyGenerator(tokens=store)
        before = key_generator(ADA)
        group.kill_primary()
        promoted = group.wait_for_failover()
        group.sentinels[0].stop()
        after, _ = settled_key(key_generator, ADA)
        with group.client(promoted) as client:
            token = client.get(ADA)
        close(store)
    assert token is not None, "the token lives on the new primary"
    assert after != before

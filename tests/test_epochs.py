"""Every token carries its server's epoch, and every client library takes the same way out.

The epoch is the server's replication id, folded into each fetched token (``<token>@<epoch>``).
Redis draws a new one whenever its dataset may have lost acknowledged writes (a restart, a
promoted replica), so keys built after such an event differ from every key built before
it instead of reverting. The failover and restart scenarios themselves are in
``test_failover.py``, ``test_sentinel.py`` and the stale-read checker; this module checks
the epoch's source, what happens when a server hides it, and that a valkey-py client keeps
the outage guarantee through a real session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import redis
import valkey
import valkey.asyncio
import valkey.exceptions
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import alkey
from alkey.asyncio import AsyncRedisTokenStore
from alkey.cache import CacheKeyGenerator
from alkey.embedded import EmbeddedRedis
from alkey.errors import TokenStoreUnavailableError
from alkey.scripts import EPOCH_LENGTH
from alkey.tokens import RedisClient, RedisTokenStore
from alkey.transports import errors_of

from .models import User


def stored_token(client: RedisClient, identifier: str) -> str:
    value = client.get(identifier)
    assert isinstance(value, bytes), identifier
    return value.decode()


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, to stop and restart."""
    with EmbeddedRedis() as server:
        yield server


def test_every_fetched_token_ends_with_the_servers_replication_id_as_its_epoch(
    redis_client: RedisClient,
) -> None:
    store = RedisTokenStore(redis_client)
    tokens = store.fetch(["alkey:users#1", "alkey:users#*"])
    replid = str(redis_client.info("replication")["master_replid"])
    assert {token.rpartition("@")[2] for token in tokens} == {replid[:EPOCH_LENGTH]}
    stored = [
        stored_token(redis_client, "alkey:users#1"),
        stored_token(redis_client, "alkey:users#*"),
    ]
    assert [token.rpartition("@")[0] for token in tokens] == stored, "Redis keeps the token"


def test_a_restart_that_keeps_every_token_still_changes_every_key(
    private_redis: EmbeddedRedis,
) -> None:
    """A restart from a snapshot gives the same stored tokens back -- possibly from before
    bumps the snapshot missed -- so the keys must differ from all keys built before."""
    client = redis.Redis.from_url(private_redis.url, socket_timeout=2)
    store = RedisTokenStore(client, retry_interval=0)
    generate = CacheKeyGenerator(tokens=store)
    before = generate("alkey:users#1", "sidebar")
    stored = client.get("alkey:users#1")
    client.save()
    private_redis.stop()  # --save "": nothing more is written on the way out
    private_redis.start()
    assert client.get("alkey:users#1") == stored, "the snapshot kept the token"
    generate("alkey:users#1")  # the first call after the restart may meet the old socket
    store.outage.probe_now()
    after = generate("alkey:users#1", "sidebar")
    assert after != before
    assert client.get("alkey:users#1") == stored, "no token was bumped: only the epoch moved"
    client.close()


def test_a_redis_that_hides_its_replication_id_still_works_and_is_reported_once(
    redis_url: str, redis_client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL without +info (or a proxy) hides the id: keys work, without failover
    detection, and the log says so once per store and what to do about it."""
    rules = ["on", ">pw", "~alkey:*", "resetchannels", "-@all", "+eval", "+evalsha", "+mget"]
    rules += ["+set", "+ping"]
    redis_client.execute_command("ACL", "SETUSER", "noinfo", *rules)  # type: ignore[no-untyped-call]
    host_port = redis_url.removeprefix("redis://")
    limited = redis.Redis.from_url(f"redis://noinfo:pw@{host_port}", socket_timeout=2)
    store = RedisTokenStore(limited, on_error="raise")
    with caplog.at_level(logging.WARNING, logger="alkey"):
        first = store.fetch(["alkey:users#1"])
        assert store.fetch(["alkey:users#1"]) == first
        store.bump(["alkey:users#1"])
        assert store.fetch(["alkey:users#1"]) != first
    assert first[0].endswith("@"), "an empty epoch"
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1, warnings
    assert "+info" in warnings[0]
    limited.close()
    redis_client.execute_command("ACL", "DELUSER", "noinfo")  # type: ignore[no-untyped-call]


@pytest.fixture
def valkey_factory(
    tables: Engine, private_redis: EmbeddedRedis
) -> Iterator[tuple[sessionmaker[Session], RedisTokenStore]]:
    client = valkey.Valkey.from_url(
        private_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None
    )
    store = RedisTokenStore(client, retry_interval=0)  # type: ignore[arg-type]
    factory = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(factory, tokens=store)
    yield factory, store
    alkey.unbind(factory)
    client.close()  # type: ignore[no-untyped-call]


def test_with_a_valkey_client_an_outage_breaks_no_commit_and_no_key_and_loses_no_bump(
    valkey_factory: tuple[sessionmaker[Session], RedisTokenStore],
    private_redis: EmbeddedRedis,
) -> None:
    """valkey-py raises its own ``ConnectionError``, no redis-py error: it must be mapped
    like redis-py's, or ``session.commit()`` raises after the database committed."""
    factory, store = valkey_factory
    generate = CacheKeyGenerator(tokens=store)
    with factory() as session:
        user = User(id=1, name="ada")
        session.add(user)
        session.commit()
    key_before = generate(user)
    observer = redis.Redis.from_url(private_redis.url)
    row = "alkey:users#1"
    before = observer.get(row)
    observer.save()  # the restart brings this token back: only the replay can change it
    private_redis.stop()
    with factory() as session:
        session.get_one(User, 1).name = "grace"
        session.commit()  # must not raise
    outage_key = generate(user)  # must not raise: a miss
    assert outage_key not in (key_before, generate(user)), "fresh tokens: a guaranteed miss"
    assert row in store.pending, "the bump is kept for replay"
    private_redis.start()
    store.outage.probe_now()
    generate(user)  # carries the kept bump
    assert store.wait_replayed(5)
    assert observer.get(row) not in (None, before), "the kept bump reached Redis"
    observer.close()


def test_with_a_valkey_asyncio_client_keys_change_after_a_bump_and_miss_in_an_outage(
    private_redis: EmbeddedRedis,
) -> None:
    async def scenario() -> None:
        client = valkey.asyncio.Valkey.from_url(
            private_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None
        )
        store = AsyncRedisTokenStore(client, retry_interval=0)
        before = await store.afetch(["alkey:users#1"])
        assert await store.afetch(["alkey:users#1"]) == before
        await store.abump(["alkey:users#1"])
        after = await store.afetch(["alkey:users#1"])
        assert after != before
        private_redis.stop()
        missed = await store.afetch(["alkey:users#1"])  # must not raise
        assert missed not in (before, after)
        await client.aclose()

    asyncio.run(scenario())


def test_a_primary_cut_off_from_its_replicas_refuses_bumps_which_are_kept_and_replayed() -> None:
    """The deploying guide's split-brain advice: with ``min-replicas-to-write``, a primary that
    cannot reach a replica answers ``NOREPLICAS`` instead of taking a bump it may lose;
    alkey keeps the bump, like any outage's, and sends it again once writes are taken."""
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=2, retry=None)
        store = RedisTokenStore(client, retry_interval=0)
        client.set("alkey:users#1", "before")
        client.config_set("min-replicas-to-write", 1)  # and no replica answers
        store.bump(["alkey:users#1"])
        assert client.get("alkey:users#1") == b"before", "refused"
        assert store.pending == frozenset({"alkey:users#1"}), "kept for replay"
        raising = RedisTokenStore(
            redis.Redis.from_url(server.url, socket_timeout=2, retry=None), on_error="raise"
        )
        with pytest.raises(TokenStoreUnavailableError, match="NOREPLICAS"):
            raising.bump(["alkey:users#2"])
        client.config_set("min-replicas-to-write", 0)
        store.outage.probe_now()
        assert store.wait_replayed(5)
        assert client.get("alkey:users#1") != b"before", "replayed"
        client.close()
        raising.client.close()


class AppValkey(valkey.Valkey):
    """An application's own subclass of a valkey client (its module is not valkey's)."""


def test_a_subclass_of_a_valkey_client_takes_the_same_way_out_in_an_outage() -> None:
    """The library is found through the client's bases: an application's subclass of
    ``valkey.Valkey`` must not be mapped by redis-py's errors, or valkey's
    ``ConnectionError`` escapes key generation and the commit's bump."""
    with EmbeddedRedis() as server:
        url = server.url
    client = AppValkey.from_url(url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None)
    assert errors_of(client).base == (valkey.exceptions.ValkeyError,)
    store = RedisTokenStore(client)  # type: ignore[arg-type]
    key = CacheKeyGenerator(tokens=store)("alkey:users#1")  # must not raise
    assert len(key) == 64
    store.bump(["alkey:users#1"])  # must not raise
    assert store.pending == frozenset({"alkey:users#1"})
    raising = RedisTokenStore(client, on_error="raise")  # type: ignore[arg-type]
    with pytest.raises(TokenStoreUnavailableError):
        raising.fetch(["alkey:users#1"])


def test_a_client_of_no_known_library_is_mapped_by_every_known_librarys_errors() -> None:
    """Fail closed: errors of any library alkey knows are alkey's, whatever the client."""

    class Elsewhere:
        pass

    errors = errors_of(Elsewhere())
    assert redis.exceptions.RedisError in errors.base
    assert valkey.exceptions.ValkeyError in errors.base
    assert valkey.exceptions.ConnectionError in errors.unavailable

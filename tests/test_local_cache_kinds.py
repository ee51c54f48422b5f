"""The local token cache on every kind of store: redis-py and valkey-py, sync and asyncio,
a single Redis and a Redis Cluster.

``tests/test_local_cache.py`` proves the cache's rules in depth on one kind; here every
kind must answer warm keys without a round trip and hear another client's bumps, and a
cluster store must keep its promise through what only a cluster does: a bump on any
node, a slot moved to another primary, a primary that fails over.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from collections.abc import Iterator

import pytest
import redis
from redis.exceptions import RedisError

from alkey.localcache import LEASE
from alkey.settings import configure
from alkey.testing import EmbeddedRedis, RoundTrips, counting_client
from alkey.tokens import RedisTokenStore

from .support.cluster import (
    CLUSTER_KINDS,
    NO_CLUSTER,
    LocalCluster,
    cluster_client,
    key_slot,
)
from .support.docs import docs_page
from .support.replication import SERVICE, replication_group
from .support.stores import STORE_KINDS, StoreKind, StoreUnderTest

LIVE_WITHIN = 20.0


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    """This module's own Redis: no other test's FLUSHDB empties its caches."""
    with EmbeddedRedis() as started:
        yield started


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    if NO_CLUSTER:
        pytest.skip(NO_CLUSTER)
    with LocalCluster(3, 0) as started:
        yield started


def live(store: StoreUnderTest, identifiers: list[str]) -> list[str]:
    """Fetch until the store's local cache serves (its listeners are up) and holds
    ``identifiers``; Redis's tokens for them.

    Held means two fetches in a row agree: a fetch that timed out on a busy machine
    answers fresh tokens (a miss), and so does every fetch for a while after it."""
    deadline = time.monotonic() + LIVE_WITHIN
    store.fetch(identifiers)
    while True:
        assert time.monotonic() < deadline, "the local cache never came up"
        if store.store.local.live:
            tokens = store.fetch(identifiers)
            if store.fetch(identifiers) == tokens:
                return tokens
        store.idle(0.02)


def changed(
    store: StoreUnderTest, identifiers: list[str], before: list[str], expected: list[int]
) -> list[int]:
    """The positions whose token differs from ``before``, once they are ``expected`` (or
    one outside it changed, or a deadline passed), letting the store's listeners run
    meanwhile: each node's invalidation arrives on a connection of its own."""
    deadline = time.monotonic() + 5
    while True:
        now = store.fetch(identifiers)
        moved = [i for i, (a, b) in enumerate(zip(before, now, strict=True)) if a != b]
        if moved == expected or not set(moved) <= set(expected):
            return moved
        if time.monotonic() > deadline:
            return moved
        store.idle(0.01)


@pytest.mark.parametrize("kind", STORE_KINDS, ids=lambda kind: kind.name)
def test_every_kind_of_store_answers_warm_keys_with_no_round_trip_and_hears_other_bumps(
    kind: StoreKind, server: EmbeddedRedis, loop: asyncio.AbstractEventLoop
) -> None:
    identifiers = [f"alkey:{kind.name.replace('.', '_')}#{n}" for n in range(10)]
    store = kind.open(server.url, loop, {"local_cache": 100})
    other = RedisTokenStore(redis.Redis.from_url(server.url))
    try:
        warm = live(store, identifiers)
        with RoundTrips() as trips:
            again = [store.fetch(identifiers) for _ in range(50)]
        assert trips.count == 0
        assert all(tokens == warm for tokens in again)

        other.bump(identifiers[3:5])
        assert changed(store, identifiers, warm, [3, 4]) == [3, 4]
    finally:
        store.close()
        other.client.close()


@pytest.mark.parametrize("kind", CLUSTER_KINDS, ids=lambda kind: kind.name)
def test_a_cluster_store_answers_warm_keys_with_no_round_trip_and_hears_bumps_on_every_node(
    kind: StoreKind, cluster: LocalCluster, loop: asyncio.AbstractEventLoop
) -> None:
    identifiers = one_per_primary(cluster, kind.name)
    store = kind.open(cluster.url, loop, {"local_cache": 100})
    other = RedisTokenStore(cluster_client(cluster.url))
    try:
        warm = live(store, identifiers)
        with RoundTrips() as trips:
            again = store.fetch(identifiers)
        assert trips.count == 0
        assert again == warm

        other.bump(identifiers)  # one row on each primary
        assert changed(store, identifiers, warm, [0, 1, 2]) == [0, 1, 2]
    finally:
        store.close()
        other.client.close()


def one_per_primary(cluster: LocalCluster, table: str) -> list[str]:
    """An identifier held by each primary, in the order of ``cluster.primaries()``."""
    found: dict[int, str] = {}
    ports = [node.port for node in cluster.primaries()]
    n = 0
    while len(found) < len(ports):
        identifier = f"alkey:{table.replace('.', '_').replace(' ', '_')}#{n}"
        port = cluster.owner(key_slot(identifier)).port
        found.setdefault(port, identifier)
        n += 1
    return [found[port] for port in ports]


def test_a_slot_moved_to_another_primary_never_serves_a_token_bumped_there() -> None:
    """Keys of a slot move to another primary, which the store's client learns only at
    its next cold call: the tokens cached from the old node go (the move deletes them
    there, which that node announces), and a bump on the new node is heard."""
    if NO_CLUSTER:
        pytest.skip(NO_CLUSTER)
    with LocalCluster(3, 0) as own:
        client = cluster_client(own.url)
        store = RedisTokenStore(client, local_cache=100, retry_interval=0.05)
        other = RedisTokenStore(cluster_client(own.url))
        try:
            identifiers = ["alkey:orders#0"]
            slot = key_slot(identifiers[0])
            sync = SyncFace(store)
            before = live(sync, identifiers)
            target = next(node for node in own.primaries() if node.port != own.owner(slot).port)
            own.migrate_slot(slot, target)
            other.bump(identifiers)  # lands on the new owner
            deadline = time.monotonic() + 5
            while store.fetch(identifiers) == before:
                assert time.monotonic() < deadline, "a token bumped on the new owner was served"
                time.sleep(0.01)
            after = store.fetch(identifiers)
            assert after != before
            # The cache serves again, now listening to the slot's new owner too.
            assert live(sync, identifiers) == after
            other.bump(identifiers)
            assert changed(sync, identifiers, after, [0]) == [0]
        finally:
            client.close()
            other.client.close()


def test_a_primary_that_fails_over_empties_the_cache_and_no_token_comes_back() -> None:
    """SIGKILL a primary: its listener loses its connection, so the cache stops serving at
    once (no token of the dead node is used again), and once the replica has taken over,
    the cache listens to it and serves again, with the keys of the promoted node's rows
    changed (its epoch)."""
    if NO_CLUSTER:
        pytest.skip(NO_CLUSTER)
    with LocalCluster(3, 1, node_timeout=1000) as own:
        client = cluster_client(own.url)
        store = RedisTokenStore(client, local_cache=100, retry_interval=0.1)
        try:
            identifiers = one_per_primary(own, "users")
            before = live(SyncFace(store), identifiers)
            victim = own.owner(key_slot(identifiers[0]))
            replica = own.replica_of(victim)
            own.kill(victim)
            deadline = time.monotonic() + 5
            while store.local is not None and store.local.live:
                assert time.monotonic() < deadline, "the cache went on serving a dead node"
                time.sleep(0.01)
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(RedisError, LookupError):
                    if own.owner(key_slot(identifiers[0])).port == replica.port:
                        break
                assert time.monotonic() < deadline, "the replica never took over"
                time.sleep(0.1)
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(RedisError):
                    store.fetch(identifiers)
                if store.local is not None and store.local.live:
                    break
                assert time.monotonic() < deadline, "the cache never served again"
                time.sleep(0.1)
            deadline = time.monotonic() + 10
            while (after := store.fetch(identifiers)) != store.fetch(identifiers):
                # Misses for a recovery window after the outage: others may owe bumps.
                assert time.monotonic() < deadline, "the tokens never settled"
                time.sleep(0.05)
            assert after[0] != before[0], "the promoted node's row has a new key (its epoch)"
            assert live(SyncFace(store), identifiers) == after
            with RoundTrips() as trips:
                assert store.fetch(identifiers) == after
            assert trips.count == 0
        finally:
            client.close()


class SyncFace(StoreUnderTest):
    """A plain sync store, with the face :func:`live` and :func:`changed` use."""

    store: RedisTokenStore

    def __init__(self, store: RedisTokenStore) -> None:
        self.store = store

    def fetch(self, identifiers: list[str]) -> list[str]:  # type: ignore[override]
        return self.store.fetch(identifiers)

    def idle(self, seconds: float) -> None:
        time.sleep(seconds)


#: What the local token cache's tracking connection adds to alkey's least-privilege user
#: (docs/deploying.md, "A least-privilege Redis user").
ACL_LOCAL_CACHE = "+client|id +client|tracking +subscribe &__redis__:invalidate"
ACL = "on >acl-pw ~alkey:* resetchannels -@all +eval +evalsha +mget +set +ping +select"


@pytest.mark.parametrize("info", ["+info", ""], ids=["with +info", "without +info"])
def test_an_acl_user_with_the_readmes_local_cache_rules_gets_warm_keys_and_hears_bumps(
    server: EmbeddedRedis, info: str
) -> None:
    """The deploying guide's rules are enough for the tracking connection; without ``+info`` the
    listener and the fetch script both see no epoch, and agree."""
    assert ACL_LOCAL_CACHE in docs_page("deploying.md")
    admin = redis.Redis.from_url(server.url)
    rules = f"{ACL} {info} {ACL_LOCAL_CACHE}".split()
    admin.execute_command("ACL", "SETUSER", "cached", *rules)  # type: ignore[no-untyped-call]
    limited = counting_client(server.url.replace("redis://", "redis://cached:acl-pw@"))
    store = RedisTokenStore(limited, local_cache=100)
    identifiers = [f"alkey:acl{len(info)}#{n}" for n in range(3)]
    try:
        warm = live(SyncFace(store), identifiers)
        with RoundTrips() as trips:
            assert store.fetch(identifiers) == warm
        assert trips.count == 0
        RedisTokenStore(admin).bump(identifiers[:1])
        assert changed(SyncFace(store), identifiers, warm, [0]) == [0]
    finally:
        store.close_local_cache()
        limited.close()
        admin.execute_command("ACL", "DELUSER", "cached")  # type: ignore[no-untyped-call]
        admin.close()


# -- Sentinel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["primary killed", "old primary demoted alive"])
def test_a_sentinel_failover_never_serves_a_token_bumped_on_the_new_primary(how: str) -> None:
    """Through a ``redis+sentinel://`` URL with ``alkey_local_cache``: after a failover --
    the primary crashed, or handed over by ``SENTINEL FAILOVER`` and still running as a
    replica -- a bump on the new primary is never hidden by a cached token, and the cache
    serves again, listening to the new primary, with no round trip."""
    with replication_group(replicas=1, sentinels=1) as group:
        url = f"{group.sentinel_url}{'&' if '?' in group.sentinel_url else '?'}"
        store = configure(url=f"{url}alkey_local_cache=100", env={}, retry_interval=0.1).store()
        assert isinstance(store, RedisTokenStore)
        assert store.local is not None
        identifiers = ["alkey:users#1", "alkey:users#2"]
        face = SyncFace(store)
        try:
            before = live(face, identifiers)
            if how == "primary killed":
                group.kill_primary()
            else:
                with group.sentinels[0].client() as sentinel:
                    sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
            promoted = group.wait_for_failover()
            with group.client(promoted, timeout=2) as client:
                RedisTokenStore(client).bump(identifiers[:1])  # a write on the new primary
                deadline = time.monotonic() + 20
                while True:
                    with contextlib.suppress(RedisError):
                        now = store.fetch(identifiers)
                        if now[0] != before[0] and now == store.fetch(identifiers):
                            break
                    assert time.monotonic() < deadline, "the bump on the new primary was hidden"
                    time.sleep(0.05)
                on_new = client.get(identifiers[0])
            assert on_new is not None
            assert now[0].split("@")[0] == str(on_new), "the new primary's token"
            assert live(face, identifiers) == now, "served again, from the new primary"
            before_stats = store.local.stats()
            assert store.fetch(identifiers) == now
            after_stats = store.local.stats()
            assert after_stats.hits - before_stats.hits == len(identifiers), "from the cache"
            assert after_stats.misses == before_stats.misses, "no round trip"
        finally:
            store.client.close()


# -- the server behind the tracking connection ----------------------------------------------


def test_a_primary_turned_replica_under_the_listener_stops_the_hits_within_the_lease(
    server: EmbeddedRedis,
) -> None:
    """The tracked server becomes a replica (of a primary it cannot reach: it keeps its
    data, its replication id and its connections, and answers pings): the listener's
    probe sees it is no primary any more, so the cache stops serving within the lease
    instead of serving tokens whose bumps now go elsewhere."""
    admin = redis.Redis.from_url(server.url)
    store = RedisTokenStore(
        counting_client(server.url, socket_timeout=0.5), local_cache=100, retry_interval=0.1
    )
    identifiers = ["alkey:demoted#1"]
    try:
        live(SyncFace(store), identifiers)
        admin.execute_command("REPLICAOF", "127.0.0.1", "1")  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + LEASE + 0.5
        while store.local is not None and store.local.live:
            assert time.monotonic() < deadline, "the cache went on serving a replica"
            time.sleep(0.01)
        with RoundTrips() as trips:
            store.fetch(identifiers)
        assert trips.count == 1, "a fetch goes to Redis (which refuses it: a replica)"
    finally:
        admin.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
        store.close_local_cache()
        store.client.close()
        admin.close()
    fresh = RedisTokenStore(redis.Redis.from_url(server.url), local_cache=10)
    assert live(SyncFace(fresh), identifiers), "a primary again: the cache serves again"
    fresh.close_local_cache()
    fresh.client.close()


def test_a_store_left_behind_ends_its_listener_and_lets_its_cache_go(
    server: EmbeddedRedis, loop: asyncio.AbstractEventLoop
) -> None:
    """Neither the listener's thread (or task) nor its connections keep a store alive: an
    application that drops a store with the cache on does not leak a thread, a task, a
    connection or the cache."""
    import gc
    import threading
    import weakref

    import redis.asyncio

    from alkey.asyncio import AsyncRedisTokenStore

    def listeners() -> set[threading.Thread]:
        return {thread for thread in threading.enumerate() if thread.name == "alkey-invalidations"}

    identifiers = ["alkey:dropped#1"]
    others = listeners()
    client = redis.Redis.from_url(server.url)
    store = RedisTokenStore(client, local_cache=10)
    live(SyncFace(store), identifiers)
    mine = listeners() - others
    assert mine, "the store's listener runs"
    assert store.local is not None
    cache = weakref.ref(store.local)
    client.close()  # the application's own connections; the store holds the pool
    del store, client
    gc.collect()
    deadline = time.monotonic() + 2
    while cache() is not None or any(thread.is_alive() for thread in mine):
        assert time.monotonic() < deadline, "the store, its cache or its listener lived on"
        gc.collect()
        time.sleep(0.05)

    async def drop_an_asyncio_store() -> weakref.ref[object]:
        aclient = redis.asyncio.Redis.from_url(server.url)
        astore = AsyncRedisTokenStore(aclient, local_cache=10)
        await astore.afetch(identifiers)
        deadline = time.monotonic() + LIVE_WITHIN
        while not astore.local.live:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
            await astore.afetch(identifiers)
        assert astore.local is not None
        reference: weakref.ref[object] = weakref.ref(astore.local)
        await aclient.aclose()  # its pool, which holds the store, goes with the client
        del astore, aclient
        gc.collect()
        deadline = time.monotonic() + 2
        while reference() is not None or any(
            not task.done() and "AsyncListener" in repr(task.get_coro())
            for task in asyncio.all_tasks()
        ):
            assert time.monotonic() < deadline, "the asyncio store's cache or task lived on"
            gc.collect()
            await asyncio.sleep(0.05)
        return reference

    assert loop.run_until_complete(drop_an_asyncio_store())() is None


def test_a_cluster_store_left_behind_ends_its_listeners_and_lets_its_cache_go() -> None:
    """As for a single Redis: a node refers to its cluster client, which holds the store,
    so the listeners connect with what a node connects with, not with the node."""
    import gc
    import threading
    import weakref

    if NO_CLUSTER:
        pytest.skip(NO_CLUSTER)
    with LocalCluster(3, 0) as own:
        others = {t for t in threading.enumerate() if t.name == "alkey-invalidations"}
        client = cluster_client(own.url)
        store = RedisTokenStore(client, local_cache=10)
        live(SyncFace(store), one_per_primary(own, "dropped"))
        mine = {t for t in threading.enumerate() if t.name == "alkey-invalidations"} - others
        assert len(mine) == 3, "a listener per primary"
        assert store.local is not None
        cache = weakref.ref(store.local)
        client.close()
        del store, client
        deadline = time.monotonic() + 3
        # Left behind unclosed on purpose: the collector may meet a connection of a
        # listener before the listener closed it, and says so (with redis-py's
        # pure-Python parser, as on Python 3.13 without hiredis). What is tested is that
        # the store, its cache and its threads go.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            while cache() is not None or any(thread.is_alive() for thread in mine):
                assert time.monotonic() < deadline, "the cluster store or its listeners lived on"
                gc.collect()
                time.sleep(0.05)

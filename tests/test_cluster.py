"""alkey on a real Redis Cluster: redis-py's ``RedisCluster`` and its asyncio twin.

Every test runs against redis-server processes in cluster mode started here
(:mod:`tests.support.cluster`): the session's cluster of 3 primaries and 3 replicas, or,
for the tests that kill a node or move a slot, a cluster of their own. Nothing is mocked.
The store contract (``test_store_contract.py``) runs on the cluster too; this module
checks what only a cluster has: hash slots, one parallel round trip per node, durable
intents on one slot, resharding (``ASK``/``MOVED``) and a primary's failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.exceptions import RedisError
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker

import alkey.asyncio
from alkey import events
from alkey.errors import TokenStoreError, TokenStoreUnavailableError
from alkey.keys import CacheKeyGenerator
from alkey.scripts import key_slot
from alkey.testing import LatencyProxy, RoundTrips
from alkey.tokens import RedisTokenStore, store_for

from .models import User
from .support.cluster import (
    CLUSTER_KINDS,
    NO_CLUSTER,
    ClusterObserver,
    LocalCluster,
    async_cluster_client,
    cluster_client,
    command,
)
from .support.docs import docs_page, python_blocks
from .support.stores import SOCKET_TIMEOUT, OpenStore, StoreKind

pytestmark = pytest.mark.skipif(NO_CLUSTER is not None, reason=f"no Redis Cluster: {NO_CLUSTER}")


#: Added to every request on its way to a node, in the latency tests.
LATENCY = 0.05


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """The module's cluster: 3 primaries, each with a replica."""
    with LocalCluster(3, 1) as started:
        yield started


@pytest.fixture
def observer(cluster: LocalCluster) -> Iterator[ClusterObserver]:
    """A look at what the stores left in the module's cluster, emptied for the test."""
    looking = ClusterObserver(cluster)
    looking.flushall()
    yield looking
    looking.close()


@pytest.fixture(params=CLUSTER_KINDS, ids=lambda kind: kind.name)
def kind(request: pytest.FixtureRequest) -> StoreKind:
    store_kind: StoreKind = request.param
    return store_kind


def one_per_node(cluster: LocalCluster, table: str = "users", count: int = 1) -> list[str]:
    """``count`` row identifiers of ``table`` served by each primary, primaries in order."""
    wanted = {node.port: [] for node in cluster.primaries()}  # type: dict[int, list[str]]
    number = 0
    while any(len(found) < count for found in wanted.values()):
        identifier = f"alkey:{table}#{number}"
        found = wanted[cluster.owner(key_slot(identifier)).port]
        if len(found) < count:
            found.append(identifier)
        number += 1
    return [identifier for found in wanted.values() for identifier in found]


def in_slot(slot: int, count: int) -> list[str]:
    """``count`` row identifiers of ``orders`` whose hash slot is ``slot``."""
    found: list[str] = []
    number = 0
    while len(found) < count:
        identifier = f"alkey:orders#{number}"
        if key_slot(identifier) == slot:
            found.append(identifier)
        number += 1
    return found


# -- hash slots -----------------------------------------------------------------------------


def test_alkeys_hash_slot_of_a_key_is_the_one_the_cluster_computes(
    cluster: LocalCluster,
) -> None:
    """The slots alkey groups a call by are computed without a client library: they must
    match the server's for identifiers, prefixes, hash tags and any text."""
    rng = random.Random(13)
    keys = [
        "alkey:users#1",
        "alkey:*#*",
        "alkey:{intents}",
        "alkey:{intents}:data",
        "{myapp}:alkey:users#1",
        "shop:alkey:users#*",
        "a{}b",
        "{}",
        "{",
        "}{x}",
        "x{y}{z}",
        "",
        "alkey:2FA%20Codes%3A%23%2C#1",
        "ключ{ü}",
        *(f"alkey:orders#{n}" for n in range(200)),
        *("".join(rng.choice("ab{}#:é") for _ in range(rng.randrange(8))) for _ in range(100)),
    ]
    client = cluster.nodes[0].client()
    try:
        for key in keys:
            assert key_slot(key) == command(client, "CLUSTER", "KEYSLOT", key), key
    finally:
        client.close()


# -- every entry point takes a cluster client -------------------------------------------------


def test_a_cluster_client_works_wherever_alkey_takes_a_sync_redis_client(
    cluster: LocalCluster, observer: ClusterObserver, tables: Engine
) -> None:
    client = cluster_client(cluster.url)
    try:
        store = RedisTokenStore(client)
        assert store_for(client) is store, "shared through the cluster client"
        keys = CacheKeyGenerator(tokens=store)
        from_client = CacheKeyGenerator(client)  # type: ignore[arg-type]
        factory = sessionmaker(tables, expire_on_commit=False)
        events.bind(factory, tokens=store)
        try:
            with factory() as session:
                users = [User(id=n, name=f"user {n}") for n in range(1, 13)]
                session.add_all(users)
                session.commit()
                before = keys(*users, "page")
                assert keys(*users, "page") == before == from_client(*users, "page")
                assert (
                    len({cluster.owner(key_slot(f"alkey:users#{u.id}")).port for u in users}) == 3
                )
                users[0].name = "changed"
                users[11].name = "changed too"
                session.commit()
                after = keys(*users, "page")
            assert after != before
            assert observer.get("alkey:users#1") is not None, "tokens live in the cluster"
        finally:
            events.unbind(factory)
    finally:
        client.close()


def test_a_cluster_client_works_wherever_alkey_takes_an_asyncio_redis_client(
    cluster: LocalCluster,
    observer: ClusterObserver,
    async_engine: AsyncEngine,
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def scenario() -> None:
        client = await async_cluster_client(cluster.url)
        try:
            store = alkey.asyncio.AsyncRedisTokenStore(client)
            assert alkey.asyncio.store_for(client) is store
            keys = alkey.asyncio.AsyncCacheKeyGenerator(tokens=store)
            factory = async_sessionmaker(async_engine, expire_on_commit=False)
            alkey.asyncio.bind(factory, tokens=store)
            try:
                async with factory() as session:
                    users = [User(id=n, name=f"user {n}") for n in range(1, 13)]
                    session.add_all(users)
                    await session.commit()
                    before = await keys(*users, "page")
                    assert await keys(*users, "page") == before
                    users[0].name = "changed"
                    await session.commit()
                    assert await keys(*users, "page") != before
            finally:
                events.unbind(factory)
        finally:
            await client.aclose()

    loop.run_until_complete(scenario())
    assert observer.get("alkey:users#1") is not None


def test_a_plain_client_of_one_cluster_node_is_told_to_use_a_cluster_client(
    cluster: LocalCluster, observer: ClusterObserver, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``redis.Redis`` pointed at one node of a cluster gets ``CROSSSLOT`` or ``MOVED``
    for keys of other slots: alkey's error says to use a cluster client (the log line of
    the default policy quotes the node's ``CROSSSLOT`` answer)."""
    plain = redis.Redis.from_url(cluster.url, socket_timeout=2)
    try:
        store = RedisTokenStore(plain, on_error="raise")
        with pytest.raises(TokenStoreError, match=r"give alkey a redis\.cluster\.RedisCluster"):
            store.fetch(one_per_node(cluster))
        degrading = RedisTokenStore(plain)
        with caplog.at_level(logging.WARNING, logger="alkey"):
            degrading.fetch(one_per_node(cluster))
        assert "CROSSSLOT" in caplog.text
    finally:
        plain.close()


def test_the_readmes_cluster_example_builds_a_store_on_the_cluster(
    cluster: LocalCluster, observer: ClusterObserver
) -> None:
    """docs/deploying.md: the example runs against a real cluster, with only the address
    of one of its nodes put in."""
    [block] = [b for b in python_blocks(docs_page("deploying.md")) if "RedisCluster(" in b]
    written = 'host="redis-cluster", port=6379'
    assert written in block
    block = block.replace(written, f'host="127.0.0.1", port={cluster.nodes[0].port}')
    namespace: dict[str, Any] = {}
    exec(compile(block, "docs/deploying.md", "exec"), namespace)
    try:
        store = namespace["store"]
        identifiers = one_per_node(cluster)
        before = store.fetch(identifiers)
        store.bump(identifiers)
        assert all(a != b for a, b in zip(before, store.fetch(identifiers), strict=True))
        assert all(observer.mget([identifier]) != [None] for identifier in identifiers)
    finally:
        namespace["cluster"].close()


#: docs/deploying.md: what alkey's user needs on a cluster, beyond a single Redis's.
ACL = "on >acl-pw ~alkey:* resetchannels -@all +eval +evalsha +mget +set +ping +select +info"
ACL_CLUSTER = "+cluster|slots +cluster|shards +cluster|nodes +command +readonly"


def test_an_acl_user_with_the_readmes_cluster_rules_fetches_and_bumps_on_every_node(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    readme = docs_page("deploying.md")
    assert all(rule in readme for rule in ACL_CLUSTER.split()), "the deploying guide names them"
    for node in cluster.running():
        with node.client() as admin:
            command(admin, "ACL", "SETUSER", "alkey", *f"{ACL} {ACL_CLUSTER}".split())
    limited = cluster_client(cluster.url, username="alkey", password="acl-pw")
    try:
        store = RedisTokenStore(limited, on_error="raise")
        identifiers = one_per_node(cluster)
        with caplog.at_level(logging.WARNING, logger="alkey"):
            before = store.fetch(identifiers)
        assert all(token.rpartition("@")[2] for token in before), "epochs: +info works"
        store.bump(identifiers)
        assert all(a != b for a, b in zip(before, store.fetch(identifiers), strict=True))
        assert "replication id" not in caplog.text
    finally:
        limited.close()
        for node in cluster.running():
            with node.client() as admin:
                command(admin, "ACL", "DELUSER", "alkey")


# -- one round trip per node, all nodes at once -----------------------------------------------


@pytest.fixture
def slow_cluster_url(cluster: LocalCluster) -> Iterator[Callable[..., Any]]:
    """Opens stores whose every request to a node is delayed by :data:`LATENCY`: a proxy in
    front of each node, and the client told to use it for the address the node announces
    (``address_remap``)."""
    proxies = {node.port: LatencyProxy(node.port, latency=LATENCY) for node in cluster.nodes}

    def remap(address: tuple[str, int]) -> tuple[str, int]:
        proxy = proxies.get(address[1])
        return (address[0], proxy.port) if proxy is not None else address

    yield remap
    for proxy in proxies.values():
        proxy.close()


def timed(call: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def test_a_key_naming_rows_on_three_nodes_costs_one_round_trip_per_node_all_at_once(
    cluster: LocalCluster,
    observer: ClusterObserver,
    slow_cluster_url: Callable[[tuple[str, int]], tuple[str, int]],
    loop: asyncio.AbstractEventLoop,
) -> None:
    """With 50 ms added on the way to each node, a fetch and a bump of rows on all three
    nodes each take about 50 ms (one round trip, in parallel), not 150 ms (three)."""
    identifiers = one_per_node(cluster, count=20)  # 60 rows, 20 on each node
    sync_client = cluster_client(cluster.url, remap=slow_cluster_url)
    async_client = loop.run_until_complete(
        async_cluster_client(cluster.url, remap=slow_cluster_url)
    )
    sync_store = RedisTokenStore(sync_client)
    async_store = alkey.asyncio.AsyncRedisTokenStore(async_client)
    try:
        calls: dict[str, Callable[[], object]] = {
            "sync fetch": lambda: sync_store.fetch(identifiers),
            "sync bump": lambda: sync_store.bump(identifiers),
            "asyncio fetch": lambda: loop.run_until_complete(async_store.afetch(identifiers)),
            "asyncio bump": lambda: loop.run_until_complete(async_store.abump(identifiers)),
        }
        for name, call in calls.items():
            call()  # scripts loaded: EVALSHA from now on
            with RoundTrips() as trips:
                call()
            assert trips.count == 3, f"{name}: one request per node"
            wall = timed(call)
            # In turn would take 3 x LATENCY; the margin is for a loaded machine.
            assert wall < 2.2 * LATENCY, f"{name} took {wall * 1000:.0f} ms: not in parallel"
        assert sync_store.fetch(identifiers) == loop.run_until_complete(
            async_store.afetch(identifiers)
        ), "both stores read the same tokens"
    finally:
        sync_client.close()
        loop.run_until_complete(async_client.aclose())


def test_a_node_that_lost_its_data_changes_the_keys_of_its_own_rows_only(
    cluster: LocalCluster, observer: ClusterObserver, open_store: OpenStore
) -> None:
    """FLUSHALL of one primary (its data lost, as a restart without persistence would):
    the rows it serves get new tokens, never an old one; the other nodes' keep theirs."""
    identifiers = one_per_node(cluster, count=4)
    store = open_store(cluster.url)
    before = store.fetch(identifiers)
    flushed = cluster.owner(key_slot(identifiers[0]))
    client = flushed.client()
    try:
        command(client, "FLUSHALL")
    finally:
        client.close()
    after = store.fetch(identifiers)
    for identifier, old, new in zip(identifiers, before, after, strict=True):
        if cluster.owner(key_slot(identifier)) is flushed:
            assert new != old, f"{identifier}: a new token"
        else:
            assert new == old, f"{identifier}: untouched"
    assert store.fetch(identifiers) == after


def test_a_key_prefix_with_a_hash_tag_keeps_every_token_on_one_node(
    cluster: LocalCluster, observer: ClusterObserver, open_store: OpenStore
) -> None:
    """``key_prefix="{shop}:"`` puts all of a store's tokens in one slot: a key naming
    rows of any table is then one script call on one node (the trade-off: that node
    holds and serves every token)."""
    store = open_store(cluster.url, key_prefix="{shop}:")
    identifiers = one_per_node(cluster, count=5)
    keys = ["{shop}:" + identifier for identifier in identifiers]
    assert len({key_slot(key) for key in keys}) == 1
    store.fetch(identifiers)
    store.bump(identifiers)  # both scripts loaded
    with RoundTrips() as trips:
        tokens = store.fetch(identifiers)
    assert trips.count == 1, "one request, to one node"
    assert [token.split("@")[0] for token in tokens] == [
        value.decode() for value in observer.mget(keys)
    ]
    with RoundTrips() as trips:
        store.bump(identifiers)
    assert trips.count == 1
    assert store.fetch(identifiers) != tokens, "bumped"


# -- durable mode -----------------------------------------------------------------------------


def test_durable_intents_live_on_one_slot_and_a_dead_writers_intent_is_recovered_on_every_node(
    cluster: LocalCluster, observer: ClusterObserver, open_store: OpenStore
) -> None:
    """The intents and their data share the ``{intents}`` hash tag: every intent call is
    one script call on one node. A writer that dies after recording its intent has its
    bump made by another store after the lease, on every node its rows live on."""
    identifiers = one_per_node(cluster, count=2)
    writer = open_store(cluster.url, durable=True, lease=0.2)
    reader = open_store(cluster.url, durable=True, lease=0.2)
    before = reader.fetch(identifiers)
    intent = writer.intend(identifiers)
    assert intent is not None
    assert key_slot("alkey:{intents}") == key_slot("alkey:{intents}:data")
    assert observer.zcard("alkey:{intents}") == 1
    writer.bump(identifiers[:2], intent=intent)  # a commit that cleared its intent
    assert observer.zcard("alkey:{intents}") == 0

    assert writer.intend(identifiers) is not None  # ... and this writer dies before its bump
    assert reader.fetch(identifiers) == reader.fetch(identifiers), "not due yet"
    reader.idle(0.25)
    after = reader.fetch(identifiers)
    assert all(old != new for old, new in zip(before, after, strict=True)), "every node bumped"
    assert observer.zcard("alkey:{intents}") == 0
    assert [token.split("@")[0] for token in after] == [
        value.decode() for value in observer.mget(identifiers)
    ], "answered after the recovery's bump"


def test_an_intent_is_not_cleared_while_a_node_its_bump_needs_is_unreachable(
    cluster: LocalCluster,
    observer: ClusterObserver,
    slow_cluster_url: Callable[[tuple[str, int]], tuple[str, int]],
) -> None:
    """The intent is what lets another process make a dead writer's bump: on a cluster
    it lives on another node than most rows, so it is cleared only once every node of the
    bump has taken it."""
    intents_node = cluster.owner(key_slot("alkey:{intents}"))
    other = next(node for node in cluster.primaries() if node.port != intents_node.port)
    identifiers = [i for i in one_per_node(cluster) if cluster.owner(key_slot(i)) is other]
    proxies: dict[int, LatencyProxy] = {}

    def remap(address: tuple[str, int]) -> tuple[str, int]:
        if address[1] != other.port:
            return address
        proxy = proxies.setdefault(other.port, LatencyProxy(other.port))
        return (address[0], proxy.port)

    client = cluster_client(cluster.url, remap=remap, timeout=0.3)
    store = RedisTokenStore(client, durable=True, lease=60, retry_interval=60)
    try:
        store.fetch(identifiers)
        intent = store.intend(identifiers)
        assert intent is not None
        proxies[other.port].cut(refuse=True)
        store.bump(identifiers, intent=intent)
        assert store.pending == set(identifiers), "the bump is kept for the replay"
        assert observer.zcard("alkey:{intents}") == 1, "and the intent stays for a claimer"
    finally:
        client.close()
        for proxy in proxies.values():
            proxy.close()


def test_an_intent_is_not_cleared_when_its_bump_meets_a_half_moved_slot_on_the_intents_node() -> (
    None
):
    """Same node, yet the bump can fail where the clear succeeds: a slot of the bump's
    keys half moved (``TRYAGAIN``). The clear waits for every bump call, on every node."""
    with LocalCluster(3, 0) as own:
        intents_node = own.owner(key_slot("alkey:{intents}"))
        tag = next(f"t{n}" for n in range(10_000) if own.owner(key_slot(f"t{n}")) is intents_node)
        identifiers = [f"alkey:users#{{{tag}}}1", f"alkey:users#{{{tag}}}2"]
        slot = key_slot(identifiers[0])
        target = next(node for node in own.primaries() if node is not intents_node)
        client = cluster_client(own.url, timeout=2)
        store = RedisTokenStore(client, durable=True, lease=60, retry_interval=60)
        with intents_node.client() as source, target.client() as destination:
            try:
                store.fetch(identifiers)
                intent = store.intend(identifiers)
                assert intent is not None
                command(destination, "CLUSTER", "SETSLOT", slot, "IMPORTING", intents_node.node_id)
                command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
                command(
                    source, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", identifiers[0]
                )
                store.bump(identifiers, intent=intent)
                assert store.pending == set(identifiers), "the bump failed: kept for the replay"
                assert source.zcard("alkey:{intents}") == 1, "and the intent stays for a claimer"
            finally:
                client.close()


def test_a_fetch_behind_a_bump_never_answers_the_pre_bump_token_when_a_node_forgot_a_script(
    cluster: LocalCluster, observer: ClusterObserver
) -> None:
    """A node that forgot one script (restart, ``SCRIPT FLUSH``) answers ``NOSCRIPT`` to
    the bump and runs the fetch behind it: sending only the bump again would run it after
    the fetch, whose token would be the one the bump replaced."""
    from alkey.scripts import BUMP, FETCH, ScriptCalls

    client = cluster_client(cluster.url)
    store = RedisTokenStore(client)
    identifier = "alkey:users#1"
    try:
        store.fetch([identifier])
        store.bump([identifier])  # the transport knows both scripts are on the node
        node = client.get_node_from_key(identifier)  # type: ignore[no-untyped-call]
        calls = ScriptCalls(clustered=True)
        with cluster.node_at(node.port).client() as admin:
            admin.script_flush()
            admin.script_load(FETCH.source)  # another process fetched since: FETCH only
        transport: Any = store.transport
        assert transport._node_scripts[node.name] >= {BUMP.sha, FETCH.sha}
        results = transport.run([*calls.bump([identifier]), *calls.fetch([identifier], ())])
        [fetched] = calls.tokens(results, [identifier])
        assert observer.mget([identifier]) == [fetched.rpartition("@")[0].encode()], (
            "the fetch ran after the bump: it answers the token Redis now holds"
        )
    finally:
        client.close()


def test_a_hung_node_costs_a_call_one_socket_timeout_whatever_the_rows_on_it() -> None:
    """redis-py would send each call of a node that did not answer again, one after the
    other, a socket timeout each: a bump of 30 rows would block a commit for 30 timeouts."""
    with LocalCluster(3, 0) as own:
        victim = own.primaries()[0]
        rows = [f"alkey:users#{n}" for n in range(400)]
        on_victim = [row for row in rows if own.owner(key_slot(row)) is victim][:30]
        assert len(on_victim) == 30
        client = cluster_client(own.url, timeout=0.5)
        store = RedisTokenStore(client, retry_interval=60)
        try:
            store.fetch(on_victim)
            assert victim.process is not None
            victim.process.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            store.bump(on_victim)
            took = time.monotonic() - started
            assert store.pending == set(on_victim), "kept for the replay"
            assert took < 1.5, f"{took:.1f} s: one timeout (0.5 s), not one per row"
        finally:
            if victim.process is not None:
                victim.process.send_signal(signal.SIGCONT)
            client.close()


def test_threads_beyond_a_cluster_pools_size_never_get_an_exception_or_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """More threads than connections: redis-py's cluster pipeline would read the topology
    again on an exhausted pool, dropping connections other threads read from. alkey lets
    no more of its calls run at once than a node's pool has connections; the others wait
    for one, or go without Redis for that call alone -- never an outage, never an error."""
    errors: list[BaseException] = []
    calls = 0
    with LocalCluster(3, 0) as own:
        client = cluster_client(own.url, max_connections=2)
        store = RedisTokenStore(client, retry_interval=0.5)
        stop = time.monotonic() + 4

        def work(first: int) -> None:
            nonlocal calls
            rows = [f"alkey:users#{n}" for n in range(first, first + 30)]
            try:
                while time.monotonic() < stop:
                    store.fetch(rows)
                    calls += 1
            except BaseException as error:  # any escape is the failure
                errors.append(error)

        with caplog.at_level(logging.WARNING, logger="alkey"):
            threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        client.close()
    assert errors == []
    assert "Redis unavailable" not in caplog.text, "an exhausted pool is no outage"
    assert calls > 100


# -- resharding -------------------------------------------------------------------------------


def test_fetches_and_bumps_while_a_slot_moves_follow_ask_and_moved_and_never_revert(
    kind: StoreKind, loop: asyncio.AbstractEventLoop
) -> None:
    """A slot moves to another primary, key by key (``MIGRATING``/``IMPORTING``, as
    ``redis-cli --cluster reshard`` does), while the store fetches and bumps its rows: the
    calls follow ``ASK`` while it moves and ``MOVED`` after; a call that meets the slot
    half moved (``TRYAGAIN``) degrades to a miss, its bump kept. No token replaced by a
    bump ever comes back, and once moved the tokens are the ones that moved along."""
    with LocalCluster(3, 0) as own:
        looking = ClusterObserver(own)
        store = kind.open(own.url, loop, {"retry_interval": 0.05})
        try:
            slot = key_slot("alkey:orders#0")
            identifiers = in_slot(slot, 40)
            source = own.owner(slot)
            target = next(node for node in own.primaries() if node.port != source.port)
            #: The tokens each identifier had before a bump replaced them: never again.
            replaced: dict[str, set[str]] = {identifier: set() for identifier in identifiers}

            def never_replaced(tokens: list[str]) -> None:
                for identifier, token in zip(identifiers, tokens, strict=True):
                    assert token not in replaced[identifier], f"{identifier} reverted"

            moving = threading.Thread(
                target=own.migrate_slot,
                args=(slot, target),
                kwargs={"between": lambda: time.sleep(0.01), "batch": 4},
            )
            current = store.fetch(identifiers)
            answers = {"tokens": 0, "misses": 0}
            moving.start()
            while moving.is_alive() or answers["tokens"] + answers["misses"] < 5:
                tokens = store.fetch(identifiers)
                never_replaced(tokens)
                answers["tokens" if tokens == current else "misses"] += 1
                for identifier, token in zip(identifiers[::3], tokens[::3], strict=True):
                    replaced[identifier].add(token)
                store.bump(identifiers[::3])
                current = store.fetch(identifiers)
                never_replaced(current)
            moving.join()
            assert own.owner(slot).port == target.port
            assert store.wait_replayed(timeout=5)
            deadline = time.monotonic() + 5
            while (settled := store.fetch(identifiers)) != store.fetch(identifiers):
                assert time.monotonic() < deadline, "the tokens never settled"
                store.idle(0.05)  # a recovery window, if a call met the slot half moved
            never_replaced(settled)
            raw = looking.mget(identifiers)
            assert [token.split("@")[0] for token in settled] == [
                value.decode() for value in raw
            ], "the tokens moved along with the slot"
            assert answers["tokens"] > 0, "the store kept answering tokens during the move"
        finally:
            store.close()
            looking.close()


# -- failover ---------------------------------------------------------------------------------


def test_a_primary_failover_degrades_to_misses_keeps_bumps_and_keys_never_revert(
    kind: StoreKind, loop: asyncio.AbstractEventLoop
) -> None:
    """SIGKILL a primary: until its replica takes over (``cluster-node-timeout``), calls
    degrade -- misses, bumps kept -- and, under ``on_error="raise"``, raise
    :class:`TokenStoreUnavailableError`; after it, the kept bumps are replayed and no key
    comes back to a value from before a bump."""
    with LocalCluster(3, 1, node_timeout=1000) as own:
        store = kind.open(own.url, loop, {"retry_interval": 0.1})
        raising = kind.open(own.url, loop, {"on_error": "raise", "retry_interval": 0.1})
        try:
            identifiers = one_per_node(own, count=3)
            seen: dict[str, set[str]] = {identifier: set() for identifier in identifiers}

            def remember(tokens: list[str]) -> None:
                for identifier, token in zip(identifiers, tokens, strict=True):
                    seen[identifier].add(token)

            remember(store.fetch(identifiers))
            store.bump(identifiers)
            before = store.fetch(identifiers)
            remember(before)
            victim = own.owner(key_slot(identifiers[0]))
            replica = own.replica_of(victim)
            own.kill(victim)

            with pytest.raises(RedisError) as raised:
                raising.fetch(identifiers)
            assert isinstance(raised.value, TokenStoreUnavailableError), repr(raised.value)
            assert raised.value.__cause__ is not None

            store.bump(identifiers)  # committed during the failover
            assert store.pending >= set(identifiers[:3]), "kept for the replay"
            during = store.fetch(identifiers)
            assert all(
                token not in seen[identifier]
                for identifier, token in zip(identifiers, during, strict=True)
            ), "misses during the failover, never a stale hit"

            deadline = time.monotonic() + 20
            while True:
                # Mid-failover a node may list the slot as nobody's, or not answer yet.
                with contextlib.suppress(RedisError, LookupError):
                    if own.owner(key_slot(identifiers[0])).port == replica.port:
                        break
                assert time.monotonic() < deadline, "the replica never took over"
                store.idle(0.1)
            assert store.wait_replayed(timeout=10), "the kept bumps reached the new primary"
            # The recovery window: 2 x retry_interval plus the client's socket timeout.
            store.idle(0.2 + SOCKET_TIMEOUT + 0.1)
            after = store.fetch(identifiers)
            assert after == store.fetch(identifiers), "settled"
            for identifier, token in zip(identifiers, after, strict=True):
                assert token not in seen[identifier], f"{identifier} came back to an old token"
        finally:
            store.close()
            raising.close()


def test_a_valkey_cluster_client_works_like_redis_pys_across_every_node(
    cluster: LocalCluster, observer: ClusterObserver
) -> None:
    """valkey-py's ``ValkeyCluster`` is laid out like ``RedisCluster``: the same slot split
    and per-node pipelines, and valkey's cluster errors mapped like redis-py's."""
    import valkey.backoff
    import valkey.cluster
    import valkey.exceptions
    import valkey.retry

    from alkey.transports import errors_of

    client = valkey.cluster.ValkeyCluster.from_url(  # type: ignore[no-untyped-call]
        cluster.url, socket_timeout=2, retry=valkey.retry.Retry(valkey.backoff.NoBackoff(), 0)
    )
    try:
        errors = errors_of(client)
        assert valkey.exceptions.ValkeyClusterException in errors.base
        store = RedisTokenStore(client)
        identifiers = one_per_node(cluster)
        before = store.fetch(identifiers)
        assert len({token.rpartition("@")[2] for token in before}) == 3, "one epoch per node"
        store.bump(identifiers)
        after = store.fetch(identifiers)
        assert all(a != b for a, b in zip(before, after, strict=True))
        assert [observer.mget([i])[0] for i in identifiers] == [
            token.rpartition("@")[0].encode() for token in after
        ]
    finally:
        client.close()

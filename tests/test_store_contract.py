"""The store contract: what every token store must do, run against every kind of store.

Each test runs once per entry of :data:`STORE_KINDS` -- the sync
:class:`~alkey.tokens.RedisTokenStore` (redis-py) and the
:class:`~alkey.asyncio.AsyncRedisTokenStore` (redis.asyncio, awaited on an event loop of
the test's own), each on one Redis and on a Redis Cluster (``redis.cluster.RedisCluster``
and ``redis.asyncio.cluster.RedisCluster``) -- through the same synchronous face,
:class:`StoreUnderTest`. A new kind of store (sentinel, valkey, a local cache in front)
is one more entry in :data:`tests.support.stores.STORE_KINDS`, and must pass every test
here.

Tests that stop, restart or flush a server use a redis-server of their own
(``private_redis``); the others use the session's, on a database emptied for the test.
For the cluster kinds, the server is a cluster of three primaries
(:class:`tests.support.cluster.LocalCluster`): the module's, emptied for the test, or one
of the test's own. What a test does to "the server" it does to the whole cluster --
``FLUSHALL``, ``SCRIPT FLUSH``, ``SAVE``, stop and start every node -- and what it counts
is counted per node: a call costs one round trip per node it touches (made at the same
time), and each node that forgot the scripts answers ``NOSCRIPT`` once (:func:`nodes`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis
from redis.exceptions import RedisError

import alkey.errors
from alkey.constants import DEFAULT_TOKEN_TTL
from alkey.observers import StoreObserver
from alkey.testing import EmbeddedRedis, RoundTrips
from alkey.tokens import CLAIM_LIMIT, RedisClient
from alkey.transports import errors_of

from .support import stores
from .support.cluster import (
    CLUSTER_KINDS,
    NO_CLUSTER,
    AsyncClusterStore,
    ClusterObserver,
    LocalCluster,
    SyncClusterStore,
)
from .support.inspection import command_calls, one_incident, stored
from .support.stores import SOCKET_TIMEOUT, OpenStore, StoreKind, StoreUnderTest

#: Every kind of store the contract runs against: one Redis, and a Redis Cluster.
STORE_KINDS = [*stores.STORE_KINDS, *CLUSTER_KINDS]


A, B, C = "alkey:users#1", "alkey:users#2", "alkey:orders#1"
INTENTS, INTENT_DATA = "alkey:{intents}", "alkey:{intents}:data"
#: A short lease, so that an intent nobody cleared falls due within the test.
LEASE = 0.2


@pytest.fixture(
    params=[
        pytest.param(
            kind,
            marks=pytest.mark.skipif(
                kind in CLUSTER_KINDS and NO_CLUSTER is not None,
                reason=f"no Redis Cluster: {NO_CLUSTER}",
            ),
        )
        for kind in STORE_KINDS
    ],
    ids=lambda kind: kind.name,
)
def kind(request: pytest.FixtureRequest) -> StoreKind:
    store_kind: StoreKind = request.param
    return store_kind


def clustered(kind: StoreKind) -> bool:
    return kind in CLUSTER_KINDS


def nodes(store: StoreUnderTest, *identifiers: str) -> int:
    """How many nodes a call of ``store`` naming ``identifiers`` goes to: its round trips,
    all made at once (1 on one Redis)."""
    if isinstance(store, SyncClusterStore | AsyncClusterStore):
        return store.nodes(identifiers)
    return 1


@pytest.fixture(scope="module")
def module_cluster() -> Iterator[LocalCluster]:
    """The cluster of the cluster kinds' tests that do not stop or restart it."""
    with LocalCluster(3, 0) as cluster:
        yield cluster


@pytest.fixture
def redis_url(redis_url: str, kind: StoreKind, request: pytest.FixtureRequest) -> str:
    """The test's Redis: the session's, or for a cluster kind the module's cluster."""
    if clustered(kind):
        cluster: LocalCluster = request.getfixturevalue("module_cluster")
        return cluster.url
    return redis_url


@pytest.fixture
def redis_client(kind: StoreKind, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A client of the test's Redis, emptied: for a cluster kind, one that asks each key's
    node, and every primary for the rest (:class:`ClusterObserver`)."""
    if not clustered(kind):
        yield request.getfixturevalue("redis_client")
        return
    observer = ClusterObserver(request.getfixturevalue("module_cluster"))
    observer.flushall()
    yield observer
    observer.close()


@pytest.fixture
def private_redis(kind: StoreKind) -> Iterator[EmbeddedRedis | LocalCluster]:
    """A redis-server of this test's own, to flush, stop and restart (a cluster kind: a
    cluster of its own, of three primaries, whose nodes stop and start together)."""
    with LocalCluster(3, 0) if clustered(kind) else EmbeddedRedis() as server:
        yield server


@pytest.fixture
def observer(private_redis: EmbeddedRedis | LocalCluster) -> Iterator[Any]:
    """A plain client of ``private_redis``, to look at what the store left there."""
    if isinstance(private_redis, LocalCluster):
        looking = ClusterObserver(private_redis)
        yield looking
        looking.close()
        return
    client: RedisClient = redis.Redis.from_url(private_redis.url, socket_timeout=2)
    yield client
    client.close()


def settled(store: StoreUnderTest, identifiers: list[str]) -> list[str]:
    """The tokens once two fetches in a row agree (after a restart: once the store's
    recovery window has passed)."""
    deadline = time.monotonic() + 5
    while (tokens := store.fetch(identifiers)) != store.fetch(identifiers):
        assert time.monotonic() < deadline, "the tokens never settled"
        store.idle(0.05)
    return tokens


def noscript_answers(client: RedisClient) -> int:
    """How many times the server has answered NOSCRIPT since it started."""
    errors: dict[str, Any] = client.info("errorstats")
    return int(errors.get("errorstat_NOSCRIPT", {}).get("count", 0))


def decoded(values: list[Any]) -> list[str | None]:
    return [None if value is None else value.decode() for value in values]


def kept(tokens: list[str]) -> list[str | None]:
    """What Redis holds for fetched tokens (see :func:`stored`)."""
    return [stored(token).decode() for token in tokens]


# -- fetch and bump -------------------------------------------------------------------------


def test_fetch_answers_one_token_per_identifier_in_order_and_the_same_ones_next_time(
    open_store: OpenStore, redis_url: str, redis_client: RedisClient
) -> None:
    store = open_store(redis_url)
    tokens = store.fetch([A, B, C])
    assert len(set(tokens)) == 3, "one token per identifier"
    assert store.fetch([C, A, B]) == [tokens[2], tokens[0], tokens[1]], "in the order asked"
    assert store.fetch([B]) == [tokens[1]]
    assert store.fetch([]) == []
    assert decoded(redis_client.mget([A, B, C])) == kept(tokens), "kept in Redis, by identifier"
    assert open_store(redis_url).fetch([A, B, C]) == tokens, "another process sees them"

    many = [f"alkey:orders#{n}" for n in range(2500)]  # several script calls, one round trip
    with RoundTrips() as trips:
        fetched = store.fetch(many)
    assert trips.count == nodes(store, *many), "one round trip (per node of a cluster)"
    assert kept(fetched) == decoded(redis_client.mget(many))
    assert store.fetch(many[::-1]) == fetched[::-1]


class _Misses(StoreObserver):
    """Counts the fetches that missed Redis (and so answered fresh tokens of their own)."""

    def __init__(self) -> None:
        self.count = 0

    def fetched(self, *, identifiers: Sequence[str], missed: bool) -> None:
        self.count += missed


def test_concurrent_fetches_of_new_identifiers_all_answer_the_tokens_created_first(
    open_store: OpenStore, redis_url: str, redis_client: RedisClient
) -> None:
    """Creating a missing token is atomic: the threads (or tasks) racing to create it
    agree on the one Redis keeps, whoever won.

    A racer that times out on a very loaded machine (the clients wait SOCKET_TIMEOUT)
    misses Redis and answers fresh tokens of its own -- by design, and no disagreement
    about Redis's. Such a round proves nothing either way, so it is run again on new
    identifiers; five rounds in which every racer reached Redis must agree.
    """
    misses = _Misses()
    store = open_store(redis_url, retry_interval=0, observers=[misses])
    other = open_store(redis_url, retry_interval=0, observers=[misses])
    store.fetch_concurrently(["alkey:warm#1"], 16)  # open the racers' connections first
    other.fetch_concurrently(["alkey:warm#1"], 4)
    clean = 0
    for round_number in range(40):
        missed_before = misses.count
        identifiers = [f"alkey:race{round_number}#{n}" for n in range(50)]
        answers = store.fetch_concurrently(identifiers, 16)
        answers += other.fetch_concurrently(identifiers, 4)
        if misses.count > missed_before:
            store.idle(2 * SOCKET_TIMEOUT)  # past the recovery window the miss opened
            continue
        assert all(answer == answers[0] for answer in answers)
        assert kept(answers[0]) == decoded(redis_client.mget(identifiers))
        assert len(set(answers[0])) == len(identifiers)
        clean += 1
        if clean == 5:
            break
    assert clean == 5, f"only {clean} of 40 rounds reached Redis without a timeout"


def test_bump_gives_each_identifier_a_new_token_and_leaves_the_others_alone(
    open_store: OpenStore, redis_url: str, redis_client: RedisClient
) -> None:
    store = open_store(redis_url)
    seen: dict[str, set[str]] = {A: set(), B: set(), C: set()}
    for identifier, token in zip([A, B, C], store.fetch([A, B, C]), strict=True):
        seen[identifier].add(token)
    for _ in range(3):
        unchanged = store.fetch([C])
        store.bump([A, B])
        tokens = store.fetch([A, B, C])
        assert tokens[0] not in seen[A], "a new token"
        assert tokens[1] not in seen[B], "a new token"
        assert [tokens[2]] == unchanged, "the identifier not bumped keeps its token"
        seen[A].add(tokens[0])
        seen[B].add(tokens[1])
    assert decoded(redis_client.mget([A, B, C])) == kept(tokens)

    store.bump(["alkey:users#9"])  # never fetched: created by the bump
    assert kept(store.fetch(["alkey:users#9"])) == decoded(redis_client.mget(["alkey:users#9"]))
    store.bump([])  # nothing to do, and no error


def test_tokens_are_random_and_lost_ones_never_come_back_as_an_old_token(
    open_store: OpenStore, private_redis: EmbeddedRedis, observer: RedisClient
) -> None:
    """Tokens lost to FLUSHALL or to a restart without persistence are created anew, at
    random: keys built before the loss never come back (a counter would repeat them)."""
    store = open_store(private_redis.url, retry_interval=0)
    identifiers = [A, B, C]
    generations = [settled(store, identifiers)]
    observer.flushall()
    generations.append(settled(store, identifiers))
    private_redis.stop()
    private_redis.start()  # empty: it saves nothing
    generations.append(settled(store, identifiers))
    tokens = [token for generation in generations for token in generation]
    assert len(set(tokens)) == len(tokens), "never an old token again, for any identifier"
    assert all(len(token) >= 22 for token in tokens), "128 random bits at least"


def test_a_server_that_forgot_its_scripts_costs_one_more_round_trip_once_and_no_error(
    open_store: OpenStore, private_redis: EmbeddedRedis, observer: RedisClient
) -> None:
    """After SCRIPT FLUSH (or a restart) Redis answers NOSCRIPT to a script's SHA: the store
    sends the script's source and carries on, within the same call."""
    store = open_store(private_redis.url)
    tokens = store.fetch([A, B])  # sends the script's source (EVAL), which loads it
    store.bump([C])
    per_call = nodes(store, A, B) + nodes(store, C)  # one round trip a call, on one Redis
    with RoundTrips() as warm:
        assert store.fetch([A, B]) == tokens
        store.bump([C])
    assert warm.count == per_call, "one round trip a call"

    observer.script_flush()
    with RoundTrips() as fetch_after_flush:
        assert store.fetch([A, B]) == tokens, "the same tokens: nothing was lost"
    with RoundTrips() as bump_after_flush:
        store.bump([C])
    with RoundTrips() as after:
        assert store.fetch([A, B]) == tokens
        store.bump([C])
    assert fetch_after_flush.count == 2 * nodes(store, A, B), "NOSCRIPT, then the source"
    # The store knows the server forgot: the source at once. (A cluster's scripts are
    # known per node: C's node, if another, answers NOSCRIPT once itself.)
    told = nodes(store, A, B, C) == nodes(store, A, B)
    assert bump_after_flush.count == nodes(store, C) * (1 if told else 2)
    assert after.count == per_call, "and one round trip a call again"
    assert noscript_answers(observer) == nodes(store, A, B, C), "one NOSCRIPT answer a node"


def test_the_ttl_and_key_prefix_options_show_on_the_redis_keys(
    open_store: OpenStore, redis_url: str, redis_client: RedisClient
) -> None:
    store = open_store(redis_url, ttl=120, key_prefix="shop:", durable=True, lease=60)
    [token] = store.fetch([A])
    assert redis_client.get(f"shop:{A}") == stored(token)
    assert 110 < redis_client.ttl(f"shop:{A}") <= 120
    redis_client.expire(f"shop:{A}", 5)
    store.bump([A])
    assert 110 < redis_client.ttl(f"shop:{A}") <= 120, "a bump sets the ttl again"
    intent = store.intend([B])
    assert redis_client.zcard(f"shop:{INTENTS}") == 1, "intents are prefixed too"
    store.bump([B], intent=intent)
    assert redis_client.zcard(f"shop:{INTENTS}") == 0
    keys = set(decoded(redis_client.keys("*")))
    assert keys == {f"shop:{A}", f"shop:{B}"}, "nothing written outside the prefix"

    plain = open_store(redis_url)
    [plain_token] = plain.fetch([A])
    assert plain_token != token, "another prefix, other tokens"
    assert DEFAULT_TOKEN_TTL - 10 < redis_client.ttl(A) <= DEFAULT_TOKEN_TTL


# -- outages --------------------------------------------------------------------------------


def test_an_outage_answers_misses_at_once_and_the_next_call_replays_kept_bumps_in_its_round_trip(
    open_store: OpenStore,
    private_redis: EmbeddedRedis | LocalCluster,
    observer: RedisClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # retry_interval=60: no background replay in the way, and no probe until probe_now().
    store = open_store(private_redis.url, retry_interval=60)
    [token_a, token_b] = store.fetch([A, B])
    observer.save()  # so that the restarted server reads the old tokens back
    private_redis.stop()
    with caplog.at_level(logging.INFO, logger="alkey"):
        started = time.monotonic()
        misses = [store.fetch([A])[0] for _ in range(20)]
        store.bump([B])
        assert time.monotonic() - started < 1.0, "answers at once, without waiting"
        assert token_a not in misses, "fresh tokens: misses, never a stale hit"
        assert len(set(misses)) == len(misses)
        assert store.pending == {B}, "the bump is kept"

        private_redis.start()
        assert observer.get(B) == stored(token_b), "the old token is back from disk"
        store.probe_now()  # as once retry_interval has passed
        with RoundTrips() as trips:
            store.fetch([C])
        # One round trip, the kept bump in front of the fetch -- and, the restarted server
        # having forgotten the scripts, one more after its NOSCRIPT answer. (A cluster: as
        # many per node.)
        touched, forgot = nodes(store, B, C), noscript_answers(observer)
        if isinstance(private_redis, LocalCluster):
            # Each node that had run a script forgot it; and a cluster client asks one or
            # more nodes who serves what (CLUSTER SLOTS) after a failure.
            assert forgot <= touched
            assert touched + forgot <= trips.count <= touched + forgot + 3
        else:
            assert trips.count == 1 + forgot == 2
        assert observer.get(B) not in (None, stored(token_b)), "replayed"
        assert store.pending == frozenset()
        assert store.wait_replayed(timeout=1)
    one_incident(caplog, "could not fetch tokens", "replayed 1 bump(s)")


def test_bumps_kept_during_an_outage_reach_redis_from_the_background_without_another_call(
    open_store: OpenStore, private_redis: EmbeddedRedis | LocalCluster, observer: RedisClient
) -> None:
    """Other processes must not go on using old tokens because the writer fell idle."""
    store = open_store(private_redis.url, retry_interval=0.3)
    [token] = store.fetch([B])
    observer.save()
    private_redis.stop()
    store.bump([B])
    assert store.pending == {B}
    assert not store.wait_replayed(timeout=0.2), "not while Redis is down"
    private_redis.start()
    if observer.get(B) != stored(token):
        # The replay thread, which probes every retry_interval, got there between the
        # server answering and this look (a cluster comes back node by node, and a
        # loaded machine is slow): the kept bump went out with no call of the
        # application's -- what this test is about. (That B came back from disk first
        # is then unseen; most runs see it below.)
        assert observer.get(B) is not None
        assert store.wait_replayed(timeout=1)
        return
    assert observer.get(B) == stored(token), "the old token is back from disk"
    deadline = time.monotonic() + 3
    while observer.get(B) == stored(token):
        assert time.monotonic() < deadline, "the kept bump never went out"
        store.idle(0.05)  # no call: only the store's own replay
    assert store.pending == frozenset()


def test_fetches_miss_for_a_recovery_window_after_an_outage_then_use_tokens_again(
    open_store: OpenStore, private_redis: EmbeddedRedis, observer: RedisClient
) -> None:
    """Other processes may still owe Redis the bumps of the outage: for 2 x retry_interval
    plus the client's socket timeout after it, fetches answer misses."""
    retry_interval = 0.25
    window = 2 * retry_interval + SOCKET_TIMEOUT
    store = open_store(private_redis.url, retry_interval=retry_interval)
    store.fetch([A])
    private_redis.stop()
    store.bump([B])  # kept: the store knows of the outage
    private_redis.start()
    assert store.wait_replayed(timeout=5)
    recovered = time.monotonic()
    misses = [store.fetch([A])[0] for _ in range(3)]
    assert time.monotonic() - recovered < window / 2, "the test itself was too slow"
    assert len(set(misses)) == 3, "misses..."
    assert observer.get(A) is not None, "...although Redis holds a token"
    store.idle(window - (time.monotonic() - recovered) + 0.05)
    [token] = store.fetch([A])
    assert store.fetch([A]) == [token], "then tokens again"
    assert kept([token]) == decoded([observer.get(A)]), "Redis's own"


def test_the_raise_policy_raises_a_redis_error_from_every_call_alkeys_own_with_cause(
    open_store: OpenStore, private_redis: EmbeddedRedis
) -> None:
    """``on_error="raise"``: fetch, bump and intend raise. Code written against redis-py's
    errors catches them (:class:`~redis.exceptions.RedisError`); they are alkey's own
    (:class:`~alkey.errors.TokenStoreUnavailableError` for a server that is down), with
    the client library's error as the cause."""
    store = open_store(private_redis.url, on_error="raise", durable=True, lease=LEASE)
    store.fetch([A])
    private_redis.stop()
    for call in (store.fetch, store.bump, store.intend):
        with pytest.raises(RedisError) as raised:
            call([A])
        if hasattr(alkey.errors, "TokenStoreError"):
            assert isinstance(raised.value, alkey.errors.TokenStoreUnavailableError), repr(
                raised.value
            )
            cause = raised.value.__cause__
            library = type(store.store.transport.client).__module__.partition(".")[0]
            assert type(cause).__module__.startswith(f"{library}."), "the client's own error"
            assert isinstance(cause, errors_of(store.store.transport.client).unavailable)


# -- durable mode ---------------------------------------------------------------------------


def test_intend_during_an_outage_records_nothing_and_never_raises_under_degrade(
    open_store: OpenStore, private_redis: EmbeddedRedis
) -> None:
    """An intent is recorded inside the commit: Redis being down must not break it."""
    store = open_store(private_redis.url, durable=True, lease=LEASE, retry_interval=60)
    store.fetch([A])
    private_redis.stop()
    assert store.intend([A]) is None, "Redis is down: no intent, no error"
    store.bump([A], intent=None)
    assert store.intend([A]) is None, "and while it is known down"
    assert store.pending == {A}, "the bump after the COMMIT is kept as usual"


def test_intend_records_an_intent_and_the_bump_that_carries_it_clears_it(
    open_store: OpenStore, redis_url: str, redis_client: RedisClient
) -> None:
    store = open_store(redis_url, durable=True, lease=LEASE)
    [token] = store.fetch([A])
    intent = store.intend([A, B])
    assert intent is not None
    assert redis_client.zcard(INTENTS) == 1, "recorded before the COMMIT"
    [identifiers] = decoded([redis_client.hget(INTENT_DATA, intent)])
    assert identifiers is not None
    assert set(identifiers.split("\n")) == {A, B}
    assert redis_client.get(A) == stored(token), "an intent alone bumps nothing"
    store.bump([A, B], intent=intent)
    assert redis_client.zcard(INTENTS) == 0, "cleared with the bump"
    assert redis_client.hlen(INTENT_DATA) == 0
    assert store.fetch([A]) != [token]

    assert open_store(redis_url).intend([A]) is None, "without durable mode: nothing"
    assert redis_client.zcard(INTENTS) == 0


def test_an_intent_its_writer_never_cleared_is_bumped_by_another_stores_fetch_after_the_lease(
    open_store: OpenStore, redis_url: str, redis_client: RedisClient
) -> None:
    writer = open_store(redis_url, durable=True, lease=LEASE)
    reader = open_store(redis_url, durable=True, lease=LEASE)
    [token] = reader.fetch([A])
    assert writer.intend([A]) is not None  # ... and the writer died before its bump
    assert reader.fetch([A]) == [token], "not due before the lease"
    reader.idle(LEASE + 0.05)
    [recovered] = reader.fetch([A])
    assert recovered != token, "bumped on the dead writer's behalf"
    assert decoded([redis_client.get(A)]) == kept([recovered]), "and answered after that bump"
    assert redis_client.zcard(INTENTS) == 0
    assert reader.fetch([A]) == [recovered]


def test_a_backlog_of_due_intents_is_claimed_in_batches_and_fetches_miss_until_it_is_done(
    open_store: OpenStore,
    redis_url: str,
    redis_client: RedisClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = open_store(redis_url, durable=True, lease=LEASE)
    identifiers = [f"alkey:orders#{n}" for n in range(2 * CLAIM_LIMIT + 50)]
    before = dead.fetch(identifiers)
    deadline = time.monotonic() + 10
    for identifier in identifiers:  # as many writers, each dead before its bump
        # An intent a loaded machine timed out is not recorded (intend() says None; the
        # store is then down for retry_interval): write it again, so that all are due.
        while dead.intend([identifier]) is None:
            assert time.monotonic() < deadline, "the intents could not be recorded"
            dead.idle(0.05)
    # At least one each: an intent whose reply timed out may have been recorded too.
    assert redis_client.zcard(INTENTS) >= len(identifiers), "every intent recorded"
    dead.idle(LEASE + 0.05)
    reader = open_store(redis_url, durable=True, lease=LEASE)
    claims_before = command_calls(redis_client, "zrangebyscore")
    with caplog.at_level(logging.INFO, logger="alkey"):
        for _ in range(len(identifiers)):
            [token] = reader.fetch([identifiers[-1]])
            if redis_client.zcard(INTENTS):
                assert stored(token) != redis_client.get(identifiers[-1]), "a miss meanwhile"
            else:
                break
        [token] = reader.fetch([identifiers[-1]])
    claims = command_calls(redis_client, "zrangebyscore") - claims_before
    assert claims >= math.ceil(len(identifiers) / CLAIM_LIMIT), "in batches of CLAIM_LIMIT"
    assert redis_client.zcard(INTENTS) == 0
    assert redis_client.hlen(INTENT_DATA) == 0
    assert stored(token) == redis_client.get(identifiers[-1]), "drained: real tokens again"
    after = decoded(redis_client.mget(identifiers))
    assert all(old != new for old, new in zip(before, after, strict=True)), "all bumped"
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert f"{CLAIM_LIMIT} commit(s) so far, and more are due" in messages[0]
    assert f"{len(identifiers)} in all" in messages[1]

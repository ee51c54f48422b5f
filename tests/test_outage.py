"""A Redis outage never breaks the application's database work, and loses no bump."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.embedded import EmbeddedRedis
from alkey.errors import TokenStoreUnavailableError
from alkey.identity import UNKNOWN_WRITES
from alkey.testing import LatencyProxy
from alkey.tokens import RedisClient, RedisTokenStore

from .conftest import one_incident, stored
from .models import User


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, to pause and stop."""
    with EmbeddedRedis() as server:
        yield server


def quick_client(url: str) -> RedisClient:
    client: RedisClient = redis.Redis.from_url(
        url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None
    )
    return client


@pytest.fixture
def store(private_redis: EmbeddedRedis) -> Iterator[RedisTokenStore]:
    client = quick_client(private_redis.url)
    # retry_interval=0: probe Redis on every call, so that recovery shows at once.
    yield RedisTokenStore(client, retry_interval=0)
    client.close()


@pytest.fixture
def factory(tables: Engine, store: RedisTokenStore) -> Iterator[sessionmaker[Session]]:
    factory = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(factory, tokens=store)
    yield factory
    alkey.unbind(factory)


def test_a_commit_during_an_outage_succeeds_and_its_bump_is_replayed_before_the_next_key(
    factory: sessionmaker[Session],
    store: RedisTokenStore,
    private_redis: EmbeddedRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key_generator = CacheKeyGenerator(tokens=store)
    with factory() as session:
        user = User(name="ada")
        session.add(user)
        session.commit()
        key_before = key_generator(user)

        # Stopped, then restarted from what it saved: the tokens from before the outage
        # come back, and only the kept bump can change them. (A paused server would still
        # run the bump that timed out, once resumed.)
        store.client.save()
        private_redis.stop()
        with caplog.at_level(logging.INFO, logger="alkey"):
            user.name = "grace"
            session.commit()  # must not raise
            outage_keys = {key_generator(user) for _ in range(3)}
            assert store.pending == {
                "alkey:users#1",
                "alkey:users#*",
                alkey.GLOBAL_WRITE_TOKEN,
            }
            assert key_before not in outage_keys, "during the outage every key is a miss"
            assert len(outage_keys) == 3
            private_redis.start()
            # The fetch carries the kept bumps in front, unless the store's background
            # replay got there first: either way they reach Redis before the key is made.
            key_generator(user)
            assert store.wait_replayed(timeout=5)
        # Misses go on for the recovery window: other processes may still owe bumps.
        time.sleep(store.outage.recovery_window)
        key_after = key_generator(user)
        assert key_generator(user) == key_after, "keys are stable again"
        assert key_after != key_before, "and the bump kept during the outage was not lost"

    with factory() as session:
        assert session.scalars(select(User.name)).one() == "grace"
    one_incident(caplog, "3 bump(s) kept for replay", "replayed 3 bump(s)")


def test_the_first_call_after_an_outage_carries_the_kept_bumps_in_its_round_trip(
    private_redis: EmbeddedRedis,
) -> None:
    """Not only the background replay: the next call itself sends what is owed, in front,
    so a key made after recovery never uses a token from before a write of the outage."""
    observer = quick_client(private_redis.url)
    client = quick_client(private_redis.url)
    store = RedisTokenStore(client, retry_interval=60)  # the background replay waits
    [token] = store.fetch(["alkey:users#1"])
    observer.save()
    private_redis.stop()
    store.bump(["alkey:users#1"])  # kept
    private_redis.start()  # the old token is back from disk
    assert observer.get("alkey:users#1") == stored(token)
    store.outage.probe_now()  # as once retry_interval has passed
    store.fetch(["alkey:users#2"])
    assert observer.get("alkey:users#1") not in (None, stored(token)), "sent in front"
    assert store.pending == frozenset()
    observer.close()
    client.close()


def test_a_link_cut_mid_request_costs_a_miss_or_a_kept_bump_and_never_an_exception(
    tables: Engine, private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """The requests are in flight (held 0.3 s by a proxy) when the link is reset."""
    proxy = LatencyProxy(private_redis.port, latency=0.3)
    client: RedisClient = redis.Redis.from_url(proxy.url, socket_timeout=1, retry=None)
    store = RedisTokenStore(client, retry_interval=0.5)
    key_generator = CacheKeyGenerator(tokens=store)
    observer = quick_client(private_redis.url)  # straight to Redis
    factory = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(factory, tokens=store)

    def cut_in_flight() -> threading.Thread:
        """Cut the link once the next request is held in the proxy (0.3 s before it
        would be forwarded)."""
        proxy.holding.clear()

        def cut() -> None:
            if proxy.holding.wait(timeout=5):
                proxy.cut()

        cutter = threading.Thread(target=cut)
        cutter.start()
        return cutter

    try:
        with factory() as session:
            user = User(name="ada")
            session.add(user)
            session.commit()
            key_before = key_generator(user)
            token_before = observer.get("alkey:users#1")
            with caplog.at_level(logging.INFO, logger="alkey"):
                cutter = cut_in_flight()
                user.name = "grace"
                session.commit()  # its bump is in flight when the link breaks
                cutter.join()
                assert store.pending == {
                    "alkey:users#1",
                    "alkey:users#*",
                    alkey.GLOBAL_WRITE_TOKEN,
                }
                assert observer.get("alkey:users#1") == token_before, "never arrived"
                proxy.restore()
                assert store.wait_replayed(timeout=5)
            assert observer.get("alkey:users#1") != token_before, "replayed"

            time.sleep(store.outage.recovery_window)
            key_after = key_generator(user)
            assert key_after == key_generator(user) != key_before
            with caplog.at_level(logging.INFO, logger="alkey"):
                cutter = cut_in_flight()
                assert key_generator(user) != key_after, "a fetch cut in flight is a miss"
                cutter.join()
            proxy.restore()
        with factory() as session:
            assert session.scalars(select(User.name)).one() == "grace"
    finally:
        alkey.unbind(factory)
        client.close()
        observer.close()
        proxy.close()
    failures = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(failures) == 2, "one line for each of the two cuts"
    assert all("ConnectionError" in failure for failure in failures), failures


def test_key_generation_with_redis_stopped_returns_misses_quickly(
    store: RedisTokenStore, private_redis: EmbeddedRedis
) -> None:
    key_generator = CacheKeyGenerator(tokens=store)
    key = key_generator("alkey:users#1")
    private_redis.stop()
    started = time.monotonic()
    assert key_generator("alkey:users#1") != key
    assert key_generator("alkey:users#1") != key_generator("alkey:users#1")
    assert time.monotonic() - started < 1.0, "refused connections fail fast"


def test_the_raise_policy_lets_redis_errors_through_after_the_database_commit(
    tables: Engine, private_redis: EmbeddedRedis
) -> None:
    client = quick_client(private_redis.url)
    store = RedisTokenStore(client, on_error="raise")
    factory = sessionmaker(tables)
    alkey.bind(factory, tokens=store)
    try:
        private_redis.stop()
        with pytest.raises(redis.ConnectionError):
            CacheKeyGenerator(tokens=store)("alkey:users#1")
        with factory() as session:
            session.add(User(name="ada"))
            with pytest.raises(redis.ConnectionError):
                session.commit()
            assert session.get_transaction() is None, "the session is clean after the error"
            assert session.scalars(select(User.name)).one() == "ada"
    finally:
        alkey.unbind(factory)
        client.close()


def test_outage_logs_never_contain_the_password(
    tables: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with EmbeddedRedis() as server:
        url = server.url.replace("redis://", "redis://app:s3cret-pw@")
    client = quick_client(url)  # the server is gone: connection refused
    factory = sessionmaker(tables)
    alkey.bind(factory, tokens=RedisTokenStore(client))
    try:
        with caplog.at_level(logging.DEBUG, logger="alkey"), factory() as session:
            session.add(User(name="ada"))
            session.commit()
    finally:
        alkey.unbind(factory)
        client.close()
    assert caplog.records, "the outage was logged"
    assert all("s3cret-pw" not in record.getMessage() for record in caplog.records)


def test_a_store_rejects_settings_that_cannot_work() -> None:
    client: RedisClient = redis.Redis()
    with pytest.raises(ValueError, match="token store option ttl=0 is invalid"):
        RedisTokenStore(client, ttl=0)
    with pytest.raises(ValueError, match="option on_error='ignore' is invalid: use 'degrade' or"):
        RedisTokenStore(client, on_error="ignore")  # type: ignore[arg-type]


def test_while_redis_is_known_down_calls_answer_at_once_and_recovery_is_probed(
    private_redis: EmbeddedRedis,
) -> None:
    client = quick_client(private_redis.url)  # 0.3 s socket timeouts
    store = RedisTokenStore(client, retry_interval=0.5)
    key_generator = CacheKeyGenerator(tokens=store)
    key = key_generator("alkey:users#1")
    [other_token] = store.fetch(["alkey:users#2"])
    private_redis.pause()
    try:
        started = time.monotonic()
        key_generator("alkey:users#1")  # finds out: one socket timeout
        assert time.monotonic() - started >= 0.25
        started = time.monotonic()
        for _ in range(100):
            assert key_generator("alkey:users#1") != key
            store.bump(["alkey:users#2"])
        assert (time.monotonic() - started) / 200 < 0.001, "under 1 ms a call while down"
        assert store.pending == {"alkey:users#2"}
    finally:
        private_redis.resume()
    # Past retry_interval the kept bump goes out by itself (the store's background replay).
    assert store.wait_replayed(timeout=2)
    assert client.get("alkey:users#2") not in (None, stored(other_token)), "sent"
    # For 2 x retry_interval after the outage, keys still miss: other processes may owe
    # bumps of writes they committed during it, and replay them within retry_interval.
    assert key_generator("alkey:users#1") != key
    time.sleep(store.outage.recovery_window)  # 2 x 0.5 s + the client's 0.3 s timeout
    assert key_generator("alkey:users#1") == key, "then the tokens are used again"
    client.close()


def test_two_namespaces_on_one_redis_never_see_each_others_tokens(
    redis_client: RedisClient,
) -> None:
    shop, blog = (RedisTokenStore(redis_client, key_prefix=p) for p in ("shop:", "blog:"))
    shop_key, blog_key = (CacheKeyGenerator(tokens=s)("alkey:users#1") for s in (shop, blog))
    shop.bump(["alkey:users#1"])
    assert CacheKeyGenerator(tokens=shop)("alkey:users#1") != shop_key
    assert CacheKeyGenerator(tokens=blog)("alkey:users#1") == blog_key
    assert redis_client.exists("alkey:users#1") == 0, "no unprefixed token was written"


#: The least a Redis ACL user needs for alkey: its own keys, and the commands alkey's
#: scripts and connections run. Documented in docs/operating.md.
ACL_RULES = (
    "on >s3cret-acl ~alkey:* resetchannels -@all +eval +evalsha +mget +set +ping +select +info"
)
#: What durable mode's scripts add to it.
ACL_DURABLE = "+time +zadd +zrangebyscore +zrem +hset +hget +hdel"


def test_an_acl_user_limited_to_alkey_keys_is_enough_and_its_password_never_shows(
    redis_url: str, redis_client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    rules = f"{ACL_RULES} {ACL_DURABLE}".split()
    redis_client.execute_command("ACL", "SETUSER", "alkey", *rules)  # type: ignore[no-untyped-call]
    host_port = redis_url.removeprefix("redis://")
    # On database 1: an ACL without +select fails on any database but 0.
    limited = redis.Redis.from_url(f"redis://alkey:s3cret-acl@{host_port}/1", socket_timeout=2)
    database_1 = redis.Redis.from_url(f"redis://{host_port}/1")
    database_1.flushdb()
    store = RedisTokenStore(limited, on_error="raise", durable=True, lease=0.05)
    with caplog.at_level(logging.WARNING, logger="alkey"):
        token = store.fetch(["alkey:users#1"])[0]
    assert not caplog.records, "+info shows the replication id: failovers are seen"
    assert token.rpartition("@")[2], "an epoch"
    store.bump(["alkey:users#1"], intent=store.intend(["alkey:users#1"]))
    assert store.fetch(["alkey:users#1"])[0] != token
    store.intend(["alkey:users#2"])  # never cleared: claimed and applied below
    time.sleep(0.1)
    store.fetch(["alkey:users#2"])
    assert database_1.zcard("alkey:{intents}") == 0, "claimed and cleared"
    assert database_1.exists("alkey:users#1") == 1, "on database 1"
    with pytest.raises(redis.exceptions.NoPermissionError):
        limited.set("other:key", "x")  # the ACL really limits this user
    limited.close()
    database_1.flushdb()
    database_1.close()

    wrong = redis.Redis.from_url(f"redis://alkey:wrong-pw@{host_port}", retry=None)
    with caplog.at_level(logging.DEBUG, logger="alkey"):
        key = CacheKeyGenerator(tokens=RedisTokenStore(wrong))("alkey:users#1")
    assert len(key) == 64, "a miss, not an exception"
    assert "alkey cannot use Redis at" in caplog.text, "a misconfiguration, not an outage"
    assert "refused alkey's credentials" in caplog.text
    assert "wrong-pw" not in caplog.text
    wrong.close()
    redis_client.execute_command("ACL", "DELUSER", "alkey")  # type: ignore[no-untyped-call]


def test_a_read_only_replica_makes_keys_miss_and_bumps_wait_for_replay_without_raising(
    private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failover, a client can be left talking to a replica: READONLY answers."""
    replica_args = ("--replicaof", "127.0.0.1", str(private_redis.port))
    with EmbeddedRedis(extra_args=replica_args) as replica:
        client = quick_client(replica.url)
        store = RedisTokenStore(client, retry_interval=0)
        with caplog.at_level(logging.INFO, logger="alkey"):
            key = CacheKeyGenerator(tokens=store)("alkey:users#1")
            assert CacheKeyGenerator(tokens=store)("alkey:users#1") != key, "misses"
            store.bump(["alkey:users#1"])
            assert store.pending == {"alkey:users#1"}
        client.close()
    failures = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(failures) == 1, "one log line for the incident"
    assert "ReadOnlyError" in failures[0].getMessage()


def test_past_max_pending_the_token_every_key_depends_on_is_bumped_instead(
    private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    client = quick_client(private_redis.url)
    store = RedisTokenStore(client, max_pending=2, retry_interval=0.05)
    key_generator = CacheKeyGenerator(tokens=store)
    key = key_generator("alkey:orders#9")  # a row that is not among the bumps below
    private_redis.pause()
    try:
        store.bump([f"alkey:users#{index}" for index in range(5)])
        assert len(store.pending) == 3, "two kept, and in place of the rest:"
        assert UNKNOWN_WRITES in store.pending
    finally:
        private_redis.resume()
    with caplog.at_level(logging.INFO, logger="alkey"):
        assert store.wait_replayed(timeout=5)
    time.sleep(store.outage.recovery_window)
    assert key_generator("alkey:orders#9") != key, "every key changed: nothing was lost"
    assert "bumped alkey:*#? for 3 more past max_pending" in caplog.text
    client.close()


def test_bumps_kept_in_an_idle_process_reach_redis_without_another_call(
    private_redis: EmbeddedRedis,
) -> None:
    """Other processes must not go on using old tokens because the writer fell idle."""
    writer = RedisTokenStore(quick_client(private_redis.url), retry_interval=0.1)
    other = RedisTokenStore(quick_client(private_redis.url))  # as in another process
    token = other.fetch(["alkey:users#1"])[0]
    private_redis.pause()
    try:
        writer.bump(["alkey:users#1"])  # the writer's last call for a while
    finally:
        private_redis.resume()
    deadline = time.monotonic() + 2
    while other.fetch(["alkey:users#1"])[0] == token:
        assert time.monotonic() < deadline, "the kept bump never went out"
        time.sleep(0.02)
    assert writer.pending == frozenset()


def test_tokens_evicted_under_allkeys_lru_change_keys_and_never_revert() -> None:
    """Eviction is data loss too: the key of an evicted token changes, to a new random one."""
    lru = ("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    with EmbeddedRedis(extra_args=lru) as server:
        client = quick_client(server.url)
        key_generator = CacheKeyGenerator(tokens=RedisTokenStore(client))
        keys = {key_generator("alkey:users#1")}
        for round_number in range(3):
            batch = 0
            while client.exists("alkey:users#1"):  # cache values push the token out
                assert batch < 100, "the token was never evicted"
                filler = client.pipeline(transaction=False)
                for index in range(100):
                    filler.set(f"alkey:cache:{round_number}:{batch}:{index}", "x" * 10_000)
                filler.execute()
                batch += 1
            key = key_generator("alkey:users#1")
            assert key not in keys, "a new random token: never an old key again"
            keys.add(key)
        client.close()


def test_tokens_lost_to_flushall_or_a_restart_change_keys_and_never_revert(
    private_redis: EmbeddedRedis,
) -> None:
    client = quick_client(private_redis.url)
    key_generator = CacheKeyGenerator(tokens=RedisTokenStore(client, retry_interval=0))

    def settled_key() -> str:
        """The key once it is stable again (after a restart: past the recovery window)."""
        deadline = time.monotonic() + 5
        while (key := key_generator("alkey:users#1")) != key_generator("alkey:users#1"):
            assert time.monotonic() < deadline, "keys never settled"
            time.sleep(0.05)
        return key

    keys = [settled_key()]
    client.flushall()
    keys.append(settled_key())
    private_redis.stop()
    private_redis.start()  # empty: nothing is saved
    keys.append(settled_key())
    assert len(set(keys)) == 3, "each loss gave a new random token, never an old key"
    client.close()


def test_a_server_still_loading_its_data_answers_misses_and_kept_bumps_land_once_it_is_ready(
    tables: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A restarted Redis answers LOADING while it reads its dataset back from disk; the
    tokens it reads back are the old ones, so a bump sent meanwhile must not be lost."""
    with EmbeddedRedis() as server:
        client = quick_client(server.url)
        store = RedisTokenStore(client, retry_interval=0.05)
        key_generator = CacheKeyGenerator(tokens=store)
        factory = sessionmaker(tables, expire_on_commit=False)
        alkey.bind(factory, tokens=store)
        try:
            with factory() as session:
                user = User(name="ada")
                session.add(user)
                session.commit()
                key_before = key_generator(user)

                filler = client.pipeline(transaction=False)
                for index in range(5000):  # read back at 0.2 ms a key: a second or more
                    filler.set(f"filler:{index}", index)
                filler.execute()
                client.save()
                server.stop()
                server.extra_args = (
                    "--key-load-delay", "200",
                    "--loading-process-events-interval-bytes", "1024",
                )  # fmt: skip
                server.start(loaded=False)

                def loading() -> bool:
                    return bool(client.info("persistence")["loading"])

                with caplog.at_level(logging.INFO, logger="alkey"):
                    outage_keys = {key_generator(user) for _ in range(2)}
                    user.name = "grace"
                    session.commit()  # must not raise
                    assert store.pending >= {"alkey:users#1", "alkey:users#*"}, "kept"
                    raising_client = quick_client(server.url)
                    raising = RedisTokenStore(raising_client, on_error="raise")
                    with pytest.raises(TokenStoreUnavailableError) as raised:
                        CacheKeyGenerator(tokens=raising)(user)
                    assert isinstance(raised.value.__cause__, redis.BusyLoadingError)
                    raising_client.close()
                    assert loading(), "all of the above met a server still loading"
                    assert key_before not in outage_keys, "keys miss while it loads"
                    assert len(outage_keys) == 2

                    deadline = time.monotonic() + 30
                    while loading():
                        assert time.monotonic() < deadline, "the server never finished loading"
                        time.sleep(0.02)
                    assert store.wait_replayed(timeout=5)
                time.sleep(store.outage.recovery_window)
                key_after = key_generator(user)
                assert key_after != key_before, "the bump sent while loading was not lost"
                assert key_generator(user) == key_after, "and keys are stable again"
        finally:
            alkey.unbind(factory)
            client.close()
    one_incident(caplog, "BusyLoadingError", "replayed")


def test_a_process_exiting_right_after_an_outage_sends_its_kept_bumps_on_the_way_out(
    private_redis: EmbeddedRedis,
) -> None:
    """A job whose commit met a Redis restart and that exits as soon as Redis is back --
    well within retry_interval -- must not leave the key on its old token for a day."""
    child = textwrap.dedent(
        """
        import sys, redis
        from alkey.tokens import RedisTokenStore
        client = redis.Redis.from_url(sys.argv[1], socket_timeout=0.3, retry=None)
        store = RedisTokenStore(client, retry_interval=60)  # no background probe in time
        store.bump(["alkey:users#1"])  # Redis is stopped: kept
        print(sorted(store.pending), flush=True)
        sys.stdin.readline()  # Redis is back: exit normally, at once
        """
    )
    observer = quick_client(private_redis.url)
    observer.set("alkey:users#1", "token-before-the-write")
    observer.save()
    private_redis.stop()
    job = subprocess.Popen(
        [sys.executable, "-c", child, private_redis.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert job.stdout is not None
        assert job.stdout.readline().strip() == "['alkey:users#1']"
        private_redis.start()  # reads its saved data back: the old token returns
        assert observer.get("alkey:users#1") == b"token-before-the-write"
        job.communicate("exit\n", timeout=30)
    finally:
        if job.poll() is None:  # pragma: no cover - only when an assertion failed
            job.kill()
    assert job.returncode == 0
    assert observer.get("alkey:users#1") != b"token-before-the-write"
    observer.close()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"socket_timeout": None, "retry": Retry(NoBackoff(), 0)}, ["no socket_timeout"]),
        ({"socket_timeout": 2, "retry": Retry(NoBackoff(), 3)}, ["3 retries"]),
        (
            {"socket_timeout": None, "retry": Retry(NoBackoff(), -1)},
            ["no socket_timeout", "unlimited retries"],
        ),
    ],
    ids=["no timeout", "retries", "both"],
)
def test_a_client_that_could_hold_a_commit_up_without_bound_gets_one_warning(
    private_redis: EmbeddedRedis,
    caplog: pytest.LogCaptureFixture,
    options: dict[str, object],
    named: list[str],
) -> None:
    with caplog.at_level(logging.WARNING, logger="alkey"):
        RedisTokenStore(redis.Redis(port=private_redis.port, **options))  # type: ignore[arg-type]
        RedisTokenStore(redis.Redis.from_url(private_redis.url, socket_timeout=2))
    [warning] = [record.getMessage() for record in caplog.records]
    assert all(problem in warning for problem in named), warning
    named_retries = any("retries" in problem for problem in named)
    assert ("retries (each multiplies the wait)" in warning) == named_retries
    assert "socket_timeout=2" in warning, "and it says how to fix it"

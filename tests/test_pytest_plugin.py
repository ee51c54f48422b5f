"""alkey.pytest_plugin: an application's own tests get a Redis, a flushed client and a store.

Each test here runs pytest on an application's test file in a subprocess
(``pytester.runpytest_subprocess``), the plugin loaded with ``-p alkey.pytest_plugin`` as
a user would, and reads its outcome.
"""

from __future__ import annotations

import textwrap

import pytest

from .support.docs import docs_page, python_blocks

pytest_plugins = ["pytester"]

APPLICATION_TESTS = """
import redis

from alkey.cache import CacheKeyGenerator
from alkey.tokens import RedisTokenStore, store_for

URLS = set()


def test_a_key_changes_when_its_row_is_bumped(alkey_redis_client, alkey_store):
    keys = CacheKeyGenerator(tokens=alkey_store)
    key = keys("alkey:users#1")
    assert keys("alkey:users#1") == key
    alkey_store.bump(["alkey:users#1"])
    assert keys("alkey:users#1") != key
    assert alkey_redis_client.exists("alkey:users#1")
    assert store_for(alkey_redis_client) is alkey_store
    alkey_redis_client.set("left-over", "x")


def test_each_test_starts_on_an_empty_database(alkey_redis, alkey_redis_client):
    URLS.add(alkey_redis)
    assert alkey_redis_client.dbsize() == 0
    alkey_redis_client.set("left-over", "x")


def test_the_session_shares_one_server(alkey_redis, alkey_redis_client):
    URLS.add(alkey_redis)
    assert len(URLS) == 1
    assert alkey_redis_client.dbsize() == 0
    assert alkey_redis_client.ping()


def test_a_private_server_can_be_stopped_and_keys_miss_meanwhile(
    alkey_redis, alkey_private_redis
):
    assert alkey_private_redis.url != alkey_redis, "not the session's server"
    client = redis.Redis.from_url(alkey_private_redis.url, socket_timeout=0.5)
    keys = CacheKeyGenerator(tokens=RedisTokenStore(client))
    key = keys("alkey:users#1")
    alkey_private_redis.stop()
    assert keys("alkey:users#1") != key
    alkey_private_redis.start()
    client.close()
"""


def test_the_plugin_gives_an_applications_tests_a_flushed_redis_a_store_and_a_private_server(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALKEY_TEST_REDIS_URL", raising=False)
    pytester.makepyfile(test_application=APPLICATION_TESTS)
    result = pytester.runpytest_subprocess("-p", "alkey.pytest_plugin", "-W", "error")
    result.assert_outcomes(passed=4)


def test_the_plugin_uses_the_redis_that_alkey_test_redis_url_names(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setenv("ALKEY_TEST_REDIS_URL", redis_url)
    pytester.makepyfile(
        test_application=textwrap.dedent(
            f"""
            def test_the_named_server(alkey_redis, alkey_redis_client):
                assert alkey_redis == {redis_url!r}
                assert alkey_redis_client.ping()
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "alkey.pytest_plugin", "-W", "error")
    result.assert_outcomes(passed=1)


def test_the_plugin_documents_its_fixtures_in_pytest_fixtures(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-p", "alkey.pytest_plugin", "--fixtures")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "alkey_redis *session*",
            "*private redis-server*",
            "alkey_redis_client*",
            "*flushed*",
            "alkey_store*",
            "alkey_private_redis*",
        ],
        consecutive=False,
    )


def test_the_readmes_pytest_example_passes_with_the_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests that the testing guide (``docs/testing.md``) shows, run as a user runs them."""
    examples = [block for block in python_blocks(docs_page("testing.md")) if "def test_" in block]
    if not examples:
        pytest.skip("docs/testing.md shows no pytest example yet")
    monkeypatch.delenv("ALKEY_TEST_REDIS_URL", raising=False)
    pytester.makepyfile(**{f"test_readme_{n}": block for n, block in enumerate(examples)})
    result = pytester.runpytest_subprocess("-p", "alkey.pytest_plugin", "-W", "error")
    result.assert_outcomes(passed=sum(block.count("def test_") for block in examples))

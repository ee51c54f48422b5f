"""The demo and the (deprecated) token command work from a fresh process, as a newcomer
runs them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from alkey.tokens import RedisClient, RedisTokenStore

from .conftest import token_keys


def run_alkey(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alkey", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.endswith("REDIS_URL")}
    env.update(extra)
    return env


def assert_demo_story(output: str) -> None:
    assert "Ada's key changed" in output
    assert "Only what changed was invalidated: Grace's profile is still a hit." in output
    assert "Ada's key is unchanged; her cached profile is still good:" in output
    assert "Grace's key unchanged, Ada's key changed:" in output
    assert "(a bug!)" not in output
    assert "CHANGED" not in output
    assert "UNCHANGED" not in output
    assert output.count("HIT") == 5
    assert output.count("MISS") == 4


def test_the_demo_runs_on_an_embedded_redis_by_default() -> None:
    result = run_alkey("demo", env=clean_env())
    assert result.returncode == 0, result.stderr
    assert "Redis:    embedded redis-server" in result.stdout
    assert_demo_story(result.stdout)


def test_the_demo_uses_redis_url_and_leaves_no_keys_behind(
    redis_url: str, redis_client: RedisClient
) -> None:
    result = run_alkey("demo", env=clean_env(REDIS_URL=redis_url))
    assert result.returncode == 0, result.stderr
    assert f"Redis:    {redis_url} (from REDIS_URL)" in result.stdout
    assert_demo_story(result.stdout)
    assert redis_client.dbsize() == 0


def test_the_token_command_is_a_deprecated_inspect_that_creates_no_token(
    redis_url: str, redis_client: RedisClient
) -> None:
    RedisTokenStore(redis_client).fetch(["alkey:users#1"])
    env = clean_env(REDIS_URL=redis_url)
    result = run_alkey("token", "alkey:users#1", "alkey:users#*", env=env)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(maxsplit=1) for line in result.stdout.splitlines())
    token, ttl = lines["alkey:users#1"].split(maxsplit=1)
    assert token.encode() == redis_client.get("alkey:users#1")
    assert ttl.startswith("ttl ")
    assert lines["alkey:users#*"] == "missing"
    assert "deprecated: use 'alkey inspect'" in result.stderr
    assert token_keys(redis_client) == {"alkey:users#1"}


@pytest.mark.parametrize("identifier", ["alkey:users", "alkey:users#%2c"])
def test_the_token_command_rejects_a_malformed_identifier(identifier: str, redis_url: str) -> None:
    result = run_alkey("token", identifier, env=clean_env(REDIS_URL=redis_url))
    assert result.returncode == 2
    assert "is not a valid alkey identifier" in result.stderr

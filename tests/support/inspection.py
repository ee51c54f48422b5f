"""What the log and Redis hold after a test: tokens, command counts, outage incidents."""

from __future__ import annotations

from typing import Any

import pytest

from alkey.tokens import RedisClient


def token_keys(client: RedisClient) -> set[str]:
    """Every token identifier present in Redis."""
    return {key.decode() if isinstance(key, bytes) else key for key in client.keys("alkey:*")}


def tokens_of(client: RedisClient, *identifiers: str) -> dict[str, Any]:
    """The raw token values of ``identifiers`` (None when missing)."""
    return dict(zip(identifiers, client.mget(identifiers), strict=True))


def stored(token: str) -> bytes:
    """What Redis holds for a token a store fetched: the token without the server's
    epoch that the store folds into it (``<stored>@<epoch>``)."""
    return token.rpartition("@")[0].encode()


def commands_processed(client: RedisClient) -> int:
    """How many commands the server has run so far (this INFO call included)."""
    stats: dict[str, Any] = client.info("stats")
    return int(stats["total_commands_processed"])


def command_calls(client: RedisClient, command: str) -> int:
    """How many times the server has run ``command`` (scripts' own calls included)."""
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command.lower()}", {}).get("calls", 0))


def set_calls(client: RedisClient) -> int:
    """How many SET commands the server has run so far."""
    return command_calls(client, "set")


def one_incident(caplog: pytest.LogCaptureFixture, down: str, recovered: str) -> None:
    """Assert that the log holds exactly one outage incident: a line when it began that
    contains ``down``, and one when it ended that contains ``recovered``."""
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert "Redis unavailable" in messages[0]
    assert down in messages[0]
    assert recovered in messages[1]

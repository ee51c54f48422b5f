"""A token store that fails inside SQLAlchemy's commit never breaks the database COMMIT.

alkey calls its store from inside the commit machinery twice: a durable store records an
intent just before the COMMIT, and a Core connection's writes are bumped from the wrapped
``do_commit`` right after it. An exception at either place would be taken for a database
error -- before the COMMIT it would abort the commit half-way -- so
:class:`alkey.transactions.inside_commit` logs it once instead. A session's own bump runs
after the COMMIT, the session clean, and raises under ``on_error="raise"``: deliberately.

The stores here are real: a RedisTokenStore whose Redis has stopped, and token stores of
our own whose calls raise.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Collection, Iterator, Sequence

import pytest
import redis
from sqlalchemy import Engine, Table, text
from sqlalchemy.orm import sessionmaker

import alkey
from alkey.testing import EmbeddedRedis
from alkey.tokens import RedisTokenStore, TokenStore, new_token

from .models import User

USERS: Table = User.__table__  # type: ignore[assignment]
#: Commits a write of user 1's name, through a bound session or a bound Core connection.
Commit = Callable[[Engine, TokenStore, str], None]


class BrokenStore:
    """A token store whose bumps fail, as a store with a bug or a dead backend would."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        return [self.tokens.setdefault(identifier, new_token()) for identifier in identifiers]

    def bump(self, identifiers: Collection[str]) -> None:
        raise RuntimeError("the store is broken")


class BrokenIntentStore:
    """A durable token store whose intents fail and whose bumps work."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.bumped: list[set[str]] = []

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        return [self.tokens.setdefault(identifier, new_token()) for identifier in identifiers]

    def intend(self, identifiers: Collection[str]) -> str | None:
        raise RuntimeError("the intent log is broken")

    def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        assert intent is None, "no intent was recorded"
        self.bumped.append(set(identifiers))


@pytest.fixture
def stopped_redis_store() -> Iterator[RedisTokenStore]:
    """A durable store raising every Redis error, on a Redis that has stopped."""
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=0.3, retry=None)
        server.stop()
        yield RedisTokenStore(client, on_error="raise", durable=True, lease=1.0)
        client.close()


def name_of_user_1(engine: Engine) -> str:
    """What another connection reads: the database COMMIT happened or not."""
    with engine.connect() as connection:
        name = connection.execute(text("SELECT name FROM users WHERE id = 1")).scalar_one()
    assert isinstance(name, str)
    return name


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.WARNING]


def commit_in_session(engine: Engine, tokens: TokenStore, name: str) -> None:
    factory = sessionmaker(engine)
    alkey.bind(factory, tokens=tokens)
    try:
        with factory() as session:
            session.get_one(User, 1).name = name
            session.commit()
    finally:
        alkey.unbind(factory)


def commit_on_connection(engine: Engine, tokens: TokenStore, name: str) -> None:
    alkey.bind_engine(engine, tokens=tokens)
    try:
        with engine.connect() as connection:
            connection.execute(USERS.update().where(USERS.c.id == 1).values(name=name))
            connection.commit()
    finally:
        alkey.unbind_engine(engine)


def test_a_session_commits_with_its_durable_stores_redis_stopped_and_raises_once_after(
    ada: Engine, stopped_redis_store: RedisTokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The intent fails inside the commit: logged at debug level only, since the bump
    after the COMMIT meets the same error and raises it (on_error="raise") -- one report."""
    with (
        caplog.at_level(logging.DEBUG, logger="alkey"),
        pytest.raises(redis.exceptions.ConnectionError),
    ):
        commit_in_session(ada, stopped_redis_store, "grace")
    assert name_of_user_1(ada) == "grace", "the database COMMIT happened"
    assert errors(caplog) == []
    [intent] = [record for record in caplog.records if record.name == "alkey.tokens"]
    assert intent.levelno == logging.DEBUG
    assert intent.getMessage().startswith("alkey could not record the bumps of a commit")


def test_a_core_commit_with_its_durable_stores_redis_stopped_commits_and_logs_one_error(
    ada: Engine, stopped_redis_store: RedisTokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="alkey"):
        commit_on_connection(ada, stopped_redis_store, "grace")  # must not raise
    assert name_of_user_1(ada) == "grace", "the database COMMIT happened"
    [error] = errors(caplog)
    assert (error.name, error.levelno) == ("alkey.connections", logging.ERROR)
    assert re.fullmatch(r"alkey could not bump \d+ token\(s\) after a COMMIT", error.getMessage())
    assert error.exc_info is not None
    assert isinstance(error.exc_info[1], redis.exceptions.ConnectionError)


def test_a_core_commit_whose_store_raises_commits_and_logs_the_failure_once(
    ada: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="alkey"):
        commit_on_connection(ada, BrokenStore(), "grace")  # must not raise
    assert name_of_user_1(ada) == "grace"
    [error] = errors(caplog)
    assert error.name == "alkey.connections"
    assert error.exc_info is not None
    assert str(error.exc_info[1]) == "the store is broken"


def test_a_session_commit_whose_store_raises_commits_before_the_bump_raises(
    ada: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's bump is the one store call outside the commit machinery: it raises,
    after the COMMIT, and is not logged as well."""
    with (
        caplog.at_level(logging.DEBUG, logger="alkey"),
        pytest.raises(RuntimeError, match="the store is broken"),
    ):
        commit_in_session(ada, BrokenStore(), "grace")
    assert name_of_user_1(ada) == "grace"
    assert errors(caplog) == []


@pytest.mark.parametrize("commit", [commit_in_session, commit_on_connection])
def test_an_intent_that_fails_is_logged_once_and_the_commit_and_its_bump_go_ahead(
    ada: Engine, caplog: pytest.LogCaptureFixture, commit: Commit
) -> None:
    store = BrokenIntentStore()
    with caplog.at_level(logging.DEBUG, logger="alkey"):
        commit(ada, store, "grace")
    assert name_of_user_1(ada) == "grace"
    [bumped] = store.bumped
    assert "alkey:users#1" in bumped
    [error] = errors(caplog)
    assert (error.name, error.levelno) == ("alkey.tokens", logging.ERROR)
    assert error.exc_info is not None
    assert str(error.exc_info[1]) == "the intent log is broken"


@pytest.mark.parametrize("commit", [commit_in_session, commit_on_connection])
def test_a_connection_whose_commit_met_a_failing_store_goes_back_to_its_pool_clean(
    ada: Engine, stopped_redis_store: RedisTokenStore, commit: Commit
) -> None:
    """Had the failure escaped before the COMMIT, SQLAlchemy would have handed the
    connection back with its transaction open; every later transaction would see it."""
    raised = commit is commit_in_session  # a session's bump raises, after the COMMIT
    with pytest.raises(redis.exceptions.ConnectionError) if raised else contextlib.nullcontext():
        commit(ada, stopped_redis_store, "grace")
    for name in ("alan", "barbara"):
        with ada.begin() as connection:
            connection.execute(USERS.update().where(USERS.c.id == 1).values(name=name))
        assert name_of_user_1(ada) == name

"""Tokens are bumped by the outermost commit, and by nothing else."""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Sequence
from typing import Any

import pytest
from sqlalchemy import Engine, Table, event, select
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import alkey
from alkey import GLOBAL_WRITE_TOKEN
from alkey.events import SESSION_EVENTS, Binding
from alkey.keys import get_token
from alkey.tokens import RedisClient, RedisTokenStore, new_token
from alkey.transactions import ChangeStack, changes_of

from .conftest import (
    KeyGenerator,
    SessionAPI,
    Sessions,
    commands_processed,
    set_calls,
    sync_session_of,
    token_keys,
    tokens_of,
)
from .models import User

# Tests that open sessions run with a Session and with an AsyncSession (see conftest).
pytestmark = pytest.mark.flavours("sync", "asyncio")

USER_1 = ("alkey:users#1", "alkey:users#*", GLOBAL_WRITE_TOKEN)


def snapshot(client: RedisClient, identifiers: tuple[str, ...] = USER_1) -> dict[str, Any]:
    """Current tokens, creating missing ones the way a reader would."""
    for identifier in identifiers:
        get_token(client, identifier)
    return tokens_of(client, *identifiers)


def changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {identifier for identifier in before if before[identifier] != after[identifier]}


def add_user(session: SessionAPI, name: str = "ada") -> User:
    user = User(name=name)
    session.add(user)
    session.commit()
    return user


@pytest.mark.parametrize("write", ["insert", "update", "delete"])
def test_a_committed_write_bumps_the_row_table_and_global_tokens(
    session: SessionAPI, redis_client: RedisClient, write: str
) -> None:
    if write != "insert":
        add_user(session)
    before = snapshot(redis_client)
    if write == "insert":
        session.add(User(id=1, name="ada"))
    elif write == "update":
        session.get_one(User, 1).name = "grace"
    else:
        session.delete(session.get_one(User, 1))
    session.commit()
    assert changed(before, snapshot(redis_client)) == set(USER_1)


def test_a_flush_neither_bumps_nor_talks_to_redis(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    user = add_user(session)
    before = snapshot(redis_client)
    user.name = "grace"
    commands = commands_processed(redis_client)
    session.flush()
    assert commands_processed(redis_client) == commands + 1  # only the INFO call itself
    assert tokens_of(redis_client, *USER_1) == before
    session.commit()
    assert changed(before, snapshot(redis_client)) == set(USER_1)


def test_a_read_only_commit_sends_nothing_to_redis(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    add_user(session)
    commands = commands_processed(redis_client)
    session.scalars(select(User)).all()
    session.get_one(User, 1).name = "ada"  # set to the same value: no net change
    session.commit()
    assert commands_processed(redis_client) == commands + 1


def test_a_rolled_back_transaction_bumps_nothing(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    user = add_user(session)
    before = snapshot(redis_client)
    user.name = "grace"
    session.add(User(name="bob"))
    session.flush()
    session.rollback()
    session.commit()
    assert tokens_of(redis_client, *USER_1) == before
    assert "alkey:users#2" not in token_keys(redis_client)


def test_a_released_savepoint_counts_at_the_outer_commit(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    user = add_user(session)
    before = snapshot(redis_client)
    with session.begin_nested():
        user.name = "grace"
    assert tokens_of(redis_client, *USER_1) == before, "nothing before the outer commit"
    session.commit()
    assert changed(before, snapshot(redis_client)) == set(USER_1)


def test_a_rolled_back_savepoint_drops_only_its_own_changes(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    add_user(session, "ada")
    add_user(session, "bob")
    identifiers = ("alkey:users#1", "alkey:users#2")
    before = snapshot(redis_client, identifiers)
    session.get_one(User, 1).name = "outer"
    session.flush()
    savepoint = session.begin_nested()
    session.get_one(User, 2).name = "inner"
    session.flush()
    savepoint.rollback()
    session.commit()
    assert changed(before, snapshot(redis_client, identifiers)) == {"alkey:users#1"}


def test_nested_savepoints_merge_upwards_and_roll_back_level_by_level(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    for name in ("a", "b", "c"):
        add_user(session, name)
    identifiers = ("alkey:users#1", "alkey:users#2", "alkey:users#3")
    before = snapshot(redis_client, identifiers)
    with session.begin_nested():
        session.get_one(User, 1).name = "level 1"
        with session.begin_nested():
            session.get_one(User, 2).name = "level 2"
        inner = session.begin_nested()
        session.get_one(User, 3).name = "level 2, rolled back"
        session.flush()
        inner.rollback()
    session.commit()
    assert changed(before, snapshot(redis_client, identifiers)) == {
        "alkey:users#1",
        "alkey:users#2",
    }


def test_a_savepoint_released_inside_a_rolled_back_transaction_bumps_nothing(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    user = add_user(session)
    before = snapshot(redis_client)
    with session.begin_nested():
        user.name = "grace"
    session.rollback()
    assert tokens_of(redis_client, *USER_1) == before


def test_closing_a_session_without_commit_bumps_nothing_and_leaves_no_residue(
    sessions: Sessions, redis_client: RedisClient
) -> None:
    """zope.sqlalchemy aborts with close(): after_transaction_end without after_rollback."""
    with sessions() as session:
        add_user(session)
    before = snapshot(redis_client)
    session = sessions()
    rollbacks: list[object] = []
    event.listen(sync_session_of(session), "after_rollback", lambda s: rollbacks.append(s))
    session.get_one(User, 1).name = "aborted"
    session.flush()
    session.close()
    assert rollbacks == [], "this path must not rely on after_rollback"
    session.get_one(User, 1)  # a new transaction on the same session object
    session.commit()
    assert tokens_of(redis_client, *USER_1) == before
    assert sync_session_of(session).info["alkey.changes"].__bool__() is False
    session.close()


def test_rows_that_were_not_written_keep_their_tokens(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    add_user(session, "ada")
    add_user(session, "bob")
    before = snapshot(redis_client, ("alkey:users#2",))
    session.get_one(User, 1).name = "grace"
    session.commit()
    assert snapshot(redis_client, ("alkey:users#2",)) == before


def test_changing_a_primary_key_bumps_the_old_and_the_new_row(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    user = add_user(session)
    identifiers = ("alkey:users#1", "alkey:users#7")
    before = snapshot(redis_client, identifiers)
    user.id = 7
    session.commit()
    assert changed(before, snapshot(redis_client, identifiers)) == set(identifiers)


def listener_counts(binding: Binding) -> dict[str, int]:
    """How many listeners a session of the bound target runs for each of alkey's events."""
    target = binding.target
    probe = target() if isinstance(target, type) else target
    assert isinstance(probe, Session)
    return {name: len(list(getattr(probe.dispatch, name))) for name in SESSION_EVENTS}


def test_a_commit_bumps_each_token_once_however_often_bind_was_called(
    sessions: Sessions, redis_client: RedisClient
) -> None:
    first = alkey.bind(sessions.target, tokens=sessions.tokens)
    listeners = listener_counts(first)
    again = alkey.bind(sessions.target)
    assert first is again
    assert first.tokens is sessions.tokens
    assert listener_counts(first) == listeners
    with sessions() as session:
        sets_before = set_calls(redis_client)
        add_user(session)
    assert set_calls(redis_client) - sets_before == len(USER_1)


def test_a_subclass_bound_as_well_as_its_base_bumps_once(
    session_factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    class AppSession(session_factory.class_):  # type: ignore[name-defined,misc]
        pass

    # A store of its own for the subclass: only the more specific binding may act.
    sub = alkey.bind(AppSession, tokens=RedisTokenStore(redis_client, key_prefix="sub:"))
    try:
        with AppSession(bind=session_factory.kw["bind"]) as session:
            sets_before = set_calls(redis_client)
            add_user(session)
        assert set_calls(redis_client) - sets_before == len(USER_1)
        assert redis_client.keys("alkey:*") == []
        assert len(redis_client.keys("sub:alkey:*")) == len(USER_1)
    finally:
        alkey.unbind(AppSession)
    assert not event.contains(AppSession, "after_flush", sub.after_flush)


@pytest.mark.parametrize("kind", ["class", "sessionmaker", "scoped_session", "instance"])
def test_bind_accepts_every_kind_of_session_target(
    tables: Any, redis_client: RedisClient, kind: str
) -> None:
    class AppSession(Session):
        pass

    factory = sessionmaker(tables, class_=AppSession)
    targets: dict[str, Any] = {
        "class": AppSession,
        "sessionmaker": factory,
        "scoped_session": scoped_session(factory),
        "instance": factory(),
    }
    target = targets[kind]
    binding = alkey.bind(target, redis_client=redis_client)
    try:
        session = target if kind == "instance" else factory()
        before = snapshot(redis_client)
        add_user(session)
        assert changed(before, snapshot(redis_client)) == set(USER_1)
        session.close()
    finally:
        alkey.unbind(target)
    assert isinstance(binding, Binding)


def test_bind_rejects_what_is_not_a_session_target() -> None:
    with pytest.raises(TypeError, match="Session class, a sessionmaker"):
        alkey.bind("Session")


def test_concurrent_sessions_in_threads_never_cancel_each_others_changes(
    session_factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    with session_factory() as session:
        for index in range(8):
            add_user(session, f"user {index}")
    identifiers = tuple(f"alkey:users#{index}" for index in range(1, 9))
    before = snapshot(redis_client, identifiers)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(user_id: int) -> None:
        try:
            barrier.wait()
            with session_factory() as session:
                session.get_one(User, user_id).name = "changed"
                session.flush()
                # Even-numbered threads roll back while odd ones commit. (SQLite
                # serialises the writers; PostgreSQL runs them side by side.)
                if user_id % 2:
                    session.commit()
                else:
                    session.rollback()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert changed(before, snapshot(redis_client, identifiers)) == {
        f"alkey:users#{index}" for index in range(1, 9, 2)
    }


def test_a_key_changes_after_commit_and_only_then(
    session: SessionAPI, key_generator: KeyGenerator
) -> None:
    user = add_user(session)
    row = f"alkey:users#{user.id}"
    key, instance_key = key_generator(row, "sidebar"), key_generator(user, "sidebar")
    assert key_generator(row, "sidebar") == key
    user.name = "grace"
    session.flush()
    # Every other reader keys on the committed row until the commit; the writer's own
    # instance already keys on its uncommitted state, a key no other reader builds.
    assert key_generator(row, "sidebar") == key
    assert key_generator(user, "sidebar") != instance_key
    session.commit()
    assert key_generator(row, "sidebar") != key


# -- the rules, written once: alkey.transactions.ChangeStack ------------------------------
#
# The tests above watch tokens in Redis; these watch what each commit *hands over* to its
# token store, through real Sessions and real Core connections on the test database, so
# that a level too many or too few shows at once. The store is a real implementation of
# the TokenStore protocol that keeps its tokens in a dict and notes each bump.


class HandoverStore:
    """A TokenStore in process memory that notes the identifiers of each bump."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.bumps: list[set[str]] = []

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        return [self.tokens.setdefault(identifier, new_token()) for identifier in identifiers]

    def bump(self, identifiers: Collection[str]) -> None:
        self.bumps.append(set(identifiers))
        self.tokens.update((identifier, new_token()) for identifier in identifiers)

    def rows(self) -> list[set[int]]:
        """The user rows of each bump (table and global tokens left out)."""
        return [
            {int(identifier.rpartition("#")[2]) for identifier in bump if ROW.fullmatch(identifier)}
            for bump in self.bumps
        ]


ROW = re.compile(r"alkey:users#\d+")

#: Steps of one transaction: ("write", row), "savepoint", "release", "rollback savepoint",
#: then the scenario ends with a commit. Each scenario with the user rows its commit bumps.
SCENARIOS: dict[str, tuple[list[Any], set[int]]] = {
    "a released savepoint joins its parent": (
        [("write", 1), "savepoint", ("write", 2), "release"],
        {1, 2},
    ),
    "a rolled-back savepoint drops only its own": (
        [("write", 1), "savepoint", ("write", 2), "rollback savepoint"],
        {1},
    ),
    "a savepoint that wrote nothing itself drops the released ones inside it": (
        [("write", 1), "savepoint", "savepoint", ("write", 2), "release", "rollback savepoint"],
        {1},
    ),
    "a write after a rolled-back inner savepoint stays with the outer one": (
        [
            "savepoint",
            ("write", 1),
            "savepoint",
            ("write", 2),
            "rollback savepoint",
            ("write", 3),
            "release",
        ],
        {1, 3},
    ),
    "sibling savepoints: one released, one rolled back": (
        [
            "savepoint",
            ("write", 1),
            "release",
            "savepoint",
            ("write", 2),
            "rollback savepoint",
            ("write", 3),
        ],
        {1, 3},
    ),
    "three levels released one by one reach the root": (
        [
            "savepoint",
            ("write", 1),
            "savepoint",
            ("write", 2),
            "savepoint",
            ("write", 3),
            "release",
            "release",
            "release",
        ],
        {1, 2, 3},
    ),
}


@pytest.fixture
def three_users(tables: Engine) -> Engine:
    with Session(tables) as session:
        session.add_all([User(id=row, name=f"user {row}") for row in (1, 2, 3)])
        session.commit()
    return tables


def run_in_session(engine: Engine, steps: list[Any], end: str) -> HandoverStore:
    store = HandoverStore()
    factory = sessionmaker(engine)
    alkey.bind(factory, tokens=store)
    try:
        with factory() as session:
            savepoints: list[Any] = []
            for step in steps:
                if step == "savepoint":
                    savepoints.append(session.begin_nested())
                elif step == "release":
                    savepoints.pop().commit()
                elif step == "rollback savepoint":
                    savepoints.pop().rollback()
                else:
                    session.get_one(User, step[1]).name = f"written {len(store.bumps)}"
                    session.flush()
            session.commit() if end == "commit" else session.rollback()
    finally:
        alkey.unbind(factory)
    return store


def run_on_connection(engine: Engine, steps: list[Any], end: str) -> HandoverStore:
    store = HandoverStore()
    alkey.bind_engine(engine, tokens=store)
    users: Table = User.__table__  # type: ignore[assignment]
    try:
        with engine.connect() as connection:
            savepoints: list[Any] = []
            for step in steps:
                if step == "savepoint":
                    savepoints.append(connection.begin_nested())
                elif step == "release":
                    savepoints.pop().commit()
                elif step == "rollback savepoint":
                    savepoints.pop().rollback()
                else:
                    connection.execute(
                        users.update().where(users.c.id == step[1]).values(name="written")
                    )
            connection.commit() if end == "commit" else connection.rollback()
    finally:
        alkey.unbind_engine(engine)
    return store


RUNNERS = {"session": run_in_session, "connection": run_on_connection}


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sessions_and_connections_hand_over_the_same_rows_once_at_the_outermost_commit(
    three_users: Engine, runner: str, scenario: str
) -> None:
    steps, committed = SCENARIOS[scenario]
    store = RUNNERS[runner](three_users, steps, "commit")
    assert store.rows() == [committed], "one bump, of exactly the surviving writes"


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sessions_and_connections_hand_over_nothing_when_the_outermost_transaction_rolls_back(
    three_users: Engine, runner: str, scenario: str
) -> None:
    steps, _ = SCENARIOS[scenario]
    assert RUNNERS[runner](three_users, steps, "rollback").bumps == []


def test_a_session_that_writes_again_after_its_commit_starts_a_fresh_stack(
    three_users: Engine,
) -> None:
    """What one transaction recorded never leaks into the next one of the same session."""
    store = HandoverStore()
    factory = sessionmaker(three_users)
    alkey.bind(factory, tokens=store)
    try:
        with factory() as session:
            savepoint = session.begin_nested()
            session.get_one(User, 1).name = "dropped"
            session.flush()
            savepoint.rollback()
            session.get_one(User, 2).name = "kept"
            session.commit()
            session.get_one(User, 3).name = "next transaction"
            session.commit()
            assert changes_of(session).__bool__() is False, "nothing left behind"
    finally:
        alkey.unbind(factory)
    assert store.rows() == [{2}, {3}]


def test_a_change_stack_merges_a_release_into_its_parent_and_a_rollback_drops_one_level() -> None:
    stack = ChangeStack()
    stack.record(["root"])
    stack.push()
    stack.record(["kept"])
    stack.push()
    stack.record(["dropped"])
    assert (stack.savepoints, stack.written()) == (2, {"root", "kept", "dropped"})
    stack.rollback()
    stack.push()
    stack.record(["released"])
    stack.release()
    assert (stack.savepoints, stack.written()) == (1, {"root", "kept", "released"})
    stack.release()
    stack.release()  # nothing open: no-op, as an unmatched RELEASE event must be
    stack.rollback()
    assert (stack.savepoints, stack.written()) == (0, {"root", "kept", "released"})
    handed_over = stack.written()
    stack.clear()
    assert (bool(stack), handed_over) == (False, {"root", "kept", "released"})

"""The shortcuts that keep alkey's CPU low give the answers of the long way round.

Each fast path here replaced a slower computation (issue #14); these tests hold it to
the slower computation's answers -- SQLAlchemy's own where it has one -- on real objects,
so that no cache-key or invalidation answer changed for speed.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    ForeignKey,
    MetaData,
    Numeric,
    String,
    event,
    select,
    text,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    InstanceState,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.orm.attributes import flag_modified, instance_state

import alkey
from alkey import identity, snapshot
from alkey._canonical import encode_arguments
from alkey.cache import CacheKeyGenerator
from alkey.scripts import FETCH, ScriptCalls
from alkey.tokens import RedisClient, RedisTokenStore
from alkey.writes import _net_change
from tests.models import Manager, User
from tests.support.inspection import stored


class Base(DeclarativeBase):
    metadata = MetaData()


class Shelf(Base):
    __tablename__ = "fast_shelves"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(50))
    books: Mapped[list[Volume]] = relationship(back_populates="shelf", order_by="Volume.id")


class Volume(Base):
    __tablename__ = "fast_volumes"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    price: Mapped[decimal.Decimal | None] = mapped_column(Numeric(10, 2))
    at: Mapped[datetime.datetime | None] = mapped_column(DateTime(timezone=True))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    shelf_id: Mapped[int | None] = mapped_column(ForeignKey("fast_shelves.id"))
    shelf: Mapped[Shelf | None] = relationship(back_populates="books")


class Pair(Base):
    """A composite key of text and integer: not the one-integer shortcut."""

    __tablename__ = "fast_pairs"
    code: Mapped[str] = mapped_column(String(20), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(String(20), default="")


@pytest.fixture
def database(tables: Engine) -> Iterator[Engine]:
    Base.metadata.drop_all(tables)
    Base.metadata.create_all(tables)
    zone = datetime.timezone(datetime.timedelta(hours=2))
    with Session(tables) as session:
        shelf = Shelf(id=1, label="top")
        session.add(shelf)
        session.add_all(
            [
                Volume(id=1, title="plain", shelf=shelf),
                Volume(id=2, title="priced", price=decimal.Decimal("9.50"), shelf=shelf),
                Volume(id=3, title="zoned", at=datetime.datetime(2024, 1, 2, 3, tzinfo=zone)),
                Volume(id=4, title="json", data={"b": [1, None], "a": "ü"}),
                Pair(code="a#b", number=1),
                Pair(code="c", number=2),
            ]
        )
        session.commit()
    yield tables
    Base.metadata.drop_all(tables)


def _loaded(session: Session) -> list[Any]:
    """Instances in every shape a key meets: plain, with non-plain values, with a loaded
    collection, of a composite key, and one whose attributes the session expired."""
    shelf = session.scalars(select(Shelf).options(selectinload(Shelf.books))).one()
    volumes = session.scalars(select(Volume).order_by(Volume.id)).all()
    pairs = session.scalars(select(Pair).order_by(Pair.number)).all()
    session.expire(volumes[0])
    return [shelf, *volumes, *pairs]


def test_instances_encoded_a_run_at_a_time_encode_as_each_one_alone(database: Engine) -> None:
    with Session(database) as session:
        instances = _loaded(session)
        states = [instance_state(instance) for instance in instances]
        snapshot.load_expired(states)
        assert identity.instance_identifiers(states) == [
            identity.instance_identifier(state) for state in states
        ]
        assert snapshot.loaded_states(states) == [snapshot.loaded_state(s) for s in states]


def test_an_expired_instance_in_a_run_is_handed_to_the_caller_to_load(
    database: Engine,
) -> None:
    with Session(database) as session:
        instances = _loaded(session)
        states = [instance_state(instance) for instance in instances]
        expired: list[Any] = []
        encoded = snapshot.loaded_states(states, expired)
        assert expired == [instance_state(instances[1])]  # the volume expired above
        assert encoded[1] == b""


def test_runs_of_instances_encode_as_the_instances_one_by_one(database: Engine) -> None:
    def one_by_one(*arguments: Any) -> list[Any]:
        chunks: list[Any] = [b"A%d[" % len(arguments)]
        for argument in arguments:
            if isinstance(argument, str):
                chunks += encode_arguments((argument,))[1:-1]
            else:
                state = instance_state(argument)
                chunks += [identity.instance_identifier(state), snapshot.loaded_state(state)]
        return [*chunks, b"]"]

    with Session(database) as session:
        instances = _loaded(session)
        snapshot.load_expired([instance_state(instance) for instance in instances])
        assert encode_arguments(tuple(instances)) == one_by_one(*instances)
        # A plain value between instances splits them into two runs.
        split = (*instances[:3], "between", *instances[3:])
        assert encode_arguments(split) == one_by_one(*split)


def test_instances_in_a_list_or_tuple_encode_as_each_one_alone_expired_ones_included(
    database: Engine,
) -> None:
    """A list of instances takes the batch path of top-level runs: the bytes are those of
    encoding each instance on its own, plain values between them split the runs, and an
    instance its session expired is loaded first (the two-pass path) all the same."""

    def one_by_one(items: list[Any] | tuple[Any, ...]) -> list[Any]:
        chunks: list[Any] = [b"l" if type(items) is list else b"(", str(len(items)).encode()]
        chunks = [chunks[0] + chunks[1] + b"["]
        for item in items:
            if isinstance(item, str):
                chunks += encode_arguments((item,))[1:-1]
            else:
                state = instance_state(item)
                chunks += [identity.instance_identifier(state), snapshot.loaded_state(state)]
        return [*chunks, b"]"]

    with Session(database) as session:
        instances = _loaded(session)  # the first volume expired: loaded by the encoding
        listed = [*instances[:3], "between", *instances[3:]]
        encoded = encode_arguments((listed, tuple(instances), "tail"))
        assert "title" in instances[1].__dict__, "the expired volume was loaded"
        expected = [b"A3[", *one_by_one(listed), *one_by_one(tuple(instances))]
        assert encoded == [*expected, *encode_arguments(("tail",))[1:-1], b"]"]


def test_a_key_changes_when_any_value_of_an_instance_in_a_run_changes(
    database: Engine, redis_client: RedisClient
) -> None:
    key = CacheKeyGenerator(redis_client)
    with Session(database) as session:
        instances = _loaded(session)
        before = key(*instances)
        volume = session.get_one(Volume, 4)
        volume.data = {"b": [1, None], "a": "u"}  # in memory only: no token changes
        assert key(*instances) != before


@pytest.mark.parametrize(
    "change",
    [
        "same_value",
        "new_value",
        "changed_back",
        "sql_expression",
        "collection_append",
        "many_to_one",
        "json_replaced_equal",
        "deleted_attribute",
        "expired_then_set_equal",
        "decimal_set_equal",
        "none_set_none",
        "flag_modified",
        "nothing",
    ],
)
def test_a_net_change_is_what_session_is_modified_says(database: Engine, change: str) -> None:
    with Session(database) as session:
        volume = session.get_one(Volume, 2)
        shelf = session.get_one(Shelf, 1)
        if change == "same_value":
            volume.title = "priced"
        elif change == "new_value":
            volume.title = "other"
        elif change == "changed_back":
            volume.title = "other"
            volume.title = "priced"
        elif change == "sql_expression":
            volume.price = Volume.price + 1
        elif change == "collection_append":
            shelf.books.append(session.get_one(Volume, 3))
        elif change == "many_to_one":
            volume.shelf = None
        elif change == "json_replaced_equal":
            volume = session.get_one(Volume, 4)
            volume.data = {"b": [1, None], "a": "ü"}  # an equal value, a new object
        elif change == "deleted_attribute":
            del volume.title
        elif change == "expired_then_set_equal":
            session.expire(volume, ["title"])
            volume.title = "priced"
        elif change == "decimal_set_equal":
            volume.price = decimal.Decimal("9.5")  # equal to the stored 9.50
        elif change == "none_set_none":
            volume.at = None
        elif change == "flag_modified":
            flag_modified(volume, "title")
        for instance in (volume, shelf):
            assert _net_change(instance_state(instance)) == session.is_modified(instance), (
                change,
                instance,
            )


def _written_the_long_way(states: list[InstanceState[Any]]) -> set[str]:
    """What writing ``states`` invalidates, by the general rule alone, without the
    one-integer-key shortcuts of :func:`alkey.identity.writes_of`: each table of the
    instance's hierarchy, and its row there under each spelling of its old key and of
    its key now (when the flush assigned or changed it); the global token."""
    identifiers: set[str] = set()
    for state in states:
        plan = identity._write_plan(state.mapper, identity.schemas_of(state))
        identifiers |= plan.table_identifiers
        key = state.key
        suffix = identity._token_suffix(key[2] if key is not None else state.identity_token)
        rows = identity._spellings(state.mapper, key[1]) if key is not None else []
        current = [state.dict.get(attribute) for attribute in plan.key_attributes]
        if any(value is not None for value in current) and (None not in current or key is not None):
            rows += identity._spellings(state.mapper, current)
        identifiers |= {prefix + row + suffix for prefix in plan.row_prefixes for row in rows}
    return identifiers | ({"alkey:*#*"} if identifiers else set())


def test_each_flush_invalidates_what_the_general_rule_names(database: Engine) -> None:
    compared: list[tuple[set[str], set[str]]] = []

    def compare(session: Session, flush_context: Any) -> None:
        states = [
            instance_state(instance)
            for instance in (*session.new, *session.dirty, *session.deleted)
        ]
        compared.append((identity.writes_of(states).identifiers(), _written_the_long_way(states)))

    with Session(database) as session:
        event.listen(session, "after_flush", compare)
        steps: list[Callable[[], object]] = [
            lambda: session.add_all([Volume(id=10, title="new"), User(name="numbered later")]),
            lambda: session.add_all([Pair(code="new", number=3), Manager(id=7, budget=3)]),
            lambda: setattr(session.get_one(Volume, 2), "title", "updated"),
            lambda: setattr(session.get_one(Volume, 3), "id", 30),  # its key changes
            lambda: setattr(session.get_one(Manager, 7), "budget", 4),
            lambda: session.delete(session.get_one(Pair, ("c", 2))),
            lambda: session.delete(session.get_one(Manager, 7)),
        ]
        for step in steps:
            step()
            session.flush()
        session.rollback()
    assert len(compared) == len(steps)
    for fast, general in compared:
        assert fast == general
    assert {"alkey:fast_volumes#10", "alkey:users#1"} <= compared[0][0]
    assert "alkey:fast_volumes#30" in compared[3][0]
    assert {"alkey:employees#7", "alkey:managers#7"} <= compared[1][0]


def test_compact_writes_name_each_written_row_as_its_key_does(database: Engine) -> None:
    with Session(database) as session:
        states = [instance_state(instance) for instance in _loaded(session)]
        written = identity.writes_of(states)
        rows = {name for name in written if name.rpartition("#")[2] not in ("*", "?")}
        assert rows == {identity.instance_identifier(state) for state in states}
        assert {"alkey:fast_volumes#*", "alkey:fast_pairs#*", "alkey:*#*"} <= written.identifiers()


def test_binding_a_session_class_whose_sessions_already_ran_covers_its_next_commit(
    database: Engine, redis_client: RedisClient
) -> None:
    made = sessionmaker(database)
    with made() as session:  # its class's binding (none) is looked up, and kept
        session.get_one(Volume, 1).title = "unbound write"
        session.commit()
    before = RedisTokenStore(redis_client).fetch(["alkey:fast_volumes#1"])
    alkey.bind(made, redis_client=redis_client)
    try:
        with made() as session:
            session.get_one(Volume, 1).title = "bound write"
            session.commit()
        after = RedisTokenStore(redis_client).fetch(["alkey:fast_volumes#1"])
        assert stored(after[0]) != stored(before[0])
    finally:
        alkey.unbind(made)
    with made() as session:
        session.get_one(Volume, 1).title = "unbound again"
        session.commit()
    assert RedisTokenStore(redis_client).fetch(["alkey:fast_volumes#1"]) == after


def test_a_read_on_a_connection_records_nothing_and_the_write_after_it_is_bumped(
    database: Engine, redis_client: RedisClient
) -> None:
    alkey.bind_engine(database, redis_client=redis_client)
    try:
        store = RedisTokenStore(redis_client)
        before = store.fetch(["alkey:fast_shelves#*"])
        with database.begin() as connection:
            connection.execute(text("SELECT label FROM fast_shelves"))
        assert store.fetch(["alkey:fast_shelves#*"]) == before
        with database.begin() as connection:
            connection.execute(text("SELECT label FROM fast_shelves"))
            connection.execute(text("UPDATE fast_shelves SET label = 'moved'"))
        assert stored(store.fetch(["alkey:fast_shelves#*"])[0]) != stored(before[0])
    finally:
        alkey.unbind_engine(database)


def test_a_token_that_holds_a_nul_byte_comes_back_whole(redis_client: RedisClient) -> None:
    redis_client.set("alkey:fast_nul#1", b"odd\x00token")
    redis_client.set("alkey:fast_nul#2", b"plain")
    results = redis_client.eval(FETCH.source, 2, "alkey:fast_nul#1", "alkey:fast_nul#2", 60, "base")
    tokens = ScriptCalls().tokens([results], ["alkey:fast_nul#1", "alkey:fast_nul#2"])
    assert [stored(token) for token in tokens] == [b"odd\x00token", b"plain"]


class _Zone(datetime.tzinfo):
    """A time zone whose repr is its name, as is: text of its own inside a row's repr."""

    def __init__(self, name: str) -> None:
        self.name = name

    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)

    def tzname(self, dt: datetime.datetime | None) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Zone {self.name}>"


def test_a_zoned_value_whose_text_mimics_the_next_argument_keeps_its_key_apart(
    database: Engine,
) -> None:
    with Session(database) as session:
        volume = session.get_one(Volume, 3)
        volume.at = datetime.datetime(2020, 1, 1, tzinfo=_Zone("a"))
        # The row's text after the zone's name, then the framing of a string argument:
        # a zone named "a" + that text would read as the first key's next argument.
        state = snapshot.loaded_state(instance_state(volume)).decode()
        rest = state[state.index("<Zone a") + len("<Zone a") :]  # ">), None, 3, ...)"
        last = "c"
        first_argument = "b" + rest + f"s{len(last)}:" + last
        first = CacheKeyGenerator().plan(volume, first_argument)
        volume.at = datetime.datetime(
            2020, 1, 1, tzinfo=_Zone("a" + rest + f"s{len(first_argument)}:b")
        )
        second = CacheKeyGenerator().plan(volume, last)
        tokens = ["token"] * len(first.identifiers)
        assert first.identifiers == second.identifiers
        assert first.finish(tokens) != second.finish(tokens)


def test_tokens_that_hold_nul_bytes_never_make_two_token_lists_share_a_key() -> None:
    plan = CacheKeyGenerator().plan("alkey:fast_nul#1", "alkey:fast_nul#2")
    extra = ["t"] * (len(plan.identifiers) - 2)
    assert plan.finish(["a\0b", "c", *extra]) != plan.finish(["a", "b\0c", *extra])
    assert plan.finish(["a", "b", *extra]) == plan.finish(["a", "b", *extra])


def test_unbinding_a_sessionmaker_lets_its_session_class_be_collected(
    database: Engine, redis_client: RedisClient
) -> None:
    import gc
    import weakref

    made = sessionmaker(database)
    alkey.bind(made, redis_client=redis_client)
    with made() as session:  # the binding of its class is looked up, and kept
        session.get_one(Volume, 1)
        session.commit()
    alkey.unbind(made)
    kind = weakref.ref(made.class_)
    del made, session
    gc.collect()
    assert kind() is None


def test_rows_with_standard_time_zones_take_the_literal_form_and_others_are_framed(
    database: Engine,
) -> None:
    with Session(database) as session:
        volume = session.get_one(Volume, 3)
        state = instance_state(volume)
        for zone in (None, datetime.timezone.utc, datetime.timezone(datetime.timedelta(hours=2))):
            volume.at = datetime.datetime(2024, 1, 2, 3, tzinfo=zone)
            assert snapshot.loaded_state(state).startswith(b"v("), zone
            assert snapshot.loaded_states([state]) == [snapshot.loaded_state(state)]
        volume.at = datetime.datetime(2024, 1, 2, 3, tzinfo=_Zone("custom"))
        assert snapshot.loaded_state(state).startswith(b"V")
        assert snapshot.loaded_states([state]) == [snapshot.loaded_state(state)]

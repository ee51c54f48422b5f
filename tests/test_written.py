"""A transaction's writes are held compactly from its flush to its commit, none lost.

Rows of integer keys are kept as numbers (:mod:`alkey.written`) and spelled out as
identifiers when the transaction hands them over: the same identifiers as before, with
each of their tokens bumped at commit, at a fraction of the memory (issue #14).

The memory bounds here (32 bytes a row) are loose on purpose: a row takes 8 to 10, and
held as strings it took 124; the rest is room for one-time allocations of alkey that a
test process shared with the whole suite may make during the measured flush (which the
warm-up keeps few), so that only a real change of what a row costs fails them.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence

import pytest
from sqlalchemy import Engine, MetaData, String, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import alkey
from alkey import catalog
from alkey.tokens import RedisClient, RedisTokenStore
from alkey.transactions import ChangeStack
from alkey.written import Written

ALKEY_FILES = tracemalloc.Filter(True, alkey.__file__.rsplit("/", 1)[0] + "/*")
PREFIX = "alkey:t#"
ROWS = 3000


class Base(DeclarativeBase):
    metadata = MetaData()


class Row(Base):
    __tablename__ = "written_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


@pytest.fixture
def database(tables: Engine) -> Iterator[Engine]:
    Base.metadata.drop_all(tables)
    Base.metadata.create_all(tables)
    with tables.begin() as connection:
        connection.execute(insert(Row), [{"id": n, "name": "x"} for n in range(1, ROWS + 1)])
    yield tables
    Base.metadata.drop_all(tables)


def _warm_up(session: Session, row: Row) -> None:
    """Writes and commits, so that alkey's one-time work is not counted as held by the
    rows written next: learning the mapper and the scripts, and the catalog's look for
    properties that other tests added to their mappers, which comes at most every
    ``PROPERTY_CHECK_INTERVAL`` -- the writes after that interval make it."""
    for value in ("warm", "warm again"):
        row.name = value
        session.commit()
        time.sleep(catalog.PROPERTY_CHECK_INTERVAL)
    row.name = "warmest"
    session.commit()


def _held_by_alkey(work: Callable[[], None]) -> tuple[int, list[str]]:
    """Bytes that alkey's own code allocated during ``work()`` and still holds, and the
    lines that hold the most (for a failure's message)."""
    gc.collect()
    tracemalloc.start(1)
    try:
        work()
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces([ALKEY_FILES])
    finally:
        tracemalloc.stop()
    top = [str(stat) for stat in snapshot.statistics("lineno")[:3]]
    return sum(trace.size for trace in snapshot.traces), top


def test_rows_held_as_numbers_are_the_same_identifiers_as_their_strings() -> None:
    compact = Written()
    compact.add_rows(PREFIX, [3, 1, 3, -2, 0])
    compact.update(["alkey:t#*"])
    spelled = {"alkey:t#3", "alkey:t#1", "alkey:t#-2", "alkey:t#0", "alkey:t#*"}
    assert compact.identifiers() == spelled
    assert (set(compact), len(compact)) == (spelled, 5)
    assert "alkey:t#1" in compact
    assert "alkey:t#2" not in compact
    merged = Written(["alkey:t#3", "alkey:u#1"])
    merged.update(compact)
    assert merged.identifiers() == spelled | {"alkey:u#1"}


def test_keys_beyond_64_bits_are_kept_as_strings_and_none_is_lost() -> None:
    keys = [7, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**100]
    written = Written()
    written.add_rows(PREFIX, keys)
    assert written.identifiers() == {f"{PREFIX}{key}" for key in keys}


def test_the_spelled_identifiers_follow_every_later_change() -> None:
    written = Written()
    written.add_rows(PREFIX, [1])
    assert written.identifiers() == {"alkey:t#1"}
    written.add_rows(PREFIX, [2])
    written.update(["alkey:t#*"])
    assert written.identifiers() == {"alkey:t#1", "alkey:t#2", "alkey:t#*"}
    other = Written()
    other.add_rows("alkey:u#", [5])
    written.update(other)
    assert "alkey:u#5" in written.identifiers()


def test_a_rolled_back_savepoint_drops_its_numbered_rows_and_keeps_the_outer_ones() -> None:
    def rows(*keys: int) -> Written:
        written = Written()
        written.add_rows(PREFIX, list(keys))
        return written

    stack = ChangeStack()
    stack.record(rows(1))
    stack.push()
    stack.record(rows(2))
    stack.push()
    stack.record(rows(3))
    stack.release()  # 3 joins the savepoint that holds 2
    assert stack.written() == {"alkey:t#1", "alkey:t#2", "alkey:t#3"}
    stack.rollback()
    assert (stack.savepoints, stack.written()) == (0, {"alkey:t#1"})


def test_a_savepoint_opened_before_any_write_rolls_back_alone() -> None:
    stack = ChangeStack()  # a Core connection's SAVEPOINT can come first
    stack.push()
    stack.record(["alkey:t#1"])
    assert (stack.savepoints, stack.written()) == (1, {"alkey:t#1"})
    stack.rollback()
    assert (stack.savepoints, stack.written(), bool(stack)) == (0, set(), False)
    stack.record(["alkey:t#2"])
    assert stack.written() == {"alkey:t#2"}


def test_what_a_stack_handed_over_stays_as_it_was_after_later_writes() -> None:
    stack = ChangeStack()
    first = Written()
    first.add_rows(PREFIX, [1])
    stack.record(first)
    handed_over = stack.written()
    more = Written()
    more.add_rows(PREFIX, [2])
    stack.record(more)
    stack.record(["alkey:t#*"])
    assert handed_over == {"alkey:t#1"}
    assert stack.written() == {"alkey:t#1", "alkey:t#2", "alkey:t#*"}


def _held_per_row_and_bumped(
    database: Engine,
    redis_client: RedisClient,
    write: Callable[[Session, Sequence[Row]], None],
    identifiers: list[str],
) -> float:
    """``write(session, rows)`` -- ending in a flush -- in a bound session, every row
    loaded and alkey warmed up first: the bytes per row that alkey still holds after it
    (the lines holding most are printed), once checked that the commit changed the token
    of each of ``identifiers``."""
    made = sessionmaker(database, expire_on_commit=False)
    alkey.bind(made, redis_client=redis_client)
    store = RedisTokenStore(redis_client)
    try:
        with made() as session:
            rows = session.scalars(select(Row)).all()
            _warm_up(session, rows[0])
            before = store.fetch(identifiers)
            held, top = _held_by_alkey(lambda: write(session, rows))
            session.commit()
        after = store.fetch(identifiers)
    finally:
        alkey.unbind(made)
    unchanged = [
        name for name, old, new in zip(identifiers, before, after, strict=True) if old == new
    ]
    assert not unchanged, f"{len(unchanged)} tokens not bumped, e.g. {unchanged[:3]}"
    print(f"held per row: {held / ROWS:.1f} B; most by {top}")
    return held / ROWS


def _row_identifiers(first: int) -> list[str]:
    return [f"alkey:written_rows#{n}" for n in range(first, first + ROWS)]


def test_a_flush_of_thousands_of_new_rows_holds_under_32_bytes_each_and_bumps_every_one(
    database: Engine, redis_client: RedisClient
) -> None:
    def insert(session: Session, rows: Sequence[Row]) -> None:
        session.add_all([Row(id=n, name="new") for n in range(ROWS + 1, 2 * ROWS + 1)])
        session.flush()

    held = _held_per_row_and_bumped(database, redis_client, insert, _row_identifiers(ROWS + 1))
    assert held < 32, f"{held:.1f} bytes per inserted row"


def test_a_flush_of_thousands_of_rows_holds_under_32_bytes_each_and_bumps_every_one(
    database: Engine, redis_client: RedisClient
) -> None:
    def update(session: Session, rows: Sequence[Row]) -> None:
        for row in rows:
            row.name = "held"
        session.flush()

    held = _held_per_row_and_bumped(database, redis_client, update, _row_identifiers(1))
    assert held < 32, f"{held:.1f} bytes per written row"


def test_writing_the_same_rows_in_many_flushes_holds_each_row_about_twice_at_most(
    database: Engine, redis_client: RedisClient
) -> None:
    flushes = 30

    def update_often(session: Session, rows: Sequence[Row]) -> None:
        for number in range(flushes):
            for row in rows:
                row.name = f"pass {number}"
            session.flush()

    held = _held_per_row_and_bumped(database, redis_client, update_often, _row_identifiers(1))
    # Kept once per flush, it would be 8 bytes a row per flush: 240 here.
    assert held < 64, f"{held:.1f} bytes per row after {flushes} flushes"

"""Every write path invalidates what it wrote, and only that.

The matrix test below runs each write path against real SQLite or PostgreSQL and records
which keys changed; the table in the write paths guide (``docs/write-paths.md``) must equal
it (set ALKEY_UPDATE_DOCS=1 to rewrite the table from a run).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    DDL,
    Column,
    Engine,
    ForeignKey,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    mapped_column,
    relationship,
    sessionmaker,
)

import alkey
from alkey.keys import CacheKeyGenerator
from alkey.sql import written_tables
from alkey.tokens import RedisClient

from .models import Employee, Manager, Tag, User
from .support.docs import DOCS

# -- models for relationships ----------------------------------------------------------------


class Base(DeclarativeBase):
    metadata = MetaData()


book_tags = Table(
    "book_tags",
    Base.metadata,
    Column("book_id", ForeignKey("books.id"), primary_key=True),
    Column("label_id", ForeignKey("labels.id"), primary_key=True),
)


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50), default="")
    author_id: Mapped[int | None] = mapped_column(ForeignKey("authors.id"))
    author: Mapped[Author | None] = relationship(back_populates="books")
    labels: Mapped[list[Label]] = relationship(secondary=book_tags, back_populates="books")


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    books: Mapped[list[Book]] = relationship(secondary=book_tags, back_populates="labels")


class Review(Base):
    """Writing a review does not touch its book: opted out per relationship."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    book_id: Mapped[int] = mapped_column(ForeignKey("books.id"))
    book: Mapped[Book] = relationship(info={"alkey_touch": False})


@pytest.fixture
def library(tables: Engine) -> Iterator[Engine]:
    Base.metadata.drop_all(tables)
    Base.metadata.create_all(tables)
    yield tables
    Base.metadata.drop_all(tables)


@pytest.fixture
def bound_engine(tables: Engine, redis_client: RedisClient) -> Iterator[Engine]:
    alkey.bind_engine(tables, redis_client=redis_client)
    yield tables
    alkey.unbind_engine(tables)


@pytest.fixture
def keys(redis_client: RedisClient) -> CacheKeyGenerator:
    return CacheKeyGenerator(redis_client)


def seed_users(factory: sessionmaker[Session]) -> None:
    with factory() as session:
        # Keys from the database's own sequence, so later inserts without keys work too.
        session.add_all([User(name="ada"), User(name="bob"), Tag(code="x")])
        session.commit()


USERS: Table = User.__table__  # type: ignore[assignment]
TAGS: Table = Tag.__table__  # type: ignore[assignment]

# -- the matrix ---------------------------------------------------------------------------

WATCHED = {
    "row 1": "alkey:users#1",
    "row 2": "alkey:users#2",
    "table users": User,
    "global": alkey.GLOBAL_WRITE_TOKEN,
    "table tags": Tag,
}


def snapshot(keys: CacheKeyGenerator) -> dict[str, str]:
    return {name: keys(target) for name, target in WATCHED.items()}


def orm_update(session: Session, engine: Engine) -> None:
    session.get_one(User, 1).name = "grace"


def bulk_update_fetch(session: Session, engine: Engine) -> None:
    session.execute(
        update(User).where(User.id == 1).values(name="grace"),
        execution_options={"synchronize_session": "fetch"},
    )


def bulk_update_evaluate(session: Session, engine: Engine) -> None:
    session.execute(update(User).where(User.id == 1).values(name="grace"))


def bulk_update_by_primary_key(session: Session, engine: Engine) -> None:
    session.execute(update(User), [{"id": 1, "name": "grace"}])


def bulk_delete_fetch(session: Session, engine: Engine) -> None:
    session.execute(
        delete(User).where(User.id == 1), execution_options={"synchronize_session": "fetch"}
    )


def bulk_insert_with_keys(session: Session, engine: Engine) -> None:
    session.execute(insert(User), [{"id": 3, "name": "cy"}])


def bulk_insert_values(session: Session, engine: Engine) -> None:
    session.execute(insert(User).values([{"name": "cy"}, {"name": "di"}]))


def core_update(session: Session, engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(USERS.update().where(USERS.c.id == 1).values(name="grace"))


def raw_update_in_session(session: Session, engine: Engine) -> None:
    session.execute(text("UPDATE users SET name = 'grace' WHERE id = 1"))


def raw_driver_sql(session: Session, engine: Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE users SET name = 'grace' WHERE id = 1")


def raw_cte_update(session: Session, engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(
                "WITH chosen AS (SELECT 1 AS id) "
                "UPDATE users SET name = 'grace' WHERE id IN (SELECT id FROM chosen)"
            )
        )


def raw_select(session: Session, engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("SELECT name FROM users"))


def ddl_alter(session: Session, engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE users ADD COLUMN nickname VARCHAR(20)"))


def orm_delete(session: Session, engine: Engine) -> None:
    session.delete(session.get_one(User, 1))


def orm_merge(session: Session, engine: Engine) -> None:
    session.merge(User(id=1, name="grace"))


def legacy_query_update(session: Session, engine: Engine) -> None:
    session.query(User).filter_by(id=1).update({"name": "grace"})


def legacy_query_delete(session: Session, engine: Engine) -> None:
    session.query(User).filter_by(id=1).delete(synchronize_session="fetch")


def bulk_update_no_sync(session: Session, engine: Engine) -> None:
    session.execute(
        update(User).where(User.id == 1).values(name="grace"),
        execution_options={"synchronize_session": False},
    )


def bulk_update_core_only(session: Session, engine: Engine) -> None:
    session.execute(
        update(User).where(User.id == 1).values(name="grace"),
        execution_options={"dml_strategy": "core_only"},
    )


def bulk_update_strategy_bulk(session: Session, engine: Engine) -> None:
    session.execute(
        update(User), [{"id": 1, "name": "grace"}], execution_options={"dml_strategy": "bulk"}
    )


def bulk_update_returning(session: Session, engine: Engine) -> None:
    session.execute(update(User).where(User.id == 1).values(name="grace").returning(User)).all()


def bulk_delete_default(session: Session, engine: Engine) -> None:
    session.execute(delete(User).where(User.id == 1))


def bulk_insert_returning(session: Session, engine: Engine) -> None:
    session.scalars(insert(User).returning(User), [{"name": "cy"}]).all()


def bulk_insert_raw(session: Session, engine: Engine) -> None:
    session.execute(insert(User).values(id=3, name="cy"), execution_options={"dml_strategy": "raw"})


def bulk_insert_orm(session: Session, engine: Engine) -> None:
    session.scalars(
        insert(User).returning(User),
        [{"id": 3, "name": "cy"}],
        execution_options={"dml_strategy": "orm"},
    ).all()


def bulk_insert_from_select(session: Session, engine: Engine) -> None:
    session.execute(insert(Tag).from_select(["code", "label"], select(User.name, User.name)))


def bulk_save_objects_update(session: Session, engine: Engine) -> None:
    user = session.get_one(User, 1)
    user.name = "grace"
    session.bulk_save_objects([user])


def bulk_save_objects_insert(session: Session, engine: Engine) -> None:
    session.bulk_save_objects([User(id=3, name="cy")])


def bulk_insert_mappings_with_keys(session: Session, engine: Engine) -> None:
    session.bulk_insert_mappings(User, [{"id": 3, "name": "cy"}])


def bulk_insert_mappings_without_keys(session: Session, engine: Engine) -> None:
    session.bulk_insert_mappings(User, [{"name": "cy"}])


def bulk_update_mappings(session: Session, engine: Engine) -> None:
    session.bulk_update_mappings(User, [{"id": 1, "name": "grace"}])


def core_executemany_by_key(session: Session, engine: Engine) -> None:
    statement = USERS.update().where(USERS.c.id == bindparam("uid")).values(name=bindparam("new"))
    with engine.begin() as connection:
        connection.execute(statement, [{"uid": 1, "new": "grace"}, {"uid": 1, "new": "ada"}])


def core_delete(session: Session, engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(USERS.delete().where(USERS.c.id == 1))


def core_insert_with_keys(session: Session, engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(USERS.insert(), [{"id": 3, "name": "cy"}, {"id": 4, "name": "di"}])


def core_update_returning(session: Session, engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(
            USERS.update().where(USERS.c.id == 1).values(name="grace").returning(USERS.c.id)
        ).all()


def raw_text_on_session_connection(session: Session, engine: Engine) -> None:
    session.connection().execute(text("UPDATE users SET name = 'grace' WHERE id = 1"))


def raw_driver_sql_on_session_connection(session: Session, engine: Engine) -> None:
    session.connection().exec_driver_sql("UPDATE users SET name = 'grace' WHERE id = 1")


def manual_touch(session: Session, engine: Engine) -> None:
    alkey.touch(session, session.get_one(User, 1))


def manual_invalidate(session: Session, engine: Engine) -> None:
    alkey.invalidate("alkey:users#1")


def manual_touch_everything(session: Session, engine: Engine) -> None:
    alkey.touch(session, alkey.GLOBAL_WRITE_TOKEN)


PATHS: dict[str, Callable[[Session, Engine], None]] = {
    "ORM unit of work: `user.name = ...`": orm_update,
    "ORM unit of work: `session.delete(user)`": orm_delete,
    "`session.merge(User(id=1, ...))`": orm_merge,
    "legacy `session.query(User).filter_by(id=1).update({...})`": legacy_query_update,
    "legacy `session.query(User).filter_by(id=1).delete()`, `'fetch'`": legacy_query_delete,
    "bulk `update(User).where(id == 1)`, `synchronize_session='fetch'`": bulk_update_fetch,
    "bulk `update(User).where(id == 1)`, default (`'auto'`/`'evaluate'`)": bulk_update_evaluate,
    "bulk UPDATE by primary key: `execute(update(User), [{'id': 1, ...}])`": (
        bulk_update_by_primary_key
    ),
    "bulk `update(User).where(id == 1)`, `synchronize_session=False`": bulk_update_no_sync,
    "bulk `update(User).where(id == 1)`, `dml_strategy='core_only'`": bulk_update_core_only,
    "bulk UPDATE by primary key, `dml_strategy='bulk'`": bulk_update_strategy_bulk,
    "bulk `update(User).where(id == 1).returning(User)`": bulk_update_returning,
    "bulk `delete(User).where(id == 1)`, `'fetch'`": bulk_delete_fetch,
    "bulk `delete(User).where(id == 1)`, default (`'auto'`)": bulk_delete_default,
    "bulk `insert(User)` with keys `[{'id': 3, ...}]`": bulk_insert_with_keys,
    "bulk `insert(User).values([...])` without keys": bulk_insert_values,
    "bulk `insert(User).returning(User)` without keys": bulk_insert_returning,
    "bulk `insert(User).values(id=3, ...)`, `dml_strategy='raw'`": bulk_insert_raw,
    "bulk `insert(User).returning(User)` with keys, `dml_strategy='orm'`": bulk_insert_orm,
    "bulk `insert(Tag).from_select(...)`": bulk_insert_from_select,
    "`session.bulk_save_objects([user_1])` (an update)": bulk_save_objects_update,
    "`session.bulk_save_objects([User(id=3, ...)])` (an insert)": bulk_save_objects_insert,
    "`session.bulk_insert_mappings(User, [{'id': 3, ...}])`": bulk_insert_mappings_with_keys,
    "`session.bulk_insert_mappings(User, [...])` without keys": (bulk_insert_mappings_without_keys),
    "`session.bulk_update_mappings(User, [{'id': 1, ...}])`": bulk_update_mappings,
    "Core `users.update()` on a connection (`bind_engine`)": core_update,
    "Core executemany `users.update().where(id == bindparam(...))`": core_executemany_by_key,
    "Core `users.delete().where(id == 1)`": core_delete,
    "Core executemany `users.insert()` with keys": core_insert_with_keys,
    "Core `users.update()...returning(users.c.id)`": core_update_returning,
    "raw `text('UPDATE users ...')` through the session": raw_update_in_session,
    "raw `exec_driver_sql('UPDATE users ...')`": raw_driver_sql,
    "raw `text('UPDATE users ...')` on `session.connection()`": raw_text_on_session_connection,
    "raw `exec_driver_sql(...)` on `session.connection()`": raw_driver_sql_on_session_connection,
    "raw `WITH ... UPDATE users ...`": raw_cte_update,
    "raw `SELECT`": raw_select,
    "DDL `ALTER TABLE users ...`": ddl_alter,
    "manual `alkey.touch(session, user_1)`, then commit": manual_touch,
    "manual `alkey.invalidate('alkey:users#1')`": manual_invalidate,
    "manual `alkey.touch(session, 'alkey:*#*')` (as any write to unknown tables)": (
        manual_touch_everything
    ),
}


def run_matrix(
    factory: sessionmaker[Session],
    engine: Engine,
    keys: CacheKeyGenerator,
    redis_client: RedisClient,
) -> dict[str, set[str]]:
    changed = {}
    for name, path in PATHS.items():
        redis_client.flushdb()
        Base.metadata.drop_all(engine)
        User.metadata.drop_all(engine)
        User.metadata.create_all(engine)
        seed_users(factory)
        before = snapshot(keys)
        with factory() as session:
            path(session, engine)
            session.commit()
        after = snapshot(keys)
        changed[name] = {watched for watched in WATCHED if before[watched] != after[watched]}
    return changed


def render(changed: dict[str, set[str]]) -> str:
    header = "| write path | " + " | ".join(WATCHED) + " |"
    rule = "|---|" + "---|" * len(WATCHED)
    rows = [
        f"| {name} | "
        + " | ".join("changes" if w in changed[name] else "-" for w in WATCHED)
        + " |"
        for name in PATHS
    ]
    return "\n".join([header, rule, *rows]) + "\n"


START, END = "<!-- write paths: start -->", "<!-- write paths: end -->"


def test_each_write_path_changes_exactly_the_keys_in_the_guide_table(
    session_factory: sessionmaker[Session],
    bound_engine: Engine,
    keys: CacheKeyGenerator,
    redis_client: RedisClient,
    redis_url: str,
    environment_redis: Callable[[str], None],
) -> None:
    environment_redis(redis_url)  # alkey.invalidate() uses the default client
    table = render(run_matrix(session_factory, bound_engine, keys, redis_client))
    guide = DOCS / "write-paths.md"
    before, _, rest = guide.read_text(encoding="utf-8").partition(START)
    documented, _, after = rest.partition(END)
    if os.environ.get("ALKEY_UPDATE_DOCS"):
        guide.write_text(f"{before}{START}\n{table}{END}{after}", encoding="utf-8")
        documented = "\n" + table
    assert documented.strip() == table.strip()


def test_rows_that_a_known_row_bulk_update_did_not_write_keep_their_keys(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    seed_users(session_factory)
    before = (keys("alkey:users#1"), keys("alkey:users#2"))
    with session_factory() as session:
        bulk_update_fetch(session, session.get_bind())  # type: ignore[arg-type]
        session.commit()
    assert keys("alkey:users#1") != before[0]
    assert keys("alkey:users#2") == before[1]


def test_a_rolled_back_bulk_statement_bumps_nothing(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    seed_users(session_factory)
    before = snapshot(keys)
    with session_factory() as session:
        bulk_update_evaluate(session, session.get_bind())  # type: ignore[arg-type]
        raw_update_in_session(session, session.get_bind())  # type: ignore[arg-type]
        session.rollback()
    assert snapshot(keys) == before


def test_core_writes_bump_at_commit_and_a_rolled_back_savepoint_drops_only_its_own(
    bound_engine: Engine,
    session_factory: sessionmaker[Session],
    keys: CacheKeyGenerator,
    redis_client: RedisClient,
) -> None:
    seed_users(session_factory)
    users, tags = USERS, TAGS
    before = snapshot(keys)
    with bound_engine.connect() as connection:
        connection.execute(users.update().values(name="x"))
        assert snapshot(keys) == before, "nothing before COMMIT"
        savepoint = connection.begin_nested()
        connection.execute(tags.update().values(label="y"))
        savepoint.rollback()
        connection.commit()
    after = snapshot(keys)
    assert {w for w in WATCHED if before[w] != after[w]} == {
        "row 1",
        "row 2",
        "table users",
        "global",
    }
    with bound_engine.connect() as connection:
        connection.execute(tags.update().values(label="z"))
        connection.rollback()
    assert snapshot(keys) == after


def test_core_statements_through_a_sessions_connection_follow_the_session(
    bound_engine: Engine, session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    seed_users(session_factory)
    before = keys(User)
    with session_factory() as session:
        session.connection().execute(USERS.update().values(name="x"))
        session.rollback()
    assert keys(User) == before
    with session_factory() as session:
        session.connection().execute(USERS.update().values(name="x"))
        assert keys(User) == before
        session.commit()
    assert keys(User) != before


def test_an_autocommit_connection_bumps_right_after_each_write(
    bound_engine: Engine, session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    seed_users(session_factory)
    before = keys("alkey:users#1")
    with bound_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(USERS.update().values(name="x"))
        assert keys("alkey:users#1") != before


# -- related parents --------------------------------------------------------------------


@pytest.fixture
def library_factory(library: Engine, redis_client: RedisClient) -> Iterator[sessionmaker[Session]]:
    factory = sessionmaker(library, expire_on_commit=False)
    alkey.bind(factory, redis_client=redis_client)
    with factory() as session:
        session.add_all([Author(id=1), Author(id=2), Label(id=1), Label(id=2)])
        session.add(Book(id=1, author_id=1))
        session.commit()
    yield factory
    alkey.unbind(factory)


@pytest.mark.parametrize("write", ["insert", "update", "delete"])
def test_writing_a_child_changes_its_parents_key(
    library_factory: sessionmaker[Session], keys: CacheKeyGenerator, write: str
) -> None:
    before = keys("alkey:authors#1"), keys("alkey:authors#2")
    with library_factory() as session:
        if write == "insert":
            session.add(Book(id=2, author_id=1))
        elif write == "update":
            session.get_one(Book, 1).title = "new title"
        else:
            session.delete(session.get_one(Book, 1))
        session.commit()
    assert keys("alkey:authors#1") != before[0]
    assert keys("alkey:authors#2") == before[1], "an unrelated parent keeps its key"


@pytest.mark.parametrize("how", ["column", "relationship"])
def test_moving_a_child_changes_the_old_and_the_new_parents_keys(
    library_factory: sessionmaker[Session], keys: CacheKeyGenerator, how: str
) -> None:
    before = keys("alkey:authors#1"), keys("alkey:authors#2")
    with library_factory() as session:
        book = session.get_one(Book, 1)
        if how == "column":
            book.author_id = 2  # the relationship is never loaded
        else:
            book.author = session.get_one(Author, 2)
        session.commit()
    assert keys("alkey:authors#1") != before[0]
    assert keys("alkey:authors#2") != before[1]


def test_a_many_to_many_change_touches_both_sides(
    library_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    before = keys("alkey:books#1"), keys("alkey:labels#1"), keys("alkey:labels#2")
    with library_factory() as session:
        book = session.get_one(Book, 1)
        book.labels.append(session.get_one(Label, 1))
        session.commit()
    after = keys("alkey:books#1"), keys("alkey:labels#1"), keys("alkey:labels#2")
    assert after[0] != before[0]
    assert after[1] != before[1]
    assert after[2] == before[2]


def test_touching_can_be_switched_off_per_relationship_and_globally(
    library_factory: sessionmaker[Session], keys: CacheKeyGenerator, redis_client: RedisClient
) -> None:
    before = keys("alkey:books#1")
    with library_factory() as session:
        session.add(Review(id=1, book_id=1))
        session.commit()
    assert keys("alkey:books#1") == before
    alkey.bind(library_factory, touch_parents=False)
    before = keys("alkey:authors#1")
    with library_factory() as session:
        session.get_one(Book, 1).title = "quiet"
        session.commit()
    assert keys("alkey:authors#1") == before


# -- inheritance ------------------------------------------------------------------------


def test_a_bulk_update_of_the_base_class_changes_subclass_instance_keys(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    with session_factory() as session:
        manager = Manager(name="m")
        session.add(manager)
        session.commit()
        before = keys(manager), keys(Manager), keys(Employee)
        session.execute(update(Employee).values(name="renamed"))
        session.commit()
        assert keys(manager) != before[0]
        assert keys(Manager) != before[1]
        assert keys(Employee) != before[2]


# -- the SQL parser ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("UPDATE users SET a = 1", {"users", "public.users"}),
        ('UPDATE "Order Items" SET a = 1', {"Order%20Items", "public.Order%20Items"}),
        ("UPDATE shop.orders SET a = 1", {"shop.orders"}),
        ("WITH x AS (SELECT 1) UPDATE users SET a = 1", {"users", "public.users"}),
        ("WITH d AS (DELETE FROM users RETURNING id) SELECT * FROM d", {"users", "public.users"}),
        (
            "INSERT INTO users (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET id = 2",
            {"users", "public.users"},
        ),
        (
            "MERGE INTO users u USING s ON u.id = s.id WHEN MATCHED THEN UPDATE SET a = 1",
            {"users", "public.users"},
        ),
        ("SELECT 1; DELETE FROM tags WHERE id = 1", {"tags", "public.tags"}),
        ("UPDATE Users SET a = 1", {"Users", "users", "public.Users", "public.users"}),
        ("TRUNCATE users", {"users", "public.users"}),
        ("DROP TABLE users", {"users", "public.users"}),
        ("SELECT * FROM users", set()),
        ("SHOW search_path", set()),
        ("EXPLAIN SELECT 1", set()),
    ],
)
def test_the_sql_parser_finds_the_written_tables(sql: str, tables: set[str]) -> None:
    assert written_tables(sql, "postgresql", "public") == frozenset(tables)


@pytest.mark.parametrize(
    "sql",
    ["CALL refresh_all()", "DO $$ BEGIN END $$", "ZAP users", "EXPLAIN ANALYZE DELETE FROM users"],
)
def test_sql_whose_written_tables_cannot_be_told_counts_as_writing_everything(sql: str) -> None:
    assert written_tables(sql, "postgresql", "public") is None


def test_raw_sql_that_writes_unknown_tables_changes_every_key(
    bound_engine: Engine, session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    if bound_engine.dialect.name != "postgresql":
        pytest.skip("an anonymous code block (DO) needs PostgreSQL")
    seed_users(session_factory)
    before = snapshot(keys)
    with bound_engine.begin() as connection:
        connection.exec_driver_sql("DO $$ BEGIN UPDATE users SET name = 'x' WHERE id = 1; END $$")
    after = snapshot(keys)
    assert all(before[watched] != after[watched] for watched in WATCHED)


@pytest.mark.parametrize("statement", ["update", "delete"])
@pytest.mark.parametrize("mode", [False, "evaluate", "auto", "fetch"])
def test_bulk_statements_invalidate_their_rows_in_every_synchronize_session_mode(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator, statement: str, mode: object
) -> None:
    seed_users(session_factory)
    before = snapshot(keys)
    with session_factory() as session:
        dml = (
            update(User).where(User.id == 1).values(name="x")
            if statement == "update"
            else delete(User).where(User.id == 1)
        )
        session.execute(dml, execution_options={"synchronize_session": mode})
        session.commit()
    after = snapshot(keys)
    changed = {watched for watched in WATCHED if before[watched] != after[watched]}
    assert {"row 1", "table users", "global"} <= changed
    assert "table tags" not in changed


# -- paths found in review ------------------------------------------------------------------


def test_a_write_made_by_a_flush_hook_is_recorded(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    seed_users(session_factory)
    before = keys(Tag)

    def audit(mapper: Any, connection: Any, target: Any) -> None:
        connection.execute(TAGS.update().values(label="audited"))

    event.listen(User, "after_update", audit)
    try:
        with session_factory() as session:
            session.get_one(User, 1).name = "grace"
            session.commit()
    finally:
        event.remove(User, "after_update", audit)
    assert keys(Tag) != before


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1; UPDATE users SET name = 'x'",
        "EXPLAIN ANALYSE UPDATE users SET name = 'x'",
    ],
)
def test_a_write_behind_a_harmless_first_word_is_seen(sql: str) -> None:
    assert written_tables(sql, "postgresql", "public") != frozenset()


@pytest.mark.parametrize("how", ["from_statement", "text_columns", "ddl_construct"])
def test_dml_hidden_in_a_select_or_a_ddl_construct_is_seen(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator, how: str
) -> None:
    seed_users(session_factory)
    before = keys("alkey:users#2")
    with session_factory() as session:
        if how == "from_statement":
            statement = text("UPDATE users SET name = 'x' RETURNING *")
            session.execute(select(User).from_statement(statement)).all()
        elif how == "text_columns":
            returning = text("UPDATE users SET name = 'x' RETURNING id").columns(USERS.c.id)
            session.execute(returning).all()
        else:
            session.execute(DDL("UPDATE users SET name = 'x'"))  # type: ignore[no-untyped-call]
        session.commit()
    assert keys("alkey:users#2") != before


def test_driver_sql_on_a_sessions_connection_is_seen_without_bind_engine(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    seed_users(session_factory)
    before = keys("alkey:users#2")
    with session_factory() as session:
        session.connection().exec_driver_sql("UPDATE users SET name = 'x'")
        session.commit()
    assert keys("alkey:users#2") != before


def test_an_upsert_with_keys_counts_its_rows_as_unknown(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    seed_users(session_factory)
    before = keys("alkey:users#2")
    dialect = session_factory.kw["bind"].dialect.name
    module = __import__(f"sqlalchemy.dialects.{dialect}", fromlist=["insert"])
    statement = module.insert(User).on_conflict_do_update(
        index_elements=["id"], set_={"name": "upserted"}
    )
    with session_factory() as session:
        session.execute(statement, [{"id": 2, "name": "bob"}])
        session.commit()
    assert keys("alkey:users#2") != before


def test_a_core_write_to_a_base_table_changes_the_subclass_table_key(
    bound_engine: Engine, session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    with session_factory() as session:
        session.add(Manager(name="m"))
        session.commit()
    before = keys(Manager)
    with bound_engine.begin() as connection:
        connection.execute(Employee.__table__.update().values(name="x"))  # type: ignore[attr-defined]
    assert keys(Manager) != before


def test_a_bulk_statement_touches_the_parents(
    library_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    before = keys("alkey:authors#1")
    with library_factory() as session:
        session.execute(
            delete(Book).where(Book.id == 1), execution_options={"synchronize_session": "fetch"}
        )
        session.commit()
    assert keys("alkey:authors#1") != before


def test_an_abandoned_connection_is_returned_to_its_pool(
    tables: Engine, redis_client: RedisClient
) -> None:
    engine = create_engine(tables.url, pool_size=1, max_overflow=0, pool_timeout=2)
    alkey.bind_engine(engine, redis_client=redis_client)
    try:
        connection = engine.connect()
        connection.execute(TAGS.update().values(label="y"))
        del connection  # neither committed nor closed
        gc.collect()
        with engine.connect() as again:
            again.execute(select(1))
    finally:
        alkey.unbind_engine(engine)
        engine.dispose()


def test_an_identifier_string_keys_the_same_whatever_the_process_did_before(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    key = keys("alkey:managers#1")
    with session_factory() as session:
        manager = Manager(name="m")
        session.add(manager)
        session.flush()
        keys(manager)  # keying an instance must not change how strings key
        session.rollback()
    assert keys("alkey:managers#1") == key


def test_a_child_whose_foreign_key_was_never_loaded_touches_every_parent(
    library_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    before = keys("alkey:authors#1")
    with library_factory() as session:
        book = session.scalars(select(Book).options(defer(Book.author_id))).one()
        book.title = "retitled"
        session.commit()
    assert keys("alkey:authors#1") != before


RAW_WRITES = {
    "on conflict": "INSERT INTO tags (code, label) VALUES ('x', 'y') "
    "ON CONFLICT (code) DO UPDATE SET label = 'z'",
    "multi-statement": "SELECT 1; UPDATE tags SET label = 'm'",
    "merge": "MERGE INTO tags t USING (SELECT 'x' AS code) s ON t.code = s.code "
    "WHEN MATCHED THEN UPDATE SET label = 'merged'",
    "truncate": "TRUNCATE tags",
    "drop": "DROP TABLE tags",
}


@pytest.mark.parametrize("name", RAW_WRITES)
def test_raw_writes_run_on_the_database_change_the_written_tables_keys(
    bound_engine: Engine, session_factory: sessionmaker[Session], keys: CacheKeyGenerator, name: str
) -> None:
    sqlite_can = {"on conflict", "drop"}
    if bound_engine.dialect.name != "postgresql" and name not in sqlite_can:
        pytest.skip(f"{name} needs PostgreSQL")
    seed_users(session_factory)
    before = keys(Tag), keys("alkey:tags#x"), keys("alkey:users#1")
    with bound_engine.begin() as connection:
        connection.exec_driver_sql(RAW_WRITES[name])
    after = keys(Tag), keys("alkey:tags#x"), keys("alkey:users#1")
    assert after[0] != before[0]
    assert after[1] != before[1]
    assert after[2] == before[2], "another table keeps its keys"


def test_a_core_savepoint_opened_before_any_write_drops_its_writes_on_rollback(
    bound_engine: Engine, session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    seed_users(session_factory)
    before = keys(Tag)
    with bound_engine.connect() as connection:
        savepoint = connection.begin_nested()
        connection.execute(TAGS.update().values(label="y"))
        savepoint.rollback()
        connection.commit()
    assert keys(Tag) == before


def test_an_attribute_set_to_a_sql_expression_invalidates_its_row(
    session_factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    seed_users(session_factory)
    before = keys("alkey:users#1"), keys("alkey:users#2")
    with session_factory() as session:
        user = session.get_one(User, 1)
        user.name = User.name + "!"  # flushed as SQL; expired, not "modified", afterwards
        session.commit()
    assert keys("alkey:users#1") != before[0]
    assert keys("alkey:users#2") == before[1]

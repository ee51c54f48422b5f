"""Mappers over a join or a select (SQLAlchemy's "mapping a class against multiple tables"
and "against arbitrary subqueries"): they configure, and their keys change with every
write to the tables they read, whichever way it names rows -- but the keys of the
tables' own mappers change only with their own rows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Engine, ForeignKey, Integer, MetaData, String, Table, join, select
from sqlalchemy import text as sql_text
from sqlalchemy.orm import Session, column_property, registry, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.identity import identifier_for, parse_identifier
from alkey.tokens import RedisClient

metadata = MetaData()
mapper_registry = registry(metadata=metadata)

people = Table(
    "view_people",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(50), nullable=False),
)
bios = Table(
    "view_bios",
    metadata,
    Column("id", Integer, ForeignKey("view_people.id"), primary_key=True),
    Column("text", String(200), nullable=False),
)


class Person:
    """The plain mapper of ``view_people``."""

    id: int
    name: str

    def __init__(self, id: int, name: str) -> None:
        self.id = id
        self.name = name


class Profile:
    """A person with their bio: one class over ``view_people JOIN view_bios``."""

    id: int
    name: str
    text: str


class Name:
    """A read model over a select of ``view_people``."""


mapper_registry.map_imperatively(Person, people)
mapper_registry.map_imperatively(
    Profile, join(people, bios), properties={"id": column_property(people.c.id, bios.c.id)}
)
mapper_registry.map_imperatively(Name, select(people.c.id, people.c.name).subquery("names"))


@pytest.fixture
def factory(tables: Engine, redis_client: RedisClient) -> Iterator[sessionmaker[Session]]:
    metadata.drop_all(tables)
    metadata.create_all(tables)
    made = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(made, redis_client=redis_client)
    with made() as session:
        for number in (1, 2):
            session.add(Person(id=number, name=f"person {number}"))
            session.flush()
            session.execute(bios.insert().values(id=number, text=f"bio {number}"))
        session.commit()
    yield made
    alkey.unbind(made)
    metadata.drop_all(tables)


def keys_of(factory: sessionmaker[Session], generate: CacheKeyGenerator) -> dict[str, str]:
    """The key of each kind of instance of row 1 and 2, and of the view classes."""
    with factory() as session:
        return {
            "profile 1": generate(session.get_one(Profile, 1)),
            "profile 2": generate(session.get_one(Profile, 2)),
            "name 1": generate(session.get_one(Name, 1)),
            "person 1": generate(session.get_one(Person, 1)),
            "person 2": generate(session.get_one(Person, 2)),
            "Profile": generate(Profile),
            "Name": generate(Name),
        }


def test_instances_and_classes_of_mappers_over_a_join_or_a_select_have_identifiers_of_their_own(
    factory: sessionmaker[Session],
) -> None:
    with factory() as session:
        profile = identifier_for(session.get_one(Profile, 1))
        name = identifier_for(session.get_one(Name, 1))
        person = identifier_for(session.get_one(Person, 1))
    assert profile == "alkey:%28view_bios%2Bview_people%29#1"
    assert name == "alkey:%28view_people%29#1"
    assert person == "alkey:view_people#1"
    for identifier in (profile, name, identifier_for(Profile), identifier_for(Name)):
        parse_identifier(identifier)  # well formed: `alkey bump` takes them


@pytest.mark.parametrize(
    "write",
    [
        "orm: the plain mapper",
        "orm: the join mapper",
        "core: the bio's table",
        "raw sql: the bio's table",
    ],
)
def test_a_write_to_a_table_a_view_mapper_reads_changes_its_keys_and_only_the_written_rows_own(
    factory: sessionmaker[Session], redis_client: RedisClient, write: str
) -> None:
    generate = CacheKeyGenerator(redis_client)
    before = keys_of(factory, generate)
    with factory() as session:
        if write == "orm: the plain mapper":
            session.get_one(Person, 1).name = "renamed"
        elif write == "orm: the join mapper":
            session.get_one(Profile, 1).text = "rewritten"
        elif write == "core: the bio's table":
            session.execute(bios.update().where(bios.c.id == 1).values(text="rewritten"))
        else:
            session.execute(sql_text("UPDATE view_bios SET text = 'rewritten' WHERE id = 1"))
        session.commit()
    after = keys_of(factory, generate)
    changed = {name for name in before if before[name] != after[name]}
    # The views read both tables: any write to either changes all their keys.
    assert {"profile 1", "profile 2", "Profile"} <= changed
    if write != "orm: the join mapper" and "bio" not in write:
        assert {"name 1", "Name"} <= changed
    # A plain mapper's rows change with their own row alone, or with every row when the
    # write could not say which: a write through the join mapper names rows by its key,
    # which is not sure to be the table's.
    if write == "orm: the plain mapper":
        assert "person 1" in changed
        assert "person 2" not in changed
    elif write == "orm: the join mapper":
        assert {"person 1", "person 2"} <= changed
    else:
        assert not changed & {"person 1", "person 2"}, "view_people was not written"


def test_a_write_through_a_join_mapper_changes_the_key_a_plain_mapper_built_for_the_row(
    factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    generate = CacheKeyGenerator(redis_client)
    with factory() as session:
        person = session.get_one(Person, 1)
        key = generate(person)
        profile = session.get_one(Profile, 1)
        profile.name = "renamed"
        session.commit()
    with factory() as session:
        assert generate(session.get_one(Person, 1)) != key

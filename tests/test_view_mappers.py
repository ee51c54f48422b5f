"""Mappers over a join or a select (SQLAlchemy's "mapping a class against multiple tables"
and "against arbitrary subqueries"): they configure, and their keys change with every
write to the tables they read, whichever way it names rows -- but the keys of the
tables' own mappers change only with their own rows."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Engine, ForeignKey, Integer, MetaData, String, Table, join, select
from sqlalchemy import text as sql_text
from sqlalchemy.ext.declarative import AbstractConcreteBase
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    class_mapper,
    column_property,
    configure_mappers,
    mapped_column,
    registry,
    relationship,
    sessionmaker,
)

import alkey
from alkey import catalog
from alkey.cache import CacheKeyGenerator
from alkey.identity import freeze_schema_map, identifier_for, parse_identifier, view_writes
from alkey.tokens import RedisClient

metadata = MetaData()
mapper_registry = registry(metadata=metadata)

orgs = Table("view_orgs", metadata, Column("id", Integer, primary_key=True))
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
    Column("org_id", Integer, ForeignKey("view_orgs.id"), nullable=True),
)
notes = Table(
    "view_notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("person_id", Integer, ForeignKey("view_people.id"), nullable=False),
)


class Org:
    """A parent that :class:`Profile` references many-to-one, through ``view_bios``."""

    id: int

    def __init__(self, id: int) -> None:
        self.id = id


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


class Note:
    """A child of :class:`Profile`, which it references many-to-one."""

    id: int
    profile: Profile

    def __init__(self, id: int, profile: Profile) -> None:
        self.id = id
        self.profile = profile


class ShapeBase(DeclarativeBase):
    metadata = MetaData()


class Shape(AbstractConcreteBase, ShapeBase):
    """Concrete inheritance: the base class is mapped to a union of its subclasses' tables."""

    strict_attrs = True
    id: Mapped[int] = mapped_column(primary_key=True)


class Circle(Shape):
    __tablename__ = "view_circles"
    __mapper_args__ = {"polymorphic_identity": "circle", "concrete": True}  # noqa: RUF012
    radius: Mapped[int]


class Square(Shape):
    __tablename__ = "view_squares"
    __mapper_args__ = {"polymorphic_identity": "square", "concrete": True}  # noqa: RUF012
    side: Mapped[int]


mapper_registry.map_imperatively(Org, orgs)
mapper_registry.map_imperatively(Person, people)
mapper_registry.map_imperatively(
    Profile,
    join(people, bios),
    properties={"id": column_property(people.c.id, bios.c.id), "org": relationship(Org)},
)
mapper_registry.map_imperatively(Note, notes, properties={"profile": relationship(Profile)})


class Texty:
    """A read model over textual SQL: SQLAlchemy knows no table it reads."""


texty = sql_text("SELECT id, name FROM view_people").columns(people.c.id, people.c.name)
mapper_registry.map_imperatively(
    Texty, texty.subquery("texty"), primary_key=[texty.subquery("texty").c.id]
)
mapper_registry.map_imperatively(Name, select(people.c.id, people.c.name).subquery("names"))


@pytest.fixture
def factory(tables: Engine, redis_client: RedisClient) -> Iterator[sessionmaker[Session]]:
    metadata.drop_all(tables)
    metadata.create_all(tables)
    made = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(made, redis_client=redis_client)
    with made() as session:
        session.add_all([Org(1), Org(2)])
        for number in (1, 2):
            session.add(Person(id=number, name=f"person {number}"))
            session.flush()
            session.execute(bios.insert().values(id=number, text=f"bio {number}", org_id=1))
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
def test_a_write_to_a_table_a_view_mapper_reads_changes_its_keys_and_plain_rows_only_when_named(
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
    if "bio" in write:
        assert not changed & {"name 1", "Name"}, "Name reads view_people alone"
    else:
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


def test_a_key_naming_a_view_class_before_the_mappers_configure_depends_on_its_tables() -> None:
    """In a process of its own, where nothing has configured the mappers yet: the class,
    and its identifier given as a string, name its tables' tokens from the first key."""
    code = (
        "from alkey.keys import CacheKeyGenerator\n"
        "from tests.test_view_mappers import Profile\n"
        "assert not Profile.__mapper__.configured\n"
        "plan = CacheKeyGenerator().plan\n"
        "print(sorted(plan(Profile).identifiers))\n"
        "print(sorted(plan('alkey:%28view_bios%2Bview_people%29#*').identifiers))\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    found = ran.stdout.splitlines()
    assert len(found) == 2
    for line in found:
        assert "'alkey:view_people#*'" in line
        assert "'alkey:view_bios#*'" in line


def test_declaring_writes_of_a_class_mapped_to_a_join_asks_for_its_tables() -> None:
    with pytest.raises(TypeError, match=r"view_bios, view_people"):
        catalog.declare_writes(Profile, "view_orgs")
    with pytest.raises(TypeError, match=r"mapped to a join or a select"):
        catalog.declare_writes("view_orgs", Profile)


@pytest.mark.parametrize("write", ["orm", "core", "raw sql"])
def test_a_write_of_a_view_classs_reference_changes_the_keys_of_its_old_and_new_parent(
    factory: sessionmaker[Session], redis_client: RedisClient, write: str
) -> None:
    generate = CacheKeyGenerator(redis_client)
    with factory() as session:
        before = [generate(session.get_one(Org, number)) for number in (1, 2)]
        if write == "orm":
            session.get_one(Profile, 1).org = session.get_one(Org, 2)  # type: ignore[attr-defined]
        elif write == "core":
            session.execute(bios.update().where(bios.c.id == 1).values(org_id=2))
        else:
            session.execute(sql_text("UPDATE view_bios SET org_id = 2 WHERE id = 1"))
        session.commit()
    with factory() as session:
        after = [generate(session.get_one(Org, number)) for number in (1, 2)]
    assert before[0] != after[0]
    assert before[1] != after[1]


def test_a_child_written_touches_its_view_parents_row_and_no_table_the_view_reads(
    factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    generate = CacheKeyGenerator(redis_client)
    before = keys_of(factory, generate)
    with factory() as session:
        session.add(Note(1, session.get_one(Profile, 1)))
        session.commit()
    after = keys_of(factory, generate)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"profile 1", "Profile"}, "the row and its class, as for any parent"


def test_a_write_to_a_concrete_subclass_changes_the_key_of_its_abstract_base_class(
    tables: Engine, redis_client: RedisClient
) -> None:
    """``Shape`` is mapped to the union of ``view_circles`` and ``view_squares``: a key
    naming the class changes with a write to either (it was named after the union's
    alias, which nothing bumped), and a key naming ``Square`` does not change with a
    write of a circle."""
    configure_mappers()  # Shape is mapped then (SQLAlchemy refuses it before, clearly)
    ShapeBase.metadata.create_all(tables)
    made = sessionmaker(tables)
    alkey.bind(made, redis_client=redis_client)
    generate = CacheKeyGenerator(redis_client)
    try:
        before = generate(Shape), generate(Square)
        with made() as session:
            session.add(Circle(id=1, radius=2))
            session.commit()
        assert generate(Shape) != before[0]
        assert generate(Square) == before[1]
    finally:
        alkey.unbind(made)
        ShapeBase.metadata.drop_all(tables)


def test_a_write_is_named_while_an_abstract_concrete_base_waits_for_the_mappers() -> None:
    """Until the mappers configure, SQLAlchemy's list of a registry's mappers raises for
    the base of ``AbstractConcreteBase``: alkey's catalog reads past it (it raised
    ``UnmappedClassError`` at the write, after retrying for seconds)."""
    code = (
        "import sqlalchemy\n"
        "from alkey.writes import raw_sql_writes\n"
        "from tests.test_view_mappers import Circle\n"
        "assert not Circle.__mapper__.configured\n"
        "dialect = sqlalchemy.create_engine('sqlite://').dialect\n"
        "print(sorted(raw_sql_writes('UPDATE view_circles SET radius = 1', dialect)))\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert "'alkey:view_circles#*'" in ran.stdout


@pytest.mark.parametrize("target", ["the class", "its identifier"])
def test_invalidating_a_view_class_changes_the_keys_of_every_row_of_its_tables(
    factory: sessionmaker[Session], redis_client: RedisClient, target: str
) -> None:
    generate = CacheKeyGenerator(redis_client)
    before = keys_of(factory, generate)
    alkey.invalidate(Profile if target == "the class" else identifier_for(Profile))
    after = keys_of(factory, generate)
    changed = {name for name in before if before[name] != after[name]}
    assert {"profile 1", "profile 2", "Profile", "person 1", "person 2", "name 1"} <= changed


def test_a_class_over_textual_sql_changes_with_every_write_as_its_tables_are_unknown(
    factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    generate = CacheKeyGenerator(redis_client)
    with factory() as session:
        key = generate(session.get_one(Texty, 1))
        session.add(Org(3))  # a table no SQL of Texty's names
        session.commit()
    with factory() as session:
        assert generate(session.get_one(Texty, 1)) != key


def test_a_tenants_write_through_a_view_class_changes_the_tenants_tables() -> None:
    """What a bulk statement or an invalidation through a class mapped to a join adds to
    its own rows: every row of each table it reads, in the tenant's schema when translated."""
    tenant = freeze_schema_map({None: "t1"})
    assert view_writes(class_mapper(Profile), tenant) >= {
        "alkey:t1.view_people#?",
        "alkey:t1.view_bios#?",
        "alkey:view_people#*",  # the mapped table, in every schema
    }
    assert "alkey:view_people#?" not in view_writes(class_mapper(Profile), tenant)
    assert view_writes(class_mapper(Person)) == set()

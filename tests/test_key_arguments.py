"""Key arguments whose text is not their identity: walked, or refused with the fix.

Every argument gets an encoding that determines it, or a TypeError naming its position.
Containers are walked, so the instances inside them count as instances and their writes
change the key (proved end to end: a commit through a bound session); SQL constructs,
dynamic and write-only relationships, iterators, and functions or classes that cannot be
found again by name are refused, because their text is the same for different values or
hides what they hold.
"""

from __future__ import annotations

import cmath
import collections
import json
import math
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from sqlalchemy import Engine, ForeignKey, MetaData, String, func, select, text
from sqlalchemy.orm import (
    DeclarativeBase,
    DynamicMapped,
    Mapped,
    Session,
    WriteOnlyMapped,
    aliased,
    mapped_column,
    relationship,
    sessionmaker,
)

from .conftest import KeyGenerator
from .models import Tag, User

# -- relationships of every loading style, on tables of their own --------------------------


class RelationBase(DeclarativeBase):
    metadata = MetaData()


class Author(RelationBase):
    __tablename__ = "key_argument_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    posts: Mapped[list[Post]] = relationship(back_populates="author")
    dynamic_posts: DynamicMapped[Post] = relationship(viewonly=True)
    write_only_posts: WriteOnlyMapped[Post] = relationship(viewonly=True)


class Post(RelationBase):
    __tablename__ = "key_argument_posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("key_argument_authors.id"))
    title: Mapped[str] = mapped_column(String(100), default="")
    author: Mapped[Author] = relationship(back_populates="posts")


@pytest.fixture
def relation_tables(tables: Engine) -> Iterator[None]:
    RelationBase.metadata.drop_all(tables)
    RelationBase.metadata.create_all(tables)
    yield
    RelationBase.metadata.drop_all(tables)


@pytest.fixture
def session(session_factory: sessionmaker[Session], relation_tables: None) -> Iterator[Session]:
    """A bound sync Session: Row and RowMapping come from its execute(). It is closed
    before the tables are dropped (on PostgreSQL, its open transaction would hold the
    drop up)."""
    with session_factory() as session:
        yield session


def commit_users(session: Session, *names: str) -> list[User]:
    users = [User(name=name) for name in names]
    session.add_all(users)
    session.commit()
    return users


def assert_key_follows(
    session: Session, key_generator: KeyGenerator, argument: object, member: User, other: User
) -> None:
    """The key of ``argument`` is stable, ignores a committed write to ``other`` and
    changes with one to ``member``, which ``argument`` holds somewhere inside."""
    before = key_generator("page", argument)
    assert key_generator("page", argument) == before
    other.name += " (renamed)"
    session.commit()
    assert key_generator("page", argument) == before, "an unrelated write changed the key"
    member.name += " (renamed)"
    session.commit()
    assert key_generator("page", argument) != before, "a write to a member left the key"


# -- instances inside containers invalidate the key ---------------------------------------


def test_instances_inside_a_row_invalidate_the_key(
    session: Session, key_generator: KeyGenerator
) -> None:
    ada, bob = commit_users(session, "ada", "bob")
    row = session.execute(select(User.id, User).where(User.id == ada.id)).one()
    assert row[1] is ada
    assert_key_follows(session, key_generator, row, ada, bob)


def test_instances_inside_a_row_mapping_invalidate_the_key(
    session: Session, key_generator: KeyGenerator
) -> None:
    ada, bob = commit_users(session, "ada", "bob")
    mapping = session.execute(select(User).where(User.id == ada.id)).mappings().one()
    assert mapping["User"] is ada
    assert_key_follows(session, key_generator, mapping, ada, bob)


def test_deque_of_instances_changes_key_when_a_member_is_written(
    session: Session, key_generator: KeyGenerator
) -> None:
    ada, bob = commit_users(session, "ada", "bob")
    assert_key_follows(session, key_generator, collections.deque([ada]), ada, bob)


@pytest.mark.parametrize("view", ["keys", "values", "items"])
def test_instances_inside_dict_views_invalidate_the_key(
    session: Session, key_generator: KeyGenerator, view: str
) -> None:
    ada, bob = commit_users(session, "ada", "bob")
    views = {
        "keys": {ada: "author"}.keys(),
        "values": {"author": ada}.values(),
        "items": {"author": ada}.items(),
    }
    assert_key_follows(session, key_generator, views[view], ada, bob)


def test_instances_inside_a_mapping_proxy_invalidate_the_key(
    session: Session, key_generator: KeyGenerator
) -> None:
    ada, bob = commit_users(session, "ada", "bob")
    proxy = types.MappingProxyType({"author": ada})
    assert_key_follows(session, key_generator, proxy, ada, bob)


class Byline(NamedTuple):
    author: User
    role: str


def test_instances_inside_a_namedtuple_invalidate_the_key(
    session: Session, key_generator: KeyGenerator
) -> None:
    ada, bob = commit_users(session, "ada", "bob")
    assert_key_follows(session, key_generator, Byline(ada, "editor"), ada, bob)


def test_instances_inside_a_user_list_invalidate_the_key(
    session: Session, key_generator: KeyGenerator
) -> None:
    ada, bob = commit_users(session, "ada", "bob")
    assert_key_follows(session, key_generator, collections.UserList([ada]), ada, bob)


def test_instances_nested_deep_inside_views_rows_and_deques_invalidate_the_key(
    session: Session, key_generator: KeyGenerator
) -> None:
    ada, bob = commit_users(session, "ada", "bob")
    row = session.execute(select(User).where(User.id == ada.id)).one()
    nested = {"rows": collections.deque([row])}.values()
    assert_key_follows(session, key_generator, nested, ada, bob)


def test_a_relationship_list_is_keyed_by_its_members_and_its_length(
    session: Session, key_generator: KeyGenerator
) -> None:
    author = Author(posts=[Post(title="first")])
    session.add(author)
    session.commit()
    before = key_generator(author.posts)
    assert before == key_generator(list(author.posts)), "an InstrumentedList is a list"
    author.posts[0].title = "edited"
    session.commit()
    edited = key_generator(author.posts)
    assert edited != before
    author.posts.append(Post(title="second"))
    session.commit()
    assert key_generator(author.posts) not in (before, edited)


# -- containers are walked, and keep their kind ---------------------------------------------


class Point(NamedTuple):
    x: int
    y: int


class Size(NamedTuple):
    x: int
    y: int


def test_namedtuples_key_apart_from_plain_tuples_and_from_each_other(
    key_generator: KeyGenerator,
) -> None:
    keys = {key_generator(value) for value in (Point(1, 2), Size(1, 2), (1, 2))}
    assert len(keys) == 3
    assert key_generator(Point(1, 2)) == key_generator(Point(x=1, y=2))
    assert key_generator(Point(1, 2)) != key_generator(Point(2, 1))


def test_keys_and_items_views_key_in_any_order_like_their_dicts(
    key_generator: KeyGenerator,
) -> None:
    forward, backward = {"a": 1, "b": [2]}, {"b": [2], "a": 1}
    assert key_generator(forward.keys()) == key_generator(backward.keys())
    assert key_generator(forward.items()) == key_generator(backward.items())
    assert key_generator(forward.keys()) != key_generator({"a": 1}.keys())
    assert key_generator(forward.items()) != key_generator({"a": 1, "b": [3]}.items())


def test_a_values_view_keys_in_its_order(key_generator: KeyGenerator) -> None:
    assert key_generator({"a": 1, "b": 2}.values()) != key_generator({"b": 2, "a": 1}.values())
    assert key_generator({"a": 1, "b": 2}.values()) == key_generator({"x": 1, "y": 2}.values())
    assert key_generator({"a": 1, "b": 1}.values()) != key_generator({"a": 1}.values())


def test_dict_views_deques_and_lists_of_the_same_items_key_apart(
    key_generator: KeyGenerator,
) -> None:
    data = {"a": 1}
    values: list[object] = [
        data.keys(),
        data.items(),
        data.values(),
        data,
        {"a"},
        ["a"],
        [1],
        [("a", 1)],
        {("a", 1)},
        collections.deque(["a"]),
        collections.deque([1]),
    ]
    assert len({key_generator(value) for value in values}) == len(values)


def test_a_deque_keys_by_its_items_in_order(key_generator: KeyGenerator) -> None:
    assert key_generator(collections.deque([1, 2])) == key_generator(collections.deque((1, 2)))
    assert key_generator(collections.deque([1, 2])) != key_generator(collections.deque([2, 1]))


def test_a_range_keys_by_exactly_its_start_stop_and_step(key_generator: KeyGenerator) -> None:
    assert key_generator(range(0, 3)) == key_generator(range(0, 3, 1))
    # Equal as sequences, but different ranges.
    assert range(0) == range(5, 5)
    assert key_generator(range(0)) != key_generator(range(5, 5))
    assert key_generator(range(0, 6, 2)) != key_generator(range(0, 5, 2))
    assert key_generator(range(3)) != key_generator([0, 1, 2])


def test_rows_key_by_their_column_names_and_values(
    session: Session, key_generator: KeyGenerator
) -> None:
    commit_users(session, "ada")
    by_name = session.execute(select(User.id, User.name)).one()
    again = session.execute(select(User.id, User.name)).one()
    renamed = session.execute(select(User.id, User.name.label("title"))).one()
    assert by_name == renamed
    assert key_generator(by_name) == key_generator(again)
    assert key_generator(by_name) != key_generator(renamed)
    assert key_generator(by_name) != key_generator(tuple(by_name))


# -- SQL constructs and relationships whose text is not their identity are refused ----------


def test_selects_with_different_bound_values_are_refused(key_generator: KeyGenerator) -> None:
    first = select(User).where(User.id == 1)
    second = select(User).where(User.id == 2)
    assert str(first) == str(second), "the text that used to be their key"
    for statement in (first, second):
        with pytest.raises(
            TypeError, match=r"argument 2: Select is a SQL construct.*pass the values"
        ):
            key_generator("users", statement)


@pytest.mark.parametrize(
    "construct",
    [
        pytest.param(User.name == "ada", id="comparison"),
        pytest.param(text("SELECT * FROM users WHERE id = :id"), id="text"),
        pytest.param(User.__table__.c.id, id="column"),
        pytest.param(func.count(User.id), id="function"),
        pytest.param(select(User.id).subquery(), id="subquery"),
    ],
)
def test_sql_expressions_are_refused_naming_their_position(
    key_generator: KeyGenerator, construct: object
) -> None:
    with pytest.raises(TypeError, match=r"argument 1: \w+ is a SQL construct"):
        key_generator(construct)
    with pytest.raises(TypeError, match=r"argument 2: \w+ is a SQL construct"):
        key_generator("list", {"where": [construct]})


def test_an_orm_query_is_refused(session: Session, key_generator: KeyGenerator) -> None:
    query = session.query(User).filter_by(id=1)
    with pytest.raises(TypeError, match=r"argument 1: Query is a SQL construct"):
        key_generator(query)


def test_dynamic_relationships_of_two_parents_are_refused(
    session: Session, key_generator: KeyGenerator
) -> None:
    first, second = Author(posts=[Post()]), Author(posts=[Post(), Post()])
    session.add_all([first, second])
    session.commit()
    assert str(first.dynamic_posts) == str(second.dynamic_posts), "one text for both"
    for author in (first, second):
        with pytest.raises(
            TypeError, match=r"argument 1: AppenderQuery \(a lazy='dynamic' relationship\)"
        ):
            key_generator(author.dynamic_posts)
    # What the message says to pass instead does tell them apart.
    assert key_generator(list(first.dynamic_posts)) != key_generator(list(second.dynamic_posts))


def test_write_only_collections_are_refused(session: Session, key_generator: KeyGenerator) -> None:
    author = Author(posts=[Post()])
    session.add(author)
    session.commit()
    with pytest.raises(
        TypeError, match=r"argument 2: WriteOnlyCollection \(a write-only relationship\)"
    ):
        key_generator("posts", author.write_only_posts)


# -- iterators are refused, and left unconsumed -------------------------------------------


def test_generator_argument_is_refused_naming_its_position(key_generator: KeyGenerator) -> None:
    numbers = (number for number in range(3))
    with pytest.raises(
        TypeError, match=r"argument 2: generator is an iterator.*pass a list of its items"
    ):
        key_generator("numbers", numbers)
    assert list(numbers) == [0, 1, 2], "refusing it did not consume it"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: iter([1, 2]), id="iter"),
        pytest.param(lambda: map(str, [1, 2]), id="map"),
        pytest.param(lambda: zip([1], [2], strict=True), id="zip"),
        pytest.param(lambda: reversed([1, 2]), id="reversed"),
        pytest.param(lambda: iter({"a": 1}.items()), id="dict_itemiterator"),
    ],
)
def test_iterators_are_refused(key_generator: KeyGenerator, make: Any) -> None:
    with pytest.raises(TypeError, match=r"argument 1: \w+ is an iterator"):
        key_generator(make())


def test_a_query_result_is_refused_and_still_readable(
    session: Session, key_generator: KeyGenerator
) -> None:
    (ada,) = commit_users(session, "ada")
    result = session.scalars(select(User))
    with pytest.raises(TypeError, match=r"argument 1: ScalarResult is an iterator"):
        key_generator(result)
    assert result.all() == [ada]


# -- functions and classes: by import path, or refused ------------------------------------


def test_module_level_functions_and_classes_key_by_their_import_path(
    key_generator: KeyGenerator,
) -> None:
    # Their text is the same ('<built-in function sqrt>'); their import paths are not.
    assert str(math.sqrt) == str(cmath.sqrt)
    assert key_generator(math.sqrt) != key_generator(cmath.sqrt)
    routines: list[object] = [
        math.sqrt,
        json.dumps,
        json.JSONEncoder,
        json.JSONEncoder.encode,
        str.upper,
        dict.fromkeys,
        Point,
        Catalogue,
        Catalogue.build,
        Catalogue.normalise,
    ]
    keys = [key_generator(routine) for routine in routines]
    assert keys == [key_generator(routine) for routine in routines]
    assert len(set(keys)) == len(routines)


class Catalogue:
    @classmethod
    def build(cls) -> Catalogue:
        return cls()

    @staticmethod
    def normalise(name: str) -> str:
        return name.lower()


ROUTINE_SCRIPT = """
import json, math
from alkey.cache import CacheKeyGenerator

class FixedTokens:
    def fetch(self, identifiers):
        return ["t"] * len(identifiers)

print(CacheKeyGenerator(tokens=FixedTokens())(json.dumps, math.sqrt, json.JSONEncoder))
"""


def test_functions_and_classes_key_the_same_in_every_process() -> None:
    keys = {
        subprocess.run(
            [sys.executable, "-c", ROUTINE_SCRIPT], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    }
    assert len(keys) == 1


def _local_class() -> type:
    class Local:
        pass

    return Local


def _nested_function() -> Any:
    def nested() -> None:
        pass

    return nested


@pytest.mark.parametrize(
    ("routine", "name"),
    [
        pytest.param(lambda: None, "function '<lambda>'", id="lambda"),
        pytest.param(
            _nested_function(), "function '_nested_function.<locals>.nested'", id="nested"
        ),
        pytest.param(_local_class(), "type '_local_class.<locals>.Local'", id="local class"),
        pytest.param("text".upper, "builtin_function_or_method 'str.upper'", id="bound builtin"),
        pytest.param(json.JSONEncoder().encode, "method 'JSONEncoder.encode'", id="bound method"),
    ],
)
def test_functions_and_classes_that_cannot_be_found_by_name_are_refused(
    key_generator: KeyGenerator, routine: object, name: str
) -> None:
    with pytest.raises(
        TypeError,
        match=rf"argument 2: {re.escape(name)} has no stable text form and cannot be found",
    ):
        key_generator("render", routine)


# -- objects with no text of their own ----------------------------------------------------


class Plain:
    pass


class Slotted:
    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value


@pytest.mark.parametrize("value", [Plain(), Slotted(1), object()], ids=["plain", "slots", "object"])
def test_objects_without_a_str_or_repr_of_their_own_are_refused_wherever_they_are(
    session: Session, key_generator: KeyGenerator, value: object
) -> None:
    name = type(value).__qualname__
    commit_users(session, "ada")
    row = session.execute(select(User.id, User.name)).one()
    for argument in (value, [value], {"a": value}.values(), collections.deque([value])):
        with pytest.raises(TypeError, match=rf"argument 3: {name} has no stable text form"):
            key_generator(row, "x", argument)


def test_mapped_classes_and_tables_inside_new_containers_stay_token_references(
    session: Session, key_generator: KeyGenerator
) -> None:
    (ada,) = commit_users(session, "ada")
    arguments = (
        collections.deque([User]),
        {"table": User.__table__}.values(),
        collections.UserList([Tag]),
    )
    before = key_generator(*arguments)
    session.add(Tag(code="t"))
    session.commit()
    tags_written = key_generator(*arguments)
    assert tags_written != before
    ada.name = "grace"
    session.commit()
    assert key_generator(*arguments) != tags_written


# -- mapped attributes and aliases ------------------------------------------------------------


class Elsewhere:
    class User(RelationBase):
        """A class named as tests.models.User, mapped elsewhere: ``User.id`` reads alike."""

        __tablename__ = "key_argument_users"
        id: Mapped[int] = mapped_column(primary_key=True)


def test_mapped_attributes_key_by_their_class_import_path_and_name(
    key_generator: KeyGenerator,
) -> None:
    from .models import User as ModelUser

    other = Elsewhere.User
    assert str(other.id) == str(ModelUser.id) == "User.id"
    keys = {key_generator(other.id), key_generator(ModelUser.id), key_generator(ModelUser.name)}
    assert len(keys) == 3
    assert key_generator(ModelUser.id) == key_generator(ModelUser.id)
    assert key_generator(aliased(ModelUser).name) == key_generator(ModelUser.name)


def test_an_aliased_class_stands_for_its_table_as_the_class_does(
    session: Session, key_generator: KeyGenerator
) -> None:
    from .models import User as ModelUser

    alias = aliased(ModelUser)
    key = key_generator(alias)
    assert key == key_generator(ModelUser)
    commit_users(session, "ada")
    assert key_generator(alias) != key, "a write to the table changes it"

"""Writes the database makes by itself: referential actions, passive_deletes, triggers.

Each test runs against the real database (SQLite with ``PRAGMA foreign_keys=ON``, or
PostgreSQL) so the database really cascades, and checks the keys of the rows it wrote.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    attribute_keyed_dict,
    mapped_column,
    relationship,
    sessionmaker,
)

import alkey
from alkey import catalog
from alkey.cache import CacheKeyGenerator
from alkey.cascades import cascaded_tables
from alkey.tokens import RedisClient


class Base(DeclarativeBase):
    metadata = MetaData()


class Owner(Base):
    __tablename__ = "owners"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), default="")
    # The database deletes pets with their owner: the mapper says so, the metadata not.
    pets: Mapped[list[Pet]] = relationship(passive_deletes=True)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(
        ForeignKey("owners.id", ondelete="CASCADE", onupdate="CASCADE")
    )


class Shelf(Base):
    """A second parent of parts: the database's deleting a part touches it too."""

    __tablename__ = "shelves"
    id: Mapped[int] = mapped_column(primary_key=True)


class Part(Base):
    """The second level of the chain owners -> items -> parts."""

    __tablename__ = "parts"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    shelf_id: Mapped[int | None] = mapped_column(ForeignKey("shelves.id"), default=None)
    shelf: Mapped[Shelf | None] = relationship()


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("owners.id", ondelete="SET NULL"))


class Pet(Base):
    __tablename__ = "pets"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"))  # no ondelete here


class Order(Base):
    """A table with a trigger the metadata does not describe (see declare_writes)."""

    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)


class Basket(Base):
    __tablename__ = "baskets"
    id: Mapped[int] = mapped_column(primary_key=True)


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(primary_key=True)


class BasketLine(Base):
    """Deleted with its basket; also references a product."""

    __tablename__ = "basket_lines"
    id: Mapped[int] = mapped_column(primary_key=True)
    basket_id: Mapped[int] = mapped_column(ForeignKey("baskets.id", ondelete="CASCADE"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    basket: Mapped[Basket] = relationship()
    product: Mapped[Product] = relationship()


playlist_songs = Table(
    "playlist_songs",
    Base.metadata,
    Column("playlist_id", ForeignKey("playlists.id", ondelete="CASCADE"), primary_key=True),
    Column("song_id", ForeignKey("songs.id", ondelete="CASCADE"), primary_key=True),
)


class Playlist(Base):
    __tablename__ = "playlists"
    id: Mapped[int] = mapped_column(primary_key=True)
    songs: Mapped[list[Song]] = relationship(
        secondary=playlist_songs, back_populates="playlists", passive_deletes=True
    )


class Song(Base):
    __tablename__ = "songs"
    id: Mapped[int] = mapped_column(primary_key=True)
    playlists: Mapped[list[Playlist]] = relationship(
        secondary=playlist_songs, back_populates="songs", passive_deletes=True
    )


badges = Table(
    "badge_holders",
    Base.metadata,
    Column("badge_id", ForeignKey("badges.id"), primary_key=True),
    Column("holder_id", ForeignKey("holders.id"), primary_key=True),
)


class Holder(Base):
    __tablename__ = "holders"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20), default="")


class Badge(Base):
    """Many-to-many relationships of other shapes: one instance, and a dict by name."""

    __tablename__ = "badges"
    id: Mapped[int] = mapped_column(primary_key=True)
    holder: Mapped[Holder | None] = relationship(secondary=badges, uselist=False, viewonly=False)
    by_name: Mapped[dict[str, Holder]] = relationship(
        secondary=badges, collection_class=attribute_keyed_dict("name"), viewonly=True
    )


follows = Table(
    "follows",
    Base.metadata,
    Column("follower_id", ForeignKey("members.id", ondelete="CASCADE"), primary_key=True),
    Column("followee_id", ForeignKey("members.id", ondelete="CASCADE"), primary_key=True),
)


class Member(Base):
    """A self-referential many-to-many: both foreign keys of follows point here."""

    __tablename__ = "members"
    id: Mapped[int] = mapped_column(primary_key=True)
    following: Mapped[list[Member]] = relationship(
        secondary=follows,
        primaryjoin="Member.id == follows.c.follower_id",
        secondaryjoin="Member.id == follows.c.followee_id",
        passive_deletes=True,
    )


class Category(Base):
    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(primary_key=True)


class Post(Base):
    """ON DELETE SET DEFAULT: its posts move to category 1, which nothing wrote."""

    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    category_id: Mapped[int] = mapped_column(
        ForeignKey("categories.id", ondelete="SET DEFAULT"), server_default=text("1")
    )
    category: Mapped[Category] = relationship()


class Kennel(Base):
    """Its passive_deletes relationship is added after first use (see the test)."""

    __tablename__ = "kennels"
    id: Mapped[int] = mapped_column(primary_key=True)


class Dog(Base):
    __tablename__ = "dogs"
    id: Mapped[int] = mapped_column(primary_key=True)
    kennel_id: Mapped[int] = mapped_column(ForeignKey("kennels.id"))  # no ondelete here


PETS_DDL = (
    "CREATE TABLE pets (id INTEGER PRIMARY KEY, "
    "owner_id INTEGER NOT NULL REFERENCES owners (id) ON DELETE CASCADE)"
)
DOGS_DDL = (
    "CREATE TABLE dogs (id INTEGER PRIMARY KEY, "
    "kennel_id INTEGER NOT NULL REFERENCES kennels (id) ON DELETE CASCADE)"
)
#: Tables created from raw DDL: their foreign keys cascade, though the metadata says not.
RAW_DDL = {"pets": PETS_DDL, "dogs": DOGS_DDL}


@pytest.fixture
def database(engine: Engine, redis_client: RedisClient) -> Iterator[Engine]:
    """The test database with foreign keys enforced, bound for Core and raw SQL."""
    cascading = create_engine(engine.url)
    if cascading.dialect.name == "sqlite":

        @event.listens_for(cascading, "connect")
        def enforce_foreign_keys(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.execute("PRAGMA foreign_keys=ON")

    others = [t for t in Base.metadata.sorted_tables if t.name not in RAW_DDL]
    with cascading.begin() as connection:
        for name in RAW_DDL:
            connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    Base.metadata.drop_all(cascading)
    Base.metadata.create_all(cascading, tables=others)
    with cascading.begin() as connection:
        for ddl in RAW_DDL.values():
            connection.exec_driver_sql(ddl)
    alkey.bind_engine(cascading, redis_client=redis_client)
    yield cascading
    alkey.unbind_engine(cascading)
    with cascading.begin() as connection:
        for name in RAW_DDL:
            connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    Base.metadata.drop_all(cascading)
    cascading.dispose()


@pytest.fixture
def factory(database: Engine, redis_client: RedisClient) -> Iterator[sessionmaker[Session]]:
    made = sessionmaker(database, expire_on_commit=False)
    alkey.bind(made, redis_client=redis_client)
    with made() as session:
        session.add_all([Owner(id=1, name="ada"), Owner(id=2, name="bob"), Shelf(id=1)])
        session.flush()
        session.add_all([Item(id=1, owner_id=1), Item(id=2, owner_id=2)])
        session.flush()
        session.add_all(
            [Part(id=1, item_id=1, shelf_id=1), Note(id=1, owner_id=1), Pet(id=1, owner_id=1)]
        )
        session.commit()
    yield made
    alkey.unbind(made)


@pytest.fixture
def keys(redis_client: RedisClient) -> CacheKeyGenerator:
    return CacheKeyGenerator(redis_client)


WATCHED = (
    "alkey:items#1",
    "alkey:items#*",
    "alkey:parts#1",
    "alkey:notes#1",
    "alkey:pets#1",
    "alkey:orders#*",
    "alkey:shelves#1",
)


def changed_keys(keys: CacheKeyGenerator, before: dict[str, str]) -> set[str]:
    return {name for name in WATCHED if keys(name) != before[name]}


def snapshot(keys: CacheKeyGenerator) -> dict[str, str]:
    return {name: keys(name) for name in WATCHED}


def count(session: Session, model: type[Any]) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def run_core_delete(database: Engine) -> None:
    owners: Table = Owner.__table__  # type: ignore[assignment]
    with database.begin() as connection:
        connection.execute(owners.delete().where(owners.c.id == 1))


@pytest.mark.parametrize("how", ["orm flush", "bulk statement", "core", "raw sql"])
def test_deleting_a_parent_changes_the_keys_of_every_row_the_database_cascades_to(
    factory: sessionmaker[Session], database: Engine, keys: CacheKeyGenerator, how: str
) -> None:
    before = snapshot(keys)
    with factory() as session:
        if how == "orm flush":
            session.delete(session.get_one(Owner, 1))
        elif how == "bulk statement":
            session.execute(delete(Owner).where(Owner.id == 1))
        elif how == "raw sql":
            session.execute(text("DELETE FROM owners WHERE id = 1"))
        session.commit()
    if how == "core":
        run_core_delete(database)
    with factory() as session:  # the database did cascade
        assert (count(session, Item), count(session, Part), count(session, Pet)) == (1, 0, 0)
        assert session.get_one(Note, 1).owner_id is None
    assert changed_keys(keys, before) == {
        "alkey:items#1",  # ON DELETE CASCADE
        "alkey:items#*",
        "alkey:parts#1",  # and on through items' own ON DELETE CASCADE
        "alkey:shelves#1",  # the deleted part's parent (touch_parents)
        "alkey:notes#1",  # ON DELETE SET NULL
        "alkey:pets#1",  # passive_deletes, though the metadata declares no ondelete
    }


@pytest.mark.parametrize("how", ["orm flush", "bulk statement", "core", "raw sql"])
def test_changing_a_referenced_key_changes_the_keys_of_on_update_cascade_children(
    factory: sessionmaker[Session], database: Engine, keys: CacheKeyGenerator, how: str
) -> None:
    before = snapshot(keys)
    with factory() as session:
        session.delete(session.get_one(Pet, 1))  # pets would refuse the change
        session.get_one(Note, 1).owner_id = None
        session.commit()
    before = snapshot(keys)
    with factory() as session:
        if how == "orm flush":
            session.get_one(Owner, 1).id = 10
        elif how == "bulk statement":
            session.execute(update(Owner).where(Owner.id == 1).values(id=10))
        elif how == "raw sql":
            session.execute(text("UPDATE owners SET id = 10 WHERE id = 1"))
        session.commit()
    if how == "core":
        owners: Table = Owner.__table__  # type: ignore[assignment]
        with database.begin() as connection:
            connection.execute(owners.update().where(owners.c.id == 1).values(id=10))
    with factory() as session:
        assert session.get_one(Item, 1).owner_id == 10
    changed = changed_keys(keys, before)
    assert {"alkey:items#1", "alkey:items#*"} <= changed
    # items.owner_id is referenced by nothing: parts keep their keys.
    assert "alkey:parts#1" not in changed


@pytest.mark.parametrize("how", ["orm flush", "bulk statement", "core", "raw sql"])
def test_an_update_that_sets_no_referenced_column_keeps_the_childrens_keys(
    factory: sessionmaker[Session], database: Engine, keys: CacheKeyGenerator, how: str
) -> None:
    before = snapshot(keys)
    with factory() as session:
        if how == "orm flush":
            session.get_one(Owner, 1).name = "grace"
        elif how == "bulk statement":
            session.execute(update(Owner).where(Owner.id == 1).values(name="grace"))
        elif how == "raw sql":
            session.execute(text("UPDATE owners SET name = 'grace' WHERE id = 1"))
        session.commit()
    if how == "core":
        owners: Table = Owner.__table__  # type: ignore[assignment]
        with database.begin() as connection:
            connection.execute(owners.update().values(name="grace"))
    assert changed_keys(keys, before) == set()


def test_an_insert_cascades_to_nothing(
    factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    before = snapshot(keys)
    with factory() as session:
        session.add(Owner(id=3, name="cy"))
        session.execute(text("INSERT INTO owners (id, name) VALUES (4, 'di')"))
        session.commit()
    assert changed_keys(keys, before) == set()


def test_a_rolled_back_cascading_delete_changes_nothing(
    factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    before = snapshot(keys)
    with factory() as session:
        session.execute(delete(Owner).where(Owner.id == 1))
        session.rollback()
    assert changed_keys(keys, before) == set()


# -- the rules, on metadata alone ----------------------------------------------------------


@pytest.fixture
def chain() -> Iterator[MetaData]:
    """a <- b (ON DELETE SET NULL on b.a_id) <- c (references b.a_id, ON UPDATE CASCADE)
    and d (references b.id, ON UPDATE CASCADE); e references itself ON DELETE CASCADE."""
    metadata = MetaData()
    Table("chain_a", metadata, Column("id", Integer, primary_key=True))
    Table(
        "chain_b",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("a_id", ForeignKey("chain_a.id", ondelete="SET NULL"), unique=True),
    )
    Table(
        "chain_c",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("b_a_id", ForeignKey("chain_b.a_id", onupdate="CASCADE")),
    )
    Table(
        "chain_d",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("b_id", ForeignKey("chain_b.id", onupdate="CASCADE", ondelete="RESTRICT")),
    )
    Table(
        "chain_e",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("parent_id", ForeignKey("chain_e.id", ondelete="CASCADE")),
    )
    catalog.register_metadata(metadata)
    yield metadata
    catalog.unregister_metadata(metadata)


def test_set_null_goes_on_only_through_foreign_keys_onto_the_nulled_columns(
    chain: MetaData,
) -> None:
    assert cascaded_tables("chain_a", "delete", None) == {"chain_b", "chain_c"}


def test_an_update_of_unknown_columns_follows_only_on_update_actions(chain: MetaData) -> None:
    assert cascaded_tables("chain_b", "update", None) == {"chain_c", "chain_d"}
    assert cascaded_tables("chain_b", "update", frozenset({"id"})) == {"chain_d"}
    assert cascaded_tables("chain_b", "delete", None) == frozenset()  # RESTRICT


def test_a_self_referencing_cascade_ends_and_reaches_its_own_table(chain: MetaData) -> None:
    assert cascaded_tables("chain_e", "delete", None) == {"chain_e"}


def test_tables_added_to_a_registered_metadata_later_are_seen(chain: MetaData) -> None:
    Table(
        "chain_f",
        chain,
        Column("id", Integer, primary_key=True),
        Column("a_id", ForeignKey("chain_a.id", ondelete="CASCADE")),
    )
    assert "chain_f" in cascaded_tables("chain_a", "delete", None)


def test_a_core_only_metadata_is_unknown_until_registered() -> None:
    metadata = MetaData()
    Table("lone_parent", metadata, Column("id", Integer, primary_key=True))
    Table(
        "lone_child",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("parent_id", ForeignKey("lone_parent.id", ondelete="CASCADE")),
    )
    assert cascaded_tables("lone_parent", "delete", None) == frozenset()
    catalog.register_metadata(metadata)
    try:
        assert cascaded_tables("lone_parent", "delete", None) == {"lone_child"}
    finally:
        catalog.unregister_metadata(metadata)


# -- declared writes (triggers) --------------------------------------------------------------


@pytest.fixture
def audit_trigger() -> Iterator[None]:
    alkey.declare_writes("orders", "order_audit")
    alkey.declare_writes("order_audit", Order)  # a cycle must end
    yield
    alkey.undeclare_writes("orders")
    alkey.undeclare_writes("order_audit")


def test_a_declared_write_changes_the_written_tables_keys_whatever_the_path(
    factory: sessionmaker[Session], database: Engine, keys: CacheKeyGenerator, audit_trigger: None
) -> None:
    for write in ("orm", "raw"):
        before = keys("alkey:order_audit#*"), keys("alkey:order_audit#5")
        with factory() as session:
            if write == "orm":
                session.add(Order(id=1))
            else:
                session.execute(text("UPDATE orders SET id = 2"))
            session.commit()
        assert keys("alkey:order_audit#*") != before[0]
        assert keys("alkey:order_audit#5") != before[1], "rows unknown: every row key"


def test_a_declared_write_cascades_through_the_written_tables_foreign_keys(
    factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    alkey.declare_writes(Order, Owner.__table__)
    try:
        before = keys("alkey:items#1")
        with factory() as session:
            session.add(Order(id=1))
            session.commit()
        assert keys("alkey:items#1") != before
    finally:
        alkey.undeclare_writes(Order)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ((Order(), "x"), TypeError, r"the table <.*Order.*> is not a table; pass a Table"),
        (("orders", 42), TypeError, "the written table 42 is not a table"),
        (("a.b.c", "x"), ValueError, r"table 'a.b.c' is not 'table' or 'schema.table'"),
        (("orders",), ValueError, "at least one table it also writes"),
    ],
)
def test_declaring_writes_for_something_that_is_not_a_table_says_what_to_pass(
    arguments: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        alkey.declare_writes(*arguments)


def test_registering_something_that_is_not_a_metadata_says_what_to_pass() -> None:
    with pytest.raises(TypeError, match=r"pass Base\.metadata"):
        catalog.register_metadata(Base)  # type: ignore[arg-type]


@pytest.fixture
def shop(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Two baskets with a line each on product 1; a playlist of songs 1 and 2, and one of
    song 3."""
    with factory() as session:
        session.add_all([Basket(id=1), Basket(id=2), Product(id=1)])
        session.flush()
        session.add_all(
            [
                BasketLine(id=1, basket_id=1, product_id=1),
                BasketLine(id=2, basket_id=2, product_id=1),
            ]
        )
        songs = [Song(id=index) for index in (1, 2, 3)]
        session.add_all([Playlist(id=1, songs=songs[:2]), Playlist(id=2, songs=songs[2:])])
        session.commit()
    return factory


@pytest.mark.parametrize("how", ["bulk statement", "core"])
def test_rows_the_database_deletes_touch_their_other_parents_but_not_their_siblings(
    shop: sessionmaker[Session], database: Engine, keys: CacheKeyGenerator, how: str
) -> None:
    before = {name: keys(name) for name in ("alkey:products#1", "alkey:baskets#2")}
    if how == "bulk statement":  # the basket's row is known: RETURNING
        with shop() as session:
            session.execute(
                delete(Basket).where(Basket.id == 1),
                execution_options={"synchronize_session": "fetch"},
            )
            session.commit()
    else:  # the basket's row is known: its key is in the parameters
        baskets = Base.metadata.tables["baskets"]
        with database.begin() as connection:
            connection.execute(baskets.delete().where(baskets.c.id == 1))
    with shop() as session:
        assert session.get(BasketLine, 1) is None, "the database deleted the line"
    # The deleted line's product lost a line; the other basket lost nothing (the line
    # reached the baskets only along the foreign key the cascade came by, from basket 1).
    assert keys("alkey:products#1") != before["alkey:products#1"]
    assert keys("alkey:baskets#2") == before["alkey:baskets#2"]


@pytest.mark.parametrize("how", ["text through the session", "core on a bound engine"])
def test_a_raw_or_core_write_to_a_child_table_touches_its_parents(
    shop: sessionmaker[Session], database: Engine, keys: CacheKeyGenerator, how: str
) -> None:
    key = keys("alkey:products#1")
    if how == "text through the session":
        with shop() as session:
            session.execute(text("UPDATE basket_lines SET product_id = product_id"))
            session.commit()
    else:
        lines = Base.metadata.tables["basket_lines"]
        with database.begin() as connection:
            connection.execute(lines.update().values(product_id=1))
    assert keys("alkey:products#1") != key


@pytest.mark.parametrize("how", ["orm flush", "bulk statement"])
def test_deleting_a_many_to_many_member_touches_the_collections_it_was_in(
    shop: sessionmaker[Session], keys: CacheKeyGenerator, how: str
) -> None:
    before = keys("alkey:playlists#1")
    with shop() as session:
        if how == "orm flush":
            session.delete(session.get_one(Song, 1))
        else:
            session.execute(delete(Song).where(Song.id == 1))
        session.commit()
    with shop() as session:
        assert [song.id for song in session.get_one(Playlist, 1).songs] == [2]
    assert keys("alkey:playlists#1") != before


def test_a_passive_deletes_relationship_added_after_first_use_is_learnt(
    factory: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    with factory() as session:
        session.add(Kennel(id=1))
        session.flush()
        session.add(Dog(id=1, kennel_id=1))
        session.commit()
    catalog.passive_delete_children("kennels")  # the catalog is in use already
    # Declarative maps it at once (and it cannot be taken back: it stays for this module).
    Kennel.dogs = relationship(Dog, passive_deletes=True)
    time.sleep(catalog.PROPERTY_CHECK_INTERVAL)
    assert catalog.passive_delete_children("kennels") == {"dogs"}
    before = keys("alkey:dogs#1")
    with factory() as session:
        session.execute(delete(Kennel).where(Kennel.id == 1))
        session.commit()
        assert session.get(Dog, 1) is None, "the database deleted the dog"
    assert keys("alkey:dogs#1") != before


@pytest.mark.parametrize("shape", ["one instance", "a dict by name"])
def test_deleting_a_row_whose_many_to_many_of_another_shape_is_loaded_commits_and_touches(
    factory: sessionmaker[Session], keys: CacheKeyGenerator, shape: str
) -> None:
    with factory() as session:
        session.add_all([Holder(id=1, name="ada"), Badge(id=1)])
        session.flush()
        session.execute(badges.insert().values(badge_id=1, holder_id=1))
        session.commit()
    before = keys("alkey:holders#1")
    with factory() as session:
        badge = session.get_one(Badge, 1)
        holder = badge.holder if shape == "one instance" else badge.by_name["ada"]
        assert holder is not None
        assert holder.id == 1
        session.delete(badge)
        session.commit()
    assert keys("alkey:holders#1") != before


def test_a_member_removed_then_its_owner_deleted_in_one_flush_is_touched(
    shop: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    before = keys("alkey:songs#2")
    with shop() as session:
        playlist = session.get_one(Playlist, 1)
        playlist.songs.remove(session.get_one(Song, 2))
        session.delete(playlist)
        session.commit()
    assert keys("alkey:songs#2") != before


@pytest.mark.parametrize("how", ["core", "bulk statement"])
def test_a_self_referential_association_cascade_touches_the_other_members(
    factory: sessionmaker[Session], database: Engine, keys: CacheKeyGenerator, how: str
) -> None:
    with factory() as session:
        first, second = Member(id=1), Member(id=2)
        session.add_all([first, second])
        session.flush()
        second.following.append(first)
        session.commit()
    before = keys("alkey:members#2")
    if how == "core":
        members = Base.metadata.tables["members"]
        with database.begin() as connection:
            connection.execute(members.delete().where(members.c.id == 1))
    else:
        with factory() as session:
            session.execute(
                delete(Member).where(Member.id == 1),
                execution_options={"synchronize_session": "fetch"},
            )
            session.commit()
    with factory() as session:
        assert session.get_one(Member, 2).following == []
    assert keys("alkey:members#2") != before


def test_set_default_touches_the_default_parent_the_children_move_to(
    factory: sessionmaker[Session], database: Engine, keys: CacheKeyGenerator
) -> None:
    with factory() as session:
        session.add_all([Category(id=1), Category(id=5)])
        session.flush()
        session.add(Post(id=10, category_id=5))
        session.commit()
    before = keys("alkey:categories#1")
    categories = Base.metadata.tables["categories"]
    with database.begin() as connection:
        connection.execute(categories.delete().where(categories.c.id == 5))
    with factory() as session:
        assert session.get_one(Post, 10).category_id == 1
    assert keys("alkey:categories#1") != before


def test_core_table_statements_through_a_session_touch_their_parents(
    shop: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    key = keys("alkey:products#1")
    lines = Base.metadata.tables["basket_lines"]
    with shop() as session:
        session.execute(lines.update().values(product_id=1))
        session.commit()
    assert keys("alkey:products#1") != key


def test_a_flush_hooks_cascading_delete_touches_the_cascaded_rows_parents(
    shop: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    with shop() as session:
        session.add(Holder(id=1, name="ada"))
        session.commit()
    before = keys("alkey:products#1")

    def empty_basket_1(mapper: Any, connection: Any, target: Any) -> None:
        connection.execute(text("DELETE FROM baskets WHERE id = 1"))  # inside the flush

    event.listen(Holder, "after_update", empty_basket_1)
    try:
        with shop() as session:
            session.get_one(Holder, 1).name = "ada lovelace"
            session.commit()
    finally:
        event.remove(Holder, "after_update", empty_basket_1)
    with shop() as session:
        assert session.get(BasketLine, 1) is None, "the database deleted the line"
    assert keys("alkey:products#1") != before


def test_a_core_insert_touches_the_parents_its_parameters_name_and_no_other(
    shop: sessionmaker[Session], database: Engine, keys: CacheKeyGenerator
) -> None:
    with shop() as session:
        session.add(Product(id=2))
        session.commit()
    before = {name: keys(name) for name in ("alkey:products#1", "alkey:products#2")}
    lines = Base.metadata.tables["basket_lines"]
    with database.begin() as connection:
        connection.execute(lines.insert(), [{"id": 3, "basket_id": 2, "product_id": 1}])
    assert keys("alkey:products#1") != before["alkey:products#1"]
    assert keys("alkey:products#2") == before["alkey:products#2"], "an audit-style insert"

"""One row, one identifier: however a session wrote or a driver returned its primary key."""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import (
    CHAR,
    Column,
    DateTime,
    Engine,
    Enum,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Uuid,
    insert,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.identity import (
    NULL_VALUE,
    Identifier,
    bulk_identifiers,
    identifier_for,
    parse_identifier,
    row_identifier,
)
from alkey.tokens import RedisClient


class Base(DeclarativeBase):
    metadata = MetaData()


class Event(Base):
    __tablename__ = "identity_events"
    at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    title: Mapped[str] = mapped_column(String(50), default="")


class Meeting(Base):
    """A timestamp key in a column without time zone."""

    __tablename__ = "identity_meetings"
    at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=False), primary_key=True)
    title: Mapped[str] = mapped_column(String(50), default="")


class Code(Base):
    """A fixed-width key: PostgreSQL returns it padded with spaces."""

    __tablename__ = "identity_codes"
    code: Mapped[str] = mapped_column(CHAR(6), primary_key=True)
    label: Mapped[str] = mapped_column(String(50), default="")


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Paint(Base):
    """An Enum key: the database stores the member's name."""

    __tablename__ = "identity_paints"
    color: Mapped[Color] = mapped_column(Enum(Color), primary_key=True)
    label: Mapped[str] = mapped_column(String(50), default="")


class Price(Base):
    __tablename__ = "identity_prices"
    amount: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2), primary_key=True)
    label: Mapped[str] = mapped_column(String(50), default="")


class Ticket(Base):
    __tablename__ = "identity_tickets"
    code: Mapped[str] = mapped_column(Uuid(as_uuid=False), primary_key=True)
    label: Mapped[str] = mapped_column(String(50), default="")


#: A mapper whose primary key, as SQLAlchemy allows, may hold a NULL part.
slots = Table(
    "identity_slots",
    Base.metadata,
    Column("row_id", Integer, primary_key=True),
    Column("room", String(20), nullable=True),
    Column("day", Integer, nullable=False),
    Column("label", String(50), default=""),
)


class Slot(Base):
    __table__ = slots
    __mapper_args__ = {"primary_key": [slots.c.room, slots.c.day]}


@pytest.fixture
def factory(tables: Engine, redis_client: RedisClient) -> Iterator[sessionmaker[Session]]:
    Base.metadata.drop_all(tables)
    Base.metadata.create_all(tables)
    made = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(made, redis_client=redis_client)
    yield made
    alkey.unbind(made)
    Base.metadata.drop_all(tables)


def test_a_timestamp_key_written_naive_and_read_back_aware_names_one_row(
    factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    key_generator = CacheKeyGenerator(redis_client)
    written_at = datetime.datetime(2024, 1, 1, 12, 30)  # naive: UTC, as the server stores it
    with factory() as writer:
        event = Event(at=written_at, title="launch")
        writer.add(event)
        writer.commit()
        with factory() as reader:
            loaded = reader.get_one(Event, written_at)
            # PostgreSQL returns timestamptz aware (in UTC here); SQLite, naive.
            assert identifier_for(loaded) == identifier_for(event)
            key = key_generator(loaded)
        event.title = "launch, moved"
        writer.commit()  # bumps the row under the spelling the writer has
    with factory() as reader:
        assert key_generator(reader.get_one(Event, written_at)) != key


def test_an_aware_datetime_names_the_same_instant_in_any_time_zone() -> None:
    utc = datetime.datetime(2024, 1, 1, 0, 0, tzinfo=datetime.timezone.utc)
    paris = utc.astimezone(datetime.timezone(datetime.timedelta(hours=1)))
    naive = utc.replace(tzinfo=None)
    spellings = {row_identifier("events", value) for value in (utc, paris, naive)}
    assert spellings == {"alkey:events#2024-01-01T00%3A00%3A00"}


def test_an_aware_timestamp_key_in_a_column_without_time_zone_is_bumped_as_read_back(
    factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    key_generator = CacheKeyGenerator(redis_client)
    # SQLite stores the wall time and drops the offset; PostgreSQL converts the instant to
    # its session's time zone (UTC). A reader loads whichever the database kept.
    at = datetime.datetime(2024, 1, 1, 10, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    with factory() as writer:
        meeting = Meeting(at=at, title="kick-off")
        writer.add(meeting)
        writer.commit()
        with factory() as reader:
            [stored] = reader.scalars(select(Meeting.at)).all()
            key = key_generator(row_identifier("identity_meetings", stored), "agenda")
        meeting.title = "kick-off, moved"  # the writer names the row by its aware value
        writer.commit()
    assert key_generator(row_identifier("identity_meetings", stored), "agenda") != key


def test_a_fixed_width_key_names_the_row_padded_or_not(
    factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    key_generator = CacheKeyGenerator(redis_client)
    with factory() as writer:
        code = Code(code="ab", label="new")
        writer.add(code)
        writer.commit()
        with factory() as reader:
            loaded = reader.get_one(Code, "ab")
            assert identifier_for(loaded) == identifier_for(code) == "alkey:identity_codes#ab"
            key = key_generator(identifier_for(loaded))
        code.label = "changed"
        writer.commit()
    assert key_generator("alkey:identity_codes#ab") != key


def test_an_enum_key_given_as_a_member_or_as_its_stored_name_names_one_row(
    factory: sessionmaker[Session],
) -> None:
    with factory() as session:
        session.add(Paint(color=Color.RED))
        session.commit()
    with factory() as session:
        loaded = session.get_one(Paint, Color.RED)
        assert identifier_for(loaded) == "alkey:identity_paints#RED"
    mapper = Paint.__mapper__
    assert bulk_identifiers(mapper, [("RED",)]) == bulk_identifiers(mapper, [(Color.RED,)])


def test_numeric_keys_of_any_scale_name_one_row(
    factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    key_generator = CacheKeyGenerator(redis_client)
    with factory() as writer:
        price = Price(amount=decimal.Decimal("1.5"), label="one and a half")
        writer.add(price)
        writer.commit()
        with factory() as reader:
            loaded = reader.get_one(Price, decimal.Decimal("1.50"))
            assert identifier_for(loaded) == identifier_for(price) == "alkey:identity_prices#1.5"
            key = key_generator(loaded)
        price.label = "changed"
        writer.commit()
    with factory() as reader:
        assert key_generator(reader.get_one(Price, decimal.Decimal("1.5"))) != key
    mapper = Price.__mapper__
    spellings = [decimal.Decimal("2"), decimal.Decimal("2.00"), 2, 2.0, "2.0"]
    assert {frozenset(bulk_identifiers(mapper, [(value,)])) for value in spellings} == {
        frozenset(bulk_identifiers(mapper, [(2,)]))
    }


def test_a_uuid_key_given_as_text_in_any_form_names_one_row() -> None:
    code = uuid.uuid4()
    spellings = [code, str(code), str(code).upper(), code.hex, code.bytes]
    identifiers = {
        frozenset(bulk_identifiers(Ticket.__mapper__, [(value,)])) for value in spellings
    }
    assert identifiers == {frozenset(bulk_identifiers(Ticket.__mapper__, [(str(code),)]))}


def test_a_bulk_update_naming_a_uuid_key_in_upper_case_changes_the_loaded_rows_key(
    factory: sessionmaker[Session], redis_client: RedisClient, tables: Engine
) -> None:
    if tables.dialect.name != "postgresql":
        pytest.skip("SQLite compares the stored text of a UUID by case")
    key_generator = CacheKeyGenerator(redis_client)
    code = uuid.uuid4()
    with factory() as writer:
        writer.execute(insert(Ticket).values(code=str(code), label="new"))
        writer.commit()
    with factory() as reader:
        key = key_generator(reader.get_one(Ticket, str(code)))
    with factory() as writer:
        writer.execute(update(Ticket), [{"code": str(code).upper(), "label": "changed"}])
        writer.commit()
    with factory() as reader:
        loaded = reader.get_one(Ticket, str(code))
        assert loaded.label == "changed"
        assert key_generator(loaded) != key


def test_a_loaded_row_whose_composite_key_has_a_null_part_gets_its_own_token(
    factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    key_generator = CacheKeyGenerator(redis_client)
    with factory() as session:
        session.execute(
            insert(slots),
            [{"row_id": 1, "room": None, "day": 3}, {"row_id": 2, "room": "a", "day": 3}],
        )
        session.commit()
        lobby, room_a = session.scalars(select(Slot).order_by(slots.c.row_id)).all()
        assert identifier_for(lobby) == f"alkey:identity_slots#{NULL_VALUE},3"
        assert identifier_for(room_a) == "alkey:identity_slots#a,3"
        keys = key_generator(lobby), key_generator(room_a)
        alkey.invalidate(lobby, tokens=key_generator.tokens)
        assert key_generator(lobby) != keys[0]
        assert key_generator(room_a) == keys[1]


def test_null_parts_and_identity_tokens_parse_back_to_themselves() -> None:
    texts = [f"alkey:slots#{NULL_VALUE},3", "alkey:items#1@east", "alkey:t#~,~null@a%2Eb"]
    for text in texts:
        assert str(parse_identifier(text)) == text
    assert parse_identifier("alkey:items#1@east") == Identifier("items", ("1",), None, "east")
    assert parse_identifier(f"alkey:slots#{NULL_VALUE},3").key == (None, "3")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("alkey:items#*@east", "a table has no identity token"),
        ("alkey:items#1@", "it must look like"),
    ],
)
def test_a_misplaced_identity_token_is_rejected(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_identifier(text)


def test_a_row_identifier_with_no_key_value_at_all_says_what_to_do_instead() -> None:
    with pytest.raises(ValueError, match=r"every primary-key value is None.*table_identifier"):
        row_identifier("users", None)

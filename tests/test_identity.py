"""Identifiers come from the mapper, for any key type and table name, and never collide."""

from __future__ import annotations

import uuid

import pytest

from alkey import GLOBAL_WRITE_TOKEN
from alkey.identity import (
    Identifier,
    identifier_for,
    parse_identifier,
    row_identifier,
    table_identifier,
)
from alkey.tokens import RedisClient

from .conftest import SessionAPI, token_keys
from .models import (
    SCHEMA,
    Document,
    Employee,
    Engineer,
    Invoice,
    Manager,
    Membership,
    OddlyNamed,
    Tag,
    User,
)

# Tests that persist rows do it with a Session and with an AsyncSession (see conftest).
pytestmark = pytest.mark.flavours("sync", "asyncio")


def test_a_single_integer_key_keeps_the_seed_format(session: SessionAPI) -> None:
    user = User(name="ada")
    session.add(user)
    session.commit()
    assert identifier_for(user) == "alkey:users#1"
    assert identifier_for(User) == "alkey:users#*"
    assert identifier_for(User.__table__) == "alkey:users#*"


def test_string_uuid_and_composite_keys_identify_their_rows(session: SessionAPI) -> None:
    document_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
    tag, document = Tag(code="python"), Document(id=document_id)
    membership = Membership(group="admins", user_id=3)
    session.add_all([tag, document, membership])
    session.commit()
    assert identifier_for(tag) == "alkey:tags#python"
    assert identifier_for(document) == f"alkey:documents#{document_id}"
    assert identifier_for(membership) == "alkey:memberships#admins,3"


def test_separators_inside_key_values_never_make_two_rows_share_an_identifier(
    session: SessionAPI,
) -> None:
    codes = ["a,b", "a#b", "a:b", "a%2Cb", "*", "", "~", "a b", "ünï", "a.b", "a/b"]
    tags = [Tag(code=code) for code in codes]
    memberships = [Membership(group="a,b", user_id=1), Membership(group="a", user_id=1)]
    session.add_all([*tags, *memberships])
    session.commit()
    identifiers = [identifier_for(obj) for obj in [*tags, *memberships]]
    assert len(set(identifiers)) == len(identifiers)
    assert identifier_for(Tag) not in identifiers
    for identifier, code in zip(identifiers, codes, strict=False):
        assert identifier.isascii()
        assert parse_identifier(identifier) == Identifier("tags", (code,))


def test_table_names_keep_digits_case_separators_and_schema(session: SessionAPI) -> None:
    odd, invoice = OddlyNamed(), Invoice()
    session.add_all([odd, invoice])
    session.commit()
    assert identifier_for(odd) == "alkey:2FA%20Codes%3A%23%2C#1"
    assert parse_identifier(identifier_for(odd)).table == "2FA Codes:#,"
    assert identifier_for(invoice) == f"alkey:{SCHEMA}.invoices#1"
    assert identifier_for(Invoice) == f"alkey:{SCHEMA}.invoices#*"


def test_an_unflushed_instance_stands_for_its_table() -> None:
    assert identifier_for(User(name="new")) == "alkey:users#*"


def test_inheritance_uses_the_most_specific_table(session: SessionAPI) -> None:
    manager, engineer = Manager(name="m"), Engineer(name="e")
    session.add_all([manager, engineer])
    session.commit()
    assert identifier_for(manager) == f"alkey:managers#{manager.id}"
    assert identifier_for(engineer) == f"alkey:employees#{engineer.id}"
    assert identifier_for(Manager) == "alkey:managers#*"
    assert identifier_for(Engineer) == identifier_for(Employee) == "alkey:employees#*"


def test_a_joined_subclass_write_bumps_every_table_in_its_hierarchy(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    manager = Manager(name="m")
    session.add(manager)
    session.commit()
    assert token_keys(redis_client) == {
        GLOBAL_WRITE_TOKEN,
        "alkey:employees#*",
        "alkey:managers#*",
        f"alkey:employees#{manager.id}",
        f"alkey:managers#{manager.id}",
    }


def test_row_and_table_identifiers_can_be_built_by_hand() -> None:
    assert row_identifier("users", 1) == "alkey:users#1"
    assert row_identifier("memberships", "a,b", 1) == "alkey:memberships#a%2Cb,1"
    assert row_identifier(Invoice.__table__, 5) == f"alkey:{SCHEMA}.invoices#5"
    assert table_identifier("shop.orders") == "alkey:shop.orders#*"
    assert row_identifier("t", "") == "alkey:t#~"
    assert row_identifier("t", "~") == "alkey:t#%7E"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("alkey:users", "must look like"),
        ("alkey:users#", "must look like"),
        ("alkey:#1", "must look like"),
        ("alkey:users#1#2", "must look like"),
        ("alkey:Order Items#1", "must look like"),
        ("alkey:users#%2c", "must look like"),
        ("alkey:users#%41", "canonical spelling is 'alkey:users#A'"),
        ("alkey:users#%FF", "escapes are not UTF-8"),
        ("alkey:*#1", "must look like"),
    ],
)
def test_an_invalid_identifier_is_rejected_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="not a valid alkey identifier") as error:
        parse_identifier(text)
    assert reason in str(error.value)
    assert "row_identifier()" in str(error.value)


def test_every_valid_identifier_parses_back_to_itself() -> None:
    for text in [GLOBAL_WRITE_TOKEN, "alkey:users#*", "alkey:s.t#a,~,%7E", "alkey:2FA#-1.5"]:
        assert str(parse_identifier(text)) == text

"""Cache keys: deterministic, injective, bounded, and tied to the right tokens."""

from __future__ import annotations

import datetime
import decimal
import enum
import os
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alkey import GLOBAL_WRITE_TOKEN
from alkey.constants import MAX_KEY_LENGTH
from alkey.keys import CacheKeyGenerator, get_cache_key_generator, get_token
from alkey.tokens import RedisClient

from .conftest import KeyGenerator, SessionAPI
from .models import Tag, User

# Tests that open sessions or take the key_generator fixture run with a Session and
# CacheKeyGenerator, and with an AsyncSession and AsyncCacheKeyGenerator (see conftest).
pytestmark = pytest.mark.flavours("sync", "asyncio")


class Colour(enum.Enum):
    RED = 1


class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return self.name


class Opaque:
    pass


class Broken:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def commit_users(session: SessionAPI, *names: str) -> list[User]:
    users = [User(name=name) for name in names]
    session.add_all(users)
    session.commit()
    return users


def test_a_key_names_the_row_so_only_that_rows_commit_changes_it(
    session: SessionAPI, key_generator: KeyGenerator
) -> None:
    ada, bob = commit_users(session, "ada", "bob")
    keys = {
        "instance": key_generator(ada),
        "identifier": key_generator("alkey:users#1"),
        "other row": key_generator(bob),
        "table": key_generator(User),
        "table identifier": key_generator("alkey:users#*"),
        "global": key_generator(GLOBAL_WRITE_TOKEN),
        "other table": key_generator(Tag),
    }
    ada.name = "grace"
    session.commit()
    after = {
        "instance": key_generator(ada),
        "identifier": key_generator("alkey:users#1"),
        "other row": key_generator(bob),
        "table": key_generator(User),
        "table identifier": key_generator("alkey:users#*"),
        "global": key_generator(GLOBAL_WRITE_TOKEN),
        "other table": key_generator(Tag),
    }
    assert {name for name in keys if keys[name] != after[name]} == {
        "instance",
        "identifier",
        "table",
        "table identifier",
        "global",
    }


def test_an_instance_and_its_identifier_share_one_token(
    session: SessionAPI, redis_client: RedisClient
) -> None:
    (ada,) = commit_users(session, "ada")
    assert get_token(redis_client, ada) == get_token(redis_client, "alkey:users#1")
    assert get_token(redis_client, User) == get_token(redis_client, "alkey:users#*")


def test_tokens_are_random_128_bit_values_not_counters_or_timestamps(
    redis_client: RedisClient,
) -> None:
    tokens = {get_token(redis_client, f"alkey:t#{index}") for index in range(50)}
    assert len(tokens) == 50
    bases = set()
    for token in tokens:
        stored, _, epoch = token.partition("@")
        assert len(epoch) == 16, "the server's epoch, folded in"
        base, _, position = stored.partition(".")
        assert len(base) >= 22  # 16 random bytes, URL-safe base64
        assert len(set(base)) > 10, "random text, not digits of a time or a counter"
        assert position.isdigit()
        bases.add(base)
    assert len(bases) == 50, "a fresh random base for every call"


def test_a_missing_token_is_created_once_with_the_default_one_day_ttl(
    redis_client: RedisClient,
) -> None:
    first = get_token(redis_client, "alkey:users#9")
    assert get_token(redis_client, "alkey:users#9") == first
    assert 0 < redis_client.ttl("alkey:users#9") <= 24 * 60 * 60


def test_nested_instances_count_as_instances(
    session: SessionAPI, key_generator: KeyGenerator
) -> None:
    users = commit_users(session, "ada", "bob")
    key = key_generator({"people": users}, "list")
    users[1].name = "robert"
    session.commit()
    assert key_generator({"people": users}, "list") != key


def test_an_unflushed_instance_keys_on_its_table(
    session: SessionAPI, key_generator: KeyGenerator
) -> None:
    assert key_generator(User(name="draft")) == key_generator(User)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("a", "b"), ("a/b",)),
        (("x",), ("x", "")),
        ((1,), ("1",)),
        ((1,), (1.0,)),
        ((1,), (True,)),
        ((None,), ("None",)),
        ((b"a",), ("a",)),
        (([1, 2],), ((1, 2),)),
        (({"a": 1},), ([("a", 1)],)),
        (({1, 2},), ([1, 2],)),
        ((Named("x"),), ("x",)),
        ((Colour.RED,), (1,)),
        (("\ud800",), ("\ufffd",)),
        ((0.0,), (-0.0,)),
    ],
)
def test_different_arguments_never_share_a_key(
    key_generator: KeyGenerator, left: tuple[Any, ...], right: tuple[Any, ...]
) -> None:
    assert key_generator(*left) != key_generator(*right)


def test_dicts_and_sets_key_the_same_in_any_order(key_generator: KeyGenerator) -> None:
    assert key_generator({"a": 1, "b": 2}) == key_generator({"b": 2, "a": 1})
    assert key_generator({"x", "y", "z"}) == key_generator({"z", "y", "x"})


KEY_SCRIPT = """
import datetime, decimal, sys, uuid
from alkey.keys import CacheKeyGenerator
from alkey.tokens import TokenStore

class FixedTokens:
    def fetch(self, identifiers):
        return ["token-" + identifier for identifier in identifiers]
    def bump(self, identifiers):
        raise AssertionError

kg = CacheKeyGenerator(tokens=FixedTokens(), prefix="page:")
print(kg("alkey:users#1", {"b": [1, 2.5, None], "a": {"x", "y"}}, b"raw",
         uuid.UUID(int=7), decimal.Decimal("1.10"), datetime.date(2024, 1, 2)))
"""


def test_keys_are_identical_across_processes_and_hash_seeds() -> None:
    keys = set()
    for seed in ("1", "2", "random"):
        environment = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", KEY_SCRIPT],
            env=environment,
            capture_output=True,
            text=True,
            check=True,
        )
        keys.add(result.stdout.strip())
    assert len(keys) == 1
    (key,) = keys
    assert key.startswith("page:")


def test_a_key_is_bounded_printable_ascii_with_an_optional_prefix(
    redis_client: RedisClient,
) -> None:
    plain = CacheKeyGenerator(redis_client)
    prefixed = CacheKeyGenerator(redis_client, prefix="fragment:sidebar:")
    for generator in (plain, prefixed):
        key = generator("x" * 1_000_000, list(range(10_000)), "ünïcode")
        assert len(key) <= MAX_KEY_LENGTH
        assert all("!" <= char <= "~" for char in key)
    assert prefixed("a").startswith("fragment:sidebar:")
    assert plain("a") == prefixed("a").removeprefix("fragment:sidebar:")


@pytest.mark.parametrize(
    ("prefix", "message"),
    [("has space", "contains ' '"), ("x" * 200, "at most 186"), ("é", "contains 'é'")],
)
def test_an_unusable_prefix_is_refused_with_the_fix(
    redis_client: RedisClient, prefix: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CacheKeyGenerator(redis_client, prefix=prefix)


@pytest.mark.parametrize(
    ("argument", "error", "message"),
    [
        ("alkey:users", ValueError, "argument 2: 'alkey:users' is not a valid alkey identifier"),
        (["ok", "alkey:Users Table#1"], ValueError, "argument 2: .* not a valid"),
        (Opaque(), TypeError, "argument 2: Opaque has no stable text form"),
        (Broken(), TypeError, r"argument 2: str\(\) of Broken failed \(RuntimeError"),
    ],
)
def test_bad_input_raises_an_error_naming_the_argument(
    key_generator: KeyGenerator, argument: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        key_generator("fine", argument)


def test_a_reference_cycle_is_refused_not_recursed_forever(
    key_generator: KeyGenerator,
) -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="nested deeper than 64 levels"):
        key_generator(cycle)


def test_get_cache_key_generator_uses_the_client_registered_for_the_request(
    redis_client: RedisClient,
) -> None:
    from zope.interface.registry import Components

    from alkey.interfaces import IRedisClientFactory

    class Request:
        registry = Components()

    Request.registry.registerUtility(lambda: redis_client, IRedisClientFactory)
    generator = get_cache_key_generator(Request(), prefix="p:")
    generator("alkey:users#5")
    assert redis_client.exists("alkey:users#5") == 1


# -- properties ---------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.uuids()
    | st.dates()
    | st.datetimes()
)
values = st.recursive(
    scalars.filter(lambda v: not (isinstance(v, str) and v.startswith("alkey:"))),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=5), children, max_size=4)
        | st.frozensets(st.integers() | st.text(max_size=5), max_size=4)
    ),
    max_leaves=12,
)


class NoTokens:
    """Arguments here hold no identifiers, so no token is ever fetched."""

    def fetch(self, identifiers: Any) -> list[str]:
        assert not identifiers
        return []

    def bump(self, identifiers: Any) -> None:  # pragma: no cover - never bumped
        raise AssertionError


OFFLINE = CacheKeyGenerator(tokens=NoTokens())


def _normal(value: Any) -> Any:
    """A form where equal inputs compare equal and distinct ones differ, for the check."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_normal(item) for item in value))
    if isinstance(value, dict):
        return ("dict", frozenset((_normal(k), _normal(v)) for k, v in value.items()))
    if isinstance(value, frozenset):
        return ("set", frozenset(_normal(item) for item in value))
    if isinstance(value, float) and value == 0:
        return ("float", str(value))
    if isinstance(value, decimal.Decimal):
        return ("decimal", str(value))
    if isinstance(value, datetime.datetime):
        return ("datetime", value.isoformat())
    return (type(value).__name__, value)


@settings(max_examples=300, deadline=None)
@given(st.lists(values, max_size=4), st.lists(values, max_size=4))
def test_property_distinct_argument_lists_get_distinct_bounded_keys(
    left: list[Any], right: list[Any]
) -> None:
    left_key, right_key = OFFLINE(*left), OFFLINE(*right)
    for key in (left_key, right_key):
        assert len(key) <= MAX_KEY_LENGTH
        assert key.isascii()
    assert (left_key == right_key) == (_normal(left) == _normal(right))


def test_no_two_of_100_000_distinct_random_inputs_share_a_key() -> None:
    import random

    rng = random.Random(20261127)
    alphabet = ["", "a", "/", ",", "#", ":", " ", "é", "1"]
    seen: dict[str, tuple[Any, ...]] = {}
    inputs: set[str] = set()
    while len(inputs) < 100_000:
        # Short arguments from a small alphabet of separators: near-collisions galore.
        arguments = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
            if rng.random() < 0.7
            else rng.choice([0, 1, 1.0, True, None, b"a", ("a",), ["a"]])
            for _ in range(rng.randint(1, 3))
        )
        key = OFFLINE(*arguments)
        assert _normal(seen.setdefault(key, arguments)) == _normal(arguments)
        inputs.add(repr(_normal(arguments)))
    assert len(seen) == len(inputs)


def test_concurrent_readers_of_a_missing_token_agree_on_one(redis_url: str) -> None:
    import threading

    import redis as redis_module

    from alkey.tokens import RedisTokenStore

    barrier = threading.Barrier(16)
    seen: list[str] = []

    def read() -> None:
        client = redis_module.Redis.from_url(redis_url)
        store = RedisTokenStore(client)
        barrier.wait()
        seen.append(store.fetch(["alkey:race#1"])[0])
        client.close()

    threads = [threading.Thread(target=read) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 16
    assert len(set(seen)) == 1


any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=50)


@settings(max_examples=300, deadline=None)
@given(any_text, any_text)
def test_property_any_text_even_lone_surrogates_keys_apart_within_bounds(
    left: str, right: str
) -> None:
    if left.startswith("alkey:") or right.startswith("alkey:"):
        return  # identifiers, validated separately
    left_key, right_key = OFFLINE(left), OFFLINE(right)
    assert len(left_key) <= MAX_KEY_LENGTH
    assert left_key.isascii()
    assert (left_key == right_key) == (left == right)


class ReprRaises:
    def __repr__(self) -> str:
        raise RuntimeError("no repr either")

    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_an_object_whose_str_and_repr_raise_gets_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"argument 1: str\(\) of ReprRaises failed"):
        OFFLINE(ReprRaises())

"""One configuration path: keyword arguments, settings, the URL's query and the environment,
read by alkey.settings.configure, checked at once, and the stores made by URL scheme."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

import alkey
from alkey import client as alkey_client
from alkey.cache import CacheKeyGenerator
from alkey.client import get_redis_config
from alkey.errors import ConfigurationError, TokenStoreError
from alkey.options import StoreOptions
from alkey.settings import (
    STORE_OPTIONS,
    Configuration,
    configure,
    redact_url,
    register_scheme,
    registered_schemes,
    unregister_scheme,
)
from alkey.tokens import RedisClient, RedisTokenStore, TokenStore, store_for

from .conftest import token_keys
from .models import User

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"

#: For each store option, a value in each source -- keyword, settings, URL query,
#: environment -- each differing from the next source's.
SOURCE_VALUES: dict[str, tuple[Any, str, str, str]] = {
    "ttl": (10, "20", "30", "40"),
    "key_prefix": ("k:", "s:", "u:", "e:"),
    "on_error": ("raise", "degrade", "raise", "degrade"),
    "max_pending": (1, "2", "3", "4"),
    "retry_interval": (0.1, "0.2", "0.3", "0.4"),
    "durable": (True, "no", "yes", "off"),
    "lease": (1.5, "2.5", "3.5", "4.5"),
    "local_cache": (100, "200", "300", "400"),
}
PARSED = {
    "ttl": (10, 20, 30, 40),
    "key_prefix": ("k:", "s:", "u:", "e:"),
    "on_error": ("raise", "degrade", "raise", "degrade"),
    "max_pending": (1, 2, 3, 4),
    "retry_interval": (0.1, 0.2, 0.3, 0.4),
    "durable": (True, False, True, False),
    "lease": (1.5, 2.5, 3.5, 4.5),
    "local_cache": (100, 200, 300, 400),
}
KINDS = ("keyword", "settings", "url", "environment")


def test_every_store_option_can_be_set_from_every_source() -> None:
    assert (
        set(SOURCE_VALUES)
        == set(STORE_OPTIONS)
        == {field.name for field in dataclasses.fields(StoreOptions)}
    )


def sources_from(level: int, name: str) -> dict[str, Any]:
    """configure()'s arguments setting ``name`` in every source from ``level`` down."""
    keyword, setting, query, variable = SOURCE_VALUES[name]
    arguments: dict[str, Any] = {"env": {"REDIS_URL": "redis://cache:6380/0"}}
    if level <= 3:
        arguments["env"][f"ALKEY_{name.upper()}"] = variable
    if level <= 2:
        arguments["env"]["REDIS_URL"] += f"?alkey_{name}={query}"
    if level <= 1:
        arguments["settings"] = {f"alkey.{name}": setting}
    if level == 0:
        arguments[name] = keyword
    return arguments


@pytest.mark.parametrize("level", range(4), ids=KINDS)
@pytest.mark.parametrize("name", STORE_OPTIONS)
def test_a_store_option_comes_from_the_highest_source_that_sets_it(name: str, level: int) -> None:
    configuration = configure(**sources_from(level, name))
    assert getattr(configuration.store_options, name) == PARSED[name][level]
    assert configuration.sources[name].kind == KINDS[level]


@pytest.mark.parametrize("name", STORE_OPTIONS)
def test_a_store_option_no_source_sets_has_its_default(name: str) -> None:
    configuration = configure(env={})
    assert getattr(configuration.store_options, name) == getattr(StoreOptions(), name)
    assert configuration.sources[name].kind == "default"
    assert not configuration.sets_store_options


def test_the_url_comes_from_code_then_alkey_redis_url_then_redis_url_then_the_environment() -> None:
    env = {"REDIS_URL": "redis://environment:1/0"}
    settings = {"alkey.redis_url": "redis://alkey-setting:2/0", "redis.url": "redis://shared:3/0"}
    assert configure(settings, env=env, url="redis://code:4/0").url == "redis://code:4/0"
    assert configure(settings, env=env).url == "redis://alkey-setting:2/0"
    assert configure({"redis.url": "redis://shared:3/0"}, env=env).url == "redis://shared:3/0"
    assert configure({"alkey.redis_url": " "}, env=env).url == "redis://environment:1/0"
    assert configure(env={}).url == "redis://localhost:6379/0"
    assert str(configure(settings, env=env).sources["url"]) == "setting alkey.redis_url"


def test_herokus_redis_tls_url_comes_before_redis_url_and_after_code_and_settings() -> None:
    """Heroku sets REDIS_URL and REDIS_TLS_URL for one server: alkey takes the TLS one,
    with REDIS_DB and REDIS_MAX_CONNECTIONS; a URL from code or the settings still wins."""
    env = {
        "REDIS_TLS_URL": "rediss://:p%40ss@heroku-host:6380/0",
        "REDIS_URL": "redis://:p%40ss@heroku-host:6379/0",
        "REDISCLOUD_URL": "redis://cloud:6379/0",
        "REDIS_DB": "2",
        "REDIS_MAX_CONNECTIONS": "9",
    }
    configuration = configure(env=env)
    assert configuration.url == "rediss://:p%40ss@heroku-host:6380/0"
    assert str(configuration.sources["url"]) == "environment variable REDIS_TLS_URL"
    assert (configuration.db, configuration.max_connections) == (2, 9)
    assert "rediss://:***@heroku-host:6380/0 (from environment variable REDIS_TLS_URL)" in (
        configuration.describe()
    )
    assert configure(env={**env, "REDIS_TLS_URL": " "}).url == env["REDIS_URL"]
    assert configure(env={"REDIS_TLS_URL": env["REDIS_TLS_URL"]}).url == env["REDIS_TLS_URL"]
    assert configure({"redis.url": "redis://shared/0"}, env=env).url == "redis://shared/0"
    assert configure(env=env, url="redis://code/0").url == "redis://code/0"
    with pytest.raises(ConfigurationError, match=r"REDIS_TLS_URL='http://:\*\*\*@h/0'"):
        configure(env={**env, "REDIS_TLS_URL": "http://:s3cret@h/0"})


def test_redis_db_and_max_connections_go_with_an_environment_url_only() -> None:
    env = {"REDIS_URL": "redis://environment/2", "REDIS_DB": "5", "REDIS_MAX_CONNECTIONS": "7"}
    from_env = configure(env=env)
    assert (from_env.db, from_env.max_connections) == (5, 7)
    from_settings = configure({"alkey.redis_url": "redis://settings/3"}, env=env)
    assert (from_settings.db, from_settings.max_connections) == (3, None)
    assert configure(env=env, db=9, max_connections=1).redis_config() == {
        "url": "redis://environment/2",
        "db": 9,
        "max_connections": 1,
    }


@pytest.mark.parametrize("spelling", ["true", "True", "yes", "on", "1", " YES "])
def test_true_is_spelt_in_any_of_the_usual_ways(spelling: str) -> None:
    assert configure({"alkey.durable": spelling}, env={}).store_options.durable is True


@pytest.mark.parametrize("spelling", ["false", "no", "off", "0", "Off"])
def test_false_is_spelt_in_any_of_the_usual_ways(spelling: str) -> None:
    assert configure(env={"ALKEY_DURABLE": spelling}).store_options.durable is False


def test_numbers_are_parsed_from_text_and_values_from_code_are_taken_as_they_are() -> None:
    parsed = configure(
        {"alkey.ttl": "3600", "alkey.retry_interval": "0.25", "alkey.on_error": " Raise "},
        env={"ALKEY_LEASE": "2", "ALKEY_MAX_PENDING": "100_000"},
    ).store_options
    assert (parsed.ttl, parsed.retry_interval, parsed.on_error) == (3600, 0.25, "raise")
    assert (parsed.lease, parsed.max_pending) == (2.0, 100_000)
    typed = configure({"alkey.ttl": 60, "alkey.durable": True}, env={}).store_options
    assert (typed.ttl, typed.durable) == (60, True)


def test_blank_values_count_as_unset() -> None:
    configuration = configure({"alkey.ttl": "", "alkey.key_prefix": "  "}, env={"ALKEY_TTL": "9"})
    assert configuration.store_options.ttl == 9
    assert configuration.store_options.key_prefix == ""
    assert configuration.sources["key_prefix"].kind == "default"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"settings": {"alkey.durable": "maybe"}},
            "alkey.durable = 'maybe' in the settings is invalid: use true or false",
        ),
        (
            {"env": {"ALKEY_TTL": "soon"}},
            "ALKEY_TTL='soon' in the environment is invalid: use a positive whole number",
        ),
        ({"env": {"ALKEY_TTL": "-5"}}, "ALKEY_TTL='-5' in the environment is invalid"),
        (
            {"settings": {"alkey.on_error": "ignore"}},
            "alkey.on_error = 'ignore' in the settings is invalid: use degrade or raise",
        ),
        (
            {"env": {"REDIS_URL": "redis://h/0?alkey_lease=0"}},
            "alkey_lease='0' in the query of REDIS_URL is invalid: use a positive number",
        ),
        ({"retry_interval": "nan"}, "retry_interval='nan' is invalid: use a number of seconds"),
        ({"max_pending": 0}, "max_pending=0 is invalid: use a whole number of at least 1"),
    ],
)
def test_an_invalid_value_is_refused_when_configuring_naming_the_setting_value_and_choices(
    arguments: dict[str, Any], message: str
) -> None:
    arguments.setdefault("env", {})
    with pytest.raises(ConfigurationError) as raised:
        configure(**arguments)
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    ("arguments", "shown"),
    [
        (
            {"env": {"REDIS_URL": "redis://app:s3cret@h/0?alkey_ttl=x"}},
            "alkey_ttl='x' in the query of REDIS_URL",
        ),
        ({"env": {"REDIS_URL": "http://app:s3cret@h/0"}}, "REDIS_URL='http://app:***@h/0'"),
        ({"settings": {"alkey.redis_url": "redis://app:s3cret@h/one"}}, "alkey.redis_url = "),
        ({"env": {"REDIS_URL": "redis://app:s3cret@h/0?alkey_tll=1"}}, "did you mean alkey_ttl"),
    ],
)
def test_errors_about_a_url_never_show_its_password(arguments: dict[str, Any], shown: str) -> None:
    arguments.setdefault("env", {})
    with pytest.raises(ConfigurationError) as raised:
        configure(**arguments)
    assert shown in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_the_configuration_shows_its_url_with_the_password_masked() -> None:
    configuration = configure({"alkey.ttl": "60"}, env={"REDIS_URL": "redis://app:s3cret@h:1/0"})
    assert configuration.url == "redis://app:s3cret@h:1/0"  # what the client needs
    for shown in (repr(configuration), configuration.describe(), configuration.redacted_url):
        assert "s3cret" not in shown
        assert "redis://app:***@h:1/0" in shown
    assert "ttl=60 (from setting alkey.ttl)" in configuration.describe()


@pytest.mark.parametrize(
    ("setting", "suggestion"),
    [
        ("alkey.tll", "did you mean alkey.ttl?"),
        ("alkey.dureable", "did you mean alkey.durable?"),
        ("alkey.redis_uri", "did you mean alkey.redis_url?"),
        ("alkey.session_class", "did you mean alkey.session_cls?"),
    ],
)
def test_an_unknown_alkey_setting_is_refused_with_a_suggestion(
    setting: str, suggestion: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        configure({setting: "5"}, env={})
    assert f"{setting} = '5' in the settings is not an alkey setting; {suggestion}" in str(
        raised.value
    )


def test_settings_of_other_packages_and_unknown_alkey_environment_variables_are_ignored() -> None:
    configuration = configure(
        {"sqlalchemy.url": "sqlite://", "alkey.cache_key_prefix": "x", "alkey.session_cls": "m"},
        env={"ALKEY_TEST_DATABASE_URL": "sqlite://", "ALKEY_TLL": "5"},
    )
    assert not configuration.sets_store_options


def test_an_other_settings_prefix_is_honoured() -> None:
    configuration = configure({"cache.ttl": "5", "alkey.ttl": "6"}, prefix="cache.", env={})
    assert configuration.store_options.ttl == 5
    with pytest.raises(ConfigurationError, match=r"cache\.tl = '5'.*did you mean cache\.ttl\?"):
        configure({"cache.tl": "5"}, prefix="cache.", env={})


def test_get_redis_config_errors_are_configuration_errors_and_still_value_errors() -> None:
    with pytest.raises(ConfigurationError, match="REDIS_DB must be a whole number") as raised:
        get_redis_config({"REDIS_DB": "one"})
    assert isinstance(raised.value, ValueError)


def test_redact_url_moved_to_settings_and_still_imports_from_client() -> None:
    assert alkey_client.redact_url is redact_url
    assert redact_url("redis://app:s3cret@host:6380/1") == "redis://app:***@host:6380/1"


# -- the URL's alkey_ options reach the store, and never redis-py ----------------------------


def test_alkey_options_in_the_url_configure_the_store_and_are_stripped_for_redis_py(
    redis_url: str, redis_client: RedisClient
) -> None:
    url = f"{redis_url}?alkey_key_prefix=fromurl:&alkey_ttl=120&socket_timeout=3"
    configuration = configure(env={"REDIS_URL": url})
    assert configuration.url == f"{redis_url}?socket_timeout=3"
    store = configuration.store()
    assert isinstance(store, RedisTokenStore)
    assert store.client.connection_pool.connection_kwargs["socket_timeout"] == 3.0
    store.fetch(["alkey:users#1"])  # redis-py would refuse an unknown alkey_ argument
    assert redis_client.keys("*") == [b"fromurl:alkey:users#1"]
    assert 0 < redis_client.ttl("fromurl:alkey:users#1") <= 120
    store.client.close()


# -- stores by URL scheme ------------------------------------------------------------------


@pytest.fixture
def relay_scheme(redis_client: RedisClient) -> Iterator[list[Configuration]]:
    """A scheme of the test's own, ``relay://``, whose stores live in the test Redis."""
    made: list[Configuration] = []

    def relay_store(configuration: Configuration, client: Any) -> TokenStore:
        made.append(configuration)
        return RedisTokenStore(
            client if client is not None else redis_client,
            **dataclasses.asdict(configuration.store_options),
        )

    register_scheme("relay", sync=relay_store)
    yield made
    unregister_scheme("relay")


def test_a_registered_scheme_makes_the_store_of_its_urls(
    relay_scheme: list[Configuration], redis_client: RedisClient
) -> None:
    configuration = configure({"alkey.redis_url": "relay://anywhere?alkey_key_prefix=relayed:"})
    store = configuration.store()
    assert relay_scheme == [configuration]
    store.bump(["alkey:users#1"])
    assert redis_client.keys("*") == [b"relayed:alkey:users#1"]
    assert "relay" in registered_schemes("sync")


def test_an_unregistered_scheme_is_refused_listing_the_registered_ones(
    relay_scheme: list[Configuration],
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        configure({"alkey.redis_url": "valkey://host:6379/0"}, env={})
    message = str(raised.value)
    assert "alkey.redis_url = 'valkey://host:6379/0' in the settings is not a Redis URL" in message
    schemes = "redis, redis+sentinel, rediss, rediss+sentinel, relay, unix"
    assert f"registered schemes: {schemes}" in message


def test_each_flavour_of_a_scheme_is_registered_on_its_own(
    relay_scheme: list[Configuration], redis_client: RedisClient
) -> None:
    configuration = configure({"alkey.redis_url": "relay://anywhere"})
    with pytest.raises(ConfigurationError, match=r"no asyncio token store .* 'relay'"):
        configuration.store(flavour="asyncio")

    def asyncio_store(configuration: Configuration, client: Any) -> TokenStore:
        return RedisTokenStore(redis_client)  # stands in for an asyncio store

    register_scheme("relay", asyncio=asyncio_store)
    assert "relay" in registered_schemes("asyncio")
    assert configuration.store(flavour="asyncio") is store_for(redis_client)
    configuration.store()
    assert len(relay_scheme) == 1, "the sync factory is still registered"
    unregister_scheme("relay", "asyncio")
    assert "relay" not in registered_schemes("asyncio")
    assert "relay" in registered_schemes("sync")


@pytest.mark.parametrize("scheme", ["Redis", "redis sentinel", "1redis", ""])
def test_a_malformed_scheme_name_cannot_be_registered(scheme: str) -> None:
    with pytest.raises(ConfigurationError, match="URL scheme"):
        register_scheme(scheme, sync=lambda configuration, client: store_for(client))


# -- sharing: one store per pool -----------------------------------------------------------


def test_a_configured_store_is_the_one_its_pool_shares_and_configuring_again_reuses_it(
    redis_client: RedisClient,
) -> None:
    configuration = configure({"alkey.key_prefix": "shared:"}, env={})
    store = configuration.store(redis_client)
    assert configuration.store(redis_client) is store
    assert configure({"alkey.key_prefix": "shared:"}, env={}).store(redis_client) is store
    assert store_for(redis_client) is store
    CacheKeyGenerator(redis_client)("alkey:users#1")  # the key generator uses it
    assert token_keys(redis_client) == set()
    assert b"shared:alkey:users#1" in redis_client.keys("shared:*")
    other = configure({"alkey.key_prefix": "other:"}, env={}).store(redis_client)
    assert other is not store
    assert store_for(redis_client) is other


def test_without_store_options_the_store_already_shared_on_the_pool_is_used(
    redis_client: RedisClient,
) -> None:
    built_in_code = RedisTokenStore(redis_client, key_prefix="code:")
    assert configure(env={}).store(redis_client) is built_in_code


# -- the environment configures the process's default store -------------------------------


@pytest.fixture
def default_store_on(
    redis_url: str, environment_redis: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., None]:
    """Point the process's default client at ``url`` with ALKEY_* variables set."""

    def use(url: str = redis_url, **variables: str) -> None:
        environment_redis(url)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return use


def test_alkey_key_prefix_in_the_environment_prefixes_the_default_stores_keys(
    tables: Engine, redis_client: RedisClient, default_store_on: Callable[..., None]
) -> None:
    default_store_on(ALKEY_KEY_PREFIX="envapp:")
    factory = sessionmaker(tables)
    alkey.bind(factory)  # no client, no store: the default one
    try:
        key = CacheKeyGenerator()(User(id=1, name="ada"))
        with factory.begin() as session:
            session.add(User(id=1, name="ada"))
        assert CacheKeyGenerator()(User(id=1, name="ada")) != key, "the bump was seen"
    finally:
        alkey.unbind(factory)
    keys = {key.decode() if isinstance(key, bytes) else key for key in redis_client.keys("*")}
    assert "envapp:alkey:users#1" in keys
    assert all(key.startswith("envapp:") for key in keys)


def test_alkey_ttl_in_the_environment_is_the_ttl_of_the_default_stores_tokens(
    redis_client: RedisClient, default_store_on: Callable[..., None]
) -> None:
    default_store_on(ALKEY_TTL="90")
    CacheKeyGenerator()("alkey:users#1")
    assert 0 < redis_client.ttl("alkey:users#1") <= 90


def test_alkey_on_error_raise_in_the_environment_lets_the_default_stores_errors_through(
    default_store_on: Callable[..., None],
) -> None:
    default_store_on(UNREACHABLE_REDIS, ALKEY_ON_ERROR="raise")
    with pytest.raises(TokenStoreError):
        CacheKeyGenerator()(User(id=1, name="ada"))


def test_a_bad_alkey_variable_fails_the_default_client_naming_it(
    default_store_on: Callable[..., None],
) -> None:
    default_store_on(ALKEY_DURABLE="sometimes")
    with pytest.raises(ConfigurationError, match="ALKEY_DURABLE='sometimes' in the environment"):
        alkey_client.get_redis_client()


def test_the_default_client_gets_alkeys_client_options(
    redis_url: str, default_store_on: Callable[..., None]
) -> None:
    default_store_on(f"{redis_url}?alkey_durable=yes")
    client = alkey_client.get_redis_client()
    assert isinstance(client, redis.Redis)
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 2.0
    store = alkey_client.default_store()
    assert isinstance(store, RedisTokenStore)
    assert store.durable is True
    assert alkey_client.default_configuration().sources["durable"].kind == "url"


# -- the asyncio flavour of the same configuration ----------------------------------------


def test_an_asyncio_store_is_built_from_the_same_configuration_and_shared_per_pool(
    redis_url: str, redis_client: RedisClient
) -> None:
    from alkey.asyncio import AsyncRedisTokenStore

    separator = "&" if "?" in redis_url else "?"
    configuration = configure(
        url=f"{redis_url}{separator}alkey_ttl=60&alkey_key_prefix=aio:", env={}
    )

    async def bump_through_the_configured_store() -> None:
        store = configuration.store(flavour="asyncio")
        assert isinstance(store, AsyncRedisTokenStore)
        assert store.options.ttl == 60
        assert configuration.store(store.client, flavour="asyncio") is store
        await store.abump(["alkey:users#1"])
        assert store.client is not None
        await store.client.aclose()

    asyncio.run(bump_through_the_configured_store())
    assert redis_client.keys("*") == [b"aio:alkey:users#1"]
    assert 0 < redis_client.ttl("aio:alkey:users#1") <= 60


@pytest.mark.parametrize(
    "url",
    [
        "rediss://:AbC/dEf+Gh=@host:6380/0",  # an Azure-style key with a "/"
        "redis://user:Xy7#Zq9w@host:6379/0",
        "redis+sentinel://:Qw8?Er4t@sentinel1:26379/svc/0",
    ],
)
def test_a_password_with_an_unencoded_slash_hash_or_question_mark_is_refused_unshown(
    url: str,
) -> None:
    """A URL parser ends the user part at such a character: refused at configuration,
    saying how to encode the password, and never showing a piece of it."""
    with pytest.raises(ConfigurationError) as raised:
        configure(url=url, env={})
    message = str(raised.value)
    assert "percent-encoded" in message
    assert "quote(password" in message
    password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
    for piece in (password, *re.split(r"[/#?]", password)):
        assert piece not in message, piece


def test_an_at_sign_in_a_query_options_value_is_no_password() -> None:
    configuration = configure(url="redis://h:1/0?client_name=me@x", env={})
    assert configuration.url == "redis://h:1/0?client_name=me@x"


@pytest.mark.parametrize(
    ("url", "named", "suggested"),
    [
        ("redis://host:6379/0?foo=1", "'foo'", None),
        ("redis://host:6379/0?socket_timout=1", "'socket_timout'", "socket_timeout"),
        (
            "redis+sentinel://s1:26379/svc?sentinel_pasword=S3cr3tPw",
            "'sentinel_pasword'",
            "sentinel_password",
        ),
    ],
)
def test_an_unknown_url_option_is_refused_at_configuration_with_a_suggestion(
    url: str, named: str, suggested: str | None
) -> None:
    """redis-py would hand it to every new connection, whose TypeError would reach the
    first commit; refused here instead, naming it (and its value masked if it may be a
    password)."""
    with pytest.raises(ConfigurationError) as raised:
        configure(url=url, env={})
    message = str(raised.value)
    assert f"{named} is not an option of a Redis connection" in message
    if suggested:
        assert f"did you mean {suggested}?" in message
    assert "S3cr3tPw" not in message


def test_every_redis_py_connection_option_passes_configuration() -> None:
    url = "redis://h:1/0?socket_timeout=3&max_connections=5&client_name=app&protocol=3"
    assert configure(url=url, env={}).url == url

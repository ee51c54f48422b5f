"""``config.include('alkey')``: session binding, ``request.cache_key`` and Redis settings.

Every application here is a real Pyramid application with pyramid_tm and zope.sqlalchemy,
driven over WSGI by WebTest, on the test Redis and database.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import zope.sqlalchemy
from pyramid.config import Configurator  # type: ignore[import-untyped]
from pyramid.exceptions import ConfigurationError  # type: ignore[import-untyped]
from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session, sessionmaker
from webtest import TestApp  # type: ignore[import-untyped]

import alkey
from alkey import client as alkey_client
from alkey import errors
from alkey.cache import CacheKeyGenerator, get_cache_key_generator, get_token
from alkey.interfaces import IRedisClientFactory, IRedisConnectionPool
from alkey.tokens import RedisClient, store_for

from .conftest import run_python_examples, token_keys
from .models import User
from .support.docs import docs_page

PYRAMID_DOCS = docs_page("integrations/pyramid.md")


#: Nothing listens here: a client on it fails at once (and alkey degrades to misses).
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


class PyramidTestSession(Session):
    """The session class that the test applications name in ``alkey.session_cls``."""


SESSION_CLS = f"{__name__}.{PyramidTestSession.__name__}"


class ViewError(Exception):
    """Raised by a view after it wrote, so that pyramid_tm aborts the transaction."""


def user_key(request: Any) -> str:
    user = request.dbsession.get(User, int(request.matchdict["id"]))
    key: str = request.cache_key(user, "profile")
    return key


def rename(request: Any) -> str:
    request.dbsession.get_one(User, int(request.matchdict["id"])).name = request.POST["name"]
    request.dbsession.flush()
    if request.POST.get("then") == "raise":
        raise ViewError("the view failed after its write was flushed")
    if request.POST.get("then") == "400":
        # Returned, not raised: the transaction is not aborted by an exception, only
        # vetoed by tm.commit_veto because of the status.
        request.response.status = 400
    return "renamed"


def add_user_views(config: Any, engine: Engine) -> None:
    """request.dbsession joined to pyramid_tm's transaction, and two views, as apps do."""
    factory = sessionmaker(engine, class_=PyramidTestSession)

    def dbsession(request: Any) -> Session:
        session = factory()
        zope.sqlalchemy.register(session, transaction_manager=request.tm)
        return session

    config.add_request_method(dbsession, "dbsession", reify=True)
    config.add_route("key", "/users/{id}/key")
    config.add_route("rename", "/users/{id}/rename")
    config.add_view(user_key, route_name="key", renderer="string")
    config.add_view(rename, route_name="rename", renderer="string", request_method="POST")


def make_app(
    engine: Engine,
    settings: dict[str, Any] | None = None,
    *,
    before_include: Callable[[Any], None] = lambda config: None,
    after_include: Callable[[Any], None] = lambda config: None,
) -> TestApp:
    """A real application; a setting given as None is left out."""
    defaults = {"alkey.session_cls": SESSION_CLS, "tm.manager_hook": "pyramid_tm.explicit_manager"}
    merged = {name: value for name, value in {**defaults, **(settings or {})}.items() if value}
    with Configurator(settings=merged) as config:
        config.include("pyramid_tm")
        before_include(config)
        config.include("alkey")
        after_include(config)
        add_user_views(config, engine)
    return TestApp(config.make_wsgi_app())


@pytest.fixture(autouse=True)
def _unbind_sessions() -> Iterator[None]:
    yield
    alkey.unbind(PyramidTestSession)


@pytest.fixture
def ada(tables: Engine) -> User:
    with Session(tables) as session, session.begin():
        session.add(User(id=1, name="ada"))
    return User(id=1, name="ada")


@pytest.fixture
def app(ada: User, tables: Engine, redis_url: str, redis_client: RedisClient) -> TestApp:
    return make_app(tables, {"alkey.redis_url": redis_url})


def test_a_request_that_commits_bumps_the_row_token_before_its_response_is_returned(
    app: TestApp, redis_client: RedisClient
) -> None:
    before = get_token(redis_client, "alkey:users#1")
    at_response: list[str] = []
    inner = app.app

    def watch_the_response(environ: Any, start_response: Any) -> Any:
        def recording(status: str, headers: Any, exc_info: Any = None) -> Any:
            # The moment the response starts leaving the application.
            at_response.append(get_token(redis_client, "alkey:users#1"))
            return start_response(status, headers, exc_info)

        return inner(environ, recording)

    TestApp(watch_the_response).post("/users/1/rename", {"name": "grace"})
    assert len(at_response) == 1
    assert at_response[0] != before, "bumped before the response started"
    assert get_token(redis_client, "alkey:users#1") == at_response[0]


def test_request_cache_key_changes_after_a_request_commits_a_write_and_only_then(
    app: TestApp,
) -> None:
    key = app.get("/users/1/key").text
    assert app.get("/users/1/key").text == key
    app.post("/users/1/rename", {"name": "grace"})
    assert app.get("/users/1/key").text != key


def test_a_request_that_raises_after_flushing_is_aborted_and_bumps_nothing(
    app: TestApp, tables: Engine, redis_client: RedisClient
) -> None:
    key = app.get("/users/1/key").text
    before = get_token(redis_client, "alkey:users#1")
    with pytest.raises(ViewError):
        app.post("/users/1/rename", {"name": "grace", "then": "raise"})
    assert get_token(redis_client, "alkey:users#1") == before
    assert app.get("/users/1/key").text == key
    with Session(tables) as session:
        assert session.get_one(User, 1).name == "ada"


def test_a_request_whose_commit_is_vetoed_bumps_nothing(
    ada: User, tables: Engine, redis_url: str, redis_client: RedisClient
) -> None:
    app = make_app(
        tables,
        {"alkey.redis_url": redis_url, "tm.commit_veto": "pyramid_tm.default_commit_veto"},
    )
    before = get_token(redis_client, "alkey:users#1")
    app.post("/users/1/rename", {"name": "grace", "then": "400"}, status=400)
    assert get_token(redis_client, "alkey:users#1") == before
    with Session(tables) as session:
        assert session.get_one(User, 1).name == "ada"
    # Without the veto, the same request commits, and bumps.
    plain = make_app(tables, {"alkey.redis_url": redis_url})
    plain.post("/users/1/rename", {"name": "grace", "then": "400"}, status=400)
    assert get_token(redis_client, "alkey:users#1") != before


def test_request_cache_key_is_one_reified_key_generator_with_the_configured_prefix(
    ada: User, tables: Engine, redis_url: str, redis_client: RedisClient
) -> None:
    def describe(request: Any) -> str:
        generator = request.cache_key
        assert isinstance(generator, CacheKeyGenerator)
        key = generator("sidebar")
        assert request.cache_key is generator  # reified: built once per request
        return key

    def add_view(config: Any) -> None:
        config.add_route("describe", "/describe")
        config.add_view(describe, route_name="describe", renderer="string")

    settings = {"alkey.redis_url": redis_url, "alkey.cache_key_prefix": "shop:"}
    app = make_app(tables, settings, after_include=add_view)
    assert app.get("/describe").text.startswith("shop:")


@pytest.mark.filterwarnings("ignore::alkey.UnboundSessionWarning")  # keys from request.dbsession
def test_without_alkey_session_cls_pyramid_basemodels_session_is_bound(
    ada: User, tables: Engine, redis_url: str, redis_client: RedisClient
) -> None:
    import pyramid_basemodel  # slow to import (inflect): only this test pays

    def rename_with_basemodel(request: Any) -> str:
        pyramid_basemodel.Session.get_one(User, 1).name = "grace"
        return "renamed"

    def add_view(config: Any) -> None:
        config.add_route("basemodel", "/basemodel")
        config.add_view(rename_with_basemodel, route_name="basemodel", renderer="string")

    pyramid_basemodel.Session.configure(bind=tables)
    # pyramid_basemodel's Session joins the thread-local transaction manager.
    settings = {"alkey.session_cls": None, "alkey.redis_url": redis_url, "tm.manager_hook": None}
    try:
        app = make_app(tables, settings, after_include=add_view)
        key = app.get("/users/1/key").text
        app.get("/basemodel")
        assert app.get("/users/1/key").text != key
    finally:
        alkey.unbind(pyramid_basemodel.Session)
        pyramid_basemodel.Session.remove()
        pyramid_basemodel.Session.configure(bind=None)


@pytest.mark.parametrize("value", ["tests.nowhere.Session", "tests.models:Nothing", ""])
def test_an_alkey_session_cls_that_does_not_resolve_fails_config_include_naming_it(
    value: str,
) -> None:
    config = Configurator(settings={"alkey.session_cls": value})
    with pytest.raises(ConfigurationError, match=rf"alkey\.session_cls = {value!r} does not"):
        config.include("alkey")


def test_an_alkey_session_cls_that_is_not_a_session_fails_config_include_naming_it() -> None:
    config = Configurator(settings={"alkey.session_cls": "tests.models.User"})
    with pytest.raises(ConfigurationError, match=r"alkey\.session_cls = 'tests\.models\.User'"):
        config.include("alkey")


@pytest.mark.parametrize("setting", ["alkey.redis_url", "redis.url"])
def test_tokens_live_in_the_redis_that_the_settings_name_not_the_environments(
    ada: User,
    tables: Engine,
    redis_url: str,
    redis_client: RedisClient,
    environment_redis: Callable[[str], None],
    setting: str,
) -> None:
    environment_redis(UNREACHABLE_REDIS)
    app = make_app(tables, {setting: redis_url})
    key = app.get("/users/1/key").text
    assert app.get("/users/1/key").text == key  # an unreachable Redis would always miss
    app.post("/users/1/rename", {"name": "grace"})
    assert app.get("/users/1/key").text != key
    assert "alkey:users#1" in token_keys(redis_client)


def test_alkey_redis_url_wins_over_redis_url(
    ada: User, tables: Engine, redis_url: str, redis_client: RedisClient
) -> None:
    app = make_app(tables, {"alkey.redis_url": redis_url, "redis.url": UNREACHABLE_REDIS})
    app.get("/users/1/key")
    assert "alkey:users#1" in token_keys(redis_client)


def test_without_settings_the_environment_names_the_redis(
    ada: User,
    tables: Engine,
    redis_url: str,
    redis_client: RedisClient,
    environment_redis: Callable[[str], None],
) -> None:
    environment_redis(redis_url)
    app = make_app(tables)
    app.get("/users/1/key")
    assert "alkey:users#1" in token_keys(redis_client)


@pytest.mark.parametrize("registered", ["before", "after"])
@pytest.mark.parametrize("interface", [IRedisClientFactory, IRedisConnectionPool])
def test_a_redis_registered_in_the_registry_wins_whether_registered_before_or_after_include(
    ada: User,
    tables: Engine,
    redis_url: str,
    redis_client: RedisClient,
    registered: str,
    interface: Any,
) -> None:
    pool = redis.ConnectionPool.from_url(redis_url)
    utility: object = pool
    if interface is IRedisClientFactory:
        utility = lambda: redis.Redis(connection_pool=pool)  # noqa: E731

    def register(config: Any) -> None:
        config.registry.registerUtility(utility, interface)

    hooks = {f"{registered}_include": register}
    app = make_app(tables, {"alkey.redis_url": UNREACHABLE_REDIS}, **hooks)
    key = app.get("/users/1/key").text
    app.post("/users/1/rename", {"name": "grace"})
    assert app.get("/users/1/key").text != key
    assert "alkey:users#1" in token_keys(redis_client)
    pool.disconnect()


def test_get_cache_key_generator_of_a_request_reads_the_same_tokens_as_request_cache_key(
    ada: User, tables: Engine, redis_url: str, redis_client: RedisClient
) -> None:
    def both_keys(request: Any) -> str:
        user = request.dbsession.get_one(User, 1)
        same = get_cache_key_generator(request)(user) == request.cache_key(user)
        return "same" if same else "different"

    def add_view(config: Any) -> None:
        config.add_route("both", "/both")
        config.add_view(both_keys, route_name="both", renderer="string")

    app = make_app(tables, {"alkey.redis_url": redis_url}, after_include=add_view)
    assert app.get("/both").text == "same"


def test_a_malformed_redis_url_fails_config_include_without_showing_the_password() -> None:
    config = Configurator(
        settings={"alkey.session_cls": SESSION_CLS, "alkey.redis_url": "http://u:s3cret@host/"}
    )
    with pytest.raises(ConfigurationError, match=r"alkey\.redis_url") as raised:
        config.include("alkey")
    assert "s3cret" not in str(raised.value)


def test_a_bad_cache_key_prefix_fails_config_include_naming_the_setting() -> None:
    config = Configurator(
        settings={"alkey.session_cls": SESSION_CLS, "alkey.cache_key_prefix": "has space"}
    )
    with pytest.raises(ConfigurationError, match=r"alkey\.cache_key_prefix"):
        config.include("alkey")


def redis_keys(client: RedisClient) -> set[str]:
    return {key.decode() if isinstance(key, bytes) else key for key in client.keys("*")}


#: A store configured the way an .ini file does it: every value is text.
INI_STORE_SETTINGS = {
    "alkey.durable": "true",
    "alkey.ttl": "3600",
    "alkey.on_error": "raise",
    "alkey.key_prefix": "app1:",
}


def test_store_options_in_the_settings_configure_the_store_of_the_binding_and_of_cache_key(
    ada: User, tables: Engine, redis_url: str, redis_client: RedisClient
) -> None:
    app = make_app(tables, {"alkey.redis_url": redis_url, **INI_STORE_SETTINGS})
    key = app.get("/users/1/key").text
    assert "app1:alkey:users#1" in redis_keys(redis_client), "request.cache_key's tokens"
    assert 3500 < redis_client.ttl("app1:alkey:users#1") <= 3600
    token = redis_client.get("app1:alkey:users#1")
    app.post("/users/1/rename", {"name": "grace"})
    assert redis_client.get("app1:alkey:users#1") != token, "the binding bumped the same key"
    assert app.get("/users/1/key").text != key
    assert all(name.startswith("app1:") for name in redis_keys(redis_client))


def test_alkey_durable_in_the_settings_records_each_commits_intent_before_the_database_commit(
    ada: User, tables: Engine, redis_url: str, redis_client: RedisClient
) -> None:
    seen_at_commit: list[dict[Any, Any]] = []

    def before_the_database_commit(connection: Connection) -> None:
        seen_at_commit.append(redis_client.hgetall("app1:alkey:{intents}:data"))

    def rename_watching_the_commit(request: Any) -> str:
        request.dbsession.get_one(User, 1).name = "grace"
        request.dbsession.flush()
        # The session has begun, so alkey watches the engine already: this runs after it.
        event.listen(tables, "commit", before_the_database_commit)
        return "renamed"

    def add_view(config: Any) -> None:
        config.add_route("durable", "/durable")
        config.add_view(rename_watching_the_commit, route_name="durable", renderer="string")

    settings = {"alkey.redis_url": redis_url, **INI_STORE_SETTINGS}
    app = make_app(tables, settings, after_include=add_view)
    try:
        app.get("/durable")
    finally:
        event.remove(tables, "commit", before_the_database_commit)
    [intents] = seen_at_commit
    [identifiers] = intents.values()
    assert "alkey:users#1" in identifiers.decode().split("\n")
    assert redis_client.zcard("app1:alkey:{intents}") == 0, "cleared by the bump"


def test_alkey_on_error_raise_in_the_settings_lets_redis_errors_reach_the_view(
    ada: User, tables: Engine
) -> None:
    app = make_app(tables, {"alkey.redis_url": UNREACHABLE_REDIS, "alkey.on_error": "raise"})
    with pytest.raises(errors.TokenStoreUnavailableError):
        app.get("/users/1/key")


@pytest.mark.parametrize("interface", [IRedisClientFactory, IRedisConnectionPool])
def test_a_registered_redis_wins_for_the_client_and_the_settings_store_options_still_apply(
    ada: User, tables: Engine, redis_url: str, redis_client: RedisClient, interface: Any
) -> None:
    pool = redis.ConnectionPool.from_url(redis_url, socket_timeout=2)
    utility: object = pool
    if interface is IRedisClientFactory:
        utility = lambda: redis.Redis(connection_pool=pool)  # noqa: E731

    def register(config: Any) -> None:
        config.registry.registerUtility(utility, interface)

    settings = {"alkey.redis_url": UNREACHABLE_REDIS, "alkey.key_prefix": "registered:"}
    app = make_app(tables, settings, after_include=register)
    key = app.get("/users/1/key").text
    app.post("/users/1/rename", {"name": "grace"})
    assert app.get("/users/1/key").text != key
    assert "registered:alkey:users#1" in redis_keys(redis_client)
    assert token_keys(redis_client) == set()
    pool.disconnect()


def test_store_options_in_the_settings_apply_to_the_redis_of_the_environment(
    ada: User,
    tables: Engine,
    redis_url: str,
    redis_client: RedisClient,
    environment_redis: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment_redis(redis_url)
    monkeypatch.setenv("ALKEY_KEY_PREFIX", "environment:")
    monkeypatch.setenv("ALKEY_TTL", "600")
    app = make_app(tables, {"alkey.key_prefix": "settings:"})
    app.get("/users/1/key")
    assert "settings:alkey:users#1" in redis_keys(redis_client), "the settings win"
    assert 0 < redis_client.ttl("settings:alkey:users#1") <= 600, "the environment still counts"


def test_settings_options_on_the_environments_redis_share_the_default_clients_store(
    ada: User,
    tables: Engine,
    redis_url: str,
    environment_redis: Callable[[str], None],
) -> None:
    """One store per pool: code using the default store (``alkey.bind`` without a client,
    ``CacheKeyGenerator()``) sees the bumps the application keeps during an outage."""
    environment_redis(redis_url)
    app = make_app(tables, {"alkey.key_prefix": "settings:"})
    app.get("/users/1/key")
    shared = store_for(alkey_client.get_redis_client())
    assert shared.options.key_prefix == "settings:"
    assert alkey_client.default_store() is shared


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("alkey.durable", "maybe", "alkey.durable = 'maybe' in the settings is invalid: use true"),
        ("alkey.ttl", "an hour", "alkey.ttl = 'an hour' in the settings is invalid: use a posi"),
        ("alkey.lease", "-1", "alkey.lease = '-1' in the settings is invalid: use a positive"),
        ("alkey.tll", "3600", "alkey.tll = '3600' in the settings is not an alkey setting; did"),
    ],
)
def test_a_bad_store_setting_fails_config_include_naming_it(
    setting: str, value: str, message: str
) -> None:
    config = Configurator(settings={"alkey.session_cls": SESSION_CLS, setting: value})
    with pytest.raises(ConfigurationError) as raised:
        config.include("alkey")
    assert message in str(raised.value)
    assert isinstance(raised.value, errors.ConfigurationError), "alkey's own error too"


def test_startup_logs_which_redis_holds_the_tokens_with_its_password_masked(
    tables: Engine, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alkey.pyramid")
    make_app(tables, {"alkey.redis_url": "redis://user:s3cret@127.0.0.1:1/0"})
    assert "alkey.redis_url = redis://user:***@127.0.0.1:1/0" in caplog.text
    assert "s3cret" not in caplog.text


def test_startup_logs_the_store_options_and_where_they_came_from(
    tables: Engine, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alkey.pyramid")
    make_app(tables, {"alkey.redis_url": redis_url, "alkey.ttl": "60"})
    assert f"alkey.redis_url = {redis_url}, with ttl=60 (from setting alkey.ttl)" in caplog.text


def test_the_pyramid_docs_have_python_examples() -> None:
    assert PYRAMID_DOCS.count("```python") >= 3


def test_every_python_example_of_the_pyramid_docs_runs_and_its_assertions_hold(
    docs_directory: Path,
    redis_url: str,
    redis_client: RedisClient,
    environment_redis: Callable[[str], None],
) -> None:
    environment_redis(redis_url)
    try:
        run_python_examples(PYRAMID_DOCS, docs_directory)
        assert "alkey:pages#1" in token_keys(redis_client)
    finally:
        if "myapp.models" in sys.modules:
            alkey.unbind(sys.modules["myapp.models"].DBSession)


def test_fail_fast_refuses_to_start_an_application_whose_redis_is_down(tables: Engine) -> None:
    settings = {"alkey.redis_url": "redis://:pa%2Fss@127.0.0.1:1/0", "alkey.fail_fast": "0.2"}
    with pytest.raises(ConfigurationError, match=r"alkey\.fail_fast: .*it cannot be reached") as e:
        make_app(tables, settings)
    assert "pa%2Fss" not in str(e.value)


def test_fail_fast_lets_an_application_with_a_usable_redis_start(
    tables: Engine, ada: User, redis_url: str
) -> None:
    app = make_app(tables, {"alkey.redis_url": redis_url, "alkey.fail_fast": "true"})
    assert app.get("/users/1/key").text


@pytest.mark.parametrize("value", ["maybe", "-1"])
def test_a_fail_fast_setting_that_is_neither_a_boolean_nor_seconds_fails_the_include(
    value: str,
) -> None:
    config = Configurator(settings={"alkey.session_cls": SESSION_CLS, "alkey.fail_fast": value})
    with pytest.raises(ConfigurationError, match=rf"alkey\.fail_fast = {value!r}"):
        config.include("alkey")

"""The example application (examples/pyramid_app), driven over HTTP by WebTest.

It runs on its own .ini settings, with SQLite and the test Redis, and shows for every
cached fragment whether it was a HIT or a MISS.
"""

from __future__ import annotations

import importlib
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyramid.paster import get_app, get_appsettings  # type: ignore[import-untyped]
from webtest import TestApp  # type: ignore[import-untyped]

import alkey
from alkey import client as alkey_client
from alkey.tokens import RedisClient

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pyramid_app"
INI = EXAMPLE / "development.ini"
STATUS = re.compile(r'data-fragment="([^"]+)">(HIT|MISS)<')
ALL_FRAGMENTS = {"summary", "item-1", "item-2", "item-3"}


def statuses(page: Any) -> dict[str, str]:
    """Fragment name -> HIT or MISS, as the page shows them."""
    return dict(STATUS.findall(page.text))


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The example's package, imported from examples/pyramid_app as pserve would."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    package = importlib.import_module("pyramid_app")
    yield package
    alkey.unbind(importlib.import_module("pyramid_app.models").AppSession)


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, redis_client: RedisClient) -> dict[str, Any]:
    """development.ini's settings, on a fresh SQLite file and the test Redis."""
    return {
        **get_appsettings(str(INI)),
        "sqlalchemy.url": f"sqlite:///{tmp_path / 'items.sqlite'}",
        "alkey.redis_url": redis_url,
    }


@pytest.fixture
def app(example: Any, settings: dict[str, Any]) -> TestApp:
    return TestApp(example.main({}, **settings))


def test_the_first_render_misses_every_fragment_and_the_second_hits_them_all(
    app: TestApp,
) -> None:
    first = app.get("/")
    assert statuses(first) == dict.fromkeys(ALL_FRAGMENTS, "MISS")
    assert "0 of 4 fragments from the cache" in first
    second = app.get("/")
    assert statuses(second) == dict.fromkeys(ALL_FRAGMENTS, "HIT")
    assert "4 of 4 fragments from the cache" in second
    assert second.text.count("rendered at") == first.text.count("rendered at") == 4


def test_an_edit_through_the_form_renders_that_item_and_the_summary_again_only(
    app: TestApp,
) -> None:
    app.get("/")
    form = app.get("/items/2/edit").form
    form["name"] = "Oil lamp"
    page = form.submit(status=303).follow()
    assert statuses(page) == {
        "summary": "MISS",  # keyed on the items table: any write renders it again
        "item-1": "HIT",
        "item-2": "MISS",
        "item-3": "HIT",
    }
    assert page.text.count("Oil lamp") == 2  # the item and the summary
    assert statuses(app.get("/")) == dict.fromkeys(ALL_FRAGMENTS, "HIT")


def test_a_rejected_edit_writes_nothing_so_every_fragment_still_hits(app: TestApp) -> None:
    app.get("/")
    form = app.get("/items/2/edit").form
    form["name"] = " "
    assert "A name, please." in form.submit(status=200)
    assert statuses(app.get("/")) == dict.fromkeys(ALL_FRAGMENTS, "HIT")


def test_an_edit_without_the_csrf_token_is_refused_and_changes_nothing(app: TestApp) -> None:
    app.get("/")
    app.post("/items/2/edit", {"name": "Forged"}, status=400)
    page = app.get("/")
    assert "Forged" not in page
    assert statuses(page) == dict.fromkeys(ALL_FRAGMENTS, "HIT")


def test_development_ini_serves_the_app_as_pserve_loads_it(
    example: Any,
    tmp_path: Path,
    redis_url: str,
    redis_client: RedisClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A copy, so that its %(here)s SQLite file lands in tmp_path.
    ini = shutil.copy(INI, tmp_path / "development.ini")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setattr(alkey_client, "_default_client", None)
    try:
        app = TestApp(get_app(str(ini)))
        assert statuses(app.get("/")) == dict.fromkeys(ALL_FRAGMENTS, "MISS")
        assert statuses(app.get("/")) == dict.fromkeys(ALL_FRAGMENTS, "HIT")
        assert (tmp_path / "pyramid_app.sqlite").exists()
    finally:
        if alkey_client._default_client is not None:
            alkey_client._default_client.close()


def test_without_a_configured_redis_the_app_starts_a_private_one(
    example: Any, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    del settings["alkey.redis_url"]
    sigterm = signal.getsignal(signal.SIGTERM)
    wsgi_app = example.main({}, **settings)
    server = wsgi_app.registry[example.EMBEDDED_REDIS]
    signal.signal(signal.SIGTERM, sigterm)  # main() made SIGTERM stop that server too
    try:
        app = TestApp(wsgi_app)
        app.get("/")
        assert statuses(app.get("/")) == dict.fromkeys(ALL_FRAGMENTS, "HIT")
        assert server.url in wsgi_app.registry.settings["alkey.redis_url"]
    finally:
        server.close()

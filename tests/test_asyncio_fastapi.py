"""The FastAPI example (examples/fastapi_app), driven through httpx.AsyncClient.

It runs on the test database through an asyncio driver (aiosqlite, or psycopg's asyncio
mode on PostgreSQL) and on the test Redis, which holds both the tokens and the cached
responses. The ``X-Cache`` header tells whether a response came from the cache.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from sqlalchemy import Engine

from alkey.tokens import RedisClient

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app"


@pytest.fixture
def example(tables: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example's module, imported from examples/fastapi_app as uvicorn would."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    imported_before = set(sys.modules)
    module = importlib.import_module("fastapi_app.main")
    yield module
    module.Base.metadata.drop_all(tables)
    for name in set(sys.modules) - imported_before:
        if name.split(".")[0] == "fastapi_app":
            del sys.modules[name]


def test_an_edit_through_the_api_makes_only_the_responses_naming_that_row_render_again(
    example: ModuleType,
    tables: Engine,
    redis_url: str,
    redis_client: RedisClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    # The test database's own URL: the example picks the asyncio driver for it.
    monkeypatch.setenv("DATABASE_URL", tables.url.render_as_string(hide_password=False))
    app = example.create_app()

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://example") as client,
        ):

            async def get(path: str) -> tuple[str, object]:
                response = await client.get(path)
                response.raise_for_status()
                return response.headers["X-Cache"], response.json()

            for title in ("Hello", "Other"):
                created = await client.post("/articles", json={"title": title})
                assert created.status_code == 201
            hello = {"id": 1, "title": "Hello", "body": ""}
            other = {"id": 2, "title": "Other", "body": ""}

            assert await get("/articles/1") == ("MISS", hello)
            assert await get("/articles/1") == ("HIT", hello)
            assert await get("/articles/2") == ("MISS", other)
            assert await get("/articles") == ("MISS", [hello, other])
            assert await get("/articles") == ("HIT", [hello, other])

            edited = await client.patch("/articles/1", json={"title": "Hello, world"})
            assert edited.json() == {**hello, "title": "Hello, world"}
            # The commit's bump finished before the PATCH answered: the next GET sees it.
            changed = {**hello, "title": "Hello, world"}
            assert await get("/articles/1") == ("MISS", changed)
            assert await get("/articles/1") == ("HIT", changed)
            assert await get("/articles") == ("MISS", [changed, other])
            assert await get("/articles/2") == ("HIT", other), "other rows keep their keys"
            assert (await client.get("/articles/3")).status_code == 404

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("database_url", "driver"),
    [
        ("", "aiosqlite"),
        ("sqlite:///app.sqlite", "aiosqlite"),
        ("postgresql://app@db/app", "psycopg"),
        ("postgresql+psycopg2://app@db/app", "psycopg"),
        ("postgresql+asyncpg://app@db/app", "asyncpg"),
    ],
)
def test_the_example_reaches_its_database_through_an_asyncio_driver(
    example: ModuleType, database_url: str, driver: str
) -> None:
    assert example.database_url({"DATABASE_URL": database_url}).get_driver_name() == driver

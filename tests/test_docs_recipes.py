"""Every Python example of the integration recipes runs, in order, against the real
libraries and the test Redis: docs/integrations/sqlmodel.md, celery.md and fastapi.md,
and docs/front-ends.md (alkey.readthrough on a dict and redis-py, dogpile.cache,
Flask-Caching, redis.asyncio, aiocache, cashews, and a Jinja2 fragment tag).

The examples hold their own assertions: a key changes after a commit, a cached value is
fresh after a write. Each test unbinds what its page bound, so other tests see no binding.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

import alkey
from alkey.tokens import RedisClient

from .support.docs import docs_page, python_blocks, run_python_examples
from .support.inspection import token_keys

PAGES = (
    "integrations/sqlmodel.md",
    "integrations/celery.md",
    "integrations/fastapi.md",
    "front-ends.md",
)


@pytest.fixture
def page_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """One module for a page's blocks, run into it in order: SQLAlchemy and pydantic
    resolve a model's annotations through ``sys.modules``."""
    module = types.ModuleType("docs_recipe")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def run_blocks(page: str, module: types.ModuleType) -> None:
    for number, block in enumerate(python_blocks(docs_page(page)), start=1):
        exec(compile(block, f"docs/{page} python block {number}", "exec"), module.__dict__)


@pytest.mark.parametrize("page", PAGES)
def test_each_recipe_page_has_a_python_example(page: str) -> None:
    assert python_blocks(docs_page(page))


def test_the_sqlmodel_recipe_changes_a_heroes_key_when_its_row_is_committed(
    page_module: types.ModuleType,
    redis_url: str,
    redis_client: RedisClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    try:
        run_blocks("integrations/sqlmodel.md", page_module)
    finally:
        if hasattr(page_module, "Session"):
            alkey.unbind(page_module.Session)
        if hasattr(page_module, "redis_client"):
            page_module.redis_client.close()
    assert "alkey:hero#1" in token_keys(redis_client)


# dogpile.cache's Redis backend stores with setex() when given redis_expiration_time, which
# redis-py 5 deprecates.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
def test_the_front_end_recipes_serve_a_fresh_value_after_a_commit(
    page_module: types.ModuleType,
    redis_url: str,
    redis_client: RedisClient,
    environment_redis: Callable[[str], None],
) -> None:
    """Every block of the page, in order, in one module: the shipped read-through helpers
    and adapters, dogpile's default keys as the stale control, and the Jinja2 tag."""
    environment_redis(redis_url)
    try:
        run_blocks("front-ends.md", page_module)
    finally:
        close_front_end_page(page_module)
    assert "alkey:notes#1" in token_keys(redis_client)


def close_front_end_page(page: types.ModuleType) -> None:
    """Undo what front-ends.md bound and close the clients it opened, however far it ran
    (its asyncio block closes its own redis.asyncio client on its event loop)."""
    for factory in ("Session", "AsyncSession"):
        if hasattr(page, factory):
            alkey.unbind(getattr(page, factory))
    if hasattr(page, "redis_cache"):
        page.redis_cache.close()
    region = getattr(page, "region", None)
    if region is not None and region.is_configured:  # its Redis backend opened clients
        region.backend.writer_client.close()
        region.backend.reader_client.close()
    if hasattr(page, "engine"):
        page.engine.dispose()


def test_the_celery_recipe_binds_each_worker_process_and_its_tasks_commits_change_keys(
    docs_directory: Path,
    redis_url: str,
    redis_client: RedisClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.chdir(docs_directory)  # the example's SQLite file
    # Celery's test worker sets up logging for itself: the root logger's level goes to
    # ERROR, and stays there, hiding the warnings later tests read. Put it back.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        run_python_examples(docs_page("integrations/celery.md"), docs_directory)
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers
        tasks = sys.modules.get("tasks")
        if tasks is not None:
            tasks.worker_process_init.disconnect(tasks.bind_alkey)
            tasks.worker_process_shutdown.disconnect(tasks.flush_alkey)
            alkey.unbind(tasks.Session)
            tasks.flush_alkey()  # what a prefork process runs as it ends: closes the client
            tasks.engine.dispose()
    assert "alkey:notes#1" in token_keys(redis_client)


# Starlette asks for httpx2 behind its TestClient; with httpx (a test dependency) it warns.
@pytest.mark.filterwarnings(
    "ignore:Using `httpx` with `starlette.testclient`:"
    "starlette.exceptions.StarletteDeprecationWarning"
)
def test_the_fastapi_recipe_answers_from_the_cache_until_a_commit_changes_the_key(
    docs_directory: Path,
    redis_url: str,
    redis_client: RedisClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.chdir(docs_directory)  # the example's SQLite file
    try:
        run_python_examples(docs_page("integrations/fastapi.md"), docs_directory)
    finally:
        main = sys.modules.get("main")
        if main is not None:
            alkey.unbind(main.SessionLocal)
            main.redis_client.close()
            main.engine.dispose()
    assert "alkey:notes#1" in token_keys(redis_client)

"""The Flask-SQLAlchemy guide's recipe (``docs/integrations/flask.md``): bind to ``db.session``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import alkey
from alkey.tokens import RedisClient

from .conftest import run_python_examples, token_keys
from .support.docs import docs_page

FLASK_DOCS = docs_page("integrations/flask.md")


def test_the_flask_recipe_has_python_examples() -> None:
    assert FLASK_DOCS.count("```python") >= 2


def test_every_python_example_of_the_flask_recipe_runs_and_its_assertions_hold(
    docs_directory: Path,
    redis_url: str,
    redis_client: RedisClient,
    environment_redis: Callable[[str], None],
) -> None:
    environment_redis(redis_url)
    try:
        run_python_examples(FLASK_DOCS, docs_directory)
        assert "alkey:note#1" in token_keys(redis_client)
    finally:
        notes = sys.modules.get("notes")
        if notes is not None:
            alkey.unbind(notes.db.session)
            notes.redis_client.close()

"""The public names are a contract: every documented import path keeps working, silently.

alkey 0.3's names (the seed's contract), the names the README and CHANGES.md document, and
every name a module lists in ``__all__`` must import without a warning (pytest turns
warnings into errors), whatever the modules behind them become.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import alkey

#: alkey 0.3's public names, which alkey 1.0 keeps.
SEED_CONTRACT = [
    "alkey.events.bind",
    "alkey.cache.get_cache_key_generator",
    "alkey.cache.CacheKeyGenerator",
    "alkey.cache.get_token",
    "alkey.client.get_redis_client",
    "alkey.client.get_redis_config",
    "alkey.constants.GLOBAL_WRITE_TOKEN",
    "alkey.interfaces.IRedisClientFactory",
    "alkey.interfaces.IRedisConnectionPool",
    "alkey.includeme",
]

#: Names the README and CHANGES.md document beyond the seed's.
DOCUMENTED = [
    "alkey.bind",
    "alkey.unbind",
    "alkey.bind_engine",
    "alkey.unbind_engine",
    "alkey.touch",
    "alkey.invalidate",
    "alkey.declare_writes",
    "alkey.undeclare_writes",
    "alkey.register_metadata",
    "alkey.row_identifier",
    "alkey.table_identifier",
    "alkey.parse_identifier",
    "alkey.CacheKeyGenerator",
    "alkey.get_cache_key_generator",
    "alkey.RedisTokenStore",
    "alkey.TokenStore",
    "alkey.events.unbind",
    "alkey.identity.row_identifier",
    "alkey.identity.table_identifier",
    "alkey.tokens.RedisTokenStore",
    "alkey.tokens.TokenStore",
    "alkey.tokens.DurableTokenStore",
    "alkey.asyncio.bind",
    "alkey.asyncio.AsyncCacheKeyGenerator",
    "alkey.asyncio.AsyncRedisTokenStore",
    "alkey.asyncio.get_async_redis_client",
    "alkey.asyncio.close_async_redis_client",
    "alkey.embedded.EmbeddedRedis",
    "alkey.testing.EmbeddedRedis",
    "alkey.testing.LatencyProxy",
    "alkey.testing.RoundTrips",
    "alkey.testing.counting_client",
]


def resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", SEED_CONTRACT + DOCUMENTED)
def test_a_documented_name_imports_from_its_documented_path(path: str) -> None:
    assert resolve(path) is not None


def modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(alkey.__path__, "alkey.")
        if info.name != "alkey.__main__"
    )


@pytest.mark.parametrize("module", modules())
def test_every_name_a_module_exports_exists(module: str) -> None:
    imported = importlib.import_module(module)
    missing = [name for name in getattr(imported, "__all__", ()) if not hasattr(imported, name)]
    assert missing == []


ASYNC_BIND = """
import sys
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
import alkey

assert "alkey.asyncio" not in sys.modules, "the core imports no asyncio integration"
binding = alkey.bind(async_sessionmaker(create_async_engine("sqlite+aiosqlite://")))
print(type(binding.tokens).__name__)
"""


def test_binding_an_asyncio_target_loads_the_asyncio_integration_by_itself() -> None:
    """The core never imports alkey.asyncio; alkey.bind still takes asyncio targets, and
    gives them the asyncio token store, by loading the integration when it meets one."""
    process = subprocess.run(
        [sys.executable, "-c", ASYNC_BIND],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"},  # never contacted
    )
    assert process.stdout.strip() == "AsyncRedisTokenStore"

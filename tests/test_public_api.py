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
    "alkey.testing.async_counting_client",
    "alkey.keys.CacheKeyGenerator",
    "alkey.settings.configure",
    "alkey.settings.register_scheme",
    "alkey.settings.Configuration",
    "alkey.options.StoreOptions",
    "alkey.observers.StoreObserver",
    "alkey.observers.LoggingObserver",
    "alkey.errors.AlkeyError",
    "alkey.errors.ConfigurationError",
    "alkey.errors.TokenStoreError",
    "alkey.errors.TokenStoreUnavailableError",
    "alkey.errors.TokenStorePoolExhaustedError",
    "alkey.errors.TokenStoreConfigurationError",
    "alkey.check_redis",
    "alkey.UnboundSessionWarning",
    "alkey.asyncio.acheck_redis",
    "alkey.asyncio.ainvalidate",
    "alkey.readthrough.cached",
    "alkey.readthrough.get_or_create",
    "alkey.readthrough_asyncio.acached",
    "alkey.readthrough_asyncio.aget_or_create",
    "alkey.adapters.dogpile.function_key_generator",
    "alkey.adapters.flask_caching.memoize",
    "alkey.adapters.aiocache.cached",
    "alkey.adapters.cashews.cached",
    "alkey.cli.main",
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


#: Modules renamed for what they are, each name as (old path, new path). The old modules
#: stay, re-exporting the very same objects without a warning.
MOVED = [
    ("alkey.cache.CacheKeyGenerator", "alkey.keys.CacheKeyGenerator"),
    ("alkey.cache.KeyPlan", "alkey.keys.KeyPlan"),
    ("alkey.cache.get_cache_key_generator", "alkey.keys.get_cache_key_generator"),
    ("alkey.cache.get_token", "alkey.keys.get_token"),
    ("alkey.cache.DIGEST_LENGTH", "alkey.keys.DIGEST_LENGTH"),
    ("alkey.cache.MAX_PREFIX_LENGTH", "alkey.keys.MAX_PREFIX_LENGTH"),
    ("alkey.tracking.TransactionChanges", "alkey.transactions.TransactionChanges"),
    ("alkey.tracking.changes_of", "alkey.transactions.changes_of"),
]


@pytest.mark.parametrize(("old", "new"), MOVED, ids=[old for old, _ in MOVED])
def test_a_moved_name_is_the_same_object_at_its_old_and_new_path(old: str, new: str) -> None:
    assert resolve(old) is resolve(new)


@pytest.mark.parametrize("module", ["alkey.cache", "alkey.tracking"])
def test_an_old_module_exports_only_moved_names(module: str) -> None:
    """Each name an old module lists is one of :data:`MOVED`, checked above to be its new
    module's very object: the old module defines nothing of its own."""
    exported = {f"{module}.{name}" for name in importlib.import_module(module).__all__}
    assert exported == {old for old, _ in MOVED if old.startswith(f"{module}.")}


OLD_AND_NEW_PATHS = """
import alkey.cache, alkey.tracking
from alkey.cache import CacheKeyGenerator, get_cache_key_generator, get_token
from alkey.tracking import TransactionChanges, changes_of
import alkey.keys, alkey.transactions
assert CacheKeyGenerator is alkey.keys.CacheKeyGenerator is alkey.CacheKeyGenerator
assert TransactionChanges is alkey.transactions.TransactionChanges
print("imported")
"""


def test_the_old_module_paths_import_silently_in_a_fresh_interpreter() -> None:
    """In a process of their own, so that they are really imported (not found in
    sys.modules), first and with every warning an error: no DeprecationWarning."""
    process = subprocess.run(
        [sys.executable, "-W", "error", "-c", OLD_AND_NEW_PATHS],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (process.returncode, process.stdout.strip(), process.stderr) == (0, "imported", "")


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

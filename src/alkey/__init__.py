"""alkey: cache keys that invalidate themselves when SQLAlchemy rows change.

Bind once, then build keys wherever you cache::

    alkey.bind(Session)
    key = alkey.CacheKeyGenerator()(user, "sidebar")

The key changes after any transaction that wrote ``user`` commits; reads and rolled-back
work leave it as it is.
"""

from __future__ import annotations

from typing import Any

from alkey.catalog import declare_writes, register_metadata, undeclare_writes
from alkey.client import check_redis, get_redis_client, get_redis_config
from alkey.connections import bind_engine, unbind_engine
from alkey.constants import GLOBAL_WRITE_TOKEN
from alkey.events import UnboundSessionWarning, bind, unbind
from alkey.identity import parse_identifier, row_identifier, table_identifier
from alkey.keys import CacheKeyGenerator, get_cache_key_generator, get_token
from alkey.manual import invalidate, touch
from alkey.tokens import RedisTokenStore, TokenStore

__all__ = [
    "GLOBAL_WRITE_TOKEN",
    "CacheKeyGenerator",
    "RedisTokenStore",
    "TokenStore",
    "UnboundSessionWarning",
    "bind",
    "bind_engine",
    "check_redis",
    "declare_writes",
    "get_cache_key_generator",
    "get_redis_client",
    "get_redis_config",
    "get_token",
    "includeme",
    "invalidate",
    "parse_identifier",
    "register_metadata",
    "row_identifier",
    "table_identifier",
    "touch",
    "unbind",
    "unbind_engine",
    "undeclare_writes",
]

__version__ = "1.0.0.dev0"


def includeme(config: Any) -> None:
    """Pyramid's ``config.include('alkey')``: see :mod:`alkey.pyramid`.

    Imported here lazily so that the core never imports a web framework.
    """
    from alkey.pyramid import includeme as include_pyramid

    include_pyramid(config)

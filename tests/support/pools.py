"""Holding a pool's connections by hand, on any redis-py the package supports."""

from __future__ import annotations

import inspect
from typing import Any

import redis


def take_connection(pool: Any) -> Any:
    """A connection out of ``pool`` (a coroutine of one for an asyncio pool), as a call
    would take it. Before redis-py 5.3 ``get_connection`` required a command name; later
    versions deprecate passing one."""
    parameters = list(inspect.signature(pool.get_connection).parameters.values())
    if parameters and parameters[0].default is inspect.Parameter.empty:
        return pool.get_connection("PING")
    return pool.get_connection()


def is_pool_exhausted(error: BaseException | None) -> bool:
    """Whether ``error`` is a pool's refusal of another connection: ``MaxConnectionsError``
    from redis-py 6.4, a ``ConnectionError`` of the same text before."""
    return isinstance(error, redis.ConnectionError) and "Too many connections" in str(error)

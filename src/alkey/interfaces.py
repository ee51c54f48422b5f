"""The extension points of alkey 0.3, as :mod:`zope.interface` interfaces.

Register either one as a utility in a component registry (a Pyramid application's
``config.registry``, or any :class:`zope.interface.registry.Components`) and
:func:`alkey.client.get_redis_client` uses it instead of configuring Redis from the
environment. Applications without a registry pass a client to
:func:`alkey.events.bind` and :class:`alkey.keys.CacheKeyGenerator` instead.
"""

from __future__ import annotations

from zope.interface import Interface

__all__ = ["IRedisClientFactory", "IRedisConnectionPool"]


class IRedisClientFactory(Interface):
    """A callable returning a ``redis.Redis`` client; called with no arguments.

    Takes precedence over :class:`IRedisConnectionPool` when both are registered.
    """

    def __call__() -> object:  # type: ignore[misc]  # zope interfaces omit self
        """Return a redis client."""


class IRedisConnectionPool(Interface):
    """A ``redis.ConnectionPool`` that clients for alkey are built on."""

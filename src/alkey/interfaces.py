"""The extension points of alkey 0.3, as :mod:`zope.interface` interfaces.

Importing this module imports :mod:`zope.interface` (the ``pyramid`` extra); ``import
alkey`` does not, and :func:`alkey.client.get_redis_client` imports it only when it is
given a registry. Register either one as a utility in a component registry (a Pyramid application's
``config.registry``, or any :class:`zope.interface.registry.Components`) and
:func:`alkey.client.get_redis_client` uses it instead of configuring Redis from the
environment. Applications without a registry pass a client to
:func:`alkey.events.bind` and :class:`alkey.keys.CacheKeyGenerator` instead.
"""

from __future__ import annotations

from zope.interface import Interface

__all__ = ["IRedisClientFactory", "IRedisConnectionPool"]


class IRedisClientFactory(Interface):
    """A callable returning a ``redis.Redis`` client.

    Called with ``request=`` (the request, or ``None`` when only a registry is known) if
    it takes a ``request`` argument or ``**kwargs``, as alkey 0.3 called every factory,
    so a factory written for 0.3 keeps working; otherwise with no arguments. Takes
    precedence over :class:`IRedisConnectionPool` when both are registered.
    """

    def __call__() -> object:  # type: ignore[misc]  # zope interfaces omit self
        """Return a redis client."""


class IRedisConnectionPool(Interface):
    """A ``redis.ConnectionPool`` that clients for alkey are built on."""

"""Rendered fragments, cached under ``request.cache_key(...)`` through Mako's cache tags.

A template marks a fragment with ``<%page cached="True" cache_key="...">`` (or the same
attributes on a ``<%def>``) and builds the key with ``request.cache_key``. Mako hands the
key to :class:`FragmentCacheImpl`, which keeps the rendered text in a dogpile.cache region
(configured by the ``fragments.cache.*`` settings) and notes, for the page, whether the
fragment was a hit or had to be rendered. When a request commits a write to a row, alkey
changes the keys built from that row, so its fragments render again; every other key
stays the same and keeps hitting. Nothing here ever deletes a cache entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dogpile.cache import CacheRegion, make_region
from mako.cache import CacheImpl, register_plugin  # type: ignore[import-untyped]
from pyramid.interfaces import IRendererFactory  # type: ignore[import-untyped]

#: The name Mako knows :class:`FragmentCacheImpl` by.
MAKO_CACHE_IMPL = "pyramid_app.fragments"
REGION = "pyramid_app.fragment_region"
DEFAULT_SETTINGS = {
    "fragments.cache.backend": "dogpile.cache.memory",
    "fragments.cache.expiration_time": "3600",
}


class FragmentLog:
    """``request.fragment_log``: which fragments of this page hit, in render order."""

    def __init__(self, request: Any) -> None:
        self.hits: list[bool] = []

    def record(self, hit: bool) -> None:
        self.hits.append(hit)

    @property
    def last(self) -> str:
        """``HIT`` or ``MISS`` for the fragment rendered last."""
        return "HIT" if self.hits[-1] else "MISS"

    def summary(self) -> str:
        hits = sum(self.hits)
        return f"{hits} of {len(self.hits)} fragments from the cache"


class FragmentCacheImpl(CacheImpl):  # type: ignore[misc]
    """Mako's cache for this application: its region, found through the request."""

    # Mako then passes the template context, and with it the request, to get_or_create.
    pass_context = True

    def get_or_create(self, key: str, creation_function: Callable[[], str], **kw: Any) -> str:
        request = kw["context"].get("request")
        region: CacheRegion = request.registry[REGION]
        rendered = False

        def render() -> str:
            nonlocal rendered
            rendered = True
            return creation_function()

        value: str = region.get_or_create(key, render)
        request.fragment_log.record(hit=not rendered)
        return value


register_plugin(MAKO_CACHE_IMPL, __name__, FragmentCacheImpl.__name__)


def includeme(config: Any) -> None:
    """The fragment region, ``request.fragment_log``, and Mako's cache set to use them."""
    settings = {**DEFAULT_SETTINGS, **config.get_settings()}
    config.registry[REGION] = make_region().configure_from_config(settings, "fragments.cache.")
    config.add_request_method(FragmentLog, "fragment_log", reify=True)

    def use_fragment_cache_in_mako() -> None:
        # pyramid_mako has no setting for Mako's cache_impl, so set it on the lookup that
        # pyramid_mako built, before any template is compiled.
        lookup = config.registry.getUtility(IRendererFactory, name=".mako").lookup
        lookup.template_args["cache_impl"] = MAKO_CACHE_IMPL

    # An action, so that it runs after pyramid_mako's own (which creates the lookup).
    config.action(None, use_fragment_cache_in_mako, order=1)

"""The alkey example application: a list of items whose rendered fragments are cached.

Run it with ``pserve examples/pyramid_app/development.ini``. SQLite holds the items; the
tokens live in the Redis that ``alkey.redis_url`` / ``redis.url`` or ``REDIS_URL`` names,
else in a private redis-server that the application starts for itself.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from typing import Any

from pyramid.config import Configurator  # type: ignore[import-untyped]
from pyramid.csrf import CookieCSRFStoragePolicy  # type: ignore[import-untyped]

from alkey.embedded import EmbeddedRedis
from alkey.pyramid import REDIS_URL_SETTINGS
from pyramid_app.models import SESSION_FACTORY, add_sample_items

log = logging.getLogger("pyramid_app")

#: The private redis-server, when the application started one (see :func:`main`).
EMBEDDED_REDIS = "pyramid_app.embedded_redis"


def start_private_redis() -> EmbeddedRedis:
    """A redis-server for this process only, stopped when the process exits."""
    server = EmbeddedRedis(prefer="bundled").start()
    atexit.register(server.close)
    # pserve (and its --reload worker) dies of SIGTERM without running atexit handlers,
    # which would leave the redis-server behind: make SIGTERM a normal exit instead.
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    log.info("no Redis configured: started a private redis-server at %s", server.url)
    return server


def main(global_config: dict[str, str], **settings: Any) -> Any:
    """The WSGI application (pserve calls this with the .ini's ``[app:main]`` settings)."""
    redis_server = None
    if not any(settings.get(name) for name in REDIS_URL_SETTINGS) and not os.environ.get(
        "REDIS_URL"
    ):
        redis_server = start_private_redis()
        settings["alkey.redis_url"] = redis_server.url

    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include("pyramid_mako")
        config.include("alkey")
        config.include(".models")
        config.include(".fragments")
        config.set_csrf_storage_policy(CookieCSRFStoragePolicy())
        config.set_default_csrf_options(require_csrf=True)
        config.include(".views")
        config.registry[EMBEDDED_REDIS] = redis_server
    add_sample_items(config.registry[SESSION_FACTORY])
    return config.make_wsgi_app()

"""``python -m alkey`` and the ``alkey`` command: the guided demo, and the operators' commands.

* ``alkey demo`` -- walks through keys changing on commit and staying put on rollback, on
  an embedded Redis and SQLite (or the Redis at ``REDIS_URL``); it lives here.
* ``alkey check``, ``inspect``, ``bump``, ``watch``, ``stats`` -- see :mod:`alkey.cli`,
  which :func:`main` hands every command to.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import alkey
from alkey import cli
from alkey.client import client_from_config, get_redis_config, redact_url
from alkey.keys import CacheKeyGenerator
from alkey.tokens import RedisClient, RedisTokenStore

#: Token keys the demo writes are prefixed, so that it never touches an application's own.
DEMO_KEY_PREFIX = "alkey-demo:"


class _Base(DeclarativeBase):
    pass


class DemoUser(_Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


@contextlib.contextmanager
def _redis(out: Callable[[str], None]) -> Iterator[RedisClient]:
    if os.environ.get("REDIS_URL"):
        config = get_redis_config()
        client = client_from_config(config)
        out(f"Redis:    {redact_url(config['url'])} (from REDIS_URL), db {config['db']}")
        try:
            yield client
        finally:
            client.close()
        return
    from alkey.embedded import EmbeddedRedis

    with EmbeddedRedis(prefer="bundled") as server:
        client = client_from_config(get_redis_config({"REDIS_URL": server.url}))
        out(f"Redis:    embedded redis-server on {server.url} ({server.executable})")
        try:
            yield client
        finally:
            client.close()


def demo(out: Callable[[str], None] = print) -> None:
    """Show a key changing on commit and staying the same on rollback."""
    out("alkey demo: cache keys that change by themselves when rows change\n")
    with _redis(out) as client:
        out("Database: SQLite in memory\n")
        engine = create_engine("sqlite://")
        _Base.metadata.create_all(engine)
        tokens = RedisTokenStore(client, key_prefix=DEMO_KEY_PREFIX)
        make_session = sessionmaker(engine, expire_on_commit=False)
        alkey.bind(make_session, tokens=tokens)
        try:
            _story(make_session, CacheKeyGenerator(tokens=tokens, prefix="profile:"), out)
        finally:
            alkey.unbind(make_session)
            leftovers = client.keys(DEMO_KEY_PREFIX + "*")
            if leftovers:
                client.delete(*leftovers)


def _story(
    make_session: sessionmaker[Session],
    key_generator: CacheKeyGenerator,
    out: Callable[[str], None],
) -> None:
    cache: dict[str, str] = {}

    def render(user: DemoUser) -> None:
        key = key_generator(user)
        if key in cache:
            out(f"   render {user.name!r:16} key {key[:20]}...  HIT  -> {cache[key]!r}")
        else:
            cache[key] = f"<h1>{user.name}</h1>"
            out(f"   render {user.name!r:16} key {key[:20]}...  MISS -> rendered and cached")

    with make_session() as session:
        ada, grace = DemoUser(name="Ada"), DemoUser(name="Grace")
        session.add_all([ada, grace])
        session.commit()
        out("1. Two users are saved. Their profiles are rendered twice:")
        for user in (ada, grace, ada, grace):
            render(user)

        out("\n2. Ada is renamed and the transaction COMMITS:")
        old_key = key_generator(ada)
        ada.name = "Ada Lovelace"
        session.commit()
        out(f"   Ada's key changed: {old_key[:28]}... -> {key_generator(ada)[:28]}...")
        render(ada)
        render(grace)
        out("   Only what changed was invalidated: Grace's profile is still a hit.")

        out("\n3. Ada is renamed again, but the transaction ROLLS BACK:")
        old_key = key_generator(ada)
        ada.name = "Countess"
        session.flush()
        session.rollback()
        unchanged = "unchanged" if key_generator(ada) == old_key else "CHANGED (a bug!)"
        out(f"   Ada's key is {unchanged}; her cached profile is still good:")
        render(ada)

        out("\n4. In one transaction, Grace is renamed inside a savepoint that rolls back,")
        out("   and Ada is renamed outside it. The transaction commits:")
        grace_key, ada_key = key_generator(grace), key_generator(ada)
        savepoint = session.begin_nested()
        grace.name = "Grace (draft)"
        session.flush()
        savepoint.rollback()
        ada.name = "Lady Lovelace"
        session.commit()
        out(
            f"   Grace's key {'unchanged' if key_generator(grace) == grace_key else 'CHANGED'},"
            f" Ada's key {'changed' if key_generator(ada) != ada_key else 'UNCHANGED'}:"
        )
        render(grace)
        render(ada)

    out("\nTokens behind the keys (in Redis, prefixed for this demo):")
    for identifier in ("alkey:users#1", "alkey:users#2", "alkey:users#*", alkey.GLOBAL_WRITE_TOKEN):
        out(f"   {identifier:16} {key_generator.tokens.fetch([identifier])[0]}")
    out("\nThat's all: bind your Session once with alkey.bind(Session), then build keys with")
    out("CacheKeyGenerator()(instance, 'anything else') wherever you cache.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m alkey`` and of the ``alkey`` console script: the
    commands of :mod:`alkey.cli`, with this module's :func:`demo`."""
    return cli.main(argv, demo=demo)


if __name__ == "__main__":
    sys.exit(main())

"""A FastAPI application whose JSON responses are cached under alkey keys.

``GET /articles/{id}`` and ``GET /articles`` answer from a cache (kept in the same Redis)
under keys that name the article's row, or the whole table. ``PATCH`` and ``POST`` commit
through an AsyncSession bound to alkey: when ``await session.commit()`` returns, those
keys have changed, so the next ``GET`` renders again. Nothing deletes cache entries; old
ones simply expire. The ``X-Cache`` header says whether a response was a HIT or a MISS.

* ``DATABASE_URL``: ``postgresql://...`` (psycopg 3 in its asyncio mode),
  ``postgresql+asyncpg://...``, or ``sqlite:///...`` (aiosqlite); by default the SQLite
  file ``fastapi_app.sqlite`` in the working directory.
* ``REDIS_URL`` (and alkey's other variables, see ``alkey.client.get_redis_config``): the
  Redis that holds the tokens and the cache; by default ``redis://localhost:6379/0``.

Run it with ``uvicorn --factory fastapi_app:create_app``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel
from redis.exceptions import RedisError
from sqlalchemy import URL, String, Text, make_url, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import alkey
import alkey.asyncio
from alkey.asyncio import AsyncCacheKeyGenerator, close_async_redis_client, get_async_redis_client

#: How long a cached response lives. Edits never wait for it: they change the key.
CACHE_SECONDS = 300

#: Keys of the cached responses: a prefix of their own, then a SHA-256.
cache_key = AsyncCacheKeyGenerator(prefix="fastapi_app:")


class Base(DeclarativeBase):
    pass


class Article(Base):
    __tablename__ = "articles"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text, default="")


class NewArticle(BaseModel):
    title: str
    body: str = ""


class ArticleEdit(BaseModel):
    title: str | None = None
    body: str | None = None


def database_url(env: Mapping[str, str] = os.environ) -> URL:
    """``DATABASE_URL`` (default: a SQLite file), with an asyncio driver."""
    url = make_url(env.get("DATABASE_URL") or "sqlite:///fastapi_app.sqlite")
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "sqlite" and driver != "aiosqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    elif backend == "postgresql" and driver not in ("psycopg", "asyncpg"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def as_json(article: Article) -> dict[str, Any]:
    return {"id": article.id, "title": article.title, "body": article.body}


async def cached_json(key: str, render: Callable[[], Awaitable[object]]) -> Response:
    """The JSON cached under ``key``, else ``render()``'s, then cached."""
    redis = await get_async_redis_client()
    try:
        cached = await redis.get(key)
    except RedisError:  # the cache only saves work: without Redis, render
        cached = None
    if cached is not None:
        return Response(cached, media_type="application/json", headers={"X-Cache": "HIT"})
    content = json.dumps(await render())
    with suppress(RedisError):
        await redis.set(key, content, ex=CACHE_SECONDS)
    return Response(content, media_type="application/json", headers={"X-Cache": "MISS"})


def create_app(database: URL | str | None = None) -> FastAPI:
    """The application, on ``database`` (default: :func:`database_url`)."""
    engine = create_async_engine(database if database is not None else database_url())
    new_session = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # From now on every commit of these sessions changes the keys of what it wrote,
        # through redis.asyncio, before `await session.commit()` returns.
        alkey.asyncio.bind(new_session)
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        try:
            yield
        finally:
            alkey.unbind(new_session)
            # Bumps kept through a Redis outage are replayed by a task of this loop:
            # give them a moment to go out before the loop ends.
            await alkey.asyncio.store_for().wait_replayed(timeout=5)
            await engine.dispose()
            await close_async_redis_client()

    app = FastAPI(title="alkey FastAPI example", lifespan=lifespan)

    @app.get("/articles/{article_id}")
    async def show(article_id: int) -> Response:
        # The key names the row without loading it, so a hit costs no database query.
        key = await cache_key(alkey.row_identifier(Article.__table__, article_id), "article")

        async def render() -> object:
            async with new_session() as session:
                article = await session.get(Article, article_id)
            if article is None:
                raise HTTPException(status_code=404, detail="no such article")
            return as_json(article)

        return await cached_json(key, render)

    @app.get("/articles")
    async def index() -> Response:
        key = await cache_key(Article, "index")  # changes with any write to the table

        async def render() -> object:
            async with new_session() as session:
                articles = await session.scalars(select(Article).order_by(Article.id))
                return [as_json(article) for article in articles]

        return await cached_json(key, render)

    @app.post("/articles", status_code=201)
    async def create(new: NewArticle) -> dict[str, Any]:
        async with new_session() as session:
            article = Article(title=new.title, body=new.body)
            session.add(article)
            await session.commit()
        return as_json(article)

    @app.patch("/articles/{article_id}")
    async def edit(article_id: int, edit: ArticleEdit) -> dict[str, Any]:
        async with new_session() as session:
            article = await session.get(Article, article_id)
            if article is None:
                raise HTTPException(status_code=404, detail="no such article")
            for field, value in edit.model_dump(exclude_unset=True).items():
                setattr(article, field, value)
            await session.commit()  # the keys naming this article have changed now
        return as_json(article)

    return app

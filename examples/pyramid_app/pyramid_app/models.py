"""The items, the session class alkey binds, and ``request.dbsession``.

As in Pyramid's cookiecutter, each request gets its own session, joined to the request's
transaction by zope.sqlalchemy, and pyramid_tm commits or aborts it. Every session is an
:class:`AppSession`, the class ``alkey.session_cls`` names, so alkey sees every commit.
"""

from __future__ import annotations

from typing import Any

import zope.sqlalchemy
from sqlalchemy import String, Text, engine_from_config, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

SESSION_FACTORY = "pyramid_app.session_factory"

SAMPLE_ITEMS = [
    ("Teapot", "Short and stout; handle and spout."),
    ("Lantern", "Brass, with a glass chimney."),
    ("Compass", "Points north, mostly."),
]


class Base(DeclarativeBase):
    pass


class AppSession(Session):
    """The class of every session this application makes: the one alkey binds."""


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")


def add_sample_items(factory: sessionmaker[AppSession]) -> None:
    """Give an empty database something to show."""
    with factory.begin() as session:
        if session.scalar(select(func.count()).select_from(Item)) == 0:
            session.add_all(Item(name=name, description=text) for name, text in SAMPLE_ITEMS)


def dbsession(request: Any) -> AppSession:
    """``request.dbsession``: committed by pyramid_tm when the view returns, else aborted."""
    session = request.registry[SESSION_FACTORY]()
    zope.sqlalchemy.register(session, transaction_manager=request.tm)
    assert isinstance(session, AppSession)
    return session


def includeme(config: Any) -> None:
    """The engine (``sqlalchemy.*`` settings), the tables, and ``request.dbsession``."""
    engine = engine_from_config(config.get_settings(), "sqlalchemy.")
    Base.metadata.create_all(engine)
    config.registry[SESSION_FACTORY] = sessionmaker(engine, class_=AppSession)
    config.add_request_method(dbsession, "dbsession", reify=True)

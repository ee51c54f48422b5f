"""Models covering the identifier cases: key types, table names, schemas, inheritance."""

from __future__ import annotations

import os
import uuid

from sqlalchemy import ForeignKey, MetaData, String, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: A schema that exists on both backends: SQLite's main database, or one we create.
SCHEMA = (
    "main"
    if os.environ.get("ALKEY_TEST_DATABASE_URL", "sqlite").startswith("sqlite")
    else ("alkey_test")
)


class Base(DeclarativeBase):
    metadata = MetaData()


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Tag(Base):
    """A string primary key whose values may contain identifier separators."""

    __tablename__ = "tags"
    code: Mapped[str] = mapped_column(String(100), primary_key=True)
    label: Mapped[str] = mapped_column(String(100), default="")


class Document(Base):
    __tablename__ = "documents"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    title: Mapped[str] = mapped_column(String(100), default="")


class Membership(Base):
    """A composite primary key."""

    __tablename__ = "memberships"
    group: Mapped[str] = mapped_column(String(100), primary_key=True)
    user_id: Mapped[int] = mapped_column(primary_key=True)
    role: Mapped[str] = mapped_column(String(100), default="member")


class OddlyNamed(Base):
    """A table name with digits, upper case and every separator character."""

    __tablename__ = "2FA Codes:#,"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(100), default="")


class Invoice(Base):
    """A schema-qualified table."""

    __tablename__ = "invoices"
    __table_args__ = {"schema": SCHEMA}
    id: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[int] = mapped_column(default=0)


class Employee(Base):
    """The base of a joined-table (Manager) and a single-table (Engineer) subclass."""

    __tablename__ = "employees"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    kind: Mapped[str] = mapped_column(String(20))
    language: Mapped[str | None] = mapped_column(String(20), default=None)
    __mapper_args__ = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "employee",
    }


class Manager(Employee):
    __tablename__ = "managers"
    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    budget: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "manager"}


class Engineer(Employee):
    __mapper_args__ = {"polymorphic_identity": "engineer"}

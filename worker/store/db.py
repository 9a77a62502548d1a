"""The SQLAlchemy engine and sessions of one database (SQLite or PostgreSQL), and its migrations.

SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` for writes, so that the listener and the
pipeline never see ``database is locked`` under normal load.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from sqlalchemy import Engine as SQLEngine
from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session, sessionmaker

# --------------------------------------------------------------------------- engine


def make_sql_engine(url: str) -> SQLEngine:
    """Create the SQLAlchemy engine with the pragmas durability needs.

    SQLite: WAL (readers never block the writer), ``synchronous=FULL`` (a commit is on disk
    before the C-STORE is acknowledged; NORMAL may lose the last commits on power loss),
    a busy timeout, and ``BEGIN IMMEDIATE`` for every transaction so that a claim takes the
    write lock up front instead of failing on upgrade from a read lock.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


#: The newest revision in ``worker/migrations/versions`` (a test keeps the two in step).
HEAD_REVISION = "0002"


def current_revision(engine: SQLEngine) -> str | None:
    """The schema revision recorded in ``alembic_version``; None for a new or foreign database."""
    from sqlalchemy import inspect, text

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: SQLEngine) -> None:
    """Bring the schema to the newest Alembic revision (run on every start).

    A current schema is recognised with one query and Alembic is not even imported (it and its
    template engine cost the resident node about 10 MB for nothing).
    """
    if current_revision(engine) == HEAD_REVISION:
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("worker") / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@dataclass
class Database:
    """The SQLAlchemy engine plus a session factory, opened once per process. (``SQLEngine`` and
    ``sql_engine``: the worker's ``Engine`` is the OpenVINO one, worker/engine.py.)"""

    sql_engine: SQLEngine
    sessions: sessionmaker[Session]

    @classmethod
    def open(cls, url: str, *, upgrade: bool = True) -> Database:
        engine = make_sql_engine(url)
        if upgrade:
            migrate(engine)
        return cls(engine, sessionmaker(engine, expire_on_commit=False))

    def close(self) -> None:
        self.sql_engine.dispose()

"""The storage seam's connection layer: SQLAlchemy engines for SQLite and PostgreSQL, and `Connected`, the
base every part of `Storage` builds on (transactions, reads, the dialect's INSERT).

SQLite (the embedded default): WAL mode, foreign keys on, a busy timeout, write transactions begun with
`BEGIN IMMEDIATE`. PostgreSQL (psycopg 3): connections are pre-pinged, so a restarted server is reconnected
to. A pooled connection never crosses `os.fork()`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Connection, Engine, create_engine, event, exc, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from search.storage.records import columns_of, json_dumps, record_of, record_table

SQLITE_BUSY_TIMEOUT_MS = 30_000
_GENERATIONS: dict[str, int] = {}  # database URL -> write generation of this process (see `generation`)
_GENERATION_LOCK = threading.Lock()


def normalize_database_url(url: str) -> str:
    """postgres:// and postgresql:// (as hosting platforms write them) mean psycopg 3 here, not psycopg2."""
    parsed = make_url(str(url))
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names (absolute); None for another backend or an in-memory database."""
    parsed = make_url(str(url))
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or _in_memory(database):
        return None
    return Path(database).expanduser().resolve()


def _in_memory(database: str) -> bool:
    return database in ("", ":memory:") or database.startswith("file::memory:")


def sqlite_engine(url: Any, echo: bool) -> Engine:
    database = url.database or ""
    memory = _in_memory(database)
    kwargs: dict[str, Any] = {"echo": echo, "json_serializer": json_dumps}
    if memory:
        # One shared connection, or each checkout would see a different empty database.
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        kwargs.update(connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy (not the sqlite3 module) decide where transactions begin: see _on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if not memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "")
        connection.exec_driver_sql(f"BEGIN {mode}".strip())

    return engine


def postgres_engine(url: Any, echo: bool) -> Engine:
    return create_engine(
        url, echo=echo, json_serializer=json_dumps, pool_pre_ping=True, pool_size=5, max_overflow=10
    )


def guard_fork(engine: Engine) -> None:
    """A pooled connection must never cross os.fork(): the child gets fresh ones (SQLAlchemy's recipe)."""

    @event.listens_for(engine, "connect")
    def _remember_pid(_dbapi: Any, record: Any) -> None:
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def _check_pid(_dbapi: Any, record: Any, proxy: Any) -> None:
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise exc.DisconnectionError("connection made in another process")


class Connected:
    """One database's engine and the transaction helpers the storage parts share."""

    def __init__(self, url: str, *, echo: bool = False):
        self.url = normalize_database_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            self.engine = sqlite_engine(parsed, echo)
        elif self.dialect == "postgresql":
            self.engine = postgres_engine(parsed, echo)
        else:
            raise ValueError(
                f"unsupported database {self.dialect!r}: use sqlite:/// or postgresql+psycopg://"
            )
        if not isinstance(self.engine.pool, StaticPool):  # (in-memory SQLite: one connection, never forked)
            guard_fork(self.engine)
        self._echo = echo
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        path = sqlite_path(self.url)
        self._wal = None if path is None else f"{path}-wal"

    def __repr__(self) -> str:
        return f"Storage({make_url(self.url).render_as_string(hide_password=True)!r})"

    def __reduce__(self) -> tuple:
        # Pickles (to a Ray actor, a spawned process) as its URL: the receiver opens its own connections.
        return (self.__class__, (self.url,), {"_echo": self._echo})

    def __setstate__(self, state: dict) -> None:
        self._echo = state.get("_echo", False)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in a write transaction, committed on success, rolled back on error.

        On SQLite it begins with `BEGIN IMMEDIATE` (the write lock is taken up front, waiting up to the busy
        timeout), so a read-then-write inside it cannot deadlock another writer.
        """
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn
        self.wrote()

    @property
    def generation(self) -> Hashable:
        """Changes after every committed write: of this process on this database (any Storage of the same
        URL) and, for a SQLite file, of any process (its write-ahead log's size and time move with every
        commit). A read made at one generation is current until the next: the API's read cache."""
        local = _GENERATIONS.get(self.url, 0)
        if self._wal is None:
            return local
        try:
            stat = os.stat(self._wal)
        except FileNotFoundError:
            return local, 0, 0
        return local, stat.st_mtime_ns, stat.st_size

    def wrote(self) -> None:
        with _GENERATION_LOCK:
            _GENERATIONS[self.url] = _GENERATIONS.get(self.url, 0) + 1

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session (for code that prefers it), committed on success."""
        with self._sessions.begin() as session:
            yield session
        self.wrote()

    def _one(self, record: type, *where: Any) -> Any:
        """The one row of `record`'s table that matches, as a record; None when there is none."""
        table = record_table(record)
        with self._read() as conn:
            row = conn.execute(select(*columns_of(record, table)).where(*where)).first()
        return None if row is None else record_of(record, row)

    def _insert(self, table: Any) -> Any:
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    def _update_one(self, table: Any, where: Any, values: dict, what: str) -> None:
        with self.transaction() as conn:
            if conn.execute(update(table).where(where).values(**values)).rowcount == 0:
                raise KeyError(f"no {what}")

"""The storage seam: every read and write of search state goes through `Storage(url)` (as Optuna's
RDBStorage).

Backends: SQLite (`sqlite:///path.db`, the embedded default: WAL mode, foreign keys on, a busy timeout, write
transactions taken with `BEGIN IMMEDIATE`) and PostgreSQL (`postgresql+psycopg://user:pw@host/db`, psycopg 3;
connections are pre-pinged, so a restarted server is reconnected to). The schema is made by the Alembic
migrations in `migrations/` (`Storage.create_schema()`), never by `metadata.create_all`.

Methods take and return plain values and frozen dataclasses, never ORM objects, so nothing leaks a session.
Every write is one short transaction; the ones that must be atomic across processes (job idempotency keys,
candidate de-duplication, result puts) are single `INSERT ... ON CONFLICT DO NOTHING` statements, so two
writers racing on the same key leave one row. Non-finite floats (NaN, inf) are stored as NULL, in JSON too
(PostgreSQL's json type has no NaN).

`Storage.transaction()` hands out a Core connection inside a write transaction for work this module does not
cover (the service's leases and schedule fires); on SQLite it begins with `BEGIN IMMEDIATE`, holding the write
lock throughout, so a conditional `UPDATE` (a lease) read-checked in the same transaction is atomic.

`sqlite://` (in memory) shares one connection between threads: for quick experiments, not for concurrency.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    exc,
    false,
    func,
    literal,
    select,
    true,
    update,
)
from sqlalchemy import delete as sa_delete
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from search import db
from search.db import (
    CANDIDATE_DONE_STATUSES,
    CANDIDATE_STATUSES,
    JOB_KINDS,
    JOB_STATUSES,
    JOB_TERMINAL_STATUSES,
    RESULT_STATUSES,
    utcnow,
)
from search.storage_schedules import ScheduleFireRecord, ScheduleRecord, ScheduleStore  # noqa: F401 - re-exported

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
DEFAULT_PAGE = 100
# Alembic's `context` and `op` are module-level proxies: one migration at a time per process. Across processes
# the database serializes them (see migrations/env.py).
_ALEMBIC_LOCK = threading.Lock()
# pg_advisory_xact_lock key that serializes job claims (any constant unique to this application).
_CLAIM_LOCK_ID = 0x68796272


class StorageError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: int
    kind: str
    name: str | None
    status: str
    priority: int
    config: dict
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    n_evaluations: int
    budget: int | None
    error: str | None
    idempotency_key: str | None
    schedule_id: int | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None


@dataclass(frozen=True, slots=True)
class CandidateRecord:
    id: int
    job_id: int
    layout_hash: str
    layout: dict
    parent_id: int | None
    generation: int
    mutation: dict | None
    status: str
    failure_reason: str | None
    traceback: str | None
    attempts: int
    training_key: str | None
    latency_key: str | None
    val_bpb: float | None
    decode_ms: float | None
    n_params: int | None
    objectives: dict | None
    on_front: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class TrainingResultRecord:
    training_key: str
    layout_hash: str
    proxy_config_hash: str | None
    result: dict | None
    val_bpb: float | None
    status: str
    artifact_path: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LatencyResultRecord:
    latency_key: str
    layout_hash: str
    latency_config_hash: str | None
    device_fingerprint: dict | None
    result: dict | None
    decode_ms: float | None
    status: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class HypervolumeRecord:
    n_evaluations: int
    hypervolume: float
    recorded_at: datetime


def _record(cls: type, row: Any) -> Any:
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in fields(cls)})


def _columns(cls: type, table: Any) -> list:
    return [table.c[f.name] for f in fields(cls)]


# --------------------------------------------------------------------------------------------------- JSON


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON (PostgreSQL's json type rejects them): stored as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    return json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------------- engine


def _check(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return value


def _statuses(status: str | Iterable[str] | None, allowed: Sequence[str], what: str) -> list[str] | None:
    if status is None:
        return None
    values = [status] if isinstance(status, str) else list(status)
    return [_check(s, allowed, what) for s in values]


def _sqlite_engine(url: Any, echo: bool) -> Engine:
    database = url.database or ""
    memory = database in ("", ":memory:") or database.startswith("file::memory:")
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


def _postgres_engine(url: Any, echo: bool) -> Engine:
    return create_engine(
        url, echo=echo, json_serializer=json_dumps, pool_pre_ping=True, pool_size=5, max_overflow=10
    )


def _guard_fork(engine: Engine) -> None:
    """A pooled connection must never cross os.fork(): the child gets fresh ones (SQLAlchemy's recipe)."""

    @event.listens_for(engine, "connect")
    def _remember_pid(_dbapi: Any, record: Any) -> None:
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def _check_pid(_dbapi: Any, record: Any, proxy: Any) -> None:
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise exc.DisconnectionError("connection made in another process")


class Storage(ScheduleStore):
    """All search and service state in one SQL database (SQLite or PostgreSQL)."""

    def __init__(self, url: str, *, echo: bool = False):
        self.url = str(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(parsed, echo)
        elif self.dialect == "postgresql":
            if parsed.drivername == "postgresql":  # plain postgresql:// means psycopg 3 here, not psycopg2
                parsed = parsed.set(drivername="postgresql+psycopg")
            self.engine = _postgres_engine(parsed, echo)
        else:
            raise ValueError(
                f"unsupported database {self.dialect!r}: use sqlite:/// or postgresql+psycopg://"
            )
        if not isinstance(self.engine.pool, StaticPool):  # (in-memory SQLite: one connection, never forked)
            _guard_fork(self.engine)
        self._echo = echo
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    # ---- plumbing

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

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session (for code that prefers it), committed on success."""
        with self._sessions.begin() as session:
            yield session

    def _insert(self, table: Any) -> Any:
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    # ---- schema (Alembic)

    def alembic_config(self, connection: Connection | None = None) -> Any:
        from alembic.config import Config

        if not (MIGRATIONS_DIR / "env.py").exists():
            raise StorageError(
                f"migrations not found at {MIGRATIONS_DIR}: install the project from its "
                "source tree (pip install -e .)"
            )
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["storage"] = self
        if connection is not None:
            config.attributes["connection"] = connection
        return config

    def _run_alembic(self, action: str, revision: str) -> None:
        from alembic import command

        with _ALEMBIC_LOCK, self.engine.connect() as conn:
            if self.is_sqlite:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            getattr(command, action)(self.alembic_config(conn), revision)

    def create_schema(self, revision: str = "head") -> None:
        """Upgrade the database to `revision` (head): creates every table on an empty database. Idempotent,
        and safe when several processes start at once (SQLite: the write lock; PostgreSQL: an advisory
        lock)."""
        self._run_alembic("upgrade", revision)

    upgrade_schema = create_schema

    def downgrade_schema(self, revision: str = "base") -> None:
        self._run_alembic("downgrade", revision)

    def schema_revision(self) -> str | None:
        """The database's current Alembic revision (None: no schema)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self.alembic_config()).get_current_head()

    def schema_is_current(self) -> bool:
        return self.schema_revision() == self.head_revision()

    # ---- jobs

    def create_job(
        self,
        kind: str,
        config: dict,
        name: str | None = None,
        priority: int = 0,
        budget: int | None = None,
        idempotency_key: str | None = None,
        schedule_id: int | None = None,
    ) -> int:
        """A new queued job; with an idempotency key already used, the existing job's id instead."""
        _check(kind, JOB_KINDS, "job kind")
        t = db.jobs
        values = {
            "kind": kind,
            "config": config,
            "name": name,
            "priority": int(priority),
            "budget": budget,
            "idempotency_key": idempotency_key,
            "schedule_id": schedule_id,
            "status": "queued",
            "n_evaluations": 0,
            "created_at": utcnow(),
        }
        with self.transaction() as conn:
            if idempotency_key is None:
                return int(conn.execute(t.insert().values(**values).returning(t.c.id)).scalar_one())
            stmt = (
                self._insert(t)
                .values(**values)
                .on_conflict_do_nothing(index_elements=[t.c.idempotency_key])
                .returning(t.c.id)
            )
            new_id = conn.execute(stmt).scalar_one_or_none()
            if new_id is not None:
                return int(new_id)
            return int(
                conn.execute(select(t.c.id).where(t.c.idempotency_key == idempotency_key)).scalar_one()
            )

    def get_job(self, job_id: int) -> JobRecord | None:
        with self._read() as conn:
            row = conn.execute(select(*_columns(JobRecord, db.jobs)).where(db.jobs.c.id == job_id)).first()
        return None if row is None else _record(JobRecord, row)

    def get_job_by_idempotency_key(self, key: str) -> JobRecord | None:
        t = db.jobs
        with self._read() as conn:
            row = conn.execute(select(*_columns(JobRecord, t)).where(t.c.idempotency_key == key)).first()
        return None if row is None else _record(JobRecord, row)

    def list_jobs(
        self,
        status: str | Iterable[str] | None = None,
        kind: str | None = None,
        limit: int | None = DEFAULT_PAGE,
        offset: int = 0,
    ) -> list[JobRecord]:
        """Jobs, newest first."""
        t = db.jobs
        stmt = select(*_columns(JobRecord, t)).where(*self._job_filters(status, kind))
        stmt = stmt.order_by(t.c.created_at.desc(), t.c.id.desc()).offset(offset).limit(limit)
        with self._read() as conn:
            return [_record(JobRecord, row) for row in conn.execute(stmt)]

    def queue(
        self,
        status: str | Iterable[str] | None = ("queued", "running"),
        kind: str | None = None,
        limit: int | None = DEFAULT_PAGE,
        offset: int = 0,
    ) -> list[JobRecord]:
        """Jobs in the order runners take them: running first, then by priority, then first in, first out."""
        t = db.jobs
        stmt = (
            select(*_columns(JobRecord, t))
            .where(*self._job_filters(status, kind))
            .order_by(
                (t.c.status == "running").desc(), t.c.priority.desc(), t.c.created_at.asc(), t.c.id.asc()
            )
            .offset(offset)
            .limit(limit)
        )
        with self._read() as conn:
            return [_record(JobRecord, row) for row in conn.execute(stmt)]

    def count_jobs(self, status: str | Iterable[str] | None = None, kind: str | None = None) -> int:
        stmt = select(func.count()).select_from(db.jobs).where(*self._job_filters(status, kind))
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())

    def _job_filters(self, status: str | Iterable[str] | None, kind: str | None) -> list:
        t = db.jobs
        filters = []
        statuses = _statuses(status, JOB_STATUSES, "job status")
        if statuses is not None:
            filters.append(t.c.status.in_(statuses))
        if kind is not None:
            filters.append(t.c.kind == _check(kind, JOB_KINDS, "job kind"))
        return filters

    def set_job_status(self, job_id: int, status: str, error: str | None = None) -> None:
        """Running sets started_at (first time); a terminal status sets finished_at; queued clears it."""
        _check(status, JOB_STATUSES, "job status")
        t = db.jobs
        now = utcnow()
        values: dict[str, Any] = {"status": status, "error": error}
        if status == "running":
            values["started_at"] = func.coalesce(t.c.started_at, literal(now, db.UTCDateTime()))
            values["finished_at"] = None
        elif status == "queued":
            values["finished_at"] = None
        elif status in JOB_TERMINAL_STATUSES and status != "archived":
            values["finished_at"] = now
        self._update_one(t, t.c.id == job_id, values, f"job {job_id}")

    def update_progress(self, job_id: int, n_evaluations: int, budget: int | None = None) -> None:
        t = db.jobs
        values: dict[str, Any] = {"n_evaluations": int(n_evaluations)}
        if budget is not None:
            values["budget"] = int(budget)
        self._update_one(t, t.c.id == job_id, values, f"job {job_id}")

    def delete_job(self, job_id: int) -> bool:
        """Delete a job with its candidates, history and strategy state; stored results stay (other searches
        reuse them). False if there was no such job."""
        with self.transaction() as conn:
            return conn.execute(sa_delete(db.jobs).where(db.jobs.c.id == job_id)).rowcount > 0

    # ---- leases: exactly one runner owns a running job

    def claim_job(
        self,
        owner: str,
        lease_s: float,
        *,
        kinds: Iterable[str] = ("search",),
        max_running: int | None = None,
        job_id: int | None = None,
        takeover_from: str | None = None,
        now: datetime | None = None,
    ) -> JobRecord | None:
        """Take the next job in queue order — a queued one, or a running one whose lease has expired (its
        owner died) — for `owner`, leased until now + lease_s; None if there is none or `max_running` jobs
        already hold live leases. With `job_id`, only that job. `takeover_from` also takes a running job from
        that owner whatever its lease says (the caller knows the owner is dead), or one with no lease at all
        (a search the command line started before leases existed).

        Atomic across processes: the pick and the conditional UPDATE run in one transaction (SQLite: `BEGIN
        IMMEDIATE` holds the write lock; PostgreSQL: a transaction-scoped advisory lock serializes claimers,
        so the concurrency count cannot race, and `FOR UPDATE SKIP LOCKED` skips rows a cancel is writing),
        and the UPDATE re-checks the lease, its row count saying whether the claim held.
        """
        from datetime import timedelta

        t = db.jobs
        now = now or utcnow()
        expires = now + timedelta(seconds=float(lease_s))
        takeable = (t.c.status == "queued") | (
            (t.c.status == "running") & t.c.lease_expires_at.is_not(None) & (t.c.lease_expires_at < now)
        )
        if takeover_from is not None:
            takeable = takeable | (
                (t.c.status == "running") & ((t.c.lease_owner == takeover_from) | t.c.lease_owner.is_(None))
            )
        with self.transaction() as conn:
            if not self.is_sqlite:
                conn.execute(select(func.pg_advisory_xact_lock(_CLAIM_LOCK_ID)))
            if max_running is not None:
                live = conn.execute(
                    select(func.count())
                    .select_from(t)
                    .where(
                        t.c.status == "running",
                        t.c.lease_expires_at >= now,
                        t.c.lease_owner != (takeover_from or ""),
                    )
                ).scalar_one()
                if live >= max_running:
                    return None
            stmt = select(t.c.id).where(takeable, t.c.kind.in_(list(kinds)))
            if job_id is not None:
                stmt = stmt.where(t.c.id == job_id)
            stmt = stmt.order_by(
                (t.c.status == "running").desc(), t.c.priority.desc(), t.c.created_at.asc(), t.c.id.asc()
            ).limit(1)
            if not self.is_sqlite:
                stmt = stmt.with_for_update(skip_locked=True)
            picked = conn.execute(stmt).scalar_one_or_none()
            if picked is None:
                return None
            claimed = conn.execute(
                update(t)
                .where(t.c.id == picked, takeable)
                .values(
                    status="running",
                    lease_owner=owner,
                    lease_expires_at=expires,
                    heartbeat_at=now,
                    started_at=func.coalesce(t.c.started_at, literal(now, db.UTCDateTime())),
                    finished_at=None,
                    error=None,
                )
            ).rowcount
            if claimed != 1:
                return None
            row = conn.execute(select(*_columns(JobRecord, t)).where(t.c.id == picked)).first()
        return _record(JobRecord, row)

    def renew_lease(self, job_id: int, owner: str, lease_s: float, now: datetime | None = None) -> bool:
        """The heartbeat: extend `owner`'s lease. False when the job is no longer running under this owner
        (cancelled, or taken over after the lease lapsed): the owner must stop."""
        from datetime import timedelta

        t = db.jobs
        now = now or utcnow()
        with self.transaction() as conn:
            return (
                conn.execute(
                    update(t)
                    .where(t.c.id == job_id, t.c.lease_owner == owner, t.c.status == "running")
                    .values(lease_expires_at=now + timedelta(seconds=float(lease_s)), heartbeat_at=now)
                ).rowcount
                == 1
            )

    def release_job(self, job_id: int, owner: str, status: str, error: str | None = None) -> bool:
        """End `owner`'s lease, setting the job's status (queued: another runner may take it at once). False,
        writing nothing, when the owner had lost the job (cancelled or taken over)."""
        _check(status, JOB_STATUSES, "job status")
        t = db.jobs
        values: dict[str, Any] = {
            "status": status,
            "error": error,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if status in JOB_TERMINAL_STATUSES and status != "archived":
            values["finished_at"] = utcnow()
        with self.transaction() as conn:
            return (
                conn.execute(
                    update(t)
                    .where(t.c.id == job_id, t.c.lease_owner == owner, t.c.status == "running")
                    .values(**values)
                ).rowcount
                == 1
            )

    def _update_one(self, table: Any, where: Any, values: dict, what: str) -> None:
        with self.transaction() as conn:
            if conn.execute(update(table).where(where).values(**values)).rowcount == 0:
                raise KeyError(f"no {what}")

    # ---- candidates

    def add_candidate(
        self,
        job_id: int,
        layout_json: dict | str,
        layout_hash: str,
        parent_id: int | None = None,
        generation: int = 0,
        mutation: dict | None = None,
    ) -> int:
        """A pending candidate of a job; the existing one's id when the job already has this layout."""
        layout = json.loads(layout_json) if isinstance(layout_json, str) else layout_json
        t = db.candidates
        values = {
            "job_id": job_id,
            "layout_hash": layout_hash,
            "layout": layout,
            "parent_id": parent_id,
            "generation": int(generation),
            "mutation": mutation,
            "status": "pending",
            "attempts": 0,
            "on_front": False,
            "created_at": utcnow(),
        }
        stmt = (
            self._insert(t)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[t.c.job_id, t.c.layout_hash])
            .returning(t.c.id)
        )
        with self.transaction() as conn:
            new_id = conn.execute(stmt).scalar_one_or_none()
            if new_id is not None:
                return int(new_id)
            return int(
                conn.execute(
                    select(t.c.id).where(t.c.job_id == job_id, t.c.layout_hash == layout_hash)
                ).scalar_one()
            )

    def find_candidate(self, job_id: int, layout_hash: str) -> CandidateRecord | None:
        t = db.candidates
        with self._read() as conn:
            row = conn.execute(
                select(*_columns(CandidateRecord, t)).where(
                    t.c.job_id == job_id, t.c.layout_hash == layout_hash
                )
            ).first()
        return None if row is None else _record(CandidateRecord, row)

    def mark_running(self, candidate_id: int) -> int:
        """Mark a candidate running and count the attempt; returns the attempt number (1 for the first)."""
        t = db.candidates
        stmt = (
            update(t)
            .where(t.c.id == candidate_id)
            .values(status="running", attempts=t.c.attempts + 1, started_at=utcnow(), finished_at=None)
            .returning(t.c.attempts)
        )
        with self.transaction() as conn:
            attempts = conn.execute(stmt).scalar_one_or_none()
        if attempts is None:
            raise KeyError(f"no candidate {candidate_id}")
        return int(attempts)

    def complete_candidate(
        self,
        candidate_id: int,
        training_key: str | None,
        latency_key: str | None,
        val_bpb: float | None,
        decode_ms: float | None,
        n_params: int | None,
        objectives: dict | None,
        reused: bool = False,
    ) -> None:
        """Record a candidate's result (status `reused` when it came from stored results)."""
        t = db.candidates
        values = {
            "status": "reused" if reused else "completed",
            "training_key": training_key,
            "latency_key": latency_key,
            "val_bpb": _float(val_bpb),
            "decode_ms": _float(decode_ms),
            "n_params": None if n_params is None else int(n_params),
            "objectives": objectives,
            "failure_reason": None,
            "traceback": None,
            "finished_at": utcnow(),
        }
        self._update_one(t, t.c.id == candidate_id, values, f"candidate {candidate_id}")

    def fail_candidate(self, candidate_id: int, reason: str, traceback: str | None = None) -> None:
        """A failed candidate: never on the front."""
        t = db.candidates
        values = {
            "status": "failed",
            "failure_reason": reason,
            "traceback": traceback,
            "on_front": False,
            "finished_at": utcnow(),
        }
        self._update_one(t, t.c.id == candidate_id, values, f"candidate {candidate_id}")

    def reset_candidate(self, candidate_id: int) -> None:
        """Back to pending (a retry), keeping its attempt count."""
        t = db.candidates
        values = {"status": "pending", "started_at": None, "finished_at": None, "on_front": False}
        self._update_one(t, t.c.id == candidate_id, values, f"candidate {candidate_id}")

    def reset_running(self, job_id: int) -> list[int]:
        """On resume: the job's running candidates (in flight when it stopped) back to pending; their ids."""
        t = db.candidates
        stmt = (
            update(t)
            .where(t.c.job_id == job_id, t.c.status == "running")
            .values(status="pending", started_at=None)
            .returning(t.c.id)
        )
        with self.transaction() as conn:
            return sorted(int(i) for i in conn.execute(stmt).scalars())

    _ORDERABLE = (
        "id",
        "generation",
        "val_bpb",
        "decode_ms",
        "n_params",
        "created_at",
        "finished_at",
        "attempts",
        "status",
    )

    def candidates(
        self,
        job_id: int,
        status: str | Iterable[str] | None = None,
        order_by: str = "id",
        limit: int | None = None,
        offset: int = 0,
        on_front: bool | None = None,
    ) -> list[CandidateRecord]:
        """A job's candidates; `order_by` is a column name (`-name` for descending; NULLs last), ties by
        id."""
        t = db.candidates
        stmt = select(*_columns(CandidateRecord, t)).where(*self._candidate_filters(job_id, status, on_front))
        descending = order_by.startswith("-")
        name = order_by.lstrip("-")
        if name not in self._ORDERABLE:
            raise ValueError(f"cannot order candidates by {name!r}; one of {', '.join(self._ORDERABLE)}")
        column = t.c[name]
        stmt = stmt.order_by(
            (column.desc() if descending else column.asc()).nulls_last(),
            t.c.id.desc() if descending else t.c.id.asc(),
        )
        if limit is None:
            with self._read() as conn:
                return [_record(CandidateRecord, row) for row in conn.execute(stmt.offset(offset))]
        # A page: sort and skip over the ids alone (a narrow sort: the wide rows, layout JSON included, are
        # not carried through it), then read just the page's rows by primary key.
        ids_stmt = stmt.with_only_columns(t.c.id).offset(offset).limit(limit)
        with self._read() as conn:
            ids = list(conn.execute(ids_stmt).scalars())
            if not ids:
                return []
            rows = {
                row.id: row
                for row in conn.execute(select(*_columns(CandidateRecord, t)).where(t.c.id.in_(ids)))
            }
        return [_record(CandidateRecord, rows[i]) for i in ids]

    def get_candidate(self, candidate_id: int) -> CandidateRecord | None:
        t = db.candidates
        with self._read() as conn:
            row = conn.execute(select(*_columns(CandidateRecord, t)).where(t.c.id == candidate_id)).first()
        return None if row is None else _record(CandidateRecord, row)

    def count_candidates(
        self, job_id: int, status: str | Iterable[str] | None = None, on_front: bool | None = None
    ) -> int:
        stmt = (
            select(func.count())
            .select_from(db.candidates)
            .where(*self._candidate_filters(job_id, status, on_front))
        )
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())

    def candidate_counts(self, job_id: int) -> dict[str, int]:
        """{status: count} over every candidate status (zeros included)."""
        t = db.candidates
        stmt = select(t.c.status, func.count()).where(t.c.job_id == job_id).group_by(t.c.status)
        counts = dict.fromkeys(CANDIDATE_STATUSES, 0)
        with self._read() as conn:
            counts.update({status: int(n) for status, n in conn.execute(stmt)})
        return counts

    def finished_since(
        self, job_id: int, after: tuple[datetime, int] | None = None, limit: int = DEFAULT_PAGE
    ) -> list[CandidateRecord]:
        """Candidates that finished (completed, reused or failed) after the cursor (finished_at, id), in that
        order: the live-progress feed. Pass the last item's (finished_at, id) to get the next ones."""
        t = db.candidates
        stmt = select(*_columns(CandidateRecord, t)).where(t.c.job_id == job_id, t.c.finished_at.is_not(None))
        if after is not None:
            at, last_id = after
            stmt = stmt.where((t.c.finished_at > at) | ((t.c.finished_at == at) & (t.c.id > last_id)))
        stmt = stmt.order_by(t.c.finished_at.asc(), t.c.id.asc()).limit(limit)
        with self._read() as conn:
            return [_record(CandidateRecord, row) for row in conn.execute(stmt)]

    def lineage(self, candidate_id: int, max_depth: int = 100) -> list[CandidateRecord]:
        """The candidate's ancestors, parent first, up to `max_depth` (parents are always older: no
        cycles)."""
        t = db.candidates
        anchor = (
            select(t.c.parent_id.label("id"), literal(1).label("depth"))
            .where(t.c.id == candidate_id, t.c.parent_id.is_not(None))
            .cte("ancestors", recursive=True)
        )
        parent = t.alias("parent")
        ancestors = anchor.union_all(
            select(parent.c.parent_id, anchor.c.depth + 1).where(
                parent.c.id == anchor.c.id, parent.c.parent_id.is_not(None), anchor.c.depth < max_depth
            )
        )
        stmt = (
            select(*_columns(CandidateRecord, t))
            .join(ancestors, t.c.id == ancestors.c.id)
            .order_by(ancestors.c.depth)
        )
        with self._read() as conn:
            return [_record(CandidateRecord, row) for row in conn.execute(stmt)]

    def children(self, candidate_id: int, limit: int = DEFAULT_PAGE) -> list[CandidateRecord]:
        t = db.candidates
        stmt = (
            select(*_columns(CandidateRecord, t))
            .where(t.c.parent_id == candidate_id)
            .order_by(t.c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [_record(CandidateRecord, row) for row in conn.execute(stmt)]

    def _candidate_filters(
        self, job_id: int, status: str | Iterable[str] | None, on_front: bool | None
    ) -> list:
        t = db.candidates
        filters = [t.c.job_id == job_id]
        statuses = _statuses(status, CANDIDATE_STATUSES, "candidate status")
        if statuses is not None:
            filters.append(t.c.status.in_(statuses))
        if on_front is not None:
            filters.append(t.c.on_front == (true() if on_front else false()))
        return filters

    def set_front(self, job_id: int, candidate_ids: Iterable[int]) -> None:
        """Materialize the job's Pareto front: exactly these candidates get on_front. Each must be a completed
        (or reused) candidate of the job, else ValueError and nothing changes."""
        ids = sorted({int(i) for i in candidate_ids})
        t = db.candidates
        with self.transaction() as conn:
            conn.execute(
                update(t)
                .where(t.c.job_id == job_id, t.c.on_front == true(), t.c.id.notin_(ids))
                .values(on_front=False)
            )
            if ids:
                n = conn.execute(
                    update(t)
                    .where(t.c.job_id == job_id, t.c.id.in_(ids), t.c.status.in_(CANDIDATE_DONE_STATUSES))
                    .values(on_front=True)
                ).rowcount
                if n != len(ids):
                    raise ValueError(
                        f"front of job {job_id}: {len(ids) - n} of the ids are not completed "
                        "candidates of this job"
                    )

    # ---- results (shared across searches; one row per key)

    def get_training_result(self, training_key: str) -> TrainingResultRecord | None:
        t = db.training_results
        with self._read() as conn:
            row = conn.execute(
                select(*_columns(TrainingResultRecord, t)).where(t.c.training_key == training_key)
            ).first()
        return None if row is None else _record(TrainingResultRecord, row)

    def put_training_result(
        self,
        training_key: str,
        *,
        layout_hash: str,
        result: dict | None,
        val_bpb: float | None = None,
        proxy_config_hash: str | None = None,
        status: str = "completed",
        artifact_path: str | None = None,
    ) -> bool:
        """Store a training result unless the key has one. Atomic: of racing puts, one stores. A completed
        result replaces a failed one, never the reverse; a completed one is never replaced. True if stored."""
        _check(status, RESULT_STATUSES, "result status")
        t = db.training_results
        values = {
            "training_key": training_key,
            "layout_hash": layout_hash,
            "proxy_config_hash": proxy_config_hash,
            "result": result,
            "val_bpb": _float(val_bpb),
            "status": status,
            "artifact_path": artifact_path,
            "created_at": utcnow(),
        }
        return self._put_result(t, t.c.training_key, values)

    def get_latency_result(self, latency_key: str) -> LatencyResultRecord | None:
        t = db.latency_results
        with self._read() as conn:
            row = conn.execute(
                select(*_columns(LatencyResultRecord, t)).where(t.c.latency_key == latency_key)
            ).first()
        return None if row is None else _record(LatencyResultRecord, row)

    def put_latency_result(
        self,
        latency_key: str,
        *,
        layout_hash: str,
        result: dict | None,
        decode_ms: float | None = None,
        latency_config_hash: str | None = None,
        device_fingerprint: dict | None = None,
        status: str = "completed",
    ) -> bool:
        """As put_training_result, for a latency measurement."""
        _check(status, RESULT_STATUSES, "result status")
        t = db.latency_results
        values = {
            "latency_key": latency_key,
            "layout_hash": layout_hash,
            "latency_config_hash": latency_config_hash,
            "device_fingerprint": device_fingerprint,
            "result": result,
            "decode_ms": _float(decode_ms),
            "status": status,
            "created_at": utcnow(),
        }
        return self._put_result(t, t.c.latency_key, values)

    def _put_result(self, table: Any, key_column: Any, values: dict) -> bool:
        key = values[key_column.name]
        stmt = self._insert(table).values(**values).on_conflict_do_nothing(index_elements=[key_column])
        stmt = stmt.returning(key_column)
        with self.transaction() as conn:
            if conn.execute(stmt).scalar_one_or_none() is not None:
                return True
            if values["status"] != "completed":
                return False
            replace = {k: v for k, v in values.items() if k != key_column.name}
            return (
                conn.execute(
                    update(table).where(key_column == key, table.c.status != "completed").values(**replace)
                ).rowcount
                > 0
            )

    # ---- hypervolume history, strategy state

    def record_hypervolume(self, job_id: int, n_evaluations: int, value: float) -> None:
        """The hypervolume after `n_evaluations`; recording the same count again overwrites it."""
        t = db.hypervolume_history
        values = {
            "job_id": job_id,
            "n_evaluations": int(n_evaluations),
            "hypervolume": float(value),
            "recorded_at": utcnow(),
        }
        stmt = self._insert(t).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.job_id, t.c.n_evaluations],
            set_={"hypervolume": stmt.excluded.hypervolume, "recorded_at": stmt.excluded.recorded_at},
        )
        with self.transaction() as conn:
            conn.execute(stmt)

    def latest_hypervolume(self, job_id: int) -> HypervolumeRecord | None:
        """The newest point of the curve: one row by the (job_id, n_evaluations) unique index."""
        t = db.hypervolume_history
        stmt = (
            select(*_columns(HypervolumeRecord, t))
            .where(t.c.job_id == job_id)
            .order_by(t.c.n_evaluations.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _record(HypervolumeRecord, row)

    def hypervolume_history(self, job_id: int) -> list[HypervolumeRecord]:
        """The curve, by evaluation count."""
        t = db.hypervolume_history
        stmt = select(*_columns(HypervolumeRecord, t)).where(t.c.job_id == job_id).order_by(t.c.n_evaluations)
        with self._read() as conn:
            return [_record(HypervolumeRecord, row) for row in conn.execute(stmt)]

    def save_strategy_state(self, job_id: int, state: dict) -> int:
        """Store (replace) a job's strategy state; returns its version (1, 2, ...)."""
        t = db.strategy_state
        now = utcnow()
        stmt = self._insert(t).values(job_id=job_id, state=state, version=1, updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.job_id],
            set_={
                "state": stmt.excluded.state,
                "updated_at": stmt.excluded.updated_at,
                "version": t.c.version + 1,
            },
        ).returning(t.c.version)
        with self.transaction() as conn:
            return int(conn.execute(stmt).scalar_one())

    def load_strategy_state(self, job_id: int) -> dict | None:
        t = db.strategy_state
        with self._read() as conn:
            return conn.execute(select(t.c.state).where(t.c.job_id == job_id)).scalar_one_or_none()


def _float(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None

"""SQLAlchemy models of everything a search (and the service) keeps: jobs, candidates, results, history.

Pure SQLAlchemy (no torch). The schema is created and changed only by the Alembic migrations in
`migrations/` (`Storage.create_schema()` runs them); these models are their source of truth for autogenerate.

- The MetaData has a naming convention, so every constraint and index has a stable name and SQLite batch
  migrations (which recreate tables) can find them.
- Timestamps are timezone-aware UTC (`UTCDateTime`): aware values in, aware UTC values out, on SQLite too.
- Status and kind columns are plain strings validated in Python (`JOB_KINDS`, `JOB_STATUSES`, ...), so adding
  a job kind or a status needs no migration.
- JSON columns use `sqlalchemy.JSON` (JSON text on SQLite, `json` on PostgreSQL, key order kept); Python
  `None` is SQL NULL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MAX_ID = 2**31 - 1  # the id columns are SQL INTEGER: larger ids would overflow on PostgreSQL (422, not 500)
JOB_KINDS = ("search", "fidelity", "depth-width", "ablation", "verdict", "study-run", "tune")
STUDY_KINDS = ("fidelity", "depth-width", "ablation", "verdict")
JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled", "archived")
JOB_TERMINAL_STATUSES = ("completed", "failed", "cancelled", "archived")
CANDIDATE_STATUSES = ("pending", "running", "completed", "failed", "reused")
CANDIDATE_DONE_STATUSES = ("completed", "reused")  # a result is there: may be on the Pareto front
RESULT_STATUSES = ("completed", "failed")
RUNG_STATUSES = ("pending", "running", "completed", "failed", "reused")
SCHEDULE_FIRE_STATUSES = ("fired", "missed", "skipped", "failed")  # failed: the template no longer validates

# The columns a candidate list may be sorted by ("-name": descending; NULLs last; ties by id), and those of
# them with an index of their own (the rest sort few enough rows, or sort by the primary key).
OBJECTIVE_COLUMNS = ("val_bpb", "decode_ms", "n_params")  # the objectives, as columns (search.config's)
# Latency metrics kept as columns of latency_results beside decode_ms: a scatter can plot any of these and the
# objectives. Throughput is the one that is better higher.
LATENCY_METRICS = ("prefill_ms", "throughput_tokens_per_s", "cache_bytes_per_sequence")
PLOT_AXES = (*OBJECTIVE_COLUMNS, *LATENCY_METRICS)
MAXIMIZED = frozenset({"throughput_tokens_per_s"})
CANDIDATE_SORT_COLUMNS = (
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
INDEXED_SORT_COLUMNS = ("val_bpb", "decode_ms", "n_params", "finished_at", "generation")
KEY_LENGTH = 128  # sha256 hex keys are 64 characters; room for other digests


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend.

    Binds must be aware (a naive datetime is a bug: whose local time?); they are converted to UTC. SQLite
    stores naive UTC text (so string comparisons order correctly); PostgreSQL stores `timestamptz`. Results
    are always aware UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime: pass a timezone-aware (UTC) datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONType = JSON(none_as_null=True)


# Ids are never reused after a delete (a deleted search's id must not name a new one in links, logs or
# scripts): SQLite's AUTOINCREMENT; PostgreSQL's sequences never hand a value out twice anyway.
NEVER_REUSE_IDS = {"sqlite_autoincrement": True}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Schedule(Base):
    """A cron schedule of searches (the service issue fills in the behaviour)."""

    __tablename__ = "schedules"
    __table_args__ = (NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    template: Mapped[dict] = mapped_column(JSONType)  # the search config each fire submits
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    warm_start: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    last_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Job(Base):
    """A unit of queued work; a search is one kind. The lease columns belong to the service's job runner."""

    __tablename__ = "jobs"
    __table_args__ = (Index(None, "status", "priority", "created_at"), NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    config: Mapped[dict] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    n_evaluations: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    budget: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    schedule_id: Mapped[int | None] = mapped_column(
        ForeignKey("schedules.id", ondelete="SET NULL"), nullable=True, index=True
    )
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # A study's runs are jobs of their own (kind `study-run`, run by their study, never queued), deleted
    # with it.
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True, index=True
    )
    result: Mapped[dict | None] = mapped_column(JSONType, nullable=True)  # a study's report


class ScheduleFire(Base):
    """One due time of a schedule: the unique (schedule_id, due_at) row makes a fire happen exactly once."""

    __tablename__ = "schedule_fires"
    __table_args__ = (UniqueConstraint("schedule_id", "due_at"), NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schedule_id: Mapped[int] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    fired_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="fired")
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class Candidate(Base):
    """One layout proposed by one search, with its evaluation outcome."""

    __tablename__ = "candidates"
    __table_args__ = (
        UniqueConstraint("job_id", "layout_hash"),
        Index(None, "job_id", "on_front"),
        Index(None, "job_id", "status"),
        # Pages sorted by a metric, and the live feed (by finished_at), read the index instead of sorting
        # rows.
        *(Index(None, "job_id", column, "id") for column in INDEXED_SORT_COLUMNS),
        NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    layout_hash: Mapped[str] = mapped_column(String(KEY_LENGTH), index=True)
    layout: Mapped[dict] = mapped_column(JSONType)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("candidates.id", ondelete="SET NULL"), nullable=True, index=True
    )
    generation: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    mutation: Mapped[dict | None] = mapped_column(JSONType, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    training_key: Mapped[str | None] = mapped_column(String(KEY_LENGTH), nullable=True, index=True)
    latency_key: Mapped[str | None] = mapped_column(String(KEY_LENGTH), nullable=True, index=True)
    val_bpb: Mapped[float | None] = mapped_column(Float, nullable=True)
    decode_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_params: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    objectives: Mapped[dict | None] = mapped_column(JSONType, nullable=True)
    on_front: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Multi-fidelity searches: the rung its values were trained at (None: a single-fidelity search).
    rung: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class RungRun(Base):
    """One candidate's training at one rung of a multi-fidelity search (`search.multifidelity`): its result
    is a training result under the rung's own key; this row says which candidate and rung it belongs to,
    and how many steps this search spent on it (0 when reused). One row per (candidate, rung)."""

    __tablename__ = "rung_runs"
    __table_args__ = (
        UniqueConstraint("candidate_id", "rung"),
        Index(None, "job_id", "status"),
        NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    rung: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    training_key: Mapped[str | None] = mapped_column(String(KEY_LENGTH), nullable=True)
    val_bpb: Mapped[float | None] = mapped_column(Float, nullable=True)
    objectives: Mapped[dict | None] = mapped_column(JSONType, nullable=True)
    steps_trained: Mapped[int | None] = mapped_column(Integer, nullable=True)
    continued_from_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TrainingResult(Base):
    """A short-training result, shared by every search (a job's deletion keeps it). One row per key."""

    __tablename__ = "training_results"

    training_key: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    layout_hash: Mapped[str] = mapped_column(String(KEY_LENGTH), index=True)
    proxy_config_hash: Mapped[str | None] = mapped_column(String(KEY_LENGTH), nullable=True)
    result: Mapped[dict | None] = mapped_column(JSONType, nullable=True)  # metrics, curves
    val_bpb: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="completed")
    artifact_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LatencyResult(Base):
    """A decode-latency measurement, shared by every search. One row per key."""

    __tablename__ = "latency_results"

    latency_key: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    layout_hash: Mapped[str] = mapped_column(String(KEY_LENGTH), index=True)
    latency_config_hash: Mapped[str | None] = mapped_column(String(KEY_LENGTH), nullable=True)
    device_fingerprint: Mapped[dict | None] = mapped_column(JSONType, nullable=True)
    result: Mapped[dict | None] = mapped_column(JSONType, nullable=True)
    decode_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The result's other headline numbers as columns (LATENCY_METRICS), so a scatter can plot them.
    prefill_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    throughput_tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    cache_bytes_per_sequence: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="completed")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class HypervolumePoint(Base):
    """The anytime hypervolume curve of a search: one value per evaluation count."""

    __tablename__ = "hypervolume_history"
    __table_args__ = (UniqueConstraint("job_id", "n_evaluations"), NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    n_evaluations: Mapped[int] = mapped_column(Integer)
    hypervolume: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class StrategyState(Base):
    """A search strategy's resumable state (population, ages, RNG state...), as JSON."""

    __tablename__ = "strategy_state"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[dict] = mapped_column(JSONType)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


jobs = Job.__table__
candidates = Candidate.__table__
training_results = TrainingResult.__table__
latency_results = LatencyResult.__table__
hypervolume_history = HypervolumePoint.__table__
strategy_state = StrategyState.__table__
rung_runs = RungRun.__table__
schedules = Schedule.__table__
schedule_fires = ScheduleFire.__table__

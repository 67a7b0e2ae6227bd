"""The storage seam's records (frozen dataclasses, never ORM objects) and the helpers every part shares:
row-to-record conversion, value checks, and JSON that PostgreSQL accepts (non-finite floats as null).

Imported by every part of `search.storage` and by nothing it imports: no cycles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, ClassVar


class StorageError(RuntimeError):
    pass


class DatabaseUnavailable(StorageError):
    """The database could not be reached (a restart, a network cut, a lock held too long): work stops
    without writing, and resumes once it can (a job's lease lapses and a runner takes it again)."""


def is_unavailable(exc: BaseException) -> bool:
    """A connection-level database error (the server gone, the connection dropped, SQLite's lock not
    granted in time), as opposed to a statement the database refused."""
    from sqlalchemy import exc as sa_exc

    return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, DatabaseUnavailable)) or bool(
        getattr(exc, "connection_invalidated", False)
    )


@dataclass(frozen=True, slots=True)
class JobRecord:
    TABLE: ClassVar[str] = "jobs"
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
    parent_id: int | None = None
    result: dict | None = None


@dataclass(frozen=True, slots=True)
class CandidateRecord:
    TABLE: ClassVar[str] = "candidates"
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
    rung: int | None = None


@dataclass(frozen=True, slots=True)
class CandidateSummaryRecord:
    """A candidate without its JSON columns (layout, mutation, objectives) and traceback: what lists, fronts
    and the live feed show, read without decoding JSON per row."""

    TABLE: ClassVar[str] = "candidates"
    id: int
    job_id: int
    layout_hash: str
    parent_id: int | None
    generation: int
    status: str
    failure_reason: str | None
    attempts: int
    val_bpb: float | None
    decode_ms: float | None
    n_params: int | None
    on_front: bool
    created_at: datetime
    finished_at: datetime | None
    rung: int | None = None


@dataclass(frozen=True, slots=True)
class PointRecord:
    """A finished candidate as a scatter plots it: its two chosen objectives."""

    id: int
    generation: int
    on_front: bool
    x: float
    y: float


@dataclass(frozen=True, slots=True)
class LineageRecord:
    """An ancestor as a lineage shows it."""

    TABLE: ClassVar[str] = "candidates"
    id: int
    generation: int
    mutation: dict | None
    val_bpb: float | None
    decode_ms: float | None


@dataclass(frozen=True, slots=True)
class TrainingResultRecord:
    TABLE: ClassVar[str] = "training_results"
    training_key: str
    layout_hash: str
    proxy_config_hash: str | None
    result: dict | None
    val_bpb: float | None
    status: str
    artifact_path: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RungRunRecord:
    """One candidate's run at one rung of a multi-fidelity search."""

    TABLE: ClassVar[str] = "rung_runs"
    id: int
    job_id: int
    candidate_id: int
    rung: int
    steps: int
    status: str
    attempts: int
    training_key: str | None
    val_bpb: float | None
    objectives: dict | None
    steps_trained: int | None
    continued_from_step: int | None
    failure_reason: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class LatencyResultRecord:
    TABLE: ClassVar[str] = "latency_results"
    latency_key: str
    layout_hash: str
    latency_config_hash: str | None
    device_fingerprint: dict | None
    result: dict | None
    decode_ms: float | None
    prefill_ms: float | None
    throughput_tokens_per_s: float | None
    cache_bytes_per_sequence: float | None
    status: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class HypervolumeRecord:
    TABLE: ClassVar[str] = "hypervolume_history"
    n_evaluations: int
    hypervolume: float
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    TABLE: ClassVar[str] = "schedules"
    id: int
    name: str
    cron: str
    timezone: str
    template: dict
    enabled: bool
    warm_start: bool
    priority: int
    created_at: datetime
    updated_at: datetime
    last_due_at: datetime | None

    @property
    def cursor(self) -> datetime:
        """Due times at or before this instant are done: max(last_due_at, created_at)."""
        if self.last_due_at is None:
            return self.created_at
        return max(self.last_due_at, self.created_at)


@dataclass(frozen=True, slots=True)
class ScheduleFireRecord:
    TABLE: ClassVar[str] = "schedule_fires"
    id: int
    schedule_id: int
    due_at: datetime
    fired_at: datetime
    status: str
    job_id: int | None
    reason: str | None


def record_of(cls: type, row: Any) -> Any:
    """A record of `cls` from a row that has (at least) its fields as columns."""
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in fields(cls)})


def record_table(cls: type) -> Any:
    """The table a record is read from (its `TABLE`)."""
    from search import db

    return db.Base.metadata.tables[cls.TABLE]


def columns_of(cls: type, table: Any) -> list:
    """The table's columns named by the record's fields, in their order."""
    return [table.c[f.name] for f in fields(cls)]


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


def latency_metric_values(result: dict | None) -> dict[str, float | None]:
    """The latency result's headline numbers that are kept as columns (`db.LATENCY_METRICS`): a statistic's
    median, or a plain number."""
    from search.db import LATENCY_METRICS

    out: dict[str, float | None] = {}
    for name in LATENCY_METRICS:
        value = (result or {}).get(name)
        if isinstance(value, dict):
            value = value.get("median")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        out[name] = finite_float(value) if numeric else None
    return out


def finite_float(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def check_value(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return value


def check_statuses(status: str | Iterable[str] | None, allowed: Sequence[str], what: str) -> list[str] | None:
    if status is None:
        return None
    values = [status] if isinstance(status, str) else list(status)
    return [check_value(s, allowed, what) for s in values]

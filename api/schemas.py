"""Request and response bodies of the REST API (pydantic), kept apart from the storage records."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from search.config import SearchConfig
from search.storage import CandidateRecord, JobRecord

T = TypeVar("T")

MAX_PAGE = 200
MAX_OFFSET = 1_000_000_000
MAX_ID = 2**31 - 1  # the id columns are SQL INTEGER: larger ids would overflow on PostgreSQL (422, not 500)


class SearchCreate(SearchConfig):
    """A search config (every field optional; unknown fields rejected) plus its queue priority."""

    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first; FIFO within a priority")

    def search_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"priority"})


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class JobOut(BaseModel):
    id: int
    kind: str
    name: str | None
    status: str
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    n_evaluations: int
    budget: int | None
    error: str | None
    schedule_id: int | None

    @classmethod
    def of(cls, job: JobRecord) -> JobOut:
        return cls(**{name: getattr(job, name) for name in cls.model_fields if hasattr(job, name)})


class QueueJobOut(JobOut):
    lease_owner: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None


class SearchOut(JobOut):
    progress: float | None = Field(None, description="evaluations done / budget (0..1)")


class SearchDetail(SearchOut):
    config: dict[str, Any]
    counts: dict[str, int] = Field(description="candidates by status")
    hypervolume: float | None = Field(None, description="the latest recorded hypervolume")
    hypervolume_at: int | None = Field(None, description="evaluations when it was recorded")


class SearchCreated(SearchOut):
    replayed: bool = Field(False, description="true when an Idempotency-Key matched an earlier request")


class CandidateSummary(BaseModel):
    id: int
    job_id: int
    layout_hash: str
    parent_id: int | None
    generation: int
    status: str
    attempts: int
    val_bpb: float | None
    decode_ms: float | None
    n_params: int | None
    on_front: bool
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, candidate: CandidateRecord) -> CandidateSummary:
        return cls(**{name: getattr(candidate, name) for name in cls.model_fields})


class CandidateDetail(CandidateSummary):
    layout: dict[str, Any]
    mutation: dict[str, Any] | None
    objectives: dict[str, Any] | None
    training_key: str | None
    latency_key: str | None
    failure_reason: str | None
    traceback: str | None
    started_at: datetime | None
    lineage: list[LineageItem] = Field(default_factory=list, description="ancestors, parent first")
    children: list[int] = Field(default_factory=list, description="ids of candidates mutated from this one")
    training: dict[str, Any] | None = Field(None, description="short-training metrics and curves")
    latency: dict[str, Any] | None = Field(None, description="latency statistics")
    device_fingerprint: dict[str, Any] | None = None
    log_tail: list[str] = Field(default_factory=list, description="the worker's last log lines")


class ParetoOut(BaseModel):
    search_id: int
    objectives: list[str]
    items: list[CandidateSummary]


# The live feed's cursor: "<finished_at, UTC ISO-8601>Z~<candidate id>" (opaque to clients).
CURSOR_PATTERN = r"^[0-9T:.\-]{10,40}Z~[0-9]{1,10}$"


def make_cursor(finished_at: datetime, candidate_id: int) -> str:
    return (
        f"{finished_at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%f')}Z~{candidate_id}"  # no "+": URL-safe
    )


def parse_cursor(cursor: str | None) -> tuple[datetime, int] | None:
    """The (finished_at, id) of a cursor; ValueError (a 422) for one that does not parse."""
    if cursor is None:
        return None
    at, _, candidate_id = cursor.rpartition("~")
    try:
        parsed = datetime.fromisoformat(at)
    except ValueError:
        raise ValueError(f"since: not a cursor this API returned ({cursor!r})") from None
    if not candidate_id.isdigit() or int(candidate_id) > MAX_ID:
        raise ValueError(f"since: not a cursor this API returned ({cursor!r})")
    return parsed, int(candidate_id)


class EvaluationFeed(BaseModel):
    search_id: int
    status: str
    n_evaluations: int
    budget: int | None
    items: list[CandidateSummary] = Field(description="finished after the cursor, oldest first")
    next: str | None = Field(None, description="pass as `since` to get what finishes next")


class LineageItem(BaseModel):
    id: int
    generation: int
    mutation: dict[str, Any] | None
    val_bpb: float | None
    decode_ms: float | None


class OperatorOut(BaseModel):
    name: str
    code: str
    kind: str
    description: str
    dims: list[str]
    cache: str
    code_version: int


class Health(BaseModel):
    status: str = "ok"


class Ready(BaseModel):
    ready: bool
    database: str
    schema_revision: str | None = None
    head_revision: str | None = None
    reason: str | None = None


class ErrorOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    detail: Any


class ScatterOut(BaseModel):
    """A scatter's points, column by column (what a plot takes): every front point, and a sample of the
    rest."""

    search_id: int
    objectives: list[str] = Field(description="[x, y], both minimized")
    total: int = Field(description="finished candidates with both objectives")
    shown: int
    front: int = Field(description="points on the front (every one is shown)")
    ids: list[int]
    generations: list[int]
    on_front: list[bool]
    x: list[float]
    y: list[float]
    x_iqr: list[float | None] = Field(description="the measured spread (IQR) of x, for latency; front only")
    y_iqr: list[float | None]
    presets: dict[str, str] = Field(description="{candidate id: name} of the named starting layouts shown")
    layouts: dict[str, str] = Field(description="{candidate id: compact layout} of the front points")


class HypervolumeOut(BaseModel):
    search_id: int
    n_evaluations: list[int]
    hypervolume: list[float]
    recorded_at: list[datetime]


class FeatureEffect(BaseModel):
    feature: str
    spearman: dict[str, float | None] = Field(description="{objective: rank correlation}")


class FeaturesOut(BaseModel):
    search_id: int
    n_candidates: int = Field(description="completed candidates the correlations are computed over")
    features: list[FeatureEffect]

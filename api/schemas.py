"""Request and response bodies of the REST API (pydantic), kept apart from the storage records."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from search.config import SearchConfig
from search.storage import CandidateRecord, JobRecord

T = TypeVar("T")

MAX_PAGE = 200
MAX_OFFSET = 1_000_000_000
MAX_DIM = 1 << 20  # any width, count or dimension in a submitted space
MAX_ID = 2**63 - 1  # SQL BIGINT: larger ids would overflow the driver, so they are 422s, not 500s


class SearchCreate(SearchConfig):
    """A search config (every field optional; unknown fields rejected) plus its queue priority."""

    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first; FIFO within a priority")

    @model_validator(mode="before")
    @classmethod
    def _bounded_numbers(cls, data: Any) -> Any:
        """Reject huge integers in the space before the space is built (building with 10**20 would hang)."""
        space = data.get("space") if isinstance(data, dict) else None
        if not isinstance(space, dict):
            return data
        for key in ("widths", "ffn_counts"):
            for value in space.get(key) or () if isinstance(space.get(key), list) else ():
                if isinstance(value, (int, float)) and abs(value) > MAX_DIM:
                    raise ValueError(f"space.{key}: {value} exceeds {MAX_DIM}")
        dims = space.get("dims")
        if isinstance(dims, dict):
            for key, value in dims.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_DIM:
                    raise ValueError(f"space.dims.{key}: {value} exceeds {MAX_DIM}")
        return data

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


class ParetoOut(BaseModel):
    search_id: int
    objectives: list[str]
    items: list[CandidateSummary]


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

"""Request and response bodies of the REST API (pydantic), kept apart from the storage records."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from search.config import SearchConfig
from search.storage import CandidateRecord, JobRecord

T = TypeVar("T")

MAX_PAGE = 200
MAX_OFFSET = 1_000_000_000
MAX_DIM = 1 << 20  # any width, count or dimension in a submitted space
# Upper bounds on worker settings a request may ask for (a budget, not a validity rule: larger runs are a
# config file's business, not an HTTP body's).
PROXY_CAPS = {
    "steps": 10_000_000,
    "tokens": 10**13,
    "batch_size": 4096,
    "seq_len": 1 << 17,
    "eval_tokens": 10**10,
    "log_every": 10**7,
    "meta_tokens": 1024,
    "timeout_s": 7 * 24 * 3600,
}
LATENCY_CAPS = {
    "prompt_len": 1 << 17,
    "decode_tokens": 1 << 16,
    "repeats": 1000,
    "warmup": 100,
    "throughput_max_batch": 4096,
    "memory_cap_bytes": 1 << 40,
    "threads": 1024,
    "vocab_size": 1 << 20,
}
MAX_ID = 2**31 - 1  # the id columns are SQL INTEGER: larger ids would overflow on PostgreSQL (422, not 500)


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

    @model_validator(mode="after")
    def _worker_settings(self) -> SearchCreate:
        """The proxy and latency settings the workers will get: known names, valid values, sane sizes —
        refused here rather than failing every candidate once the search runs."""
        from dataclasses import fields

        from latency.config import LatencyConfig
        from proxies.config import ProxyConfig

        for section, cls, caps in (
            ("proxy", ProxyConfig, PROXY_CAPS),
            ("latency", LatencyConfig, LATENCY_CAPS),
        ):
            data = getattr(self, section)
            known = {f.name for f in fields(cls)}
            for key, value in data.items():
                if key not in known:
                    raise ValueError(
                        f"{section}.{key}: unknown {section} setting (known: {', '.join(sorted(known))})"
                    )
                cap = caps.get(key)
                if (
                    cap is not None
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and value > cap
                ):
                    raise ValueError(f"{section}.{key}: {value} exceeds {cap}")
            try:
                cls(**data)
            except (TypeError, ValueError) as exc:
                name, sep, reason = str(exc).partition(": ")
                if not sep:
                    raise ValueError(f"{section}: {exc}") from None
                if "/" in name:  # a rule over several settings ("steps/tokens"): name the first, say which
                    name, reason = name.split("/")[0], f"{reason} ({name})"
                raise ValueError(f"{section}.{name}: {reason}") from None
        return self

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

"""Shared route dependencies: the storage and settings live on `app.state` (one place, set by create_app)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Query, Request

from api.errors import error_responses
from api.schemas import MAX_OFFSET, MAX_PAGE
from search.storage import CandidateRecord, JobRecord, Storage

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size (at most {MAX_PAGE})")]
Offset = Annotated[
    int, Query(ge=0, le=MAX_OFFSET, description="items to skip (for the next page: offset + limit)")
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="makes a retry safe: the same key and body again answer 200 with what the first request "
        "made (header `Idempotent-Replayed: true`) instead of queueing another",
    ),
]
# What a route can answer besides its success (each problem details; api/errors.py):
READ = error_responses(401, 422)  # reads: 401 only when reads need the token
READ_ONE = error_responses(401, 404, 422)  # a read of one job


def change_responses(noun: str) -> dict:
    """A state change of one job: 409 when its status does not allow it."""
    why = f"The {noun} is not in a state that allows this (its current status is in `detail`)"
    return error_responses(401, 403, 404, 409, 422, _409=why)


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


StorageDep = Annotated[Storage, Depends(get_storage)]


def job_or_404(storage: Storage, job_id: int, kind: str | None = "search") -> JobRecord:
    job = storage.get_job(job_id)
    if job is None or (kind is not None and job.kind != kind):
        raise HTTPException(404, detail=f"no search {job_id}" if kind == "search" else f"no job {job_id}")
    return job


def candidate_or_404(storage: Storage, candidate_id: int) -> CandidateRecord:
    candidate = storage.get_candidate(candidate_id)
    if candidate is None:
        raise HTTPException(404, detail=f"no candidate {candidate_id}")
    return candidate

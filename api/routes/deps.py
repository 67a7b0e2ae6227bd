"""Shared route dependencies: the storage and settings live on `app.state` (one place, set by create_app)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from search.storage import CandidateRecord, JobRecord, Storage


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

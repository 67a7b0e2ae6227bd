"""/api/searches: submit, list, inspect, cancel, archive, delete searches; their candidates and Pareto front.

No runner in this slice: a submitted search is stored as a queued job, which a runner (later) picks up.
"""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy import update

from api.auth import require_read_token, require_token
from api.routes.deps import StorageDep, job_or_404
from api.schemas import (
    MAX_ID,
    MAX_OFFSET,
    MAX_PAGE,
    CandidateSummary,
    JobOut,
    Page,
    ParetoOut,
    SearchCreate,
    SearchCreated,
    SearchDetail,
    SearchOut,
)
from api.submit import SubmitError, submit_search
from search import db
from search.db import CANDIDATE_STATUSES, JOB_STATUSES, utcnow
from search.storage import JobRecord, Storage

router = APIRouter(prefix="/api/searches", tags=["searches"])

SearchId = Annotated[int, Path(ge=1, le=MAX_ID, description="the search's id")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size (at most {MAX_PAGE})")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]
CandidateStatus = Literal[CANDIDATE_STATUSES]  # type: ignore[valid-type]
# Whitelisted sort columns ("-" prefix: descending; NULLs last; ties by id).
SORTABLE = ("id", "generation", "val_bpb", "decode_ms", "n_params", "created_at", "finished_at", "attempts",
            "status")
SORT_PATTERN = rf"^-?({'|'.join(SORTABLE)})$"


def _progress(job: JobRecord) -> float | None:
    if not job.budget:
        return None
    return min(1.0, job.n_evaluations / job.budget)


def _out(job: JobRecord) -> SearchOut:
    return SearchOut(**JobOut.of(job).model_dump(), progress=_progress(job))


def _detail(storage: Storage, job: JobRecord) -> SearchDetail:
    history = storage.hypervolume_history(job.id)
    last = history[-1] if history else None
    return SearchDetail(**_out(job).model_dump(), config=job.config, counts=storage.candidate_counts(job.id),
                        hypervolume=None if last is None else last.hypervolume,
                        hypervolume_at=None if last is None else last.n_evaluations)


def _transition(storage: Storage, job_id: int, allowed: tuple[str, ...], target: str, finish: bool) -> bool:
    """Atomically move a search from one of `allowed` to `target`; False if its status was another."""
    t = db.jobs
    values: dict = {"status": target}
    if finish:
        values["finished_at"] = utcnow()
    with storage.transaction() as conn:
        stmt = update(t).where(t.c.id == job_id, t.c.kind == "search", t.c.status.in_(allowed)).values(**values)
        return conn.execute(stmt).rowcount > 0


@router.post("", status_code=201, response_model=SearchCreated, dependencies=[Depends(require_token)],
             summary="Submit a search (queued)")
def create_search(body: SearchCreate, response: Response, storage: StorageDep,
                  idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200,
                                                                pattern=r"^[\x21-\x7e]+$")] = None) -> SearchCreated:
    try:
        submitted = submit_search(storage, body, idempotency_key=idempotency_key)
    except SubmitError as exc:
        if exc.conflict:
            raise HTTPException(409, detail=f"{exc.field} was {exc.reason}") from None
        raise RequestValidationError([{"loc": ("body", exc.field), "type": "value_error", "msg": exc.reason}]) from None
    job, replayed = submitted.job, submitted.replayed
    if replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/api/searches/{job.id}"
    return SearchCreated(**_out(job).model_dump(), replayed=replayed)


@router.get("", response_model=Page[SearchOut], dependencies=[Depends(require_read_token)],
            summary="List searches, newest first")
def list_searches(storage: StorageDep, limit: Limit = 50, offset: Offset = 0,
                  status: JobStatus | None = None) -> Page[SearchOut]:
    jobs = storage.list_jobs(status=status, kind="search", limit=limit, offset=offset)
    return Page[SearchOut](items=[_out(j) for j in jobs], total=storage.count_jobs(status=status, kind="search"),
                           limit=limit, offset=offset)


@router.get("/{search_id}", response_model=SearchDetail, dependencies=[Depends(require_read_token)])
def get_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    return _detail(storage, job_or_404(storage, search_id))


@router.post("/{search_id}/cancel", response_model=SearchDetail, dependencies=[Depends(require_token)],
             summary="Cancel a queued or running search (idempotent)")
def cancel_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    job = job_or_404(storage, search_id)
    if job.status != "cancelled" and not _transition(storage, search_id, ("queued", "running"), "cancelled", True):
        job = job_or_404(storage, search_id)
        raise HTTPException(409, detail=f"search {search_id} is {job.status}: only a queued or running search "
                                        "can be cancelled")
    return _detail(storage, job_or_404(storage, search_id))


@router.post("/{search_id}/archive", response_model=SearchDetail, dependencies=[Depends(require_token)],
             summary="Archive a finished search (idempotent)")
def archive_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    job = job_or_404(storage, search_id)
    if job.status != "archived" and not _transition(storage, search_id, ("completed", "failed", "cancelled"),
                                                    "archived", False):
        job = job_or_404(storage, search_id)
        raise HTTPException(409, detail=f"search {search_id} is {job.status}: cancel it first (only a finished "
                                        "search can be archived)")
    return _detail(storage, job_or_404(storage, search_id))


@router.delete("/{search_id}", status_code=204, dependencies=[Depends(require_token)],
               summary="Delete a search with its candidates (stored results stay for reuse)")
def delete_search(search_id: SearchId, storage: StorageDep) -> Response:
    job = job_or_404(storage, search_id)
    if job.status == "running":
        raise HTTPException(409, detail=f"search {search_id} is running: cancel it first")
    if not storage.delete_job(search_id):
        raise HTTPException(404, detail=f"no search {search_id}")
    return Response(status_code=204)


@router.get("/{search_id}/candidates", response_model=Page[CandidateSummary],
            dependencies=[Depends(require_read_token)])
def list_candidates(search_id: SearchId, storage: StorageDep, limit: Limit = 50, offset: Offset = 0,
                    status: CandidateStatus | None = None,
                    sort: Annotated[str, Query(pattern=SORT_PATTERN, max_length=32,
                                               description=f"one of {', '.join(SORTABLE)}; '-' prefix: "
                                                           "descending")] = "id") -> Page[CandidateSummary]:
    job_or_404(storage, search_id)
    rows = storage.candidates(search_id, status=status, order_by=sort, limit=limit, offset=offset)
    return Page[CandidateSummary](items=[CandidateSummary.of(c) for c in rows],
                                  total=storage.count_candidates(search_id, status=status), limit=limit,
                                  offset=offset)


@router.get("/{search_id}/pareto", response_model=ParetoOut, dependencies=[Depends(require_read_token)],
            summary="The materialized Pareto front for the search's own objectives")
def pareto(search_id: SearchId, storage: StorageDep) -> ParetoOut:
    job = job_or_404(storage, search_id)
    objectives = list(job.config.get("objectives") or ("val_bpb", "decode_ms"))
    order = objectives[0] if objectives and objectives[0] in SORTABLE else "id"
    front = storage.candidates(search_id, on_front=True, order_by=order)
    return ParetoOut(search_id=search_id, objectives=objectives, items=[CandidateSummary.of(c) for c in front])

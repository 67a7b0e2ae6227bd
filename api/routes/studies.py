"""/api/studies: submit, list, inspect, cancel, resume and delete studies (search/studies/), and read their
reports (JSON, and the points as CSV).

A submitted study is a queued job of its kind; a runner (`api/runner.py`) takes it and runs its planned grid
searches on its executors, then stores the report.
"""

from __future__ import annotations

import csv
import io
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, Response

from api.auth import require_read_token, require_token
from api.errors import error_responses
from api.routes.deps import READ, READ_ONE, IdempotencyKey, Limit, Offset, StorageDep, change_responses
from api.schemas import (
    MAX_ID,
    STUDY_EXAMPLES,
    JobOut,
    Page,
    StudyCreate,
    StudyDetail,
    StudyOut,
)
from api.submit import SubmitError, submit_study
from search.db import JOB_STATUSES, STUDY_KINDS
from search.storage import JobRecord, Storage
from search.studies import STUDIES

router = APIRouter(prefix="/api/studies", tags=["studies"], responses=error_responses(500, 503))

StudyId = Annotated[int, Path(ge=1, le=MAX_ID, description="the study's id")]
CHANGE = change_responses("study")


def _study_or_404(storage: Storage, study_id: int) -> JobRecord:
    job = storage.get_job(study_id)
    if job is None or job.kind not in STUDY_KINDS:
        raise HTTPException(404, detail=f"no study {study_id}")
    return job


def _out(job: JobRecord) -> StudyOut:
    progress = None if not job.budget else min(1.0, job.n_evaluations / job.budget)
    return StudyOut(**JobOut.of(job).model_dump(), progress=progress)


def _detail(storage: Storage, job: JobRecord) -> StudyDetail:
    runs = [JobOut.of(child) for child in storage.child_jobs(job.id)]
    return StudyDetail(**_out(job).model_dump(), config=job.config, runs=runs, result=job.result)


@router.post(
    "",
    status_code=201,
    response_model=StudyDetail,
    dependencies=[Depends(require_token)],
    summary="Submit a study (queued)",
    responses={
        200: {"model": StudyDetail, "description": "An Idempotency-Key replay: the study made before"},
        **error_responses(401, 403, 409, 413, 422, _409="The Idempotency-Key was already used differently"),
    },
)
def create_study(
    body: Annotated[StudyCreate, Body(openapi_examples=STUDY_EXAMPLES)],
    request: Request,
    response: Response,
    storage: StorageDep,
    idempotency_key: IdempotencyKey = None,
) -> StudyDetail:
    """Validates the study (unknown fields refused; `kind` picks its model) with the checks of a search on
    each run it plans, and queues it. `Location` names the new study."""
    try:
        submitted = submit_study(
            storage, body, idempotency_key=idempotency_key, data_roots=request.app.state.settings.data_roots
        )
    except SubmitError as exc:
        if exc.conflict:
            raise HTTPException(409, detail=str(exc)) from None
        raise exc.as_validation_error() from None
    if submitted.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/api/studies/{submitted.job.id}"
    return _detail(storage, submitted.job)


@router.get(
    "",
    response_model=Page[StudyOut],
    dependencies=[Depends(require_read_token)],
    summary="List studies, newest first",
    responses=READ,
)
def list_studies(
    storage: StorageDep,
    kind: Annotated[Literal[STUDY_KINDS] | None, Query(description="only studies of this kind")] = None,  # type: ignore[valid-type]
    status: Annotated[
        Literal[JOB_STATUSES] | None, Query(description="only studies with this status")
    ] = None,  # type: ignore[valid-type]
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[StudyOut]:
    """Every study kind unless `kind` narrows it (their runs are listed with each study, not here)."""
    kinds = [kind] if kind else list(STUDY_KINDS)
    jobs = [j for k in kinds for j in storage.list_jobs(status=status, kind=k, limit=None)]
    jobs.sort(key=lambda j: (j.created_at, j.id), reverse=True)
    return Page(
        items=[_out(j) for j in jobs[offset : offset + limit]], total=len(jobs), limit=limit, offset=offset
    )


@router.get(
    "/{study_id}",
    response_model=StudyDetail,
    dependencies=[Depends(require_read_token)],
    summary="A study: its status, runs and report",
    responses=READ_ONE,
)
def get_study(study_id: StudyId, storage: StorageDep) -> StudyDetail:
    """The report (`result`) is there once the study completed."""
    return _detail(storage, _study_or_404(storage, study_id))


@router.get(
    "/{study_id}/results.csv",
    dependencies=[Depends(require_read_token)],
    summary="A study's report as one CSV table",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "one row per result"}, **READ_ONE},
)
def results_csv(study_id: StudyId, storage: StorageDep) -> Response:
    """By kind: depth-width, one row per grid point (depth, width, candidate_id, status, val_bpb,
    predicted_val_bpb, decode_ms, n_params); fidelity, one per layout (its val_bpb in each run); ablation,
    one per (arm, layout, seed) pair; verdict, one per latency budget. Only the header before the study
    completed."""
    job = _study_or_404(storage, study_id)
    model = STUDIES[job.kind]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=model.columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(model.table(job.result) if job.result else [])
    return Response(
        out.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="study-{study_id}-{job.kind}.csv"'},
    )


def _transition(
    storage: Storage, study_id: int, allowed: tuple[str, ...], target: str, verb: str
) -> StudyDetail:
    job = _study_or_404(storage, study_id)
    if job.status != target and not storage.transition_job(study_id, allowed, target, kind=job.kind):
        job = _study_or_404(storage, study_id)
        raise HTTPException(409, detail=f"study {study_id} is {job.status}: it cannot be {verb}")
    return _detail(storage, _study_or_404(storage, study_id))


@router.post(
    "/{study_id}/cancel",
    response_model=StudyDetail,
    dependencies=[Depends(require_token)],
    summary="Cancel a queued or running study (idempotent)",
    responses=CHANGE,
)
def cancel_study(study_id: StudyId, storage: StorageDep) -> StudyDetail:
    """A running study stops after the evaluations in flight; `resume` continues it where it stopped."""
    return _transition(storage, study_id, ("queued", "running"), "cancelled", "cancelled")


@router.post(
    "/{study_id}/resume",
    response_model=StudyDetail,
    dependencies=[Depends(require_token)],
    summary="Put a cancelled or failed study back in the queue",
    responses=CHANGE,
)
def resume_study(study_id: StudyId, storage: StorageDep) -> StudyDetail:
    """Its finished runs stay; the unfinished one continues where it stopped."""
    job = _study_or_404(storage, study_id)
    if job.status in ("queued", "running"):
        return _detail(storage, job)
    return _transition(storage, study_id, ("cancelled", "failed"), "queued", "resumed")


@router.delete(
    "/{study_id}",
    status_code=204,
    dependencies=[Depends(require_token)],
    summary="Delete a study that is not running, with its runs",
    responses=CHANGE,
)
def delete_study(study_id: StudyId, storage: StorageDep) -> Response:
    """Stored results stay (searches and other studies reuse them)."""
    job = _study_or_404(storage, study_id)
    if job.status in ("queued", "running"):
        raise HTTPException(409, detail=f"study {study_id} is {job.status}: cancel it first")
    storage.delete_job(study_id)
    return Response(status_code=204)

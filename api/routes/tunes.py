"""/api/tunes: submit a tune job (Ray Tune's ASHA over a candidate's training recipe), list and read them,
cancel one. A submitted tune is a queued job of kind `tune`; a runner (`api/runner.py`) runs it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Request, Response

from api.auth import require_read_token, require_token
from api.errors import error_responses
from api.routes.deps import READ, READ_ONE, IdempotencyKey, Limit, Offset, StorageDep, change_responses
from api.schemas import MAX_ID, Page
from api.submit import SubmitError, submit_tune
from api.tune_schemas import TUNE_EXAMPLES, TuneCreate, TuneDetail, TuneOut
from search.storage import JobRecord, Storage
from search.tune_config import TUNE_KIND

router = APIRouter(prefix="/api/tunes", tags=["tunes"], responses=error_responses(500, 503))

TuneId = Annotated[int, Path(ge=1, le=MAX_ID, description="the tune job's id")]


def _tune_or_404(storage: Storage, tune_id: int) -> JobRecord:
    job = storage.get_job(tune_id)
    if job is None or job.kind != TUNE_KIND:
        raise HTTPException(404, detail=f"no tune job {tune_id}")
    return job


@router.post(
    "",
    status_code=201,
    response_model=TuneDetail,
    dependencies=[Depends(require_token)],
    summary="Tune a candidate's training recipe (queued)",
    responses={
        200: {"model": TuneDetail, "description": "An Idempotency-Key replay: the tune job made before"},
        **error_responses(401, 403, 409, 413, 422, _409="The Idempotency-Key was already used differently"),
    },
)
def create_tune(
    body: Annotated[TuneCreate, Body(openapi_examples=TUNE_EXAMPLES)],
    request: Request,
    response: Response,
    storage: StorageDep,
    idempotency_key: IdempotencyKey = None,
) -> TuneDetail:
    """Refused (422) for an unknown candidate, one without a completed training and kept proxy weights,
    and ranges out of bounds. `steps` defaults to 4x the search's proxy steps, `grace_steps` to a quarter."""
    data_dir = request.app.state.settings.resolved_data_dir()
    try:
        submitted = submit_tune(storage, body, data_dir, idempotency_key=idempotency_key)
    except SubmitError as exc:
        if exc.conflict:
            raise HTTPException(409, detail=str(exc)) from None
        raise exc.as_validation_error() from None
    job, replayed = submitted.job, submitted.replayed
    if replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/api/tunes/{job.id}"
    return TuneDetail.of(job)


@router.get(
    "",
    response_model=Page[TuneOut],
    dependencies=[Depends(require_read_token)],
    summary="List tune jobs, newest first",
    responses=READ,
)
def list_tunes(storage: StorageDep, limit: Limit = 50, offset: Offset = 0) -> Page[TuneOut]:
    """Every tune job, each with its candidate and progress (trials finished of trials)."""
    jobs = storage.list_jobs(kind=TUNE_KIND, limit=None)
    jobs.sort(key=lambda j: (j.created_at, j.id), reverse=True)
    items = [TuneOut.of(j) for j in jobs[offset : offset + limit]]
    return Page(items=items, total=len(jobs), limit=limit, offset=offset)


@router.get(
    "/{tune_id}",
    response_model=TuneDetail,
    dependencies=[Depends(require_read_token)],
    summary="A tune job: its status, trials and best recipe",
    responses=READ_ONE,
)
def get_tune(tune_id: TuneId, storage: StorageDep) -> TuneDetail:
    """The report (`result`: every trial's recipe, status and curve; the best recipe) once it completed."""
    return TuneDetail.of(_tune_or_404(storage, tune_id))


@router.post(
    "/{tune_id}/cancel",
    response_model=TuneDetail,
    dependencies=[Depends(require_token)],
    summary="Cancel a queued or running tune job (idempotent)",
    responses=change_responses("tune job"),
)
def cancel_tune(tune_id: TuneId, storage: StorageDep) -> TuneDetail:
    """A running one stops its trials at their next report; nothing of it is stored as a report."""
    job = _tune_or_404(storage, tune_id)
    if job.status != "cancelled" and not storage.transition_job(
        tune_id, ("queued", "running"), "cancelled", kind=TUNE_KIND
    ):
        raise HTTPException(
            409,
            detail=f"tune job {tune_id} is {_tune_or_404(storage, tune_id).status}: it cannot be cancelled",
        )
    return TuneDetail.of(_tune_or_404(storage, tune_id))

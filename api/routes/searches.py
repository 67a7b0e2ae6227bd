"""/api/searches: submit, list, inspect, cancel, resume, archive, delete searches; their candidates, Pareto
fronts (CSV too) and the live feed of finished evaluations.

A submitted search is a queued job; a runner (`api/runner.py`) takes it from the queue.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api.auth import require_read_token, require_token
from api.routes.deps import StorageDep, job_or_404
from api.schemas import (
    CURSOR_PATTERN,
    MAX_ID,
    MAX_OFFSET,
    MAX_PAGE,
    CandidateSummary,
    EvaluationFeed,
    JobOut,
    Page,
    ParetoOut,
    SearchCreate,
    SearchCreated,
    SearchDetail,
    SearchOut,
    make_cursor,
    parse_cursor,
)
from api.submit import SubmitError, submit_search
from search.config import OBJECTIVES
from search.db import (
    CANDIDATE_DONE_STATUSES,
    CANDIDATE_SORT_COLUMNS,
    CANDIDATE_STATUSES,
    JOB_STATUSES,
    JOB_TERMINAL_STATUSES,
)
from search.layout import Layout
from search.pareto import pareto_front
from search.storage import JobRecord, Storage

router = APIRouter(prefix="/api/searches", tags=["searches"])

SearchId = Annotated[int, Path(ge=1, le=MAX_ID, description="the search's id")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size (at most {MAX_PAGE})")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]
CandidateStatus = Literal[CANDIDATE_STATUSES]  # type: ignore[valid-type]
SORT_PATTERN = rf"^-?({'|'.join(CANDIDATE_SORT_COLUMNS)})$"


def _progress(job: JobRecord) -> float | None:
    if not job.budget:
        return None
    return min(1.0, job.n_evaluations / job.budget)


def _out(job: JobRecord) -> SearchOut:
    return SearchOut(**JobOut.of(job).model_dump(), progress=_progress(job))


def _detail(storage: Storage, job: JobRecord) -> SearchDetail:
    last = storage.latest_hypervolume(job.id)
    return SearchDetail(
        **_out(job).model_dump(),
        config=job.config,
        counts=storage.candidate_counts(job.id),
        hypervolume=None if last is None else last.hypervolume,
        hypervolume_at=None if last is None else last.n_evaluations,
    )


def _transition(storage: Storage, job_id: int, allowed: tuple[str, ...], target: str) -> bool:
    return storage.transition_job(job_id, allowed, target, kind="search")


@router.post(
    "",
    status_code=201,
    response_model=SearchCreated,
    dependencies=[Depends(require_token)],
    summary="Submit a search (queued)",
)
def create_search(
    body: SearchCreate,
    request: Request,
    response: Response,
    storage: StorageDep,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")
    ] = None,
) -> SearchCreated:
    try:
        submitted = submit_search(
            storage, body, idempotency_key=idempotency_key, data_roots=request.app.state.settings.data_roots
        )
    except SubmitError as exc:
        if exc.conflict:
            raise HTTPException(409, detail=f"{exc.field} was {exc.reason}") from None
        raise exc.as_validation_error() from None
    job, replayed = submitted.job, submitted.replayed
    if replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/api/searches/{job.id}"
    return SearchCreated(**_out(job).model_dump(), replayed=replayed)


@router.get(
    "",
    response_model=Page[SearchOut],
    dependencies=[Depends(require_read_token)],
    summary="List searches, newest first",
)
def list_searches(
    storage: StorageDep, limit: Limit = 50, offset: Offset = 0, status: JobStatus | None = None
) -> Page[SearchOut]:
    jobs = storage.list_jobs(status=status, kind="search", limit=limit, offset=offset)
    return Page[SearchOut](
        items=[_out(j) for j in jobs],
        total=storage.count_jobs(status=status, kind="search"),
        limit=limit,
        offset=offset,
    )


@router.get("/{search_id}", response_model=SearchDetail, dependencies=[Depends(require_read_token)])
def get_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    return _detail(storage, job_or_404(storage, search_id))


@router.post(
    "/{search_id}/cancel",
    response_model=SearchDetail,
    dependencies=[Depends(require_token)],
    summary="Cancel a queued or running search (idempotent)",
)
def cancel_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    job = job_or_404(storage, search_id)
    if job.status != "cancelled" and not _transition(storage, search_id, ("queued", "running"), "cancelled"):
        job = job_or_404(storage, search_id)
        raise HTTPException(
            409,
            detail=f"search {search_id} is {job.status}: only a queued or running search can be cancelled",
        )
    return _detail(storage, job_or_404(storage, search_id))


@router.post(
    "/{search_id}/archive",
    response_model=SearchDetail,
    dependencies=[Depends(require_token)],
    summary="Archive a finished search (idempotent)",
)
def archive_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    job = job_or_404(storage, search_id)
    if job.status != "archived" and not _transition(
        storage, search_id, ("completed", "failed", "cancelled"), "archived"
    ):
        job = job_or_404(storage, search_id)
        raise HTTPException(
            409,
            detail=f"search {search_id} is {job.status}: cancel it first (only a finished "
            "search can be archived)",
        )
    return _detail(storage, job_or_404(storage, search_id))


@router.delete(
    "/{search_id}",
    status_code=204,
    dependencies=[Depends(require_token)],
    summary="Delete a search with its candidates (stored results stay for reuse)",
)
def delete_search(search_id: SearchId, storage: StorageDep) -> Response:
    job = job_or_404(storage, search_id)
    if job.status == "running":
        raise HTTPException(409, detail=f"search {search_id} is running: cancel it first")
    if not storage.delete_job(search_id):
        raise HTTPException(404, detail=f"no search {search_id}")
    return Response(status_code=204)


@router.get(
    "/{search_id}/candidates",
    response_model=Page[CandidateSummary],
    dependencies=[Depends(require_read_token)],
)
def list_candidates(
    search_id: SearchId,
    storage: StorageDep,
    limit: Limit = 50,
    offset: Offset = 0,
    status: CandidateStatus | None = None,
    sort: Annotated[
        str,
        Query(
            pattern=SORT_PATTERN,
            max_length=32,
            description=f"one of {', '.join(CANDIDATE_SORT_COLUMNS)}; '-' prefix: descending",
        ),
    ] = "id",
) -> Page[CandidateSummary]:
    job_or_404(storage, search_id)
    rows = storage.candidate_summaries(search_id, status=status, order_by=sort, limit=limit, offset=offset)
    return Page[CandidateSummary](
        items=[CandidateSummary.of(c) for c in rows],
        total=storage.count_candidates(search_id, status=status),
        limit=limit,
        offset=offset,
    )


@router.post(
    "/{search_id}/resume",
    response_model=SearchDetail,
    dependencies=[Depends(require_token)],
    summary="Put a cancelled or failed search back in the queue (idempotent for a queued or running one)",
)
def resume_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    job = job_or_404(storage, search_id)
    if job.status not in ("queued", "running") and not _transition(
        storage, search_id, ("cancelled", "failed"), "queued"
    ):
        job = job_or_404(storage, search_id)
        raise HTTPException(
            409,
            detail=f"search {search_id} is {job.status}: only a cancelled or failed search can be resumed",
        )
    return _detail(storage, job_or_404(storage, search_id))


Objective = Literal[OBJECTIVES]  # type: ignore[valid-type]


def own_objectives(job: JobRecord, x: str | None, y: str | None) -> list[str]:
    """[x, y]: the chosen objectives, each defaulting to the search's own; a 422 naming `y` if they are the
    same."""
    own = list(job.config.get("objectives") or ("val_bpb", "decode_ms"))
    chosen = [x or own[0], y or own[1]]
    if chosen[0] == chosen[1]:
        raise RequestValidationError(
            [{"loc": ("query", "y"), "type": "value_error", "msg": "the two objectives must differ"}]
        )
    return chosen


def _front(storage: Storage, job: JobRecord, x: str | None, y: str | None) -> tuple[list[str], list]:
    """The materialized front for the search's own objectives (an indexed read), else computed on request."""
    own = own_objectives(job, None, None)
    chosen = own_objectives(job, x, y)
    if sorted(chosen) == sorted(own):
        return chosen, storage.candidate_summaries(job.id, on_front=True, order_by=chosen[0])
    done = [
        c
        for c in storage.candidate_summaries(job.id, status=CANDIDATE_DONE_STATUSES)
        if getattr(c, chosen[0]) is not None and getattr(c, chosen[1]) is not None
    ]
    keep = pareto_front([[float(getattr(c, name)) for name in chosen] for c in done]) if done else []
    return chosen, sorted((done[i] for i in keep), key=lambda c: (getattr(c, chosen[0]), c.id))


AxisX = Annotated[Objective | None, Query(description="first objective (default: the search's own)")]
AxisY = Annotated[Objective | None, Query(description="second objective (default: the search's own)")]


@router.get(
    "/{search_id}/pareto",
    response_model=ParetoOut,
    dependencies=[Depends(require_read_token)],
    summary="The Pareto front (every objective minimized) for the search's objectives or a chosen pair",
)
def pareto(search_id: SearchId, storage: StorageDep, x: AxisX = None, y: AxisY = None) -> ParetoOut:
    job = job_or_404(storage, search_id)
    objectives, front = _front(storage, job, x, y)
    return ParetoOut(
        search_id=search_id, objectives=objectives, items=[CandidateSummary.of(c) for c in front]
    )


CSV_COLUMNS = (
    "candidate_id",
    "layout_hash",
    "operators",
    "d_model",
    "val_bpb",
    "decode_ms",
    "n_params",
    "generation",
    "parent_id",
    "status",
    "failure_reason",
)


def _csv(rows, filename: str) -> Response:
    """Candidates (full records: the layout is read) as a CSV download."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for c in rows:
        layout = Layout.from_dict(c.layout)
        writer.writerow(
            [
                c.id,
                c.layout_hash,
                layout.compact(),
                layout.d_model,
                c.val_bpb,
                c.decode_ms,
                c.n_params,
                c.generation,
                c.parent_id if c.parent_id is not None else "",
                c.status,
                c.failure_reason or "",
            ]
        )
    return Response(
        buffer.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/{search_id}/pareto.csv",
    dependencies=[Depends(require_read_token)],
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
    summary="The Pareto front as CSV",
)
def pareto_csv(search_id: SearchId, storage: StorageDep, x: AxisX = None, y: AxisY = None) -> Response:
    job = job_or_404(storage, search_id)
    objectives, front = _front(storage, job, x, y)
    rows = [storage.get_candidate(c.id) for c in front]  # the front is small: one read each
    return _csv(rows, f"search-{search_id}-pareto-{'-'.join(objectives)}.csv")


@router.get(
    "/{search_id}/candidates.csv",
    dependencies=[Depends(require_read_token)],
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
    summary="Every candidate of the search as CSV, by id",
)
def candidates_csv(search_id: SearchId, storage: StorageDep) -> Response:
    job_or_404(storage, search_id)
    return _csv(storage.candidates(search_id), f"search-{search_id}-candidates.csv")


def _cursor(since: str | None):
    """A feed cursor, or a 422 naming `since` for one this API did not hand out."""
    try:
        return parse_cursor(since)
    except ValueError as exc:
        raise RequestValidationError(
            [{"loc": ("query", "since"), "type": "value_error", "msg": str(exc).removeprefix("since: ")}]
        ) from None


@router.get(
    "/{search_id}/evaluations",
    response_model=EvaluationFeed,
    dependencies=[Depends(require_read_token)],
    summary="Live progress: evaluations finished after a cursor (poll with the returned `next`)",
)
def evaluations(
    search_id: SearchId,
    storage: StorageDep,
    limit: Limit = 50,
    since: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=CURSOR_PATTERN,
            description="the `next` of the previous call; none: from the start",
        ),
    ] = None,
) -> EvaluationFeed:
    job = job_or_404(storage, search_id)
    after = _cursor(since)
    rows = storage.finished_since(search_id, after, limit=limit)
    cursor = make_cursor(rows[-1].finished_at, rows[-1].id) if rows else since
    return EvaluationFeed(
        search_id=search_id,
        status=job.status,
        n_evaluations=job.n_evaluations,
        budget=job.budget,
        items=[CandidateSummary.of(c) for c in rows],
        next=cursor,
    )


SSE_POLL_S = 1.0
SSE_MAX_S = 3600.0  # a stream ends after this long; EventSource clients reconnect with Last-Event-ID


def _feed_start(
    search_id: SearchId,
    storage: StorageDep,
    last_event_id: Annotated[str | None, Header(max_length=64, pattern=CURSOR_PATTERN)] = None,
    since: Annotated[str | None, Query(max_length=64, pattern=CURSOR_PATTERN)] = None,
):
    """A 404 or 422 before the stream starts: the search exists and the cursor is one this API handed out."""
    job_or_404(storage, search_id)
    return _cursor(last_event_id or since)


@router.get(
    "/{search_id}/events",
    dependencies=[Depends(require_read_token)],
    response_class=EventSourceResponse,
    summary="Live progress as Server-Sent Events: one `evaluation` event per finished evaluation, "
    "`status` on changes, `end` when the search is over (resume with Last-Event-ID)",
)
async def events(
    search_id: SearchId, request: Request, storage: StorageDep, cursor=Depends(_feed_start)
) -> AsyncIterator[ServerSentEvent]:
    """Polls the database each second (keep-alive comments in between come from FastAPI). The stream
    closes without an `end` when this coordinator shuts down, so that EventSource reconnects elsewhere."""
    shutting_down = request.app.state.shutting_down
    loop = asyncio.get_running_loop()
    deadline, status = loop.time() + SSE_MAX_S, None
    while loop.time() < deadline and not shutting_down.is_set():
        rows = await run_in_threadpool(storage.finished_since, search_id, cursor, 100)
        for c in rows:
            cursor = (c.finished_at, c.id)
            yield ServerSentEvent(data=CandidateSummary.of(c), event="evaluation", id=make_cursor(*cursor))
        current = await run_in_threadpool(storage.get_job, search_id)
        if current is None:  # deleted while watched
            yield ServerSentEvent(data={"status": "deleted"}, event="end")
            return
        if current.status != status:
            status = current.status
            body = {"status": status, "n_evaluations": current.n_evaluations, "budget": current.budget}
            yield ServerSentEvent(data=body, event="status")
        if not rows and status in JOB_TERMINAL_STATUSES:
            yield ServerSentEvent(data={"status": status}, event="end")
            return
        if not rows:
            await asyncio.sleep(SSE_POLL_S)

"""/api/searches: submit, list, inspect, cancel, resume, archive, delete searches; their candidates (a page,
CSV or JSON Lines), Pareto fronts (CSV too) and the live feed of finished evaluations.

A submitted search is a queued job; a runner (`api/runner.py`) takes it from the queue.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api.auth import require_read_token, require_token
from api.errors import error_responses
from api.routes.deps import (
    READ,
    READ_ONE,
    IdempotencyKey,
    Limit,
    Offset,
    StorageDep,
    change_responses,
    job_or_404,
)
from api.schemas import (
    CURSOR_PATTERN,
    MAX_ID,
    SEARCH_EXAMPLES,
    CandidateRow,
    CandidateSummary,
    EvaluationFeed,
    JobOut,
    Page,
    ParetoOut,
    RungOut,
    RungsOut,
    SearchCreate,
    SearchCreated,
    SearchDetail,
    SearchOut,
    make_cursor,
    parse_cursor,
)
from api.submit import SubmitError, submit_search
from search.config import OBJECTIVES, SearchConfig
from search.db import (
    CANDIDATE_DONE_STATUSES,
    CANDIDATE_SORT_COLUMNS,
    CANDIDATE_STATUSES,
    JOB_STATUSES,
    JOB_TERMINAL_STATUSES,
)
from search.layout import Layout
from search.multifidelity import summarize_rungs
from search.pareto import HypervolumeSpace, pareto_front
from search.storage import JobRecord, Storage

router = APIRouter(prefix="/api/searches", tags=["searches"], responses=error_responses(500, 503))

SearchId = Annotated[int, Path(ge=1, le=MAX_ID, description="the search's id")]
CHANGE = change_responses("search")
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
    response_description="The queued search (201), or the earlier one an Idempotency-Key matched (200)",
    responses={
        200: {"model": SearchCreated, "description": "An Idempotency-Key replay: the search made before"},
        **error_responses(
            401,
            403,
            409,
            413,
            422,
            _409="The Idempotency-Key was already used for a different request",
        ),
    },
)
def create_search(
    body: Annotated[SearchCreate, Body(openapi_examples=SEARCH_EXAMPLES)],
    request: Request,
    response: Response,
    storage: StorageDep,
    idempotency_key: IdempotencyKey = None,
) -> SearchCreated:
    """Validates the search config (every field optional, unknown fields refused; the JSON Schema is at
    `GET /api/schema/search-config`) and queues it as a job; a runner takes it from the queue in priority
    order. Corpus, tokenizer and latency-table paths must lie inside the server's data roots. `Location`
    names the new search."""
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
    responses=READ,
)
def list_searches(
    storage: StorageDep,
    limit: Limit = 50,
    offset: Offset = 0,
    status: Annotated[JobStatus | None, Query(description="only searches with this status")] = None,
) -> Page[SearchOut]:
    """A page of searches (`total` counts them all), with each one's progress through its budget."""
    jobs = storage.list_jobs(status=status, kind="search", limit=limit, offset=offset)
    return Page[SearchOut](
        items=[_out(j) for j in jobs],
        total=storage.count_jobs(status=status, kind="search"),
        limit=limit,
        offset=offset,
    )


@router.get(
    "/{search_id}",
    response_model=SearchDetail,
    dependencies=[Depends(require_read_token)],
    summary="A search with its config, candidate counts and latest hypervolume",
    responses=READ_ONE,
)
def get_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    """The search as submitted (`config`, defaults filled in), its status and progress, how many candidates
    are in each status, and the hypervolume last recorded."""
    return _detail(storage, job_or_404(storage, search_id))


@router.post(
    "/{search_id}/cancel",
    response_model=SearchDetail,
    dependencies=[Depends(require_token)],
    summary="Cancel a queued or running search (idempotent)",
    responses=CHANGE,
)
def cancel_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    """A running search stops after the evaluations in flight; a cancelled one answers as it is. A finished
    search cannot be cancelled (409)."""
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
    responses=CHANGE,
)
def archive_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    """Only a completed, failed or cancelled search can be archived (409 otherwise); its candidates and
    results stay readable."""
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
    responses=error_responses(401, 403, 404, 409, 422, _409="The search is running: cancel it first"),
)
def delete_search(search_id: SearchId, storage: StorageDep) -> Response:
    """Removes the search and its candidates. The training and latency results they pointed to stay, so a
    later search that meets the same layouts reuses them."""
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
    summary="A page of the search's candidates, sorted and filtered",
    responses=READ_ONE,
)
def list_candidates(
    search_id: SearchId,
    storage: StorageDep,
    limit: Limit = 50,
    offset: Offset = 0,
    status: Annotated[CandidateStatus | None, Query(description="only candidates with this status")] = None,
    sort: Annotated[
        str,
        Query(
            pattern=SORT_PATTERN,
            max_length=32,
            description=f"one of {', '.join(CANDIDATE_SORT_COLUMNS)}; '-' prefix: descending",
        ),
    ] = "id",
) -> Page[CandidateSummary]:
    """Candidates without their layouts (`GET /api/candidates/{id}` has everything about one); a sort's ties
    go by id. For every candidate at once: `candidates.csv` or `candidates.jsonl`."""
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
    responses=CHANGE,
)
def resume_search(search_id: SearchId, storage: StorageDep) -> SearchDetail:
    """The search continues where it stopped: its finished candidates stay, the ones in flight are
    evaluated again. A completed or archived search cannot be resumed (409)."""
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
    responses=READ_ONE,
)
def pareto(search_id: SearchId, storage: StorageDep, x: AxisX = None, y: AxisY = None) -> ParetoOut:
    """The finished candidates no other one beats on both objectives, by the first objective. The front of
    the search's own pair is kept up to date as evaluations finish; another pair's is computed on request.
    `x` and `y` must differ (422 naming `y`)."""
    job = job_or_404(storage, search_id)
    objectives, front = _front(storage, job, x, y)
    return ParetoOut(
        search_id=search_id, objectives=objectives, items=[CandidateSummary.of(c) for c in front]
    )


@router.get(
    "/{search_id}/rungs",
    response_model=RungsOut,
    dependencies=[Depends(require_read_token)],
    summary="A multi-fidelity search's rungs: runs, promotions, each rung's front and hypervolume",
    responses=READ_ONE,
)
def rungs(search_id: SearchId, storage: StorageDep) -> RungsOut:
    """Per rung (lowest first): its runs by status, how many were promoted to the next, the front of its
    results and that front's hypervolume (in the search's fixed space, as the search's own hypervolume at the
    top rung). A single-fidelity search has no rungs."""
    job = job_or_404(storage, search_id)
    objectives = own_objectives(job, None, None)
    config = SearchConfig.model_validate(job.config)
    if config.fidelity is None:
        return RungsOut(
            search_id=search_id,
            objectives=objectives,
            eta=None,
            continuation=None,
            training_steps=0,
            rungs=[],
        )
    state = storage.load_strategy_state(search_id) or {}
    space = state.get("hypervolume_space")
    summaries = summarize_rungs(
        config.fidelity,
        storage.rung_runs(search_id),
        objectives,
        HypervolumeSpace.from_dict(space) if space else None,
    )
    return RungsOut(
        search_id=search_id,
        objectives=objectives,
        eta=config.fidelity.eta,
        continuation=config.fidelity.continuation,
        training_steps=storage.training_steps_spent(search_id),
        rungs=[RungOut(**asdict(s)) for s in summaries],
    )


CSV_COLUMNS = tuple(CandidateRow.model_fields)  # the export's columns (CSV) and keys (JSON Lines)
EXPORT_PAGE = 500  # candidates read at a time for a streamed export


def candidate_row(c) -> dict[str, Any]:
    """One candidate (a full record: the layout is read) as an export row: the fields of CandidateRow, for
    both candidates.csv and candidates.jsonl."""
    layout = Layout.from_dict(c.layout)
    return {
        "candidate_id": c.id,
        "layout_hash": c.layout_hash,
        "operators": layout.compact(),
        "d_model": layout.d_model,
        "val_bpb": c.val_bpb,
        "decode_ms": c.decode_ms,
        "n_params": c.n_params,
        "generation": c.generation,
        "parent_id": c.parent_id,
        "status": c.status,
        "failure_reason": c.failure_reason,
        "rung": c.rung,
    }


class CSVResponse(Response):
    media_type = "text/csv"


def _csv(rows: Iterable, filename: str) -> Response:
    """Candidates as a CSV download (an empty cell for a null)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for c in rows:
        row = candidate_row(c)
        writer.writerow(["" if row[name] is None else row[name] for name in CSV_COLUMNS])
    return CSVResponse(
        buffer.getvalue(), headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


def _csv_doc(what: str) -> dict[int | str, dict[str, Any]]:
    example = ",".join(CSV_COLUMNS) + "\n1,3f2a9c,A F,64,2.0,1.0,1001,0,,completed,\n"
    return {
        200: {
            "description": f"{what} as CSV (a header row, then one row per candidate)",
            "content": {"text/csv": {"schema": {"type": "string"}, "example": example}},
        },
        **READ_ONE,
    }


@router.get(
    "/{search_id}/pareto.csv",
    dependencies=[Depends(require_read_token)],
    response_class=CSVResponse,
    responses=_csv_doc("The front"),
    summary="The Pareto front as CSV",
)
def pareto_csv(search_id: SearchId, storage: StorageDep, x: AxisX = None, y: AxisY = None) -> Response:
    """The front of `GET /api/searches/{id}/pareto` (the same objectives), one row per candidate with its
    compact layout; a download (`Content-Disposition`)."""
    job = job_or_404(storage, search_id)
    objectives, front = _front(storage, job, x, y)
    rows = [storage.get_candidate(c.id) for c in front]  # the front is small: one read each
    return _csv(rows, f"search-{search_id}-pareto-{'-'.join(objectives)}.csv")


@router.get(
    "/{search_id}/candidates.csv",
    dependencies=[Depends(require_read_token)],
    response_class=CSVResponse,
    responses=_csv_doc("Every candidate"),
    summary="Every candidate of the search as CSV, by id",
)
def candidates_csv(search_id: SearchId, storage: StorageDep) -> Response:
    """Columns: CandidateRow's fields (`candidates.jsonl` has the same rows as JSON); a download
    (`Content-Disposition`)."""
    job_or_404(storage, search_id)
    return _csv(storage.candidates(search_id), f"search-{search_id}-candidates.csv")


def _export_start(search_id: SearchId, storage: StorageDep, response: Response) -> int:
    """A 404 before the stream starts (and the download's file name); the search's id."""
    job_or_404(storage, search_id)
    response.headers["Content-Disposition"] = f'attachment; filename="search-{search_id}-candidates.jsonl"'
    return search_id


@router.get(
    "/{search_id}/candidates.jsonl",
    dependencies=[Depends(require_read_token)],
    summary="Every candidate of the search as JSON Lines, by id (streamed)",
    response_description="One JSON object per line (`application/jsonl`), each a CandidateRow",
    responses=READ_ONE,
)
def candidates_jsonl(
    storage: StorageDep, job_id: Annotated[int, Depends(_export_start)]
) -> Iterator[CandidateRow]:
    """The rows of `candidates.csv` (the same fields; null where the CSV has an empty cell), streamed as
    they are read, a page of candidates at a time: one object per line, in id order."""
    offset = 0
    while True:
        page = storage.candidates(job_id, limit=EXPORT_PAGE, offset=offset)
        for c in page:
            yield candidate_row(c)
        if len(page) < EXPORT_PAGE:
            return
        offset += len(page)


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
    responses=READ_ONE,
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
    """Candidates that finished (completed, failed or reused) after the cursor, oldest first, with the
    search's status; `next` is the cursor for the next call (the same one when nothing finished). A cursor
    this API did not hand out is a 422 naming `since`."""
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
    last_event_id: Annotated[
        str | None,
        Header(
            max_length=64,
            pattern=CURSOR_PATTERN,
            description="sent by a reconnecting EventSource: the stream resumes after that event",
        ),
    ] = None,
    since: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=CURSOR_PATTERN,
            description="start after this cursor (an event id, or `next` of /evaluations); none: the start",
        ),
    ] = None,
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
    response_description="`text/event-stream`: `evaluation` events (data: a CandidateSummary, id: its "
    "cursor), `status` events (status, n_evaluations, budget) and a last `end` event",
    responses=READ_ONE,
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

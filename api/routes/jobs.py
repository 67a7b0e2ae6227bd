"""/api/jobs: the queue (every kind of job), in the order runners take them: priority, then FIFO."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from api.auth import require_read_token
from api.errors import error_responses
from api.routes.deps import StorageDep
from api.schemas import MAX_OFFSET, MAX_PAGE, Page, QueueJobOut
from search.db import JOB_KINDS, JOB_STATUSES

router = APIRouter(
    prefix="/api/jobs",
    tags=["jobs"],
    dependencies=[Depends(require_read_token)],
    responses=error_responses(401, 422, 500, 503),
)


@router.get("", response_model=Page[QueueJobOut], summary="The job queue, in the order runners take it")
def queue(
    storage: StorageDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size (at most {MAX_PAGE})")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="items to skip")] = 0,
    status: Annotated[
        list[Literal[JOB_STATUSES]] | None,  # type: ignore[valid-type]
        Query(
            max_length=len(JOB_STATUSES),
            description="any of these statuses (repeat it); default: queued and running",
        ),
    ] = None,
    kind: Annotated[
        Literal[JOB_KINDS] | None,  # type: ignore[valid-type]
        Query(description="only jobs of this kind"),
    ] = None,
) -> Page[QueueJobOut]:
    """Jobs of every kind by priority (higher first), then first in, first out; a running job with its
    lease (which runner holds it, until when)."""
    statuses = list(status) if status else ["queued", "running"]
    jobs = storage.queue(statuses, kind, limit=limit, offset=offset)
    rows = [QueueJobOut(**{name: getattr(job, name) for name in QueueJobOut.model_fields}) for job in jobs]
    return Page[QueueJobOut](items=rows, total=storage.count_jobs(statuses, kind), limit=limit, offset=offset)

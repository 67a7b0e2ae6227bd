"""/api/schedules: cron schedules of searches (create, list, inspect, change, delete) and their fire records.

The scheduler (api/scheduler.py) fires them; these routes only store them. Times are UTC, with the schedule's
local time alongside where useful.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, Response

from api.auth import require_read_token, require_token
from api.errors import error_responses
from api.routes.deps import StorageDep
from api.schedule_schemas import (
    SCHEDULE_EXAMPLES,
    FireOut,
    ScheduleCreate,
    ScheduleOut,
    SchedulePatch,
    template_json,
)
from api.scheduler import local_time, next_due_time
from api.schemas import MAX_ID, MAX_OFFSET, MAX_PAGE, Page, SearchCreate
from api.submit import SubmitError, check_data_paths
from search.db import SCHEDULE_FIRE_STATUSES, utcnow
from search.storage import ScheduleRecord, Storage

router = APIRouter(prefix="/api/schedules", tags=["schedules"], responses=error_responses(500, 503))

ScheduleId = Annotated[int, Path(ge=1, le=MAX_ID, description="the schedule's id")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size (at most {MAX_PAGE})")]
Offset = Annotated[
    int, Query(ge=0, le=MAX_OFFSET, description="items to skip (for the next page: offset + limit)")
]
FireStatus = Literal[SCHEDULE_FIRE_STATUSES]  # type: ignore[valid-type]


def _checked_template(request: Request, template: SearchCreate, field: str = "template") -> SearchCreate:
    """The template's data paths resolve inside the data roots (as for POST /api/searches)."""
    try:
        return check_data_paths(template, request.app.state.settings.data_roots)
    except SubmitError as exc:
        raise exc.as_validation_error(field) from None


def _now(request: Request) -> datetime:
    """The app's clock (`app.state.clock`, e.g. the scheduler's in tests), else the system clock."""
    clock = getattr(request.app.state, "clock", None)
    return clock() if clock is not None else utcnow()


def _schedule_or_404(storage: Storage, schedule_id: int) -> ScheduleRecord:
    schedule = storage.get_schedule(schedule_id)
    if schedule is None:
        raise HTTPException(404, detail=f"no schedule {schedule_id}")
    return schedule


def _out(schedule: ScheduleRecord, now: datetime) -> ScheduleOut:
    if not schedule.enabled:
        return ScheduleOut.of(schedule, None, None)
    due = next_due_time(schedule.cron, schedule.timezone, max(now, schedule.cursor))
    return ScheduleOut.of(schedule, due, None if due is None else local_time(due, schedule.timezone))


@router.post(
    "",
    status_code=201,
    response_model=ScheduleOut,
    dependencies=[Depends(require_token)],
    summary="Create a schedule (its first due time is the first one after now)",
    responses=error_responses(401, 403, 413, 422),
)
def create_schedule(
    body: Annotated[ScheduleCreate, Body(openapi_examples=SCHEDULE_EXAMPLES)],
    request: Request,
    response: Response,
    storage: StorageDep,
) -> ScheduleOut:
    """At each due time of `cron` (in `timezone`), the scheduler submits `template` as a search at the
    schedule's priority. The template is checked as POST /api/searches checks a body (errors name
    `template.<field>`). `Location` names the new schedule."""
    now = _now(request)
    template = _checked_template(request, body.template)
    schedule_id = storage.create_schedule(
        body.name,
        body.cron,
        template_json(template),
        timezone=body.timezone,
        enabled=body.enabled,
        warm_start=body.warm_start,
        priority=body.priority,
        created_at=now,
    )
    response.headers["Location"] = f"/api/schedules/{schedule_id}"
    return _out(_schedule_or_404(storage, schedule_id), now)


@router.get(
    "",
    response_model=Page[ScheduleOut],
    dependencies=[Depends(require_read_token)],
    summary="List schedules, oldest first",
    responses=error_responses(401, 422),
)
def list_schedules(
    request: Request,
    storage: StorageDep,
    limit: Limit = 50,
    offset: Offset = 0,
    enabled: Annotated[bool | None, Query(description="only enabled (true) or disabled (false) ones")] = None,
) -> Page[ScheduleOut]:
    """A page of schedules (`total` counts them all), each with its next due time."""
    now = _now(request)
    rows = storage.list_schedules(enabled=enabled, limit=limit, offset=offset)
    return Page[ScheduleOut](
        items=[_out(s, now) for s in rows],
        total=storage.count_schedules(enabled=enabled),
        limit=limit,
        offset=offset,
    )


@router.get(
    "/{schedule_id}",
    response_model=ScheduleOut,
    dependencies=[Depends(require_read_token)],
    summary="A schedule with its next due time (UTC and local)",
    responses=error_responses(401, 404, 422),
)
def get_schedule(schedule_id: ScheduleId, request: Request, storage: StorageDep) -> ScheduleOut:
    """The schedule as stored (its template as given), with the next due time after now and after the
    due times already handled (none while disabled)."""
    return _out(_schedule_or_404(storage, schedule_id), _now(request))


@router.patch(
    "/{schedule_id}",
    response_model=ScheduleOut,
    dependencies=[Depends(require_token)],
    summary="Change some fields (a template replaces the whole template)",
    responses=error_responses(401, 403, 404, 413, 422),
)
def patch_schedule(
    schedule_id: ScheduleId, body: SchedulePatch, request: Request, storage: StorageDep
) -> ScheduleOut:
    """Only the fields sent change (null is refused: leave a field out to keep it). Changing `cron` or
    `timezone`, or enabling a disabled schedule, starts its due times from now. An empty body changes
    nothing and answers the schedule."""
    now = _now(request)
    changes = body.changes()
    if body.template is not None:
        changes["template"] = template_json(_checked_template(request, body.template))
    if not changes:
        return _out(_schedule_or_404(storage, schedule_id), now)
    try:
        schedule = storage.update_schedule(schedule_id, changes, now=now)
    except KeyError:
        raise HTTPException(404, detail=f"no schedule {schedule_id}") from None
    return _out(schedule, now)


@router.delete(
    "/{schedule_id}",
    status_code=204,
    dependencies=[Depends(require_token)],
    summary="Delete a schedule and its fire records (the searches it queued stay)",
    responses=error_responses(401, 403, 404, 422),
)
def delete_schedule(schedule_id: ScheduleId, storage: StorageDep) -> Response:
    """No more searches are queued for it; those it queued stay, their `schedule_id` becoming null."""
    if not storage.delete_schedule(schedule_id):
        raise HTTPException(404, detail=f"no schedule {schedule_id}")
    return Response(status_code=204)


@router.get(
    "/{schedule_id}/fires",
    response_model=Page[FireOut],
    dependencies=[Depends(require_read_token)],
    summary="A schedule's recorded due times (fired, missed, skipped, failed), newest first",
    responses=error_responses(401, 404, 422),
)
def list_fires(
    schedule_id: ScheduleId,
    storage: StorageDep,
    limit: Limit = 50,
    offset: Offset = 0,
    status: Annotated[FireStatus | None, Query(description="only due times with this outcome")] = None,
) -> Page[FireOut]:
    """Each due time the scheduler handled: `fired` (a search queued: `job_id`), `missed` (the coordinator
    was down past the grace period), `skipped` (its previous run was still queued or running) or `failed` (the
    template no longer validates: `reason`), with the time in UTC and in the schedule's time zone."""
    schedule = _schedule_or_404(storage, schedule_id)
    fires = storage.list_fires(schedule_id, limit=limit, offset=offset, status=status)
    return Page[FireOut](
        items=[FireOut.of(f, local_time(f.due_at, schedule.timezone)) for f in fires],
        total=storage.count_fires(schedule_id, status=status),
        limit=limit,
        offset=offset,
    )

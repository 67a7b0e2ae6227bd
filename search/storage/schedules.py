"""Schedules of searches in the storage seam: `ScheduleStore`, a part of `search.storage.Storage`.

A schedule is a cron expression in a time zone plus a search template; every due time of it is recorded once
in `schedule_fires` as fired (with the queued job), missed (older than the scheduler's grace period), skipped
(a previous run of the schedule was still queued or running) or failed (the template no longer validates). The
unique (schedule_id, due_at) row is the exactly-once guarantee: `fire()` inserts it with
`INSERT ... ON CONFLICT DO NOTHING` and, in the same transaction, the queued job, so of several coordinators
racing on one due time exactly one records it and at most one job exists.

`schedules.last_due_at` is a cursor, not the guarantee: due times at or before it are done (recorded by some
scheduler, or passed while the schedule was disabled or before its cron or time zone last changed). `fire()`
only ever moves it forward.

"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy import delete as sa_delete

from search import db
from search.db import JOB_KINDS, SCHEDULE_FIRE_STATUSES, utcnow
from search.storage.engines import Connected
from search.storage.records import (
    JobRecord,
    ScheduleFireRecord,
    ScheduleRecord,
    check_value,
    columns_of,
    record_of,
)

DEFAULT_PAGE = 100
CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
SCHEDULE_FIELDS = ("name", "cron", "timezone", "template", "enabled", "warm_start", "priority")
ACTIVE_JOB_STATUSES = ("queued", "running")


# ------------------------------------------------------------------------------------------ validation


def check_cron(expr: str) -> str:
    """A standard 5-field cron expression (minute hour day-of-month month day-of-week) or an @alias
    (@hourly, @daily, ...), that matches at least once; ValueError otherwise. Seconds and years fields are
    refused (the scheduler works to the minute)."""
    from croniter import croniter

    if not isinstance(expr, str):
        raise ValueError("a cron expression is a string")
    expr = " ".join(expr.split())
    if not expr:
        raise ValueError("empty cron expression")
    if expr.startswith("@"):
        expr = expr.lower()
        if expr not in CRON_ALIASES:
            raise ValueError(f"unknown cron alias {expr!r} (known: {', '.join(CRON_ALIASES)})")
    elif len(expr.split(" ")) != 5:
        raise ValueError(f"{expr!r}: expected 5 fields (minute hour day-of-month month day-of-week)")
    if not croniter.is_valid(expr):
        raise ValueError(f"{expr!r} is not a valid cron expression")
    try:
        croniter(expr, datetime(2000, 1, 1)).get_next(datetime)
    except Exception:  # noqa: BLE001 - CroniterBadDateError and friends: it never matches
        raise ValueError(f"{expr!r} never matches a date") from None
    return expr


@lru_cache(maxsize=1)
def _known_zones() -> frozenset[str]:
    import zoneinfo

    return frozenset(zoneinfo.available_timezones())


def check_timezone(name: str) -> str:
    """An IANA time zone name known to zoneinfo (e.g. `Europe/Berlin`, `UTC`); ValueError otherwise."""
    import zoneinfo

    if not isinstance(name, str) or not name or len(name) > 64:
        raise ValueError("a time zone is an IANA name such as Europe/Berlin or UTC")
    known = _known_zones()
    if known and name not in known and name != "UTC":
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Berlin or UTC)")
    try:
        zoneinfo.ZoneInfo(name)
    except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError for odd keys, OSError
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Berlin or UTC)") from None
    return name


def _check_status(status: str) -> str:
    if status not in SCHEDULE_FIRE_STATUSES:
        raise ValueError(
            f"unknown fire status {status!r}; expected one of {', '.join(SCHEDULE_FIRE_STATUSES)}"
        )
    return status


def _aware(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what}: pass a timezone-aware datetime")
    return value


# ------------------------------------------------------------------------------------------ the mixin


class ScheduleStore(Connected):
    """Schedules and their fire records."""

    # ---- schedules

    def create_schedule(
        self,
        name: str,
        cron: str,
        template: dict,
        *,
        timezone: str = "UTC",
        enabled: bool = True,
        warm_start: bool = False,
        priority: int = 0,
        created_at: datetime | None = None,
    ) -> int:
        """A new schedule; its first due time is the first one after `created_at` (default: now)."""
        if not isinstance(template, dict):
            raise ValueError("template: a search config (a JSON object)")
        now = utcnow()
        values = {
            "name": name,
            "cron": check_cron(cron),
            "timezone": check_timezone(timezone),
            "template": template,
            "enabled": bool(enabled),
            "warm_start": bool(warm_start),
            "priority": int(priority),
            "created_at": _aware(created_at, "created_at") if created_at else now,
            "updated_at": now,
            "last_due_at": None,
        }
        t = db.schedules
        with self.transaction() as conn:
            return int(conn.execute(t.insert().values(**values).returning(t.c.id)).scalar_one())

    def get_schedule(self, schedule_id: int) -> ScheduleRecord | None:
        return self._one(ScheduleRecord, db.schedules.c.id == schedule_id)

    def list_schedules(
        self, enabled: bool | None = None, limit: int | None = DEFAULT_PAGE, offset: int = 0
    ) -> list[ScheduleRecord]:
        """Schedules by id (oldest first)."""
        t = db.schedules
        stmt = select(*columns_of(ScheduleRecord, t)).where(*self._schedule_filters(enabled))
        stmt = stmt.order_by(t.c.id).offset(offset).limit(limit)
        with self._read() as conn:
            return [record_of(ScheduleRecord, row) for row in conn.execute(stmt)]

    def count_schedules(self, enabled: bool | None = None) -> int:
        stmt = select(func.count()).select_from(db.schedules).where(*self._schedule_filters(enabled))
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())

    @staticmethod
    def _schedule_filters(enabled: bool | None) -> list:
        return [] if enabled is None else [db.schedules.c.enabled == bool(enabled)]

    def update_schedule(
        self, schedule_id: int, changes: dict[str, Any], *, now: datetime | None = None
    ) -> ScheduleRecord:
        """Change some of name, cron, timezone, template, enabled, warm_start, priority; KeyError if there is
        no such schedule, ValueError for an unknown field or a bad cron/time zone.

        Re-enabling a disabled schedule, or changing its cron or time zone, moves the cursor (`last_due_at`)
        to `now` (default: the current time): due times that passed while it was disabled, or under the old
        cron, are neither fired nor recorded as missed."""
        unknown = sorted(set(changes) - set(SCHEDULE_FIELDS))
        if unknown:
            raise ValueError(f"cannot change schedule field(s) {', '.join(unknown)}")
        values = dict(changes)
        if "cron" in values:
            values["cron"] = check_cron(values["cron"])
        if "timezone" in values:
            values["timezone"] = check_timezone(values["timezone"])
        for key in ("enabled", "warm_start"):
            if key in values:
                values[key] = bool(values[key])
        if "priority" in values:
            values["priority"] = int(values["priority"])
        now = _aware(now, "now") if now is not None else utcnow()
        t = db.schedules
        with self.transaction() as conn:
            row = conn.execute(select(*columns_of(ScheduleRecord, t)).where(t.c.id == schedule_id)).first()
            if row is None:
                raise KeyError(f"no schedule {schedule_id}")
            current: ScheduleRecord = record_of(ScheduleRecord, row)
            rebase = (
                (values.get("enabled") is True and not current.enabled)
                or values.get("cron", current.cron) != current.cron
                or values.get("timezone", current.timezone) != current.timezone
            )
            if rebase and (current.last_due_at is None or current.last_due_at < now):
                values["last_due_at"] = now
            values["updated_at"] = utcnow()
            conn.execute(update(t).where(t.c.id == schedule_id).values(**values))
            row = conn.execute(select(*columns_of(ScheduleRecord, t)).where(t.c.id == schedule_id)).first()
        return record_of(ScheduleRecord, row)

    def delete_schedule(self, schedule_id: int) -> bool:
        """Delete a schedule and its fire records; its jobs stay (their schedule_id becomes NULL). False if
        there was no such schedule."""
        with self.transaction() as conn:
            return conn.execute(sa_delete(db.schedules).where(db.schedules.c.id == schedule_id)).rowcount > 0

    # ---- fires

    def list_fires(
        self,
        schedule_id: int,
        limit: int | None = DEFAULT_PAGE,
        offset: int = 0,
        status: str | Iterable[str] | None = None,
    ) -> list[ScheduleFireRecord]:
        """A schedule's recorded due times, newest due time first."""
        t = db.schedule_fires
        stmt = (
            select(*columns_of(ScheduleFireRecord, t))
            .where(*self._fire_filters(schedule_id, status))
            .order_by(t.c.due_at.desc(), t.c.id.desc())
            .offset(offset)
            .limit(limit)
        )
        with self._read() as conn:
            return [record_of(ScheduleFireRecord, row) for row in conn.execute(stmt)]

    def count_fires(self, schedule_id: int, status: str | Iterable[str] | None = None) -> int:
        stmt = (
            select(func.count())
            .select_from(db.schedule_fires)
            .where(*self._fire_filters(schedule_id, status))
        )
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())

    @staticmethod
    def _fire_filters(schedule_id: int, status: str | Iterable[str] | None) -> list:
        t = db.schedule_fires
        filters = [t.c.schedule_id == schedule_id]
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            filters.append(t.c.status.in_([_check_status(s) for s in statuses]))
        return filters

    def fire(
        self,
        schedule_id: int,
        due_at: datetime,
        status: str,
        *,
        job: dict | None = None,
        reason: str | None = None,
        fired_at: datetime | None = None,
    ) -> ScheduleFireRecord | None:
        """Record one due time of a schedule, atomically and at most once.

        In one transaction: insert the (schedule_id, due_at) row (`ON CONFLICT DO NOTHING` on its unique
        constraint); if that inserted it and `status` is "fired", insert the queued search job (`job`:
        `config` and optionally `name`, `priority`, `budget`, `kind`; the values `create_job` uses,
        `schedule_id` set) and link it; move the schedule's `last_due_at` forward to `due_at`. Returns the new
        fire record (its `job_id` is the job's id), or None when that due time was already recorded (by
        anyone): then nothing changed. KeyError if the schedule does not exist.
        """
        _check_status(status)
        _aware(due_at, "due_at")
        if (status == "fired") != (job is not None):
            raise ValueError("a 'fired' fire needs its job, and only a fired one has a job")
        job_values = None
        if job is not None:
            unknown = sorted(set(job) - {"kind", "config", "name", "priority", "budget"})
            if unknown or "config" not in job:
                raise ValueError(f"job: needs 'config'; unknown key(s) {', '.join(unknown) or 'none'}")
            job_values = {
                "kind": check_value(job.get("kind", "search"), JOB_KINDS, "job kind"),
                "config": job["config"],
                "name": job.get("name"),
                "priority": int(job.get("priority", 0)),
                "budget": job.get("budget"),
                "idempotency_key": None,
                "schedule_id": schedule_id,
                "status": "queued",
                "n_evaluations": 0,
                "created_at": utcnow(),
            }
        s, f, j = db.schedules, db.schedule_fires, db.jobs
        values = {
            "schedule_id": schedule_id,
            "due_at": due_at,
            "fired_at": fired_at or utcnow(),
            "status": status,
            "job_id": None,
            "reason": reason,
        }
        stmt = (
            self._insert(f)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[f.c.schedule_id, f.c.due_at])
            .returning(*columns_of(ScheduleFireRecord, f))
        )
        with self.transaction() as conn:
            if conn.execute(select(s.c.id).where(s.c.id == schedule_id)).first() is None:
                raise KeyError(f"no schedule {schedule_id}")
            row = conn.execute(stmt).first()
            if row is None:
                return None
            record: ScheduleFireRecord = record_of(ScheduleFireRecord, row)
            if job_values is not None:
                job_id = int(conn.execute(j.insert().values(**job_values).returning(j.c.id)).scalar_one())
                conn.execute(update(f).where(f.c.id == record.id).values(job_id=job_id))
                record = ScheduleFireRecord(
                    record.id,
                    record.schedule_id,
                    record.due_at,
                    record.fired_at,
                    record.status,
                    job_id,
                    record.reason,
                )
            # Forward only; updated_at is the user's last change, not the scheduler's progress.
            conn.execute(
                update(s)
                .where(s.c.id == schedule_id, or_(s.c.last_due_at.is_(None), s.c.last_due_at < due_at))
                .values(last_due_at=due_at, updated_at=s.c.updated_at)
            )
        return record

    # ---- the schedule's jobs

    def active_schedule_job(self, schedule_id: int) -> JobRecord | None:
        """A previous run of this schedule that is still queued or running (a running one first, then the
        oldest), or None."""
        t = db.jobs
        stmt = (
            select(*columns_of(JobRecord, t))
            .where(t.c.schedule_id == schedule_id, t.c.status.in_(ACTIVE_JOB_STATUSES))
            .order_by(case((t.c.status == "running", 0), else_=1), t.c.created_at, t.c.id)
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else record_of(JobRecord, row)

    def latest_completed_schedule_job(self, schedule_id: int) -> JobRecord | None:
        """The most recently started (created) run of this schedule that completed, or None."""
        t = db.jobs
        stmt = (
            select(*columns_of(JobRecord, t))
            .where(t.c.schedule_id == schedule_id, t.c.status == "completed")
            .order_by(t.c.created_at.desc(), t.c.id.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else record_of(JobRecord, row)

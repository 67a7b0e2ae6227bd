"""The scheduler: fires each due time of each enabled schedule exactly once, even with several coordinators.

    scheduler = Scheduler(storage, grace=timedelta(minutes=15))
    stop = threading.Event()
    threading.Thread(target=scheduler.run, args=(stop, 30.0), daemon=True).start()
    ...
    stop.set()

`tick()` does one pass and returns the fire records this instance wrote. For every enabled schedule it takes
the due times after the schedule's cursor (`max(last_due_at, created_at)`) up to `clock()`, oldest first:

- older than `now - grace`: recorded as **missed** (at most `max_missed_recorded` of them, the newest; the
  oldest recorded one says that earlier ones were not recorded individually);
- else, if a previous run of the schedule is still queued or running: recorded as **skipped**, naming it;
- else the template is validated again (`SearchCreate.model_validate`; with `warm_start` on, `warm_start_job`
  is the schedule's latest completed run, or none yet: a cold start). A template that no longer validates (or
  names a warm-start search that is gone) is recorded as **failed** with the reason; otherwise the search is
  **fired**: the fire row and the queued job are written in one transaction (`Storage.fire`).

So a due time missed while every coordinator was down runs once at start if it is within the grace period
(several such due times: the first runs, the others are skipped because it is queued). Exactly once comes from
the unique (schedule_id, due_at) row, not from this process: schedulers on the same database may tick
concurrently, and of those racing on one due time one records it, the others get None from `fire()`.

Due times and DST. A cron expression (5 fields, or @daily...) is matched against **local wall-clock times** in
the schedule's time zone (zoneinfo), and each matching wall time is one due time:

- a wall time that happens once is due at that instant;
- a wall time that happens twice (the repeated hour when clocks fall back) is due once, at its **first**
  occurrence (the earlier, pre-transition offset); the second pass through that hour fires nothing;
- a wall time that does not exist (the hour skipped when clocks spring forward) is due once, at the instant
  the clocks jump, i.e. the first wall time after the gap (e.g. `30 2 * * *` in Europe/Berlin on
  2024-03-31 fires at 03:00 CEST = 01:00 UTC). Several skipped wall times, and a real wall time at that same
  instant, coalesce into that one due time.

So a daily job runs exactly once on both transition days, and nothing runs twice. Due times are stored in UTC.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from api.schemas import SearchCreate
from search.storage import ScheduleFireRecord, ScheduleRecord, Storage

log = logging.getLogger("hybridnas.api.scheduler")

DEFAULT_GRACE = timedelta(minutes=15)
DEFAULT_MAX_MISSED_RECORDED = 100
DEFAULT_INTERVAL_S = 30.0
_MAX_SCAN = 100_000  # cron matches examined per computation (a guard; never reached by a sane cron)
_LATE_NOTE = timedelta(minutes=1)


# ------------------------------------------------------------------------------------------ due times


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _croniter(cron: str, start: datetime):
    from croniter import croniter

    return croniter(cron, start)


def wall_to_utc(wall: datetime, tz: ZoneInfo) -> datetime:
    """The due instant (aware UTC) of a naive local wall time under the DST rule above: the instant itself;
    the first occurrence of a repeated one; the end of the gap for a skipped one."""
    wall = wall.replace(tzinfo=None, fold=0)
    first = wall.replace(tzinfo=tz).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # In a gap: the instant the clocks jump lies between the two readings of the wall time (PEP 495).
    a = int(min(first, wall.replace(tzinfo=tz, fold=1).astimezone(UTC)).timestamp())
    b = int(first.timestamp())
    if a > b:
        a, b = b, a
    after = datetime.fromtimestamp(b, tz).utcoffset()
    while a + 1 < b:  # invariant: offset(a) != after, offset(b) == after
        mid = (a + b) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == after:
            b = mid
        else:
            a = mid
    return datetime.fromtimestamp(b, UTC)


def _local_wall(instant: datetime, tz: ZoneInfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None, fold=0)


def due_times(
    cron: str, timezone: str, after: datetime, until: datetime, limit: int | None = None
) -> list[datetime]:
    """The due instants d (aware UTC, ascending, distinct) with `after < d <= until`, at most `limit`."""
    tz = _zone(timezone)
    # A wall time at or before after's wall time maps to an instant at or before `after` (the map is monotone
    # and a repeated wall time maps to its first occurrence), so starting there misses nothing.
    it = _croniter(cron, _local_wall(after, tz))
    out: list[datetime] = []
    for _ in range(_MAX_SCAN):
        due = wall_to_utc(it.get_next(datetime), tz)
        if due > until:
            break
        if due > after and (not out or due != out[-1]):
            out.append(due)
            if limit is not None and len(out) >= limit:
                break
    return out


def next_due_time(cron: str, timezone: str, after: datetime) -> datetime | None:
    """The first due instant strictly after `after` (None if none within the scan guard)."""
    tz = _zone(timezone)
    it = _croniter(cron, _local_wall(after, tz))
    for _ in range(_MAX_SCAN):
        due = wall_to_utc(it.get_next(datetime), tz)
        if due > after:
            return due
    return None


def last_due_times(
    cron: str, timezone: str, before: datetime, after: datetime, n: int
) -> tuple[list[datetime], bool]:
    """Up to `n` newest due instants d with `after < d < before` (ascending), and whether older ones (still
    after `after`) were left out. Walks backwards, so its cost does not grow with how long ago `after` is."""
    tz = _zone(timezone)
    local = before.astimezone(tz)
    wall = local.replace(tzinfo=None, fold=0)
    if (
        local.fold == 1
    ):  # in the second pass of a repeated hour: later wall times of it are due before `before`
        wall += local.replace(fold=0).utcoffset() - local.utcoffset()
    it = _croniter(cron, wall)
    out: list[datetime] = []
    more = False
    for _ in range(_MAX_SCAN):
        due = wall_to_utc(it.get_prev(datetime), tz)
        if due <= after:
            break
        if due >= before or (out and due == out[-1]):
            continue
        if len(out) >= n:
            more = True
            break
        out.append(due)
    out.reverse()
    return out, more


def local_time(instant: datetime, timezone: str) -> datetime:
    return instant.astimezone(_zone(timezone))


# ------------------------------------------------------------------------------------------ the scheduler


def _utc_clock() -> datetime:
    return datetime.now(UTC)


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'template'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )


class Scheduler:
    """Fires the schedules stored in `storage` (see the module docstring).

    clock: returns the current time, timezone-aware (tests inject a fake one); default: the system clock in
    UTC. grace: a due time older than clock() - grace is recorded as missed instead of run.
    max_missed_recorded: at most this many missed due times (the newest) are recorded per catch-up.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        clock: Callable[[], datetime] | None = None,
        grace: timedelta = DEFAULT_GRACE,
        max_missed_recorded: int = DEFAULT_MAX_MISSED_RECORDED,
    ):
        if grace < timedelta(0):
            raise ValueError("grace must not be negative")
        if max_missed_recorded < 1:
            raise ValueError("max_missed_recorded must be at least 1")
        self.storage = storage
        self.clock = clock or _utc_clock
        self.grace = grace
        self.max_missed_recorded = int(max_missed_recorded)

    def now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("the scheduler's clock returned a naive datetime: it must be timezone-aware")
        return now.astimezone(UTC)

    # ---- one pass

    def tick(self) -> list[ScheduleFireRecord]:
        """One pass over the enabled schedules; the fire records this call wrote (due times another scheduler
        recorded first are not in it). A schedule that raises is logged and retried on the next tick."""
        now = self.now()
        done: list[ScheduleFireRecord] = []
        for schedule in self.storage.list_schedules(enabled=True, limit=None):
            try:
                done.extend(self.tick_schedule(schedule, now))
            except KeyError:
                log.info("schedule %s was deleted during the tick", schedule.id)
            except Exception:  # noqa: BLE001 - one bad schedule (or a database hiccup) must not stop the rest
                log.exception("schedule %s: tick failed; retried on the next tick", schedule.id)
        return done

    def tick_schedule(self, schedule: ScheduleRecord, now: datetime) -> list[ScheduleFireRecord]:
        cursor = schedule.cursor
        if cursor >= now:
            return []
        horizon = now - self.grace
        done: list[ScheduleFireRecord] = []
        if cursor < horizon:
            missed, more = last_due_times(
                schedule.cron, schedule.timezone, horizon, cursor, self.max_missed_recorded
            )
            for i, due in enumerate(missed):
                reason = (
                    f"due {local_time(due, schedule.timezone).isoformat()} was more than {self.grace} before "
                    f"a scheduler ran ({now.isoformat()})"
                )
                if i == 0 and more:
                    reason += (
                        f"; earlier due times since {cursor.isoformat()} were missed too and not recorded "
                        f"individually (at most {self.max_missed_recorded} are)"
                    )
                self._record(done, schedule.id, due, "missed", now, reason=reason)
            cursor = max(cursor, horizon - timedelta(microseconds=1))  # d > cursor now means d >= horizon
        for due in due_times(schedule.cron, schedule.timezone, cursor, now):
            self._due(done, schedule, due, now)
        return done

    def _due(
        self, done: list[ScheduleFireRecord], schedule: ScheduleRecord, due: datetime, now: datetime
    ) -> None:
        active = self.storage.active_schedule_job(schedule.id)
        if active is not None:
            self._record(
                done,
                schedule.id,
                due,
                "skipped",
                now,
                reason=f"the previous run (search {active.id}) is still {active.status}",
            )
            return
        try:
            job = self._job(schedule)
        except ValidationError as exc:
            self._record(
                done,
                schedule.id,
                due,
                "failed",
                now,
                reason=f"the template no longer validates: {_errors(exc)}"[:2000],
            )
            return
        except ValueError as exc:
            self._record(done, schedule.id, due, "failed", now, reason=str(exc)[:2000])
            return
        late = now - due
        reason = (
            f"late by {late - timedelta(microseconds=late.microseconds)} (within the grace period)"
            if late > _LATE_NOTE
            else None
        )
        self._record(done, schedule.id, due, "fired", now, job=job, reason=reason)

    def _job(self, schedule: ScheduleRecord) -> dict:
        """The job values of one run: the template validated now, named, with its warm start."""
        if not isinstance(schedule.template, dict):
            raise ValueError("template: not a JSON object")
        template = {k: v for k, v in schedule.template.items() if k != "priority"}
        template["name"] = template.get("name") or schedule.name
        if schedule.warm_start:
            previous = self.storage.latest_completed_schedule_job(schedule.id)
            template["warm_start_job"] = None if previous is None else previous.id
        body = SearchCreate.model_validate(template)
        if body.warm_start_job is not None and self.storage.get_job(body.warm_start_job) is None:
            raise ValueError(f"warm_start_job: no search {body.warm_start_job} to warm-start from")
        return {
            "kind": "search",
            "config": body.search_config(),
            "name": body.name,
            "priority": schedule.priority,
            "budget": body.budget,
        }

    def _record(
        self,
        done: list[ScheduleFireRecord],
        schedule_id: int,
        due: datetime,
        status: str,
        now: datetime,
        *,
        job: dict | None = None,
        reason: str | None = None,
    ) -> None:
        record = self.storage.fire(schedule_id, due, status, job=job, reason=reason, fired_at=now)
        if record is None:
            log.debug(
                "schedule %s: due %s already recorded by another scheduler", schedule_id, due.isoformat()
            )
            return
        if status == "fired":
            log.info("schedule %s: due %s fired search %s", schedule_id, due.isoformat(), record.job_id)
        else:
            log.info("schedule %s: due %s %s: %s", schedule_id, due.isoformat(), status, reason)
        done.append(record)

    # ---- background

    def run(self, stop: threading.Event, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        """Tick every `interval_s` seconds until `stop` is set (for a background thread). Errors are logged,
        never raised: the next tick retries."""
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the database may be down: keep the thread alive
                log.exception("scheduler tick failed; retrying in %.0f s", interval_s)
            stop.wait(interval_s)

    def start(self, interval_s: float = DEFAULT_INTERVAL_S) -> tuple[threading.Thread, threading.Event]:
        """`run` in a daemon thread; set the returned event (then join the thread) to stop it."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self.run, args=(stop, interval_s), name="hybridnas-scheduler", daemon=True
        )
        thread.start()
        return thread, stop

"""Nightly schedules of searches: storage (SQLite and PostgreSQL), the scheduler with an injected clock
(exactly once, missed, skipped, warm start, DST), concurrent schedulers in threads and processes, and the REST
routes."""

from __future__ import annotations

import multiprocessing
import threading
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import StatementError

from api.app import create_app
from api.auth import Auth
from api.scheduler import Scheduler, due_times, last_due_times, next_due_time, wall_to_utc
from api.schemas import SearchCreate
from api.settings import Settings
from search import db
from search.storage import Storage
from tests import pg

storage = pg.storage

TOKEN = "schedule-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GRACE = timedelta(minutes=15)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, *args: int) -> datetime:
        self.now = utc(*args)
        return self.now


def _schedule(
    store: Storage,
    cron: str = "0 2 * * *",
    timezone: str = "UTC",
    created: datetime | None = None,
    template: dict | None = None,
    **kw,
) -> int:
    return store.create_schedule(
        kw.pop("name", "nightly"),
        cron,
        template if template is not None else {"budget": 4},
        timezone=timezone,
        created_at=created or utc(2024, 6, 3),
        **kw,
    )


def _count(store: Storage, table, *where) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def _jobs(store: Storage, schedule_id: int | None = None) -> list:
    jobs = store.list_jobs(limit=None)
    if schedule_id is not None:
        jobs = [j for j in jobs if j.schedule_id == schedule_id]
    return sorted(jobs, key=lambda j: j.id)


def _fires(store: Storage, schedule_id: int) -> list[tuple[datetime, str]]:
    return [(f.due_at, f.status) for f in reversed(store.list_fires(schedule_id, limit=None))]


def _complete_all(store: Storage) -> None:
    for job in store.list_jobs(status=("queued", "running"), limit=None):
        store.set_job_status(job.id, "completed")


# ---------------------------------------------------------------------------------------------- storage


def test_schedule_crud(storage):
    sid = _schedule(storage, "0 2 * * *", "Europe/Berlin", warm_start=True, priority=5)
    s = storage.get_schedule(sid)
    assert (s.name, s.cron, s.timezone, s.template, s.enabled, s.warm_start, s.priority) == (
        "nightly",
        "0 2 * * *",
        "Europe/Berlin",
        {"budget": 4},
        True,
        True,
        5,
    )
    assert s.created_at == utc(2024, 6, 3) and s.last_due_at is None and s.cursor == utc(2024, 6, 3)
    other = _schedule(storage, "@daily", enabled=False, name="off")
    assert [x.id for x in storage.list_schedules()] == [sid, other]
    assert [x.id for x in storage.list_schedules(enabled=True)] == [sid]
    assert [x.id for x in storage.list_schedules(limit=1, offset=1)] == [other]
    assert storage.count_schedules() == 2 and storage.count_schedules(enabled=False) == 1

    # A rename keeps the cursor; a new cron (or time zone, or re-enabling) starts due times from `now`.
    renamed = storage.update_schedule(sid, {"name": "renamed", "priority": -3}, now=utc(2024, 6, 10))
    assert (renamed.name, renamed.priority, renamed.last_due_at) == ("renamed", -3, None)
    moved = storage.update_schedule(sid, {"cron": "15 3 * * *"}, now=utc(2024, 6, 10))
    assert moved.cron == "15 3 * * *" and moved.last_due_at == utc(2024, 6, 10)
    assert storage.update_schedule(sid, {"cron": "15 3 * * *"}, now=utc(2024, 6, 12)).last_due_at == utc(
        2024, 6, 10
    )
    enabled = storage.update_schedule(other, {"enabled": True}, now=utc(2024, 6, 11))
    assert enabled.enabled and enabled.last_due_at == utc(2024, 6, 11)

    with pytest.raises(KeyError):
        storage.update_schedule(99999, {"name": "x"})
    with pytest.raises(ValueError, match="cannot change"):
        storage.update_schedule(sid, {"last_due_at": utc(2030, 1, 1)})
    with pytest.raises(ValueError, match="5 fields"):
        storage.update_schedule(sid, {"cron": "0 2 * * * *"})
    with pytest.raises(ValueError, match="time zone"):
        _schedule(storage, timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="never matches"):
        _schedule(storage, cron="0 0 31 2 *")

    # Delete: its fires go with it, its jobs stay (schedule_id NULL).
    fire = storage.fire(sid, utc(2024, 6, 11, 1, 15), "fired", job={"config": {"budget": 4}})
    assert storage.delete_schedule(sid) is True and storage.delete_schedule(sid) is False
    assert storage.get_schedule(sid) is None
    assert _count(storage, db.schedule_fires) == 0
    assert storage.get_job(fire.job_id).schedule_id is None


def test_fire_records_once_with_its_job_in_one_transaction(storage):
    sid = _schedule(storage, priority=7)
    due = utc(2024, 6, 4, 2)
    job = {"config": {"budget": 4, "name": "nightly"}, "name": "nightly", "priority": 7, "budget": 4}
    rec = storage.fire(sid, due, "fired", job=job, fired_at=utc(2024, 6, 4, 2, 0, 5))
    assert (rec.schedule_id, rec.due_at, rec.status, rec.fired_at) == (
        sid,
        due,
        "fired",
        utc(2024, 6, 4, 2, 0, 5),
    )
    queued = storage.get_job(rec.job_id)
    assert (
        queued.kind,
        queued.status,
        queued.schedule_id,
        queued.priority,
        queued.budget,
        queued.name,
        queued.config,
    ) == ("search", "queued", sid, 7, 4, "nightly", {"budget": 4, "name": "nightly"})
    assert storage.get_schedule(sid).last_due_at == due

    # The same due time again, as any status: nothing changes.
    assert storage.fire(sid, due, "fired", job=job) is None
    assert storage.fire(sid, due, "missed", reason="late") is None
    assert _count(storage, db.jobs) == 1 and _count(storage, db.schedule_fires) == 1

    # An older due time is recorded but never moves the cursor back.
    missed = storage.fire(sid, utc(2024, 6, 3, 2), "missed", reason="down")
    assert missed.job_id is None and missed.reason == "down"
    assert storage.get_schedule(sid).last_due_at == due
    storage.fire(sid, utc(2024, 6, 5, 2), "skipped", reason="busy")
    assert [f.due_at for f in storage.list_fires(sid)] == [utc(2024, 6, 5, 2), due, utc(2024, 6, 3, 2)]
    assert [f.status for f in storage.list_fires(sid, limit=1, offset=1)] == ["fired"]
    assert storage.count_fires(sid) == 3 and storage.count_fires(sid, status=("missed", "skipped")) == 2

    # A job that cannot be written rolls the fire row back with it: the due time stays open.
    with pytest.raises((TypeError, StatementError), match="not JSON serializable"):
        storage.fire(sid, utc(2024, 6, 6, 2), "fired", job={"config": {"x": object()}})
    assert storage.count_fires(sid) == 3 and _count(storage, db.jobs) == 1
    assert storage.get_schedule(sid).last_due_at == utc(2024, 6, 5, 2)

    with pytest.raises(ValueError, match="fire status"):
        storage.fire(sid, utc(2024, 6, 7), "exploded")
    with pytest.raises(ValueError, match="needs its job"):
        storage.fire(sid, utc(2024, 6, 7), "fired")
    with pytest.raises(ValueError, match="aware"):
        storage.fire(sid, datetime(2024, 6, 7), "missed")
    with pytest.raises(KeyError):
        storage.fire(99999, utc(2024, 6, 7), "missed")


def test_active_and_latest_completed_jobs(storage):
    sid = _schedule(storage)
    assert storage.active_schedule_job(sid) is None and storage.latest_completed_schedule_job(sid) is None
    first = storage.fire(sid, utc(2024, 6, 4, 2), "fired", job={"config": {}}).job_id
    second = storage.fire(sid, utc(2024, 6, 5, 2), "fired", job={"config": {}}).job_id
    storage.create_job("search", {})  # not the schedule's
    assert storage.active_schedule_job(sid).id == first
    storage.set_job_status(second, "running")
    assert storage.active_schedule_job(sid).id == second  # a running one first
    storage.set_job_status(first, "completed")
    storage.set_job_status(second, "failed")
    assert storage.active_schedule_job(sid) is None
    assert storage.latest_completed_schedule_job(sid).id == first
    third = storage.fire(sid, utc(2024, 6, 6, 2), "fired", job={"config": {}}).job_id
    storage.set_job_status(third, "completed")
    assert storage.latest_completed_schedule_job(sid).id == third


# ---------------------------------------------------------------------------------------------- the scheduler


def test_fires_exactly_once_per_due_time(storage):
    sid = _schedule(storage, "0 2 * * *", created=utc(2024, 6, 3))
    clock = Clock(utc(2024, 6, 3, 1, 59))
    scheduler = Scheduler(storage, clock=clock)
    assert scheduler.tick() == []
    clock.set(2024, 6, 3, 2, 0)
    [rec] = scheduler.tick()
    assert (rec.due_at, rec.status, rec.reason) == (utc(2024, 6, 3, 2), "fired", None)
    for minute in (0, 1, 10, 14, 16, 59):
        clock.set(2024, 6, 3, 2, minute)
        assert scheduler.tick() == []
        assert Scheduler(storage, clock=clock).tick() == []  # a second coordinator sees it done too
    assert [j.id for j in _jobs(storage, sid)] == [rec.job_id]
    _complete_all(storage)
    clock.set(2024, 6, 4, 2, 0, 5)
    [rec2] = scheduler.tick()
    assert (rec2.due_at, rec2.status) == (utc(2024, 6, 4, 2), "fired")
    assert scheduler.tick() == []
    assert len(_jobs(storage, sid)) == 2
    assert _fires(storage, sid) == [(utc(2024, 6, 3, 2), "fired"), (utc(2024, 6, 4, 2), "fired")]
    assert storage.get_schedule(sid).last_due_at == utc(2024, 6, 4, 2)


def test_missed_beyond_grace_and_late_within_grace_runs_once(storage):
    sid = _schedule(storage, "0 * * * *", created=utc(2024, 6, 3))  # hourly
    clock = Clock(utc(2024, 6, 3, 5, 10))  # every coordinator was down until 05:10
    done = Scheduler(storage, clock=clock, grace=GRACE).tick()
    assert [(r.due_at, r.status) for r in done] == [
        (utc(2024, 6, 3, 1), "missed"),
        (utc(2024, 6, 3, 2), "missed"),
        (utc(2024, 6, 3, 3), "missed"),
        (utc(2024, 6, 3, 4), "missed"),
        (utc(2024, 6, 3, 5), "fired"),
    ]
    assert "late by 0:10:00" in done[-1].reason
    assert "more than 0:15:00" in done[0].reason
    assert len(_jobs(storage, sid)) == 1
    assert Scheduler(storage, clock=clock, grace=GRACE).tick() == []

    # Several due times within the grace period: the first runs, the others find it queued.
    other = _schedule(storage, "*/5 * * * *", created=utc(2024, 6, 3, 5), name="five")
    clock.set(2024, 6, 3, 5, 12)
    done = [r for r in Scheduler(storage, clock=clock, grace=GRACE).tick() if r.schedule_id == other]
    assert [(r.due_at, r.status) for r in done] == [
        (utc(2024, 6, 3, 5, 5), "fired"),
        (utc(2024, 6, 3, 5, 10), "skipped"),
    ]
    assert len(_jobs(storage, other)) == 1


def test_missed_recording_is_capped_and_cheap(storage):
    sid = _schedule(storage, "* * * * *", created=utc(2023, 6, 3))  # every minute, down for a year
    clock = Clock(utc(2024, 6, 3, 0, 0, 30))
    done = Scheduler(storage, clock=clock, grace=GRACE, max_missed_recorded=5).tick()
    missed = [r for r in done if r.status == "missed"]
    assert [r.due_at for r in missed] == [utc(2024, 6, 2, 23, m) for m in range(41, 46)]
    assert "not recorded individually" in missed[0].reason
    assert all("not recorded" not in r.reason for r in missed[1:])
    rest = [(r.due_at, r.status) for r in done if r.status != "missed"]
    assert rest[0] == (utc(2024, 6, 2, 23, 46), "fired")
    assert rest[1:] == [(utc(2024, 6, 2, 23, 47) + timedelta(minutes=i), "skipped") for i in range(14)]
    assert len(_jobs(storage, sid)) == 1 and storage.count_fires(sid) == 20


def test_skipped_while_previous_run_is_queued_or_running(storage):
    sid = _schedule(storage, "0 2 * * *", created=utc(2024, 6, 3))
    clock = Clock(utc(2024, 6, 3, 2, 1))
    scheduler = Scheduler(storage, clock=clock)
    [first] = scheduler.tick()
    clock.set(2024, 6, 4, 2, 1)
    [skipped] = scheduler.tick()
    assert (skipped.status, skipped.job_id) == ("skipped", None)
    assert skipped.reason == f"the previous run (search {first.job_id}) is still queued"
    storage.set_job_status(first.job_id, "running")
    clock.set(2024, 6, 5, 2, 1)
    [skipped] = scheduler.tick()
    assert skipped.reason == f"the previous run (search {first.job_id}) is still running"
    storage.set_job_status(first.job_id, "completed")
    clock.set(2024, 6, 6, 2, 1)
    [fired] = scheduler.tick()
    assert fired.status == "fired" and fired.job_id != first.job_id
    assert _fires(storage, sid) == [
        (utc(2024, 6, 3, 2), "fired"),
        (utc(2024, 6, 4, 2), "skipped"),
        (utc(2024, 6, 5, 2), "skipped"),
        (utc(2024, 6, 6, 2), "fired"),
    ]
    assert len(_jobs(storage, sid)) == 2


def test_warm_start_from_the_latest_completed_run(storage):
    sid = _schedule(storage, "0 2 * * *", created=utc(2024, 6, 3), warm_start=True)
    cold = _schedule(storage, "0 2 * * *", created=utc(2024, 6, 3), name="cold")
    clock = Clock(utc(2024, 6, 3, 2, 1))
    scheduler = Scheduler(storage, clock=clock)

    def run_day(day: int, outcome: str) -> int:
        clock.set(2024, 6, day, 2, 1)
        fired = {r.schedule_id: r for r in scheduler.tick()}
        for rec in fired.values():
            storage.set_job_status(rec.job_id, outcome)
        return fired[sid].job_id, fired[cold].job_id

    day1, cold1 = run_day(3, "completed")
    assert storage.get_job(day1).config["warm_start_job"] is None  # nothing to start from yet: cold
    day2, _ = run_day(4, "failed")
    assert storage.get_job(day2).config["warm_start_job"] == day1
    day3, _ = run_day(5, "completed")
    assert (
        storage.get_job(day3).config["warm_start_job"] == day1
    )  # day 2 failed: day 1 is the latest completed
    day4, cold4 = run_day(6, "completed")
    assert storage.get_job(day4).config["warm_start_job"] == day3
    assert storage.get_job(cold4).config["warm_start_job"] is None


def test_job_values_follow_template_and_schedule(storage):
    template = {"budget": 8, "strategy": "random", "seed": 3}
    sid = _schedule(
        storage, "0 2 * * *", created=utc(2024, 6, 3), template=template, priority=9, name="nightly-x"
    )
    clock = Clock(utc(2024, 6, 3, 2))
    [rec] = Scheduler(storage, clock=clock).tick()
    job = storage.get_job(rec.job_id)
    expected = SearchCreate.model_validate({**template, "name": "nightly-x", "warm_start_job": None})
    assert job.config == expected.search_config()
    assert (job.name, job.priority, job.budget, job.kind, job.schedule_id) == (
        "nightly-x",
        9,
        8,
        "search",
        sid,
    )


def test_template_that_no_longer_validates_is_recorded_as_failed(storage):
    sid = _schedule(
        storage, "0 2 * * *", created=utc(2024, 6, 3), template={"strategy": "retired", "budget": 4}
    )
    gone = _schedule(
        storage, "0 2 * * *", created=utc(2024, 6, 3), template={"warm_start_job": 424242}, name="g"
    )
    clock = Clock(utc(2024, 6, 3, 2, 1))
    scheduler = Scheduler(storage, clock=clock)
    done = {r.schedule_id: r for r in scheduler.tick()}
    assert done[sid].status == "failed" and done[sid].job_id is None
    assert done[sid].reason.startswith(
        "the template no longer validates: strategy: unknown strategy 'retired'"
    )
    assert done[gone].status == "failed" and "no search 424242" in done[gone].reason
    assert scheduler.tick() == []
    assert _count(storage, db.jobs) == 0 and storage.count_fires(sid) == 1


def test_disabled_schedules_do_not_fire(storage):
    sid = _schedule(storage, "0 * * * *", created=utc(2024, 6, 3), enabled=False)
    clock = Clock(utc(2024, 6, 3, 1, 0))
    scheduler = Scheduler(storage, clock=clock)
    for hour in range(1, 6):
        clock.set(2024, 6, 3, hour, 0)
        assert scheduler.tick() == []
    assert storage.count_fires(sid) == 0 and _count(storage, db.jobs) == 0
    # Enabled again at 05:05: the hours it was off are neither fired nor recorded as missed.
    storage.update_schedule(sid, {"enabled": True}, now=utc(2024, 6, 3, 5, 5))
    clock.set(2024, 6, 3, 5, 10)
    assert scheduler.tick() == []
    clock.set(2024, 6, 3, 6, 0)
    assert [(r.due_at, r.status) for r in scheduler.tick()] == [(utc(2024, 6, 3, 6), "fired")]
    storage.update_schedule(sid, {"enabled": False})
    clock.set(2024, 6, 3, 7, 0)
    assert scheduler.tick() == []


def test_clock_must_be_aware_and_a_bad_stored_template_fails_alone(storage):
    with pytest.raises(ValueError, match="naive"):
        Scheduler(storage, clock=lambda: datetime(2024, 6, 3)).tick()
    with pytest.raises(ValueError, match="template"):
        _schedule(storage, template=["not", "an", "object"])
    sid = _schedule(storage, "0 2 * * *", created=utc(2024, 6, 3))
    with storage.transaction() as conn:  # written by something else, or an older version
        conn.execute(
            db.schedules.update().where(db.schedules.c.id == sid).values(template=["not", "an", "object"])
        )
    ok = _schedule(storage, "0 2 * * *", created=utc(2024, 6, 3), name="ok")
    done = Scheduler(storage, clock=Clock(utc(2024, 6, 3, 2))).tick()
    assert {(r.schedule_id, r.status) for r in done} == {(sid, "failed"), (ok, "fired")}


def test_a_schedule_deleted_during_a_tick_is_left_alone(storage, monkeypatch):
    gone = _schedule(storage, "0 2 * * *", created=utc(2024, 6, 3))
    kept = _schedule(storage, "0 2 * * *", created=utc(2024, 6, 3), name="kept")
    stale = storage.list_schedules(limit=None)  # what a scheduler read before the delete
    storage.delete_schedule(gone)
    monkeypatch.setattr(storage, "list_schedules", lambda **kw: stale)
    done = Scheduler(storage, clock=Clock(utc(2024, 6, 3, 2))).tick()
    assert [(r.schedule_id, r.status) for r in done] == [(kept, "fired")]
    assert [j.schedule_id for j in _jobs(storage)] == [kept]


def test_run_ticks_in_a_thread_until_stopped(storage):
    _schedule(storage, "* * * * *", created=utc(2024, 6, 3))
    clock = Clock(utc(2024, 6, 3, 0, 1))
    scheduler = Scheduler(storage, clock=clock)
    thread, stop = scheduler.start(interval_s=0.01)
    try:
        for _ in range(500):
            if _count(storage, db.jobs) == 1:
                break
            threading.Event().wait(0.01)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert _count(storage, db.jobs) == 1 and _count(storage, db.schedule_fires) == 1


# ---------------------------------------------------------------------------------------------- DST


@pytest.mark.parametrize(
    ("cron", "tz", "start", "end", "expected"),
    [
        # Spring forward, Europe/Berlin 2024-03-31 02:00 CET -> 03:00 CEST: 02:30 does not exist, runs at
        # 03:00 CEST.
        (
            "30 2 * * *",
            "Europe/Berlin",
            utc(2024, 3, 29),
            utc(2024, 4, 2),
            [
                utc(2024, 3, 29, 1, 30),
                utc(2024, 3, 30, 1, 30),
                utc(2024, 3, 31, 1, 0),
                utc(2024, 4, 1, 0, 30),
            ],
        ),
        # Hourly across the gap: 02:00 (gone) and 03:00 are one instant, fired once.
        (
            "0 * * * *",
            "Europe/Berlin",
            utc(2024, 3, 30, 23),
            utc(2024, 3, 31, 2, 30),
            [utc(2024, 3, 31, 0), utc(2024, 3, 31, 1), utc(2024, 3, 31, 2)],
        ),
        # Fall back, Europe/Berlin 2024-10-27 03:00 CEST -> 02:00 CET: 02:30 happens twice, runs at the first.
        (
            "30 2 * * *",
            "Europe/Berlin",
            utc(2024, 10, 25),
            utc(2024, 10, 29),
            [
                utc(2024, 10, 25, 0, 30),
                utc(2024, 10, 26, 0, 30),
                utc(2024, 10, 27, 0, 30),
                utc(2024, 10, 28, 1, 30),
            ],
        ),
        # Every 30 minutes through the repeated hour: 02:00 and 02:30 once each (CEST), nothing at
        # 01:00Z/01:30Z.
        (
            "*/30 * * * *",
            "Europe/Berlin",
            utc(2024, 10, 26, 23, 15),
            utc(2024, 10, 27, 2, 10),
            [utc(2024, 10, 26, 23, 30), utc(2024, 10, 27, 0), utc(2024, 10, 27, 0, 30), utc(2024, 10, 27, 2)],
        ),
        # Starting inside the second pass of the repeated hour: its wall times were already due (first pass).
        (
            "*/30 * * * *",
            "Europe/Berlin",
            utc(2024, 10, 27, 1, 10),
            utc(2024, 10, 27, 2, 40),
            [utc(2024, 10, 27, 2), utc(2024, 10, 27, 2, 30)],
        ),
        # America/New_York: spring forward 2024-03-10 02:00 EST -> 03:00 EDT.
        (
            "30 2 * * *",
            "America/New_York",
            utc(2024, 3, 9),
            utc(2024, 3, 12),
            [utc(2024, 3, 9, 7, 30), utc(2024, 3, 10, 7, 0), utc(2024, 3, 11, 6, 30)],
        ),
        # America/New_York: fall back 2024-11-03 02:00 EDT -> 01:00 EST: 01:30 twice, runs at 01:30 EDT.
        (
            "30 1 * * *",
            "America/New_York",
            utc(2024, 11, 2),
            utc(2024, 11, 5),
            [utc(2024, 11, 2, 5, 30), utc(2024, 11, 3, 5, 30), utc(2024, 11, 4, 6, 30)],
        ),
        ("@daily", "UTC", utc(2024, 2, 28), utc(2024, 3, 1, 12), [utc(2024, 2, 29), utc(2024, 3, 1)]),
    ],
)
def test_due_times_across_dst(cron, tz, start, end, expected):
    assert due_times(cron, tz, start, end) == expected
    assert next_due_time(cron, tz, start) == expected[0]
    # Walking backwards gives the same instants (the catch-up of missed due times uses it).
    back, more = last_due_times(cron, tz, end + timedelta(microseconds=1), start, len(expected))
    assert back == expected and more is False
    assert last_due_times(cron, tz, end + timedelta(microseconds=1), start, 1) == (expected[-1:], True)


def test_wall_to_utc_rule():
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    assert wall_to_utc(datetime(2024, 3, 31, 2, 30), berlin) == utc(2024, 3, 31, 1)  # gap: when clocks jump
    assert wall_to_utc(datetime(2024, 3, 31, 2, 0), berlin) == utc(2024, 3, 31, 1)
    assert wall_to_utc(datetime(2024, 10, 27, 2, 30), berlin) == utc(2024, 10, 27, 0, 30)  # repeated: first
    assert wall_to_utc(datetime(2024, 10, 27, 2, 30, fold=1), berlin) == utc(2024, 10, 27, 0, 30)
    assert wall_to_utc(datetime(2024, 6, 1, 12), berlin) == utc(2024, 6, 1, 10)
    # A 30-minute gap (Australia/Lord_Howe, 2024-10-06 02:00 -> 02:30 local).
    assert wall_to_utc(datetime(2024, 10, 6, 2, 15), ZoneInfo("Australia/Lord_Howe")) == utc(
        2024, 10, 5, 15, 30
    )


@pytest.mark.parametrize(
    ("tz", "cron", "start", "end", "expected"),
    [
        (
            "Europe/Berlin",
            "30 2 * * *",
            utc(2024, 3, 30, 12),
            utc(2024, 4, 1, 12),
            [utc(2024, 3, 31, 1), utc(2024, 4, 1, 0, 30)],
        ),
        (
            "Europe/Berlin",
            "30 2 * * *",
            utc(2024, 10, 26, 12),
            utc(2024, 10, 28, 12),
            [utc(2024, 10, 27, 0, 30), utc(2024, 10, 28, 1, 30)],
        ),
        (
            "Europe/Berlin",
            "*/30 * * * *",
            utc(2024, 10, 26, 23),
            utc(2024, 10, 27, 2, 40),
            [
                utc(2024, 10, 26, 23, 30),
                utc(2024, 10, 27, 0),
                utc(2024, 10, 27, 0, 30),
                utc(2024, 10, 27, 2),
                utc(2024, 10, 27, 2, 30),
            ],
        ),
        (
            "America/New_York",
            "30 2 * * *",
            utc(2024, 3, 9, 12),
            utc(2024, 3, 11, 12),
            [utc(2024, 3, 10, 7), utc(2024, 3, 11, 6, 30)],
        ),
        (
            "America/New_York",
            "30 1 * * *",
            utc(2024, 11, 2, 12),
            utc(2024, 11, 4, 12),
            [utc(2024, 11, 3, 5, 30), utc(2024, 11, 4, 6, 30)],
        ),
    ],
)
def test_scheduler_fires_once_on_dst_days(tmp_path, tz, cron, start, end, expected):
    with pg.migrated_url("sqlite", tmp_path) as url, Storage(url) as store:
        sid = _schedule(store, cron, tz, created=start)
        clock = Clock(start)
        scheduler = Scheduler(store, clock=clock, grace=GRACE)
        fired = []
        while clock.now <= end:  # a coordinator ticking every 10 minutes; each run finishes before the next
            done = [r.due_at for r in scheduler.tick() if r.status == "fired"]
            if done:
                fired += done
                _complete_all(store)
            clock.now += timedelta(minutes=10)
        assert fired == expected
        assert _fires(store, sid) == [(d, "fired") for d in expected]
        assert len(_jobs(store, sid)) == len(expected)


# ---------------------------------------------------------------------------------------------- concurrency


def _setup_race(store: Storage) -> tuple[int, int, int]:
    nightly = _schedule(store, "0 2 * * *", created=utc(2024, 6, 3), name="nightly")
    hourly = _schedule(store, "0 * * * *", created=utc(2024, 6, 3), name="hourly")
    off = _schedule(store, "* * * * *", created=utc(2024, 6, 3), name="off", enabled=False)
    return nightly, hourly, off


def _check_race(store: Storage, records: list[tuple], ids: tuple[int, int, int], day: int) -> None:
    nightly, hourly, off = ids
    # Each due time recorded exactly once, by exactly one of the schedulers.
    keys = [(sid, due) for sid, due, _status, _job in records]
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(
        (f.schedule_id, f.due_at) for s in (nightly, hourly, off) for f in store.list_fires(s, limit=None)
    )
    for sid in (nightly, hourly):  # exactly one job per schedule per day, the one the fire row names
        jobs = _jobs(store, sid)
        assert len(jobs) == day - 2, (sid, jobs)
        fired = [(due, job) for s, due, status, job in records if s == sid and status == "fired"]
        assert sorted(j.id for j in jobs) == sorted(job for _due, job in fired)
    assert [f.due_at for f in store.list_fires(nightly, status="fired", limit=None)] == [
        utc(2024, 6, d, 2) for d in range(day, 2, -1)
    ]
    assert [f.due_at for f in store.list_fires(hourly, status="fired", limit=None)] == [
        utc(2024, 6, d, 2) for d in range(day, 2, -1)
    ]
    assert store.count_fires(off) == 0


def test_concurrent_schedulers_in_threads_fire_once(storage):
    ids = _setup_race(storage)
    n = 4
    stores = [Storage(storage.url) for _ in range(n)]
    clock = Clock(utc(2024, 6, 3, 2, 5))
    records: list[tuple] = []
    lock = threading.Lock()
    try:
        for day in (3, 4, 5):
            clock.set(2024, 6, day, 2, 5)
            barrier = threading.Barrier(n)
            errors: list[BaseException] = []

            def run(store: Storage, barrier: threading.Barrier = barrier, errors: list = errors) -> None:
                try:
                    scheduler = Scheduler(store, clock=clock, grace=GRACE)
                    barrier.wait(timeout=30)
                    got = scheduler.tick()
                    with lock:
                        records.extend((r.schedule_id, r.due_at, r.status, r.job_id) for r in got)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(s,)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert errors == []
            _check_race(storage, records, ids, day)
            _complete_all(storage)
    finally:
        for s in stores:
            s.close()


def _tick_in_process(url: str, now_iso: str, barrier, results) -> None:
    store = Storage(url)
    try:
        scheduler = Scheduler(store, clock=lambda: datetime.fromisoformat(now_iso), grace=GRACE)
        barrier.wait(timeout=120)
        results.put([(r.schedule_id, r.due_at.isoformat(), r.status, r.job_id) for r in scheduler.tick()])
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(("error", repr(exc)))
    finally:
        store.close()


@pytest.mark.parametrize("backend", pg.BACKENDS)
def test_concurrent_scheduler_processes_fire_once(backend, tmp_path):
    with pg.migrated_url(backend, tmp_path) as url, Storage(url) as store:
        ids = _setup_race(store)
        ctx = multiprocessing.get_context("spawn")
        n = 3
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [
            ctx.Process(
                target=_tick_in_process, args=(url, utc(2024, 6, 3, 2, 5).isoformat(), barrier, results)
            )
            for _ in range(n)
        ]
        for p in procs:
            p.start()
        got = [results.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert all(not (isinstance(r, tuple) and r[0] == "error") for r in got), got
        records = [
            (sid, datetime.fromisoformat(due), status, job) for r in got for sid, due, status, job in r
        ]
        _check_race(store, records, ids, 3)
        assert _count(store, db.jobs) == 2
        # The hourly schedule's 01:00 was missed (more than 15 minutes before 02:05), recorded once.
        assert _fires(store, ids[1]) == [(utc(2024, 6, 3, 1), "missed"), (utc(2024, 6, 3, 2), "fired")]


# ---------------------------------------------------------------------------------------------- REST routes


@pytest.fixture(scope="module")
def api_storage(tmp_path_factory):
    store = Storage(f"sqlite:///{tmp_path_factory.mktemp('db')}/schedules.db")
    store.create_schema()
    yield store
    store.close()


@pytest.fixture
def api_clock():
    return Clock(utc(2024, 3, 30, 12))


@pytest.fixture
def client(api_storage, api_clock, tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data"), api_storage, auth=Auth(TOKEN))
    app.state.clock = api_clock
    return TestClient(app)


def _body(**kw) -> dict:
    return {
        "name": "nightly",
        "cron": "30 2 * * *",
        "timezone": "Europe/Berlin",
        "template": {"budget": 4},
        **kw,
    }


def _fields(response) -> set[str]:
    return {e["field"] for e in response.json()["errors"]}


def test_routes_need_the_token_to_change_schedules(client):
    assert client.post("/api/schedules", json=_body()).status_code == 401
    created = client.post("/api/schedules", json=_body(), headers=AUTH)
    assert created.status_code == 201
    sid = created.json()["id"]
    assert client.patch(f"/api/schedules/{sid}", json={"enabled": False}).status_code == 401
    assert (
        client.patch(
            f"/api/schedules/{sid}", json={"enabled": False}, headers={"Authorization": "Bearer wrong"}
        ).status_code
        == 401
    )
    assert client.delete(f"/api/schedules/{sid}").status_code == 401
    got = client.get(f"/api/schedules/{sid}")  # reads are public by default
    assert got.status_code == 200 and got.json()["enabled"] is True
    assert client.get("/api/schedules").status_code == 200
    assert client.get(f"/api/schedules/{sid}/fires").status_code == 200


def test_create_get_patch_delete_and_next_due_time(client, api_storage):
    r = client.post("/api/schedules", json=_body(warm_start=True, priority=3), headers=AUTH)
    assert r.status_code == 201
    out = r.json()
    sid = out["id"]
    assert r.headers["Location"] == f"/api/schedules/{sid}"
    assert (
        out["name"],
        out["cron"],
        out["timezone"],
        out["template"],
        out["enabled"],
        out["warm_start"],
        out["priority"],
    ) == ("nightly", "30 2 * * *", "Europe/Berlin", {"budget": 4}, True, True, 3)
    # Now is 2024-03-30 12:00Z: the next 02:30 Berlin falls in the spring-forward gap, so 03:00 CEST.
    assert out["next_due_at"] == "2024-03-31T01:00:00Z"
    assert out["next_due_local"] == "2024-03-31T03:00:00+02:00"
    assert client.get(f"/api/schedules/{sid}").json() == out

    r = client.patch(
        f"/api/schedules/{sid}", json={"cron": "0 6 * * 1", "timezone": "America/New_York"}, headers=AUTH
    )
    assert r.status_code == 200
    assert (r.json()["cron"], r.json()["name"], r.json()["warm_start"]) == ("0 6 * * 1", "nightly", True)
    assert r.json()["next_due_at"] == "2024-04-01T10:00:00Z"  # Monday 06:00 EDT
    assert r.json()["next_due_local"] == "2024-04-01T06:00:00-04:00"
    r = client.patch(
        f"/api/schedules/{sid}", json={"enabled": False, "template": {"budget": 9, "seed": 1}}, headers=AUTH
    )
    assert r.json()["enabled"] is False and r.json()["next_due_at"] is None
    assert r.json()["template"] == {"budget": 9, "seed": 1}
    assert client.patch(f"/api/schedules/{sid}", json={}, headers=AUTH).json()["template"] == {
        "budget": 9,
        "seed": 1,
    }

    assert client.delete(f"/api/schedules/{sid}", headers=AUTH).status_code == 204
    assert client.get(f"/api/schedules/{sid}").status_code == 404
    assert client.delete(f"/api/schedules/{sid}", headers=AUTH).status_code == 404


def test_list_and_fires_are_paginated(client, api_storage, api_clock):
    before = client.get("/api/schedules").json()["total"]
    ids = [
        client.post(
            "/api/schedules", json=_body(name=f"s{i}", cron="0 * * * *", timezone="UTC"), headers=AUTH
        ).json()["id"]
        for i in range(3)
    ]
    page = client.get("/api/schedules", params={"limit": 2, "offset": before}).json()
    assert page["total"] == before + 3 and [s["id"] for s in page["items"]] == ids[:2]
    assert page["limit"] == 2 and page["offset"] == before
    client.patch(f"/api/schedules/{ids[2]}", json={"enabled": False}, headers=AUTH)
    assert ids[2] in [
        s["id"] for s in client.get("/api/schedules", params={"enabled": False, "limit": 200}).json()["items"]
    ]

    api_clock.now = utc(2024, 3, 30, 15, 10)  # 13:00 and 14:00 missed, 15:00 runs (late, within grace)
    done = Scheduler(api_storage, clock=api_clock, grace=GRACE).tick()
    assert {r.schedule_id for r in done} >= {ids[0], ids[1]}
    fires = client.get(f"/api/schedules/{ids[0]}/fires", params={"limit": 2}).json()
    assert fires["total"] == 3
    assert [(f["due_at"], f["status"]) for f in fires["items"]] == [
        ("2024-03-30T15:00:00Z", "fired"),
        ("2024-03-30T14:00:00Z", "missed"),
    ]
    assert (
        fires["items"][0]["due_local"] == "2024-03-30T15:00:00Z" and fires["items"][0]["job_id"] is not None
    )
    missed = client.get(f"/api/schedules/{ids[0]}/fires", params={"status": "missed"}).json()
    assert missed["total"] == 2 and {f["status"] for f in missed["items"]} == {"missed"}
    assert client.get(f"/api/schedules/{ids[2]}/fires").json()["total"] == 0  # disabled
    assert client.get(f"/api/schedules/{ids[0]}/fires", params={"status": "bogus"}).status_code == 422
    assert client.get(f"/api/schedules/{ids[0]}/fires", params={"limit": 201}).status_code == 422
    for sid in ids:
        client.delete(f"/api/schedules/{sid}", headers=AUTH)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_body(cron="not a cron"), "cron"),
        (_body(cron="61 * * * *"), "cron"),
        (_body(cron="0 2 * * * *"), "cron"),
        (_body(cron="0 0 31 2 *"), "cron"),
        (_body(cron="@reboot"), "cron"),
        (_body(cron=""), "cron"),
        (_body(timezone="Mars/Olympus"), "timezone"),
        (_body(timezone="../../etc/passwd"), "timezone"),
        (_body(timezone="x" * 65), "timezone"),
        (_body(template={"budget": 0}), "template.budget"),
        (_body(template={"strategy": "nope"}), "template.strategy"),
        (_body(template={"bogus": 1}), "template.bogus"),
        (_body(template={"priority": 5}), "template.priority"),
        (_body(template={"data": {"corpus": "../../../etc"}}), "template.data.corpus"),
        (_body(template={"data": {"tokenizer": "file:/etc/passwd"}}), "template.data.tokenizer"),
        (_body(name=""), "name"),
        (_body(name="n" * 201), "name"),
        (_body(priority=10_000), "priority"),
        (_body(extra=1), "extra"),
        ({"cron": "0 2 * * *", "template": {}}, "name"),
        ({"name": "x", "cron": "0 2 * * *"}, "template"),
    ],
)
def test_bad_input_is_422_naming_the_field(client, body, field):
    r = client.post("/api/schedules", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert field in _fields(r), r.json()


def test_patch_validates_and_unknown_ids_are_404(client):
    sid = client.post("/api/schedules", json=_body(), headers=AUTH).json()["id"]
    for body, field in (
        ({"cron": "nope"}, "cron"),
        ({"timezone": "Nowhere/Land"}, "timezone"),
        ({"template": {"budget": -1}}, "template.budget"),
        ({"enabled": None}, "enabled"),
        ({"template": {"data": {"corpus": "/etc"}}}, "template.data.corpus"),
        ({"name": None}, "name"),
        ({"id": 5}, "id"),
    ):
        r = client.patch(f"/api/schedules/{sid}", json=body, headers=AUTH)
        assert r.status_code == 422 and field in _fields(r), (body, r.json())
    assert client.get(f"/api/schedules/{sid}").json()["cron"] == "30 2 * * *"  # unchanged
    missing = 987654
    assert client.get(f"/api/schedules/{missing}").status_code == 404
    assert client.patch(f"/api/schedules/{missing}", json={"name": "x"}, headers=AUTH).status_code == 404
    assert client.delete(f"/api/schedules/{missing}", headers=AUTH).status_code == 404
    assert client.get(f"/api/schedules/{missing}/fires").status_code == 404
    assert client.get("/api/schedules/0").status_code == 422
    client.delete(f"/api/schedules/{sid}", headers=AUTH)

"""The storage seam's jobs and leases: the queue (priority, then first in, first out), job status, and the
leases by which exactly one runner owns a running job (claimed, renewed and released in single statements)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import delete as sa_delete
from sqlalchemy import func, literal, select, update

from search import db
from search.db import JOB_KINDS, JOB_STATUSES, JOB_TERMINAL_STATUSES, utcnow
from search.storage.engines import Connected
from search.storage.records import JobRecord, check_statuses, check_value, columns_of, record_of

DEFAULT_PAGE = 100
# pg_advisory_xact_lock key that serializes job claims (any constant unique to this application).
_CLAIM_LOCK_ID = 0x68796272


class JobStore(Connected):
    def create_job(
        self,
        kind: str,
        config: dict,
        name: str | None = None,
        priority: int = 0,
        budget: int | None = None,
        idempotency_key: str | None = None,
        schedule_id: int | None = None,
        parent_id: int | None = None,
    ) -> int:
        """A new queued job; with an idempotency key already used, the existing job's id instead."""
        job_id, _created = self.create_job_once(
            kind,
            config,
            name=name,
            priority=priority,
            budget=budget,
            idempotency_key=idempotency_key,
            schedule_id=schedule_id,
            parent_id=parent_id,
        )
        return job_id

    def create_job_once(
        self,
        kind: str,
        config: dict,
        *,
        name: str | None = None,
        priority: int = 0,
        budget: int | None = None,
        idempotency_key: str | None = None,
        schedule_id: int | None = None,
        parent_id: int | None = None,
    ) -> tuple[int, bool]:
        """(job id, created): a new queued job, or — with an idempotency key already used — the existing one.
        `created` comes from the INSERT itself, so of any number of racing calls with one key exactly one
        says it created the job."""
        check_value(kind, JOB_KINDS, "job kind")
        t = db.jobs
        values = {
            "kind": kind,
            "config": config,
            "name": name,
            "priority": int(priority),
            "budget": budget,
            "idempotency_key": idempotency_key,
            "schedule_id": schedule_id,
            "parent_id": parent_id,
            "status": "queued",
            "n_evaluations": 0,
            "created_at": utcnow(),
        }
        with self.transaction() as conn:
            if idempotency_key is None:
                return int(conn.execute(t.insert().values(**values).returning(t.c.id)).scalar_one()), True
            stmt = (
                self._insert(t)
                .values(**values)
                .on_conflict_do_nothing(index_elements=[t.c.idempotency_key])
                .returning(t.c.id)
            )
            new_id = conn.execute(stmt).scalar_one_or_none()
            if new_id is not None:
                return int(new_id), True
            existing = conn.execute(select(t.c.id).where(t.c.idempotency_key == idempotency_key)).scalar_one()
            return int(existing), False

    def get_job(self, job_id: int) -> JobRecord | None:
        return self._one(JobRecord, db.jobs.c.id == job_id)

    def get_job_by_idempotency_key(self, key: str) -> JobRecord | None:
        return self._one(JobRecord, db.jobs.c.idempotency_key == key)

    def list_jobs(
        self,
        status: str | Iterable[str] | None = None,
        kind: str | None = None,
        limit: int | None = DEFAULT_PAGE,
        offset: int = 0,
    ) -> list[JobRecord]:
        """Jobs, newest first."""
        t = db.jobs
        stmt = select(*columns_of(JobRecord, t)).where(*self._job_filters(status, kind))
        stmt = stmt.order_by(t.c.created_at.desc(), t.c.id.desc()).offset(offset).limit(limit)
        with self._read() as conn:
            return [record_of(JobRecord, row) for row in conn.execute(stmt)]

    def queue(
        self,
        status: str | Iterable[str] | None = ("queued", "running"),
        kind: str | None = None,
        limit: int | None = DEFAULT_PAGE,
        offset: int = 0,
    ) -> list[JobRecord]:
        """Jobs in the order runners take them: running first, then by priority, then first in, first out."""
        t = db.jobs
        stmt = (
            select(*columns_of(JobRecord, t))
            .where(*self._job_filters(status, kind))
            .order_by(
                (t.c.status == "running").desc(), t.c.priority.desc(), t.c.created_at.asc(), t.c.id.asc()
            )
            .offset(offset)
            .limit(limit)
        )
        with self._read() as conn:
            return [record_of(JobRecord, row) for row in conn.execute(stmt)]

    def count_jobs(self, status: str | Iterable[str] | None = None, kind: str | None = None) -> int:
        stmt = select(func.count()).select_from(db.jobs).where(*self._job_filters(status, kind))
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())

    def _job_filters(self, status: str | Iterable[str] | None, kind: str | None) -> list:
        t = db.jobs
        filters = []
        statuses = check_statuses(status, JOB_STATUSES, "job status")
        if statuses is not None:
            filters.append(t.c.status.in_(statuses))
        if kind is not None:
            filters.append(t.c.kind == check_value(kind, JOB_KINDS, "job kind"))
        return filters

    def set_job_status(self, job_id: int, status: str, error: str | None = None) -> None:
        """Running sets started_at (first time); a terminal status sets finished_at; queued clears it."""
        check_value(status, JOB_STATUSES, "job status")
        t = db.jobs
        now = utcnow()
        values: dict[str, Any] = {"status": status, "error": error}
        if status == "running":
            values["started_at"] = func.coalesce(t.c.started_at, literal(now, db.UTCDateTime()))
            values["finished_at"] = None
        elif status == "queued":
            values["finished_at"] = None
        elif status in JOB_TERMINAL_STATUSES and status != "archived":
            values["finished_at"] = now
        self._update_one(t, t.c.id == job_id, values, f"job {job_id}")

    def transition_job(
        self, job_id: int, allowed: Iterable[str], status: str, *, kind: str | None = None
    ) -> bool:
        """Atomically move a job from one of the `allowed` statuses to `status` (one conditional UPDATE);
        False, writing nothing, when its status was another (or it is not of `kind`). A terminal status other
        than archived sets finished_at; queued clears finished_at, the error and the lease (a resume)."""
        allowed = check_statuses(allowed, JOB_STATUSES, "job status") or []
        check_value(status, JOB_STATUSES, "job status")
        t = db.jobs
        values: dict[str, Any] = {"status": status}
        if status in JOB_TERMINAL_STATUSES and status != "archived":
            values["finished_at"] = utcnow()
        elif status == "queued":
            values.update(finished_at=None, error=None, lease_owner=None, lease_expires_at=None)
        where = [t.c.id == job_id, t.c.status.in_(allowed)]
        if kind is not None:
            where.append(t.c.kind == check_value(kind, JOB_KINDS, "job kind"))
        with self.transaction() as conn:
            return conn.execute(update(t).where(*where).values(**values)).rowcount == 1

    def update_progress(self, job_id: int, n_evaluations: int, budget: int | None = None) -> None:
        t = db.jobs
        values: dict[str, Any] = {"n_evaluations": int(n_evaluations)}
        if budget is not None:
            values["budget"] = int(budget)
        self._update_one(t, t.c.id == job_id, values, f"job {job_id}")

    def child_jobs(self, parent_id: int) -> list[JobRecord]:
        """A study's runs, oldest first."""
        t = db.jobs
        stmt = select(*columns_of(JobRecord, t)).where(t.c.parent_id == parent_id).order_by(t.c.id)
        with self._read() as conn:
            return [record_of(JobRecord, row) for row in conn.execute(stmt)]

    def set_job_result(self, job_id: int, result: dict | None) -> None:
        """A study's report (JSON)."""
        t = db.jobs
        self._update_one(t, t.c.id == job_id, {"result": result}, f"job {job_id}")

    def delete_job(self, job_id: int) -> bool:
        """Delete a job with its candidates, history and strategy state; stored results stay (other searches
        reuse them). False if there was no such job."""
        with self.transaction() as conn:
            return conn.execute(sa_delete(db.jobs).where(db.jobs.c.id == job_id)).rowcount > 0

    # ---- leases: exactly one runner owns a running job

    def claim_job(
        self,
        owner: str,
        lease_s: float,
        *,
        kinds: Iterable[str] = ("search",),
        max_running: int | None = None,
        job_id: int | None = None,
        takeover_from: str | None = None,
        now: datetime | None = None,
    ) -> JobRecord | None:
        """Take the next job in queue order — a queued one, or a running one whose lease has expired (its
        owner died) — for `owner`, leased until now + lease_s; None if there is none or `max_running` jobs
        already hold live leases. With `job_id`, only that job. `takeover_from` also takes a running job from
        that owner whatever its lease says (the caller knows the owner is dead), or one with no lease at all
        (a search the command line started before leases existed).

        Atomic across processes: the pick and the conditional UPDATE run in one transaction (SQLite: `BEGIN
        IMMEDIATE` holds the write lock; PostgreSQL: a transaction-scoped advisory lock serializes claimers,
        so the concurrency count cannot race, and `FOR UPDATE SKIP LOCKED` skips rows a cancel is writing),
        and the UPDATE re-checks the lease, its row count saying whether the claim held.
        """
        from datetime import timedelta

        t = db.jobs
        now = now or utcnow()
        expires = now + timedelta(seconds=float(lease_s))
        takeable = (t.c.status == "queued") | (
            (t.c.status == "running") & t.c.lease_expires_at.is_not(None) & (t.c.lease_expires_at < now)
        )
        if takeover_from is not None:
            takeable = takeable | (
                (t.c.status == "running") & ((t.c.lease_owner == takeover_from) | t.c.lease_owner.is_(None))
            )
        with self.transaction() as conn:
            if not self.is_sqlite:
                conn.execute(select(func.pg_advisory_xact_lock(_CLAIM_LOCK_ID)))
            if max_running is not None:
                live = conn.execute(
                    select(func.count())
                    .select_from(t)
                    .where(
                        t.c.status == "running",
                        t.c.lease_expires_at >= now,
                        t.c.lease_owner != (takeover_from or ""),
                    )
                ).scalar_one()
                if live >= max_running:
                    return None
            stmt = select(t.c.id).where(takeable, t.c.kind.in_(list(kinds)))
            if job_id is not None:
                stmt = stmt.where(t.c.id == job_id)
            stmt = stmt.order_by(
                (t.c.status == "running").desc(), t.c.priority.desc(), t.c.created_at.asc(), t.c.id.asc()
            ).limit(1)
            if not self.is_sqlite:
                stmt = stmt.with_for_update(skip_locked=True)
            picked = conn.execute(stmt).scalar_one_or_none()
            if picked is None:
                return None
            claimed = conn.execute(
                update(t)
                .where(t.c.id == picked, takeable)
                .values(
                    status="running",
                    lease_owner=owner,
                    lease_expires_at=expires,
                    heartbeat_at=now,
                    started_at=func.coalesce(t.c.started_at, literal(now, db.UTCDateTime())),
                    finished_at=None,
                    error=None,
                )
            ).rowcount
            if claimed != 1:
                return None
            row = conn.execute(select(*columns_of(JobRecord, t)).where(t.c.id == picked)).first()
        return record_of(JobRecord, row)

    def renew_lease(self, job_id: int, owner: str, lease_s: float, now: datetime | None = None) -> bool:
        """The heartbeat: extend `owner`'s lease. False when the job is no longer running under this owner
        (cancelled, or taken over after the lease lapsed): the owner must stop."""
        from datetime import timedelta

        t = db.jobs
        now = now or utcnow()
        with self.transaction() as conn:
            return (
                conn.execute(
                    update(t)
                    .where(t.c.id == job_id, t.c.lease_owner == owner, t.c.status == "running")
                    .values(lease_expires_at=now + timedelta(seconds=float(lease_s)), heartbeat_at=now)
                ).rowcount
                == 1
            )

    def release_job(self, job_id: int, owner: str, status: str, error: str | None = None) -> bool:
        """End `owner`'s lease, setting the job's status (queued: another runner may take it at once). False,
        writing nothing, when the owner had lost the job (cancelled or taken over)."""
        check_value(status, JOB_STATUSES, "job status")
        t = db.jobs
        values: dict[str, Any] = {
            "status": status,
            "error": error,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if status in JOB_TERMINAL_STATUSES and status != "archived":
            values["finished_at"] = utcnow()
        with self.transaction() as conn:
            return (
                conn.execute(
                    update(t)
                    .where(t.c.id == job_id, t.c.lease_owner == owner, t.c.status == "running")
                    .values(**values)
                ).rowcount
                == 1
            )

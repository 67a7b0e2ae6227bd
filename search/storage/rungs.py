"""The storage seam's multi-fidelity state: each candidate's run at each rung (`rung_runs`). A rung's result
is a training result under its own key (shared across searches like any other); a row here ties it to the
candidate and rung, and counts the steps this search spent on it. A run is begun by one `INSERT ... ON
CONFLICT DO NOTHING` on (candidate, rung), so a promotion happens at most once, however the engine stops."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select, update

from search import db
from search.db import RUNG_STATUSES, utcnow
from search.storage.engines import Connected
from search.storage.records import RungRunRecord, check_statuses, columns_of, finite_float, record_of


class RungStore(Connected):
    def begin_rung(
        self, job_id: int, candidate_id: int, rung: int, steps: int, status: str = "pending"
    ) -> int | None:
        """A new run of `candidate_id` at `rung`; its id, or None when that candidate has one at that rung."""
        t = db.rung_runs
        values = {
            "job_id": job_id,
            "candidate_id": candidate_id,
            "rung": int(rung),
            "steps": int(steps),
            "status": status,
            "created_at": utcnow(),
        }
        stmt = (
            self._insert(t)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[t.c.candidate_id, t.c.rung])
            .returning(t.c.id)
        )
        with self.transaction() as conn:
            found = conn.execute(stmt).scalar_one_or_none()
        return None if found is None else int(found)

    def mark_rung_running(self, run_id: int) -> int:
        """Mark a rung run running and count the attempt; returns the attempt number."""
        t = db.rung_runs
        stmt = (
            update(t)
            .where(t.c.id == run_id)
            .values(status="running", attempts=t.c.attempts + 1, finished_at=None)
            .returning(t.c.attempts)
        )
        with self.transaction() as conn:
            attempts = conn.execute(stmt).scalar_one_or_none()
        if attempts is None:
            raise KeyError(f"no rung run {run_id}")
        return int(attempts)

    def complete_rung(
        self,
        run_id: int,
        training_key: str,
        val_bpb: float,
        objectives: dict,
        steps_trained: int,
        continued_from_step: int | None = None,
        reused: bool = False,
    ) -> None:
        t = db.rung_runs
        values = {
            "status": "reused" if reused else "completed",
            "training_key": training_key,
            "val_bpb": finite_float(val_bpb),
            "objectives": objectives,
            "steps_trained": int(steps_trained),
            "continued_from_step": continued_from_step,
            "failure_reason": None,
            "finished_at": utcnow(),
        }
        self._update_one(t, t.c.id == run_id, values, f"rung run {run_id}")

    def fail_rung(self, run_id: int, reason: str) -> None:
        t = db.rung_runs
        values = {"status": "failed", "failure_reason": reason, "finished_at": utcnow()}
        self._update_one(t, t.c.id == run_id, values, f"rung run {run_id}")

    def reset_running_rungs(self, job_id: int) -> list[int]:
        """On resume: the job's rung runs in flight when it stopped back to pending; their ids."""
        t = db.rung_runs
        stmt = (
            update(t)
            .where(t.c.job_id == job_id, t.c.status == "running")
            .values(status="pending")
            .returning(t.c.id)
        )
        with self.transaction() as conn:
            return sorted(int(i) for i in conn.execute(stmt).scalars())

    def get_rung_run(self, run_id: int) -> RungRunRecord | None:
        return self._one(RungRunRecord, db.rung_runs.c.id == run_id)

    def rung_runs(
        self, job_id: int, status: str | Iterable[str] | None = None, candidate_id: int | None = None
    ) -> list[RungRunRecord]:
        """The job's rung runs in the order they were begun (the promotion rule's arrival order)."""
        t = db.rung_runs
        query = select(*columns_of(RungRunRecord, t)).where(t.c.job_id == job_id)
        if status is not None:
            query = query.where(t.c.status.in_(check_statuses(status, RUNG_STATUSES, "rung status")))
        if candidate_id is not None:
            query = query.where(t.c.candidate_id == candidate_id)
        with self._read() as conn:
            return [record_of(RungRunRecord, row) for row in conn.execute(query.order_by(t.c.id))]

    def training_steps_spent(self, job_id: int) -> int:
        """Optimizer steps this search trained, over every rung (reused results cost none)."""
        t = db.rung_runs
        stmt = select(func.coalesce(func.sum(t.c.steps_trained), 0)).where(t.c.job_id == job_id)
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())

    def set_candidate_rung(
        self, candidate_id: int, rung: int, training_key: str, val_bpb: float, objectives: dict
    ) -> None:
        """A candidate's values are now those of `rung` (its highest trained so far)."""
        t = db.candidates
        values = {
            "rung": int(rung),
            "training_key": training_key,
            "val_bpb": finite_float(val_bpb),
            "objectives": objectives,
        }
        self._update_one(t, t.c.id == candidate_id, values, f"candidate {candidate_id}")

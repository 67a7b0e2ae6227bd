"""The storage seam's search state: candidates (proposed, running, finished, on the front), the results
shared across searches (one row per training or latency key), the hypervolume history and the strategy
state."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import false, func, literal, select, true, update

from search import db
from search.db import (
    CANDIDATE_DONE_STATUSES,
    CANDIDATE_SORT_COLUMNS,
    CANDIDATE_STATUSES,
    LATENCY_METRICS,
    OBJECTIVE_COLUMNS,
    PLOT_AXES,
    RESULT_STATUSES,
    utcnow,
)
from search.storage.engines import Connected
from search.storage.records import (
    CandidateRecord,
    CandidateSummaryRecord,
    HypervolumeRecord,
    LatencyResultRecord,
    LineageRecord,
    PointRecord,
    TrainingResultRecord,
    check_statuses,
    check_value,
    columns_of,
    finite_float,
    latency_metric_values,
    record_of,
)

DEFAULT_PAGE = 100


class CandidateStore(Connected):
    def add_candidate(
        self,
        job_id: int,
        layout_json: dict | str,
        layout_hash: str,
        parent_id: int | None = None,
        generation: int = 0,
        mutation: dict | None = None,
    ) -> int:
        """A pending candidate of a job; the existing one's id when the job already has this layout."""
        layout = json.loads(layout_json) if isinstance(layout_json, str) else layout_json
        t = db.candidates
        values = {
            "job_id": job_id,
            "layout_hash": layout_hash,
            "layout": layout,
            "parent_id": parent_id,
            "generation": int(generation),
            "mutation": mutation,
            "status": "pending",
            "attempts": 0,
            "on_front": False,
            "created_at": utcnow(),
        }
        stmt = (
            self._insert(t)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[t.c.job_id, t.c.layout_hash])
            .returning(t.c.id)
        )
        with self.transaction() as conn:
            new_id = conn.execute(stmt).scalar_one_or_none()
            if new_id is not None:
                return int(new_id)
            return int(
                conn.execute(
                    select(t.c.id).where(t.c.job_id == job_id, t.c.layout_hash == layout_hash)
                ).scalar_one()
            )

    def find_candidate(self, job_id: int, layout_hash: str) -> CandidateRecord | None:
        t = db.candidates
        return self._one(CandidateRecord, t.c.job_id == job_id, t.c.layout_hash == layout_hash)

    def mark_running(self, candidate_id: int) -> int:
        """Mark a candidate running and count the attempt; returns the attempt number (1 for the first)."""
        t = db.candidates
        stmt = (
            update(t)
            .where(t.c.id == candidate_id)
            .values(status="running", attempts=t.c.attempts + 1, started_at=utcnow(), finished_at=None)
            .returning(t.c.attempts)
        )
        with self.transaction() as conn:
            attempts = conn.execute(stmt).scalar_one_or_none()
        if attempts is None:
            raise KeyError(f"no candidate {candidate_id}")
        return int(attempts)

    def complete_candidate(
        self,
        candidate_id: int,
        training_key: str | None,
        latency_key: str | None,
        val_bpb: float | None,
        decode_ms: float | None,
        n_params: int | None,
        objectives: dict | None,
        reused: bool = False,
    ) -> None:
        """Record a candidate's result (status `reused` when it came from stored results)."""
        t = db.candidates
        values = {
            "status": "reused" if reused else "completed",
            "training_key": training_key,
            "latency_key": latency_key,
            "val_bpb": finite_float(val_bpb),
            "decode_ms": finite_float(decode_ms),
            "n_params": None if n_params is None else int(n_params),
            "objectives": objectives,
            "failure_reason": None,
            "traceback": None,
            "finished_at": utcnow(),
        }
        self._update_one(t, t.c.id == candidate_id, values, f"candidate {candidate_id}")

    def fail_candidate(self, candidate_id: int, reason: str, traceback: str | None = None) -> None:
        """A failed candidate: never on the front."""
        t = db.candidates
        values = {
            "status": "failed",
            "failure_reason": reason,
            "traceback": traceback,
            "on_front": False,
            "finished_at": utcnow(),
        }
        self._update_one(t, t.c.id == candidate_id, values, f"candidate {candidate_id}")

    def reset_candidate(self, candidate_id: int) -> None:
        """Back to pending (a retry), keeping its attempt count."""
        t = db.candidates
        values = {"status": "pending", "started_at": None, "finished_at": None, "on_front": False}
        self._update_one(t, t.c.id == candidate_id, values, f"candidate {candidate_id}")

    def reset_running(self, job_id: int) -> list[int]:
        """On resume: the job's running candidates (in flight when it stopped) back to pending; their ids."""
        t = db.candidates
        stmt = (
            update(t)
            .where(t.c.job_id == job_id, t.c.status == "running")
            .values(status="pending", started_at=None)
            .returning(t.c.id)
        )
        with self.transaction() as conn:
            return sorted(int(i) for i in conn.execute(stmt).scalars())

    def candidates(
        self,
        job_id: int,
        status: str | Iterable[str] | None = None,
        order_by: str = "id",
        limit: int | None = None,
        offset: int = 0,
        on_front: bool | None = None,
        *,
        record: type = CandidateRecord,
    ) -> list:
        """A job's candidates (as `record`: every column, or `CandidateSummaryRecord`); `order_by` is a
        column name (`-name` for descending; NULLs last), ties by id."""
        t = db.candidates
        stmt = select(*columns_of(record, t)).where(*self._candidate_filters(job_id, status, on_front))
        descending = order_by.startswith("-")
        name = order_by.lstrip("-")
        if name not in CANDIDATE_SORT_COLUMNS:
            raise ValueError(
                f"cannot order candidates by {name!r}; one of {', '.join(CANDIDATE_SORT_COLUMNS)}"
            )
        column = t.c[name]
        stmt = stmt.order_by(
            (column.desc() if descending else column.asc()).nulls_last(),
            t.c.id.desc() if descending else t.c.id.asc(),
        )
        if limit is None:
            with self._read() as conn:
                return [record_of(record, row) for row in conn.execute(stmt.offset(offset))]
        # A page: sort and skip over the ids alone (a narrow sort: the wide rows, layout JSON included, are
        # not carried through it), then read just the page's rows by primary key.
        ids_stmt = stmt.with_only_columns(t.c.id).offset(offset).limit(limit)
        with self._read() as conn:
            ids = list(conn.execute(ids_stmt).scalars())
            if not ids:
                return []
            rows = {
                row.id: row for row in conn.execute(select(*columns_of(record, t)).where(t.c.id.in_(ids)))
            }
        return [record_of(record, rows[i]) for i in ids]

    def candidate_summaries(
        self,
        job_id: int,
        status: str | Iterable[str] | None = None,
        order_by: str = "id",
        limit: int | None = None,
        offset: int = 0,
        on_front: bool | None = None,
    ) -> list[CandidateSummaryRecord]:
        """As `candidates`, without the JSON columns: what pages, fronts and CSV exports show."""
        return self.candidates(
            job_id, status, order_by, limit, offset, on_front, record=CandidateSummaryRecord
        )

    def get_candidate(self, candidate_id: int) -> CandidateRecord | None:
        return self._one(CandidateRecord, db.candidates.c.id == candidate_id)

    def count_candidates(
        self, job_id: int, status: str | Iterable[str] | None = None, on_front: bool | None = None
    ) -> int:
        stmt = (
            select(func.count())
            .select_from(db.candidates)
            .where(*self._candidate_filters(job_id, status, on_front))
        )
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())

    def candidate_counts(self, job_id: int) -> dict[str, int]:
        """{status: count} over every candidate status (zeros included)."""
        return self.counts_by_job([job_id])[job_id]

    def counts_by_job(self, job_ids: Iterable[int]) -> dict[int, dict[str, int]]:
        """{job id: {status: count}} for several jobs in one grouped statement (a list page's rows)."""
        ids = sorted({int(i) for i in job_ids})
        out = {i: dict.fromkeys(CANDIDATE_STATUSES, 0) for i in ids}
        if not ids:
            return out
        t = db.candidates
        stmt = (
            select(t.c.job_id, t.c.status, func.count())
            .where(t.c.job_id.in_(ids))
            .group_by(t.c.job_id, t.c.status)
        )
        with self._read() as conn:
            for job_id, status, n in conn.execute(stmt):
                out[int(job_id)][status] = int(n)
        return out

    def best_by_job(self, job_ids: Iterable[int], objective: str = "val_bpb") -> dict[int, float]:
        """{job id: the lowest value of `objective` among its finished candidates}, one statement."""
        if objective not in OBJECTIVE_COLUMNS:
            raise ValueError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVE_COLUMNS)}")
        ids = sorted({int(i) for i in job_ids})
        if not ids:
            return {}
        t = db.candidates
        stmt = (
            select(t.c.job_id, func.min(t.c[objective]))
            .where(t.c.job_id.in_(ids), t.c.status.in_(CANDIDATE_DONE_STATUSES))
            .group_by(t.c.job_id)
        )
        with self._read() as conn:
            return {int(j): float(v) for j, v in conn.execute(stmt) if v is not None}

    def finished_since(
        self, job_id: int, after: tuple[datetime, int] | None = None, limit: int = DEFAULT_PAGE
    ) -> list[CandidateSummaryRecord]:
        """Candidates that finished (completed, reused or failed) after the cursor (finished_at, id), in that
        order: the live-progress feed. Pass the last item's (finished_at, id) to get the next ones."""
        t = db.candidates
        stmt = select(*columns_of(CandidateSummaryRecord, t)).where(
            t.c.job_id == job_id, t.c.finished_at.is_not(None)
        )
        if after is not None:
            at, last_id = after
            stmt = stmt.where((t.c.finished_at > at) | ((t.c.finished_at == at) & (t.c.id > last_id)))
        stmt = stmt.order_by(t.c.finished_at.asc(), t.c.id.asc()).limit(limit)
        with self._read() as conn:
            return [record_of(CandidateSummaryRecord, row) for row in conn.execute(stmt)]

    def objective_points(self, job_id: int, x: str, y: str) -> list[PointRecord]:
        """Every completed (or reused) candidate that has both values, by id: five narrow columns, no JSON.
        `x` and `y` are objectives (columns of the candidate) or latency metrics (of its latency result)."""
        columns = self._point_columns(x, y)
        stmt = self._points(x, y, columns).where(*self._point_filters(job_id, columns))
        with self._read() as conn:
            return self._point_records(conn.execute(stmt.order_by(db.candidates.c.id)))

    def objective_point_sample(
        self, job_id: int, x: str, y: str, max_points: int, keep: Iterable[int] = ()
    ) -> tuple[list[PointRecord], int, int]:
        """(points, total, front): every point on the stored front and every id in `keep`, then, in the room
        left, an even sample of the others stratified by generation (as `api.scatter.sample_points`), in id
        order; `total` counts every point, `front` the front's. The sample is taken inside the database (a
        window over the generation-and-id index), so a search of 100,000 candidates sends only what is
        kept."""
        t = db.candidates
        keep = sorted({int(i) for i in keep})
        kept_filter = (t.c.on_front == true()) | (t.c.id.in_(keep) if keep else false())
        columns = self._point_columns(x, y)
        filters = self._point_filters(job_id, columns)
        counts = self._points(x, y, [func.count(), func.count().filter(t.c.on_front == true())]).where(
            *filters
        )
        kept = self._points(x, y, columns).where(*filters, kept_filter)
        with self._read() as conn:
            total, front = (int(v or 0) for v in conn.execute(counts).one())
            rows = list(conn.execute(kept))
            budget, others = max(0, max_points - len(rows)), total - len(rows)
            if budget and others:
                rank = func.row_number().over(order_by=(t.c.generation, t.c.id))
                ranked = self._points(x, y, [*columns, rank.label("rank")]).where(*filters, ~kept_filter)
                ranked = ranked.subquery()
                # kept: the others whose rank, by (generation, id), crosses a multiple of others / budget
                picked = (ranked.c.rank * budget) // others > ((ranked.c.rank - 1) * budget) // others
                rows += list(conn.execute(select(*list(ranked.c)[:5]).where(picked)))
        return sorted(self._point_records(rows), key=lambda p: p.id), total, front

    @staticmethod
    def _point_records(rows: Iterable) -> list[PointRecord]:
        return [PointRecord(int(i), int(g), bool(f), float(a), float(b)) for i, g, f, a, b in rows]

    @staticmethod
    def _point_columns(x: str, y: str) -> list:
        """id, generation, on_front and the two plotted values: candidate columns or latency-result ones."""
        t = db.candidates
        values = []
        for field, name in (("x", x), ("y", y)):
            if name in OBJECTIVE_COLUMNS:
                values.append(t.c[name])
            elif name in LATENCY_METRICS:
                values.append(db.latency_results.c[name])
            else:
                known = ", ".join(PLOT_AXES)
                raise ValueError(f"{field}: {name!r} is not a plotted value (one of {known})")
        return [t.c.id, t.c.generation, t.c.on_front, *values]

    @staticmethod
    def _points(x: str, y: str, columns: list) -> Any:
        """A select of `columns` over the candidates, joined to their latency results when a value is
        there."""
        t, lat = db.candidates, db.latency_results
        joined = x in LATENCY_METRICS or y in LATENCY_METRICS
        return select(*columns).select_from(
            t.join(lat, lat.c.latency_key == t.c.latency_key) if joined else t
        )

    @staticmethod
    def _point_filters(job_id: int, columns: list) -> list:
        t = db.candidates
        filters = [t.c.job_id == job_id, t.c.status.in_(CANDIDATE_DONE_STATUSES)]
        return [*filters, columns[3].is_not(None), columns[4].is_not(None)]

    def latency_results_of(self, candidate_ids: Iterable[int]) -> dict[int, dict]:
        """{candidate id: its latency result's metrics}, for a few candidates (a front) in one statement."""
        ids = sorted({int(i) for i in candidate_ids})
        if not ids:
            return {}
        c, lat = db.candidates, db.latency_results
        stmt = (
            select(c.c.id, lat.c.result)
            .join(lat, lat.c.latency_key == c.c.latency_key)
            .where(c.c.id.in_(ids))
        )
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        out = {}
        for candidate_id, result in rows:
            result = json.loads(result) if isinstance(result, str) else result
            if isinstance(result, dict):
                out[int(candidate_id)] = result
        return out

    def result_details_of(self, job_id: int) -> dict[int, tuple[dict | None, dict | None]]:
        """{candidate id: (its training result's dict, its latency result's device fingerprint)} for every
        candidate of a job, in one statement (None where the candidate has no such result)."""
        c, tr, lat = db.candidates, db.training_results, db.latency_results
        stmt = (
            select(c.c.id, tr.c.result, lat.c.device_fingerprint)
            .outerjoin(tr, tr.c.training_key == c.c.training_key)
            .outerjoin(lat, lat.c.latency_key == c.c.latency_key)
            .where(c.c.job_id == job_id)
        )
        with self._read() as conn:
            rows = conn.execute(stmt).all()

        def decoded(value):
            return json.loads(value) if isinstance(value, str) else value

        return {int(i): (decoded(training), decoded(device)) for i, training, device in rows}

    def layouts_of(self, candidate_ids: Iterable[int]) -> dict[int, dict]:
        """{candidate id: its layout}, for a few candidates (a front) in one statement."""
        ids = sorted({int(i) for i in candidate_ids})
        if not ids:
            return {}
        t = db.candidates
        with self._read() as conn:
            rows = conn.execute(select(t.c.id, t.c.layout).where(t.c.id.in_(ids))).all()
        return {int(i): (json.loads(layout) if isinstance(layout, str) else layout) for i, layout in rows}

    def initial_layout_names(self, job_id: int) -> dict[int, str]:
        """{candidate id: layout name} of the named layouts the search started from (the preset baselines):
        the initial population only, so the JSON of a few rows is read."""
        t = db.candidates
        stmt = select(t.c.id, t.c.layout).where(
            t.c.job_id == job_id, t.c.parent_id.is_(None), t.c.generation == 0
        )
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        names = {}
        for candidate_id, layout in rows:
            layout = json.loads(layout) if isinstance(layout, str) else layout
            if isinstance(layout, dict) and layout.get("name"):
                names[int(candidate_id)] = str(layout["name"])
        return names

    def last_finished(self, job_id: int) -> tuple[datetime, int] | None:
        """(finished_at, id) of the job's most recently finished candidate: where a live feed starts to get
        only what finishes from now on."""
        t = db.candidates
        stmt = (
            select(t.c.finished_at, t.c.id)
            .where(t.c.job_id == job_id, t.c.finished_at.is_not(None))
            .order_by(t.c.finished_at.desc(), t.c.id.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else (row[0], int(row[1]))

    def lineage(self, candidate_id: int, max_depth: int = 100) -> list[LineageRecord]:
        """The candidate's ancestors, parent first, up to `max_depth` (parents are always older: no
        cycles)."""
        t = db.candidates
        anchor = (
            select(t.c.parent_id.label("id"), literal(1).label("depth"))
            .where(t.c.id == candidate_id, t.c.parent_id.is_not(None))
            .cte("ancestors", recursive=True)
        )
        parent = t.alias("parent")
        ancestors = anchor.union_all(
            select(parent.c.parent_id, anchor.c.depth + 1).where(
                parent.c.id == anchor.c.id, parent.c.parent_id.is_not(None), anchor.c.depth < max_depth
            )
        )
        stmt = (
            select(*columns_of(LineageRecord, t))
            .join(ancestors, t.c.id == ancestors.c.id)
            .order_by(ancestors.c.depth)
        )
        with self._read() as conn:
            return [record_of(LineageRecord, row) for row in conn.execute(stmt)]

    def child_ids(self, candidate_id: int, limit: int = DEFAULT_PAGE) -> list[int]:
        """The candidates mutated from this one, oldest first."""
        t = db.candidates
        stmt = select(t.c.id).where(t.c.parent_id == candidate_id).order_by(t.c.id).limit(limit)
        with self._read() as conn:
            return [int(i) for i in conn.execute(stmt).scalars()]

    def _candidate_filters(
        self, job_id: int, status: str | Iterable[str] | None, on_front: bool | None
    ) -> list:
        t = db.candidates
        filters = [t.c.job_id == job_id]
        statuses = check_statuses(status, CANDIDATE_STATUSES, "candidate status")
        if statuses is not None:
            filters.append(t.c.status.in_(statuses))
        if on_front is not None:
            filters.append(t.c.on_front == (true() if on_front else false()))
        return filters

    def set_front(self, job_id: int, candidate_ids: Iterable[int]) -> None:
        """Materialize the job's Pareto front: exactly these candidates get on_front. Each must be a completed
        (or reused) candidate of the job, else ValueError and nothing changes."""
        ids = sorted({int(i) for i in candidate_ids})
        t = db.candidates
        with self.transaction() as conn:
            conn.execute(
                update(t)
                .where(t.c.job_id == job_id, t.c.on_front == true(), t.c.id.notin_(ids))
                .values(on_front=False)
            )
            if ids:
                n = conn.execute(
                    update(t)
                    .where(t.c.job_id == job_id, t.c.id.in_(ids), t.c.status.in_(CANDIDATE_DONE_STATUSES))
                    .values(on_front=True)
                ).rowcount
                if n != len(ids):
                    raise ValueError(
                        f"front of job {job_id}: {len(ids) - n} of the ids are not completed "
                        "candidates of this job"
                    )

    # ---- results (shared across searches; one row per key)

    def get_training_result(self, training_key: str) -> TrainingResultRecord | None:
        return self._one(TrainingResultRecord, db.training_results.c.training_key == training_key)

    def put_training_result(
        self,
        training_key: str,
        *,
        layout_hash: str,
        result: dict | None,
        val_bpb: float | None = None,
        proxy_config_hash: str | None = None,
        status: str = "completed",
        artifact_path: str | None = None,
    ) -> bool:
        """Store a training result unless the key has one. Atomic: of racing puts, one stores. A completed
        result replaces a failed one, never the reverse; a completed one is never replaced. True if stored."""
        check_value(status, RESULT_STATUSES, "result status")
        t = db.training_results
        values = {
            "training_key": training_key,
            "layout_hash": layout_hash,
            "proxy_config_hash": proxy_config_hash,
            "result": result,
            "val_bpb": finite_float(val_bpb),
            "status": status,
            "artifact_path": artifact_path,
            "created_at": utcnow(),
        }
        return self._put_result(t, t.c.training_key, values)

    def get_latency_result(self, latency_key: str) -> LatencyResultRecord | None:
        return self._one(LatencyResultRecord, db.latency_results.c.latency_key == latency_key)

    def put_latency_result(
        self,
        latency_key: str,
        *,
        layout_hash: str,
        result: dict | None,
        decode_ms: float | None = None,
        latency_config_hash: str | None = None,
        device_fingerprint: dict | None = None,
        status: str = "completed",
    ) -> bool:
        """As put_training_result, for a latency measurement."""
        check_value(status, RESULT_STATUSES, "result status")
        t = db.latency_results
        values = {
            "latency_key": latency_key,
            "layout_hash": layout_hash,
            "latency_config_hash": latency_config_hash,
            "device_fingerprint": device_fingerprint,
            "result": result,
            "decode_ms": finite_float(decode_ms),
            **latency_metric_values(result),
            "status": status,
            "created_at": utcnow(),
        }
        return self._put_result(t, t.c.latency_key, values)

    def _put_result(self, table: Any, key_column: Any, values: dict) -> bool:
        key = values[key_column.name]
        stmt = self._insert(table).values(**values).on_conflict_do_nothing(index_elements=[key_column])
        stmt = stmt.returning(key_column)
        with self.transaction() as conn:
            if conn.execute(stmt).scalar_one_or_none() is not None:
                return True
            if values["status"] != "completed":
                return False
            replace = {k: v for k, v in values.items() if k != key_column.name}
            return (
                conn.execute(
                    update(table).where(key_column == key, table.c.status != "completed").values(**replace)
                ).rowcount
                > 0
            )

    # ---- hypervolume history, strategy state

    def record_hypervolume(self, job_id: int, n_evaluations: int, value: float) -> None:
        """The hypervolume after `n_evaluations`; recording the same count again overwrites it."""
        t = db.hypervolume_history
        values = {
            "job_id": job_id,
            "n_evaluations": int(n_evaluations),
            "hypervolume": float(value),
            "recorded_at": utcnow(),
        }
        stmt = self._insert(t).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.job_id, t.c.n_evaluations],
            set_={"hypervolume": stmt.excluded.hypervolume, "recorded_at": stmt.excluded.recorded_at},
        )
        with self.transaction() as conn:
            conn.execute(stmt)

    def latest_hypervolume(self, job_id: int) -> HypervolumeRecord | None:
        """The newest point of the curve: one row by the (job_id, n_evaluations) unique index."""
        t = db.hypervolume_history
        stmt = (
            select(*columns_of(HypervolumeRecord, t))
            .where(t.c.job_id == job_id)
            .order_by(t.c.n_evaluations.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else record_of(HypervolumeRecord, row)

    def hypervolume_history(self, job_id: int) -> list[HypervolumeRecord]:
        """The curve, by evaluation count."""
        t = db.hypervolume_history
        stmt = (
            select(*columns_of(HypervolumeRecord, t)).where(t.c.job_id == job_id).order_by(t.c.n_evaluations)
        )
        with self._read() as conn:
            return [record_of(HypervolumeRecord, row) for row in conn.execute(stmt)]

    def save_strategy_state(self, job_id: int, state: dict) -> int:
        """Store (replace) a job's strategy state; returns its version (1, 2, ...)."""
        t = db.strategy_state
        now = utcnow()
        stmt = self._insert(t).values(job_id=job_id, state=state, version=1, updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.job_id],
            set_={
                "state": stmt.excluded.state,
                "updated_at": stmt.excluded.updated_at,
                "version": t.c.version + 1,
            },
        ).returning(t.c.version)
        with self.transaction() as conn:
            return int(conn.execute(stmt).scalar_one())

    def load_strategy_state(self, job_id: int) -> dict | None:
        t = db.strategy_state
        with self._read() as conn:
            return conn.execute(select(t.c.state).where(t.c.job_id == job_id)).scalar_one_or_none()

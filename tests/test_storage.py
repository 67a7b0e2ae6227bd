"""The storage seam (search/storage.py) and its migrations, on SQLite and on PostgreSQL (tests/pg.py)."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from search import db
from search.storage import Storage
from tests import pg

db_url = pg.db_url
storage = pg.storage

TABLES = {
    "jobs",
    "candidates",
    "training_results",
    "latency_results",
    "hypervolume_history",
    "strategy_state",
    "schedules",
    "schedule_fires",
}


def _count(store: Storage, table, *where) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


# ---------------------------------------------------------------------------------------------- no database


def test_storage_does_not_import_torch():
    code = "import sys, search.storage, search.db; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError, match="naive"):
        db.UTCDateTime().process_bind_param(datetime(2024, 1, 1), None)


# ---------------------------------------------------------------------------------------------- migrations


def test_concurrent_create_schema(db_url):
    stores = [Storage(db_url) for _ in range(3)]
    errors: list[BaseException] = []

    def migrate(store: Storage) -> None:
        try:
            store.create_schema()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert stores[0].schema_is_current()
    finally:
        for s in stores:
            s.close()


def test_sqlite_pragmas(tmp_path):
    store = Storage(f"sqlite:///{tmp_path}/sub/dir/h.db")  # parent folders are made
    try:
        store.create_schema()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on after the migration
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        store.close()


def test_storage_pickles_as_its_url(tmp_path):
    store = Storage(f"sqlite:///{tmp_path}/h.db")
    clone = pickle.loads(pickle.dumps(store))
    try:
        assert clone.url == store.url and clone.engine is not store.engine
    finally:
        store.close()
        clone.close()


def test_in_memory_sqlite():
    with Storage("sqlite://") as store:
        store.create_schema()
        jid = store.create_job("search", {"x": 1})
        assert store.get_job(jid).config == {"x": 1}


def test_unsupported_url():
    with pytest.raises(ValueError, match="unsupported"):
        Storage("mysql://x/y")


# ---------------------------------------------------------------------------------------------- jobs


def test_job_lifecycle(storage):
    before = datetime.now(UTC)
    jid = storage.create_job(
        "search",
        {"strategy": "pareto-aging", "space": {"widths": [64, 128]}},
        name="first",
        priority=2,
        budget=12,
    )
    job = storage.get_job(jid)
    assert (job.kind, job.name, job.status, job.priority, job.budget, job.n_evaluations) == (
        "search",
        "first",
        "queued",
        2,
        12,
        0,
    )
    assert job.config == {"strategy": "pareto-aging", "space": {"widths": [64, 128]}}
    assert job.created_at.tzinfo == UTC and before - timedelta(seconds=5) <= job.created_at
    assert job.started_at is None and job.finished_at is None and job.lease_owner is None

    storage.set_job_status(jid, "running")
    started = storage.get_job(jid).started_at
    assert started is not None and started.tzinfo == UTC
    storage.update_progress(jid, 5)
    storage.set_job_status(jid, "running")  # again (a resume): started_at kept
    assert storage.get_job(jid).started_at == started
    assert storage.get_job(jid).n_evaluations == 5
    storage.set_job_status(jid, "failed", error="worker died")
    job = storage.get_job(jid)
    assert job.status == "failed" and job.error == "worker died" and job.finished_at >= job.started_at

    other = storage.create_job("fidelity", {})
    assert [j.id for j in storage.list_jobs()] == [other, jid]  # newest first
    assert [j.id for j in storage.list_jobs(status="failed")] == [jid]
    assert [j.id for j in storage.list_jobs(status=["queued", "failed"], kind="fidelity")] == [other]
    assert [j.id for j in storage.list_jobs(limit=1, offset=1)] == [jid]
    assert storage.count_jobs() == 2 and storage.count_jobs(status="queued") == 1

    with pytest.raises(ValueError):
        storage.set_job_status(jid, "sleeping")
    with pytest.raises(ValueError):
        storage.create_job("unknown-kind", {})
    with pytest.raises(KeyError):
        storage.set_job_status(9999, "running")
    with pytest.raises(KeyError):
        storage.update_progress(9999, 1)
    assert storage.get_job(9999) is None
    assert storage.delete_job(jid) is True and storage.delete_job(jid) is False
    assert storage.get_job(jid) is None


def test_idempotency_key(storage):
    first = storage.create_job("search", {"a": 1}, idempotency_key="req-1")
    assert storage.create_job("search", {"a": 2}, idempotency_key="req-1") == first
    assert storage.get_job(first).config == {"a": 1}
    assert storage.get_job_by_idempotency_key("req-1").id == first
    second = storage.create_job("search", {"a": 1}, idempotency_key="req-2")
    assert second != first
    assert storage.create_job("search", {}) != storage.create_job("search", {})  # no key: always new
    assert storage.count_jobs() == 4


def test_transaction_conditional_update_and_session(storage):
    """The service's lease pattern through Storage.transaction(): a conditional UPDATE on aware timestamps."""
    from sqlalchemy import or_, update

    jid = storage.create_job("search", {})
    jobs = db.jobs
    now = datetime.now(UTC)

    def take(owner: str, at: datetime) -> bool:
        with storage.transaction() as conn:
            return (
                conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.id == jid, or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < at)
                    )
                    .values(lease_owner=owner, lease_expires_at=at + timedelta(seconds=30), heartbeat_at=at)
                ).rowcount
                == 1
            )

    assert take("a", now)
    assert not take("b", now + timedelta(seconds=10))  # lease still held
    assert take("b", now + timedelta(seconds=31))  # expired: taken over
    job = storage.get_job(jid)
    assert job.lease_owner == "b" and job.lease_expires_at == now + timedelta(seconds=61)
    with storage.session() as session:
        assert session.get(db.Job, jid).lease_owner == "b"


# ---------------------------------------------------------------------------------------------- candidates


def test_candidates_are_unique_per_job_and_layout(storage):
    job = storage.create_job("search", {})
    other = storage.create_job("search", {})
    layout = {"operators": ["attention", "ffn"], "d_model": 64}
    cid = storage.add_candidate(job, layout, "h1", generation=0)
    assert storage.add_candidate(job, '{"operators": ["attention", "ffn"], "d_model": 64}', "h1") == cid
    assert storage.add_candidate(other, layout, "h1") != cid  # another search may hold the same layout
    child = storage.add_candidate(
        job,
        {"operators": ["ffn"]},
        "h2",
        parent_id=cid,
        generation=1,
        mutation={"kind": "swap_mixer", "at": 0},
    )
    assert storage.count_candidates(job) == 2
    record = storage.get_candidate(child)
    assert (record.parent_id, record.generation, record.mutation, record.status, record.attempts) == (
        cid,
        1,
        {"kind": "swap_mixer", "at": 0},
        "pending",
        0,
    )
    assert storage.get_candidate(cid).layout == layout
    assert storage.find_candidate(job, "h2").id == child and storage.find_candidate(job, "nope") is None


def test_candidate_outcomes_and_front(storage):
    job = storage.create_job("search", {})
    ids = [storage.add_candidate(job, {"i": i}, f"h{i}") for i in range(4)]
    assert storage.mark_running(ids[0]) == 1
    assert storage.mark_running(ids[0]) == 2
    storage.complete_candidate(
        ids[0],
        "tk0",
        "lk0",
        val_bpb=2.5,
        decode_ms=1.0,
        n_params=3_000_000_000,
        objectives={"val_bpb": 2.5, "decode_ms": 1.0},
    )
    storage.mark_running(ids[1])
    storage.complete_candidate(ids[1], "tk1", "lk1", 2.0, 3.0, 10, {"val_bpb": 2.0}, reused=True)
    storage.mark_running(ids[2])
    storage.fail_candidate(ids[2], "OOM", "Traceback (most recent call last): ...")

    c0, c1, c2 = (storage.get_candidate(i) for i in ids[:3])
    assert (c0.status, c0.attempts, c0.n_params, c0.training_key, c0.objectives["decode_ms"]) == (
        "completed",
        2,
        3_000_000_000,
        "tk0",
        1.0,
    )
    assert c0.finished_at.tzinfo == UTC and c0.finished_at >= c0.started_at
    assert c1.status == "reused"
    assert (c2.status, c2.failure_reason, c2.traceback.startswith("Traceback")) == ("failed", "OOM", True)
    assert storage.candidate_counts(job) == {
        "pending": 1,
        "running": 0,
        "completed": 1,
        "failed": 1,
        "reused": 1,
    }
    assert storage.count_candidates(job, status=("completed", "reused")) == 2

    assert [c.id for c in storage.candidates(job, order_by="val_bpb")] == [ids[1], ids[0], ids[2], ids[3]]
    # Descending: NULLs still last, ties by id descending.
    assert [c.id for c in storage.candidates(job, order_by="-val_bpb")] == [ids[0], ids[1], ids[3], ids[2]]
    assert [c.id for c in storage.candidates(job, status="pending")] == [ids[3]]
    assert [c.id for c in storage.candidates(job, limit=2, offset=1)] == ids[1:3]
    with pytest.raises(ValueError):
        storage.candidates(job, order_by="layout; drop table jobs")

    storage.set_front(job, [ids[0], ids[1]])
    assert [c.id for c in storage.candidates(job, on_front=True)] == ids[:2]
    storage.set_front(job, [ids[1]])
    assert [c.id for c in storage.candidates(job, on_front=True)] == [ids[1]]
    assert storage.count_candidates(job, on_front=False) == 3
    with pytest.raises(ValueError):  # a failed candidate never enters the front; nothing changes
        storage.set_front(job, [ids[0], ids[2]])
    assert [c.id for c in storage.candidates(job, on_front=True)] == [ids[1]]
    storage.set_front(job, [])
    assert storage.count_candidates(job, on_front=True) == 0

    with pytest.raises(KeyError):
        storage.mark_running(99999)
    with pytest.raises(KeyError):
        storage.fail_candidate(99999, "x")


def test_reset_running(storage):
    job = storage.create_job("search", {})
    other = storage.create_job("search", {})
    ids = [storage.add_candidate(job, {"i": i}, f"h{i}") for i in range(4)]
    foreign = storage.add_candidate(other, {"i": 0}, "h0")
    for cid in (ids[0], ids[1], ids[3], foreign):
        storage.mark_running(cid)
    storage.complete_candidate(ids[3], "tk", "lk", 1.0, 1.0, 1, {})
    assert storage.reset_running(job) == sorted([ids[0], ids[1]])
    assert storage.reset_running(job) == []
    assert [storage.get_candidate(i).status for i in ids] == ["pending", "pending", "pending", "completed"]
    assert storage.get_candidate(ids[0]).attempts == 1  # attempts are kept: a rerun counts
    assert storage.get_candidate(foreign).status == "running"


# ---------------------------------------------------------------------------------------------- results


def test_the_result_details_of_a_job_are_read_in_one_statement_as_one_by_one(storage):
    job = storage.create_job("search", {})
    ids = [storage.add_candidate(job, {"i": i}, f"h{i}") for i in range(3)]
    storage.put_training_result("tk0", layout_hash="h0", result={"tokens_per_s": 900.0}, val_bpb=2.0)
    storage.put_latency_result(
        "lk0", layout_hash="h0", result={}, decode_ms=1.0, device_fingerprint={"device": "x"}
    )
    storage.complete_candidate(ids[0], "tk0", "lk0", 2.0, 1.0, 10, {})
    storage.complete_candidate(ids[1], "tk-missing", "lk0", 2.0, 1.0, 10, {})
    details = storage.result_details_of(job)
    for cid in ids:
        c = storage.get_candidate(cid)
        trained = storage.get_training_result(c.training_key) if c.training_key else None
        measured = storage.get_latency_result(c.latency_key) if c.latency_key else None
        assert details[cid] == (trained and trained.result, measured and measured.device_fingerprint)
    assert details[ids[0]] == ({"tokens_per_s": 900.0}, {"device": "x"}) and details[ids[2]] == (None, None)
    assert storage.result_details_of(storage.create_job("search", {})) == {}


def test_put_training_result_once(storage):
    kw = {"layout_hash": "h", "proxy_config_hash": "p", "artifact_path": "/a"}
    assert storage.put_training_result("k", result={"val_bpb": 2.0, "curve": [3.0, 2.5]}, val_bpb=2.0, **kw)
    assert not storage.put_training_result("k", result={"val_bpb": 1.0}, val_bpb=1.0, **kw)
    assert _count(storage, db.training_results) == 1
    stored = storage.get_training_result("k")
    assert (stored.val_bpb, stored.result["curve"], stored.status, stored.artifact_path) == (
        2.0,
        [3.0, 2.5],
        "completed",
        "/a",
    )
    assert not storage.put_training_result(
        "k", result=None, status="failed", **kw
    )  # never over a completed one
    assert storage.get_training_result("k").status == "completed"

    # A failed result is replaced by a completed one, once.
    assert storage.put_training_result(
        "f", result={"error": "nan loss", "curve": [float("nan")]}, status="failed", **kw
    )
    assert storage.get_training_result("f").result == {
        "error": "nan loss",
        "curve": [None],
    }  # JSON has no NaN
    assert storage.put_training_result("f", result={"val_bpb": 3.0}, val_bpb=3.0, **kw)
    assert not storage.put_training_result("f", result={"val_bpb": 4.0}, val_bpb=4.0, **kw)
    assert storage.get_training_result("f").val_bpb == 3.0
    assert storage.get_training_result("missing") is None
    with pytest.raises(ValueError):
        storage.put_training_result("x", result={}, status="weird", **kw)


def test_put_latency_result_once(storage):
    fp = {"device": "cpu", "torch": "2.x"}
    assert storage.put_latency_result(
        "lk",
        layout_hash="h",
        latency_config_hash="c",
        device_fingerprint=fp,
        result={"decode_ms": 1.5},
        decode_ms=1.5,
    )
    assert not storage.put_latency_result("lk", layout_hash="h", result={"decode_ms": 9.0}, decode_ms=9.0)
    assert _count(storage, db.latency_results) == 1
    got = storage.get_latency_result("lk")
    assert (got.decode_ms, got.device_fingerprint, got.latency_config_hash) == (1.5, fp, "c")


def test_concurrent_puts_from_threads(storage):
    n = 6
    barrier = threading.Barrier(n)
    outcomes: list[object] = []

    def put(i: int) -> None:
        barrier.wait()
        try:
            outcomes.append(storage.put_training_result("race", layout_hash="h", result={"by": i}, val_bpb=i))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcomes.append(exc)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=str) == [False] * (n - 1) + [True]
    assert _count(storage, db.training_results) == 1


def _race_in_process(url: str, barrier, results) -> None:
    store = Storage(url)
    try:
        barrier.wait(timeout=60)
        store.create_schema()  # several coordinators starting on one empty database
        job = store.create_job("search", {}, idempotency_key="same-request")
        barrier.wait(timeout=60)
        stored = store.put_training_result("race", layout_hash="h", result={"x": 1}, val_bpb=1.0)
        cid = store.add_candidate(job, {"x": 1}, "same-hash")
        results.put((stored, job, cid))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(("error", repr(exc), None))
    finally:
        store.close()


def test_concurrent_processes_migrate_and_put_once(db_url):
    ctx = multiprocessing.get_context("spawn")
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race_in_process, args=(db_url, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] != "error" for r in got), got
    assert sorted(r[0] for r in got) == [False] * (n - 1) + [True]  # one put stored
    assert len({r[1] for r in got}) == 1 and len({r[2] for r in got}) == 1  # one job, one candidate
    store = Storage(db_url)
    try:
        assert store.schema_is_current()
        assert _count(store, db.training_results) == 1
        assert _count(store, db.jobs) == 1 and _count(store, db.candidates) == 1
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- history, stat


def test_hypervolume_history_ordering(storage):
    job = storage.create_job("search", {})
    other = storage.create_job("search", {})
    for n, value in ((5, 0.5), (1, 0.1), (3, 0.3), (2, 0.2)):
        storage.record_hypervolume(job, n, value)
    storage.record_hypervolume(other, 1, 0.9)
    storage.record_hypervolume(job, 3, 0.35)  # recorded again (a resumed search): one point, the new value
    history = storage.hypervolume_history(job)
    assert [(h.n_evaluations, h.hypervolume) for h in history] == [(1, 0.1), (2, 0.2), (3, 0.35), (5, 0.5)]
    assert all(h.recorded_at.tzinfo == UTC for h in history)
    assert storage.hypervolume_history(12345) == []


def test_strategy_state_round_trip(storage):
    job = storage.create_job("search", {})
    assert storage.load_strategy_state(job) is None
    state = {
        "population": [{"id": 1, "age": 0, "hash": "ab"}, {"id": 2, "age": 1, "hash": "cd"}],
        "rng": [3, [2**32 - 1, 0, 12345678901234], None],
        "cycle": 7,
        "name": "ünïcode ✓",
        "bounds": {"val_bpb": [0.5, 8.0]},
        "flags": [True, False],
        "inf": float("inf"),
    }
    assert storage.save_strategy_state(job, state) == 1
    loaded = storage.load_strategy_state(job)
    assert loaded == {**state, "inf": None}
    state["cycle"] = 8
    assert storage.save_strategy_state(job, state) == 2
    assert storage.load_strategy_state(job)["cycle"] == 8
    assert _count(storage, db.strategy_state) == 1


def test_delete_job_cascades_but_keeps_results(storage):
    job = storage.create_job("search", {})
    keeper = storage.create_job("search", {})
    a = storage.add_candidate(job, {"i": 0}, "h0")
    b = storage.add_candidate(job, {"i": 1}, "h1", parent_id=a, generation=1)
    storage.put_training_result("tk0", layout_hash="h0", result={"val_bpb": 2.0}, val_bpb=2.0)
    storage.put_latency_result("lk0", layout_hash="h0", result={"decode_ms": 1.0}, decode_ms=1.0)
    storage.complete_candidate(a, "tk0", "lk0", 2.0, 1.0, 10, {})
    storage.set_front(job, [a])
    storage.record_hypervolume(job, 1, 0.2)
    storage.save_strategy_state(job, {"population": [a, b]})
    # The other search reuses the result, and warm-started from a candidate of the first one.
    reused = storage.add_candidate(keeper, {"i": 0}, "h0", parent_id=b)
    storage.complete_candidate(reused, "tk0", "lk0", 2.0, 1.0, 10, {}, reused=True)

    assert storage.delete_job(job)
    assert storage.get_candidate(a) is None and storage.get_candidate(b) is None
    assert storage.count_candidates(job) == 0
    assert storage.hypervolume_history(job) == [] and storage.load_strategy_state(job) is None
    assert storage.get_training_result("tk0") is not None and storage.get_latency_result("lk0") is not None
    kept = storage.get_candidate(reused)
    assert (
        kept.status == "reused" and kept.parent_id is None
    )  # lineage into the deleted job is cut, not broken
    assert _count(storage, db.candidates) == 1

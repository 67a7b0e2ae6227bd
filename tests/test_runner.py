"""Job leases and the job runner, on SQLite and PostgreSQL: atomic claims under a global concurrency limit,
queue order, heartbeats, takeover of a dead owner's job, cancellation reaching the running engine, graceful
stop handing the job back."""

import json
import os
import threading
import time
from datetime import timedelta

import pytest

from api.runner import JobRunner
from search.config import SearchConfig
from search.db import utcnow
from search.executors import InlineExecutor
from tests import pg
from tests.test_engine import TINY

storage = pg.storage


def make_job(storage, priority=0, budget=4, **overrides):
    config = SearchConfig.model_validate({**TINY, "budget": budget, **overrides})
    return storage.create_job(
        "search", json.loads(config.model_dump_json()), priority=priority, budget=budget
    )


def test_claim_takes_queue_order_and_respects_the_global_limit(storage):
    low, high, high2 = make_job(storage, 0), make_job(storage, 5), make_job(storage, 5)
    first = storage.claim_job("a", 30, max_running=2)
    second = storage.claim_job("b", 30, max_running=2)
    assert (first.id, second.id) == (high, high2)  # priority first, FIFO within it
    assert first.status == "running" and first.lease_owner == "a" and first.started_at is not None
    assert storage.claim_job("c", 30, max_running=2) is None  # two live leases: the limit holds
    assert storage.claim_job("c", 30, max_running=3).id == low
    assert storage.claim_job("d", 30) is None  # nothing queued any more


def test_expired_lease_is_taken_over_and_the_old_owner_cannot_write(storage):
    job = make_job(storage)
    t0 = utcnow()
    assert storage.claim_job("dead", 10, now=t0).id == job
    assert storage.claim_job("other", 10, now=t0 + timedelta(seconds=5)) is None  # still leased
    taken = storage.claim_job("other", 10, now=t0 + timedelta(seconds=11))
    assert taken.id == job and taken.lease_owner == "other"
    assert not storage.renew_lease(job, "dead", 10)  # the old owner learns it lost the job
    assert not storage.release_job(job, "dead", "failed", error="late")  # and its status write is refused
    assert storage.get_job(job).status == "running" and storage.get_job(job).error is None
    assert storage.renew_lease(job, "other", 10)
    assert storage.release_job(job, "other", "queued")
    released = storage.get_job(job)
    assert released.status == "queued" and released.lease_owner is None and released.lease_expires_at is None
    assert storage.claim_job("third", 10).id == job  # a released job is taken at once


def test_claims_race_to_exactly_one_owner(storage):
    job = make_job(storage)
    winners, barrier = [], threading.Barrier(6)

    def claim(i):
        barrier.wait()
        got = storage.claim_job(f"r{i}", 30, max_running=10)
        if got is not None:
            winners.append(got.lease_owner)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(winners) == 1 and storage.get_job(job).lease_owner == winners[0]


def inline_runner(storage, tmp_path, **kwargs):
    data_dir = tmp_path / "data"
    return JobRunner(
        storage,
        data_dir,
        executor_factory=lambda c: InlineExecutor(str(data_dir), threads=1),
        poll_s=0.05,
        **kwargs,
    )


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_runner_runs_queued_jobs_to_completion_one_at_a_time(storage, tmp_path):
    jobs = [make_job(storage, budget=3), make_job(storage, budget=3, seed=1)]
    runner = inline_runner(storage, tmp_path, slots=2, max_running=1)
    seen_running = []
    runner.start()
    try:

        def done():
            statuses = [storage.get_job(j).status for j in jobs]
            seen_running.append(statuses.count("running"))
            return statuses == ["completed", "completed"]

        wait_for(done, what="both jobs completed")
    finally:
        runner.stop()
    assert max(seen_running) == 1  # the global limit: never two at once even with two free slots
    for j in jobs:
        job = storage.get_job(j)
        assert job.lease_owner is None and job.n_evaluations == 3 and job.finished_at is not None


def test_cancel_reaches_the_running_engine_and_stop_hands_jobs_back(storage, tmp_path):
    cancelled, handed_back = make_job(storage, budget=50), make_job(storage, budget=50)
    runner = inline_runner(storage, tmp_path, slots=2, max_running=2, lease_s=0.6)
    runner.start()
    try:
        wait_for(lambda: sorted(runner.running_jobs) == sorted([cancelled, handed_back]), what="both running")
        wait_for(lambda: storage.count_candidates(cancelled, "completed") >= 1, what="one evaluation done")
        with storage.transaction() as conn:  # what POST /cancel does
            conn.exec_driver_sql(f"UPDATE jobs SET status = 'cancelled' WHERE id = {cancelled}")
        wait_for(lambda: cancelled not in runner.running_jobs, timeout=30, what="the cancelled job to stop")
        assert handed_back in runner.running_jobs
    finally:
        runner.stop()
    job = storage.get_job(cancelled)
    assert job.status == "cancelled" and storage.count_candidates(cancelled, "running") == 0
    back = storage.get_job(handed_back)
    assert back.status == "queued" and back.lease_owner is None  # graceful stop: back in the queue at once
    assert storage.count_candidates(handed_back, "running") == 0


def test_a_runner_takes_over_a_dead_owners_job_and_finishes_it(storage, tmp_path):
    job = make_job(storage, budget=4)
    dead = storage.claim_job("dead-coordinator", 0.5)
    assert dead.id == job
    runner = inline_runner(storage, tmp_path, lease_s=5)
    runner.start()
    try:
        wait_for(lambda: storage.get_job(job).status == "completed", what="the taken-over job to complete")
    finally:
        runner.stop()
    assert storage.count_candidates(job, ("completed", "reused", "failed")) == 4


@pytest.mark.parametrize("kind", ["fidelity"])
def test_kinds_without_a_handler_stay_queued(storage, kind):
    storage.create_job(kind, {})
    assert storage.claim_job("r", 30, kinds=("search",)) is None


def test_a_dead_owner_of_this_machine_is_taken_over_at_once_a_live_one_is_not(storage, tmp_path):
    import socket
    import subprocess

    from search.leases import _pid_namespace, owner_is_dead_here

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_owner = f"{socket.gethostname()}:{gone.pid}:{_pid_namespace()}:deadbeef"
    live_owner = f"{socket.gethostname()}:{os.getppid()}:{_pid_namespace()}:cafecafe"  # our parent lives
    elsewhere = f"another-host:{gone.pid}:{_pid_namespace()}:0badf00d"
    assert owner_is_dead_here(dead_owner) and not owner_is_dead_here(live_owner)
    assert not owner_is_dead_here(elsewhere) and not owner_is_dead_here("free-form-owner")
    jobs = {}
    for owner in (dead_owner, live_owner, elsewhere):
        jobs[owner] = make_job(storage)
        assert storage.claim_job(owner, 3600, job_id=jobs[owner]).lease_owner == owner  # an hour-long lease
    runner = inline_runner(storage, tmp_path, lease_s=30, max_running=5)
    taken = runner._take_from_dead_owner()
    assert taken is not None and taken.id == jobs[dead_owner] and taken.lease_owner == runner.owner
    assert runner._take_from_dead_owner() is None  # the live and the foreign owners keep theirs
    assert storage.get_job(jobs[live_owner]).lease_owner == live_owner
    assert storage.get_job(jobs[elsewhere]).lease_owner == elsewhere

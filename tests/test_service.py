"""The coordinator as users run it: `hybridnas serve` (uvicorn) in a subprocess, on SQLite and PostgreSQL.

- kill -9 the coordinator mid-evaluation, start it again: the job resumes under the engine's guarantee
  (nothing completed lost, an in-flight evaluation rerun at most once, no key twice) — at once, since the dead
  owner was a process of this machine (`owner_is_dead_here`); a coordinator elsewhere would wait for the
  lease;
- SIGTERM: the server exits cleanly, the job goes back to the queue with its lease released and nothing left
  running; the next coordinator takes it at once and finishes it.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from search.storage import Storage
from tests import pg
from tests.test_search_resume import wait_for

HYBRIDNAS = str(Path(sys.executable).with_name("hybridnas"))
TOKEN = "service-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEARCH = {
    "name": "service-test",
    "space": {"preset": "benchmark"},
    "strategy": "pareto-aging",
    "strategy_options": {"population_size": 4, "sample_size": 2},
    "budget": 6,
    "executor": "inline",
    "workers": 1,
    "seed": 5,
    "proxy": {"steps": 25, "batch_size": 4, "seq_len": 32, "eval_tokens": 512},
    "latency": {"prompt_len": 8, "decode_tokens": 4, "repeats": 2, "throughput": False},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coordinator:
    def __init__(self, tmp_path: Path, url: str, lease_s: float = 2.0):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HYBRIDNAS_DATABASE_URL": url,
            "HYBRIDNAS_TOKEN": TOKEN,
            "HYBRIDNAS_LEASE_S": str(lease_s),
            "HYBRIDNAS_POLL_S": "0.2",
            "HYBRIDNAS_SCHEDULER": "false",
            "PYTHONUNBUFFERED": "1",
        }
        self.log = open(tmp_path / f"serve-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [HYBRIDNAS, "serve", "--port", str(self.port), "--data-dir", str(tmp_path / "data")],
            env=env,
            cwd=tmp_path,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.log_path = Path(self.log.name)
        wait_for(self.healthy, timeout=60, what="the coordinator to answer")

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"coordinator exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}"
            )
        try:
            return httpx.get(f"{self.base}/api/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


def submit(coordinator: Coordinator) -> int:
    r = httpx.post(f"{coordinator.base}/api/searches", json=SEARCH, headers=AUTH, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def mid_evaluation(storage: Storage, job_id: int):
    def check() -> bool:
        counts = storage.candidate_counts(job_id)
        return counts["completed"] + counts["reused"] >= 2 and counts["running"] >= 1

    return check


@pytest.mark.parametrize("backend", pg.BACKENDS)
def test_kill_9_coordinator_and_restart_resumes_the_job(tmp_path, backend):
    with pg.migrated_url(backend, tmp_path) as url:
        storage = Storage(url)
        first = Coordinator(tmp_path, url)
        try:
            job_id = submit(first)
            wait_for(mid_evaluation(storage, job_id), what="two evaluations done and one running")
            os.kill(first.proc.pid, signal.SIGKILL)  # a real crash: no shutdown code runs
            first.proc.wait(30)
        finally:
            first.close()
        dead = storage.get_job(job_id)
        assert dead.status == "running" and dead.lease_owner  # the dead owner's lease is still there
        completed_before = {
            c.id: (c.training_key, c.val_bpb)
            for c in storage.candidates(job_id, status=("completed", "reused"))
        }
        in_flight = [c.id for c in storage.candidates(job_id, status="running")]
        assert completed_before and in_flight
        second = Coordinator(tmp_path, url)
        try:
            wait_for(
                lambda: storage.get_job(job_id).status == "completed", timeout=300, what="the job to complete"
            )
            r = httpx.get(f"{second.base}/api/searches/{job_id}", timeout=10).json()
            assert r["status"] == "completed" and r["n_evaluations"] == 6
        finally:
            second.close()
        job = storage.get_job(job_id)
        assert job.lease_owner is None and job.lease_owner != dead.lease_owner
        after = {c.id: c for c in storage.candidates(job_id)}
        for cid, (key, bpb) in completed_before.items():  # nothing completed is lost
            assert after[cid].status in ("completed", "reused") and (
                after[cid].training_key,
                after[cid].val_bpb,
            ) == (key, bpb)
        for cid in in_flight:  # rerun at most once
            assert after[cid].status in ("completed", "failed", "reused") and after[cid].attempts <= 2
        assert sum(c.status in ("completed", "failed", "reused") for c in after.values()) == 6
        with storage.transaction() as conn:
            twice = conn.exec_driver_sql(
                "SELECT training_key FROM training_results GROUP BY training_key HAVING COUNT(*) > 1"
            ).fetchall()
        assert twice == []
        storage.close()


def test_sigterm_hands_the_job_back_and_the_next_coordinator_finishes_it(tmp_path):
    url = f"sqlite:///{tmp_path}/service.db"
    storage = None
    first = Coordinator(
        tmp_path, url, lease_s=60
    )  # a long lease: only the graceful release lets it go at once
    try:
        storage = Storage(url)
        job_id = submit(first)
        wait_for(mid_evaluation(storage, job_id), what="two evaluations done and one running")
        first.proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal after its graceful shutdown: exit by SIGTERM, with the shutdown done.
        assert first.proc.wait(90) in (0, -signal.SIGTERM), first.log_path.read_text()[-3000:]
        assert "Application shutdown complete" in first.log_path.read_text()
    finally:
        first.close()
    job = storage.get_job(job_id)
    assert job.status == "queued" and job.lease_owner is None and job.lease_expires_at is None
    assert storage.candidate_counts(job_id)["running"] == 0
    assert TOKEN not in first.log_path.read_text()  # no secret in the logs
    second = Coordinator(tmp_path, url, lease_s=60)
    try:
        started = time.monotonic()
        wait_for(
            lambda: storage.get_job(job_id).status == "completed", timeout=300, what="the job to complete"
        )
        assert time.monotonic() - started < 60  # taken at once, not after a 60 s lease
    finally:
        second.close()
    storage.close()


def ray_heads_of(pid: int) -> list[int]:
    """Ray's live GCS server processes whose parent is `pid`."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,stat=,comm="], capture_output=True, text=True).stdout
    return [
        int(fields[0])
        for fields in (line.split() for line in out.splitlines())
        if fields[3:] == ["gcs_server"] and int(fields[1]) == pid and not fields[2].startswith("Z")
    ]


def test_local_ray_outlives_each_job_and_serves_the_next(tmp_path):
    """Ray's head processes die with the thread that started them: started on a job's thread, they died when
    that job ended and took the coordinator down a minute later. Two Ray searches in a row must both
    finish."""
    url = f"sqlite:///{tmp_path}/ray.db"
    storage = Storage(url)
    coordinator = Coordinator(tmp_path, url, lease_s=30)
    try:
        body = {**SEARCH, "executor": "ray", "workers": 1, "budget": 2}
        first = httpx.post(f"{coordinator.base}/api/searches", json=body, headers=AUTH, timeout=10).json()[
            "id"
        ]
        wait_for(
            lambda: storage.get_job(first).status == "completed", timeout=300, what="the first Ray search"
        )
        time.sleep(2)
        assert ray_heads_of(coordinator.proc.pid), "Ray's GCS died with the first job"
        second = httpx.post(
            f"{coordinator.base}/api/searches", json={**body, "seed": 9}, headers=AUTH, timeout=10
        ).json()["id"]
        wait_for(
            lambda: storage.get_job(second).status == "completed", timeout=300, what="the second Ray search"
        )
        assert coordinator.healthy()
    finally:
        coordinator.close()
        storage.close()


def test_the_app_lifespan_runs_the_scheduler_and_stops_it(tmp_path):
    """The wiring `hybridnas serve` uses: the lifespan starts the scheduler (a due time missed within the
    grace period fires once at start) and stops it on shutdown; runners off, so the fired search stays
    queued."""
    from datetime import timedelta

    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.auth import Auth
    from api.settings import Settings
    from search.db import utcnow

    storage = Storage(f"sqlite:///{tmp_path}/sched.db")
    storage.create_schema()
    schedule_id = storage.create_schedule(
        "every-minute", "* * * * *", {"budget": 2}, created_at=utcnow() - timedelta(seconds=90)
    )
    settings = Settings(data_dir=tmp_path / "data", runners=0, scheduler=True, scheduler_interval_s=0.2)
    with TestClient(create_app(settings, storage, auth=Auth(TOKEN))) as client:
        wait_for(lambda: storage.count_jobs(kind="search") >= 1, timeout=30, what="the missed fire to run")
        time.sleep(1.0)  # more ticks: still exactly one fire per due time
        fires = client.get(f"/api/schedules/{schedule_id}/fires").json()["items"]
    jobs = storage.list_jobs(kind="search")
    fired = [f for f in fires if f["status"] == "fired"]
    assert len(jobs) == len(fired) >= 1 and all(
        j.status == "queued" and j.schedule_id == schedule_id for j in jobs
    )
    count = storage.count_jobs()
    time.sleep(0.6)
    assert storage.count_jobs() == count  # the lifespan's end stopped the scheduler
    storage.close()

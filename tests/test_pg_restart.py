"""PostgreSQL restarts under a running Storage, and under a running coordinator (uvicorn): both go on.

The server is restarted with `pg_ctlcluster <version> <cluster> restart` (fast shutdown: every connection is
dropped), the cluster being the one `pg_lsclusters -h` lists on the test URL's port. Whoever may do that runs
these tests: root (CI runs as root; pg_ctlcluster switches to the cluster's owner) or the cluster's owner.
Anyone else skips them with the reason — except under CI=true, where they must run and so fail instead.

What is checked: writes before the restart; after it (once `pg_ctlcluster` returns, the server accepts
connections again) reads and writes succeed with *no* failed call, on the same Storage and the same server
process — the pooled connections the restart killed are replaced on checkout (`pool_pre_ping` in
search/storage.py's `_postgres_engine`). A control engine without pre-ping, idle over the same restart, does
fail on its first use: the restart really dropped the pooled connections, so the check is not vacuous.

Effect on the rest of the session (one pytest process, tests run one at a time): the restart drops every
connection to the server, but nothing here is shared — each test makes its own database and Storage (function
fixtures), tests/pg.py's admin engines hold no pooled connection (NullPool) and its template database is made
and closed before use; another module's long-lived PostgreSQL Storage would reconnect through pre-ping as
tested here. Each test waits until the server accepts connections again (and starts it if a restart left it
down) before it returns, so the next test finds it up. Do not run this module against a server others are
using at the same moment: their open connections are dropped too.
"""

from __future__ import annotations

import concurrent.futures
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, exc, select
from sqlalchemy.engine import make_url

from search import db
from search.storage import Storage
from tests import pg
from tests.test_service import SEARCH as SERVICE_SEARCH

REPO = Path(__file__).resolve().parent.parent
TOKEN = "pg-restart-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READY_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------- the server


@dataclass(frozen=True)
class Cluster:
    version: str
    name: str
    port: int
    owner: str


def _skip_or_fail(reason: str) -> None:
    if pg.in_ci():
        pytest.fail(f"CI=true and the PostgreSQL restart test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _cluster(url: str) -> Cluster:
    """The local cluster serving `url`, found with `pg_lsclusters -h`; skips (fails in CI) if there is none or
    this process may not restart it."""
    parsed = make_url(url)
    if parsed.host not in (None, "", "localhost", "127.0.0.1", "::1"):
        _skip_or_fail(f"PostgreSQL at {parsed.host} is not on this machine: cannot restart it")
    port = parsed.port or 5432
    if shutil.which("pg_lsclusters") is None or shutil.which("pg_ctlcluster") is None:
        _skip_or_fail(
            "pg_lsclusters/pg_ctlcluster not found (Debian's postgresql-common): cannot restart the server"
        )
    out = subprocess.run(
        ["pg_lsclusters", "-h"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[2] == str(port):
            cluster = Cluster(version=cols[0], name=cols[1], port=port, owner=cols[4])
            break
    else:
        _skip_or_fail(f"no cluster of pg_lsclusters listens on port {port}:\n{out}")
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        me = f"uid {os.geteuid()}"
    if os.geteuid() != 0 and me != cluster.owner:
        _skip_or_fail(
            f"this process runs as {me!r}, neither root nor the owner of cluster {cluster.version}/"
            f"{cluster.name} ({cluster.owner!r}): not allowed to restart PostgreSQL"
        )
    return cluster


def _wait_ready(timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until a new connection to the server succeeds (a fresh one each try: nothing pooled)."""
    _url, engine = pg._admin_engine(pg.require_postgres())
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
                return
            except exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        engine.dispose()


def _start_time() -> str:
    _url, engine = pg._admin_engine(pg.require_postgres())
    try:
        with engine.connect() as conn:
            return str(conn.exec_driver_sql("SELECT pg_postmaster_start_time()").scalar_one())
    finally:
        engine.dispose()


def _restart(cluster: Cluster) -> None:
    """Restart the cluster (fast shutdown: connections dropped) and wait until it accepts connections."""
    before = _start_time()
    cmd = ["pg_ctlcluster", cluster.version, cluster.name, "restart"]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd="/")
        assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}"
    finally:
        try:
            _wait_ready(10)
        except exc.OperationalError:  # left down: start it, so the rest of the session has its server
            subprocess.run(
                ["pg_ctlcluster", cluster.version, cluster.name, "start"], check=False, timeout=120, cwd="/"
            )
            _wait_ready()
    assert _start_time() != before, "the server did not restart"


@pytest.fixture
def cluster() -> Cluster:
    return _cluster(pg.require_postgres())


@pytest.fixture
def pg_url(tmp_path, cluster):
    """A fresh database of this test's own, schema at head (nothing shared with other tests)."""
    with pg.migrated_url("postgresql", tmp_path) as url:
        yield url
    _wait_ready()


# ---------------------------------------------------------------------------------------------- Storage


def _backend_pids(store: Storage, n: int) -> set[int]:
    """Check out `n` connections at once (so the pool holds that many) and return their server pids."""
    conns = [store.engine.connect() for _ in range(n)]
    try:
        return {c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() for c in conns}
    finally:
        for c in conns:
            c.close()


def test_storage_survives_a_server_restart(pg_url, cluster):
    store = Storage(pg_url)
    control = create_engine(make_url(store.engine.url), pool_pre_ping=False)  # the same pool, minus pre-ping
    try:
        job = store.create_job("search", {"budget": 10}, name="before", idempotency_key="restart-1")
        first = store.add_candidate(job, {"operators": ["attention"]}, "h0")
        store.update_progress(job, 1)
        old_pids = _backend_pids(store, 3)
        assert len(old_pids) == 3 and store.engine.pool.checkedin() == 3
        with control.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

        _restart(cluster)

        # every call below must succeed the first time: no retry, no new Storage
        assert store.get_job(job).name == "before"
        assert store.get_candidate(first).layout_hash == "h0"
        second = store.add_candidate(job, {"operators": ["mamba2"]}, "h1")
        store.complete_candidate(second, None, None, 1.25, 2.5, 1000, {"val_bpb": 1.25, "decode_ms": 2.5})
        store.set_front(job, [second])
        store.update_progress(job, 2)
        assert store.create_job("search", {"budget": 10}, idempotency_key="restart-1") == job
        other = store.create_job("search", {"budget": 3}, name="after")
        with store.transaction() as conn:
            conn.execute(db.jobs.update().where(db.jobs.c.id == other).values(priority=7))
        with store.session() as session:
            assert session.execute(select(db.Job.priority).where(db.Job.id == other)).scalar_one() == 7
        assert [c.id for c in store.candidates(job, on_front=True)] == [second]
        assert store.get_job(job).n_evaluations == 2 and store.count_jobs() == 2
        new_pids = _backend_pids(store, 3)
        assert not new_pids & old_pids  # the old sessions were gone; these are new ones

        # the control: without pre-ping, the first use of the killed pooled connection fails
        with pytest.raises(exc.OperationalError), control.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    finally:
        control.dispose()
        store.close()


# ---------------------------------------------------------------------------------------------- coordinator


_SERVER = """
import sys, uvicorn
from api.app import create_app
from api.settings import Settings
uvicorn.run(create_app(Settings()), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def coordinator(tmp_path, cluster):
    """A coordinator process (uvicorn) on an empty PostgreSQL database of its own (it migrates it at start),
    runners and scheduler off; yields its base URL."""
    import httpx

    with pg.backend_url("postgresql", tmp_path) as url:
        port = _free_port()
        env = {
            **os.environ,
            "HYBRIDNAS_DATABASE_URL": url,
            "HYBRIDNAS_TOKEN": TOKEN,
            "HYBRIDNAS_DATA_DIR": str(tmp_path / "data"),
            "HYBRIDNAS_RUNNERS": "0",
            "HYBRIDNAS_SCHEDULER": "false",
            "PYTHONPATH": str(REPO),
        }
        env.pop("DATABASE_URL", None)
        log = (tmp_path / "server.log").open("w+")
        proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                assert proc.poll() is None, (
                    f"the coordinator exited:\n{(tmp_path / 'server.log').read_text()}"
                )
                try:
                    if httpx.get(f"{base}/api/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the coordinator did not become ready"
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()
        _wait_ready()


def test_coordinator_survives_a_server_restart(coordinator, cluster, tmp_path):
    import httpx

    def ok(response: httpx.Response, status: int = 200) -> dict:
        assert response.status_code == status, (
            f"{response.request.method} {response.request.url}: "
            f"{response.status_code} {response.text}\n--- server log:\n"
            f"{(tmp_path / 'server.log').read_text()}"
        )
        return response.json() if response.content else {}

    with httpx.Client(base_url=coordinator, timeout=30) as client:
        ids = [
            ok(client.post("/api/searches", json={"name": f"before-{i}", "budget": 4}, headers=AUTH), 201)[
                "id"
            ]
            for i in range(3)
        ]
        # several requests at once, so the server's pool holds several connections for the restart to kill
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for r in pool.map(lambda i: client.get(f"/api/searches/{i}"), ids + ids):
                ok(r)

        _restart(cluster)

        # no failed request after the server is back: the same process, the same Storage
        ok(client.get("/api/ready"))
        assert {s["id"] for s in ok(client.get("/api/searches"))["items"]} == set(ids)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for r in pool.map(lambda i: client.get(f"/api/searches/{i}"), ids + ids):
                ok(r)
        new = ok(
            client.post(
                "/api/searches",
                json={"name": "after", "budget": 2},
                headers=AUTH,
            ),
            201,
        )["id"]
        assert ok(client.post(f"/api/searches/{ids[0]}/cancel", headers=AUTH))["status"] == "cancelled"
        ok(client.delete(f"/api/searches/{ids[1]}", headers=AUTH), 204)
        listing = ok(client.get("/api/searches", params={"limit": 10}))
        assert {s["id"] for s in listing["items"]} == {ids[0], ids[2], new} and listing["total"] == 3
        assert ok(client.get("/api/jobs"))["total"] == 2  # queued: ids[2] and new


def test_a_running_search_survives_a_server_restart(tmp_path, cluster):
    """A restart while the job runner is mid-search: the engine stops without writing (the database is
    gone), the job's lease lapses, the runner takes it again and resumes it; the search completes its budget
    with nothing evaluated twice."""
    import httpx

    search = {**SERVICE_SEARCH, "name": "through-a-restart", "seed": 2}
    with pg.migrated_url("postgresql", tmp_path) as url:
        port = _free_port()
        env = {
            **os.environ,
            "HYBRIDNAS_DATABASE_URL": url,
            "HYBRIDNAS_TOKEN": TOKEN,
            "HYBRIDNAS_LEASE_S": "3",
            "HYBRIDNAS_POLL_S": "0.2",
            "HYBRIDNAS_SCHEDULER": "false",
            "PYTHONPATH": str(REPO),
        }
        env.pop("DATABASE_URL", None)
        log = (tmp_path / "serve.log").open("w+")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "api.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path / "data"),
            ],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        store = Storage(url)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if httpx.get(f"{base}/api/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.2)
            job_id = httpx.post(f"{base}/api/searches", json=search, headers=AUTH, timeout=30).json()["id"]

            def counts():
                return store.candidate_counts(job_id)

            deadline = time.monotonic() + 240
            while not (counts()["completed"] + counts()["reused"] >= 2 and counts()["running"] >= 1):
                assert time.monotonic() < deadline, counts()
                time.sleep(0.1)
            _restart(cluster)
            deadline = time.monotonic() + 300
            while store.get_job(job_id).status != "completed":
                assert store.get_job(job_id).status in ("queued", "running"), store.get_job(job_id)
                assert time.monotonic() < deadline, counts()
                time.sleep(0.5)
            job = store.get_job(job_id)
            assert job.n_evaluations == 6 and job.lease_owner is None
            cands = store.candidates(job_id)
            done = [c for c in cands if c.status in ("completed", "reused")]
            assert len(done) + counts()["failed"] == 6 and len({c.layout_hash for c in done}) == len(done)
        finally:
            proc.terminate()
            proc.wait(60)
            log.close()
            store.close()
        _wait_ready()

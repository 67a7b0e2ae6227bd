"""The chaos harness: a real search through `hybridnas serve` on real Ray while a seeded schedule kill -9s a
random Ray worker or the coordinator (restarted at once) at random moments, optionally restarting
PostgreSQL too; then the checks every run must pass.

Used by `tests/test_chaos.py` (3 kills, in CI, on both backends) and `benchmarks/chaos.py` (a longer run
whose counts go to `benchmarks/results/chaos.md`). Every process of a run carries a marker in its
environment (`HYBRIDNAS_CHAOS_RUN`), inherited by the coordinator's Ray and its workers, so the run's
processes can be found, and checked to be gone at the end, without trusting parent pids.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HYBRIDNAS = str(Path(sys.executable).with_name("hybridnas"))
TOKEN = "chaos-token-not-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MARKER = "HYBRIDNAS_CHAOS_RUN"


def chaos_search(budget: int, seed: int) -> dict:
    return {
        "name": f"chaos-{seed}",
        "space": {"preset": "benchmark"},
        "strategy": "pareto-aging",
        "strategy_options": {"population_size": 4, "sample_size": 2},
        "budget": budget,
        "executor": "ray",
        "workers": 2,
        "seed": seed,
        "max_retries": 3,
        "timeout_s": 300,
        "proxy": {"steps": 30, "batch_size": 4, "seq_len": 32, "eval_tokens": 512},
        "latency": {"prompt_len": 8, "decode_tokens": 4, "repeats": 2, "throughput": False},
    }


@dataclass
class ChaosReport:
    backend: str
    seed: int
    budget: int
    kills: Counter = field(default_factory=Counter)  # by target: "worker", "coordinator"
    postgres_restarts: int = 0
    coordinators_started: int = 0
    status: str = ""
    evaluations: int = 0
    completed: int = 0
    failed: int = 0
    reruns: int = 0  # attempts beyond the first, over every candidate
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)  # every check that did not hold

    def to_dict(self) -> dict:
        return {**self.__dict__, "kills": dict(self.kills)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def run_processes(run_id: str) -> list[int]:
    """The live processes that carry this run's marker."""
    needle = f"{MARKER}={run_id}".encode()
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and needle in _environ(int(p.name)) and _alive(int(p.name))
    ]


def ray_workers(run_id: str) -> list[int]:
    """The run's evaluation workers (Ray titles an actor's process `ray::EvaluationWorker...`)."""
    return [pid for pid in run_processes(run_id) if _cmdline(pid).startswith("ray::EvaluationWorker")]


class Coordinator:
    """One `hybridnas serve` of the run, in its own process group."""

    def __init__(self, env: dict, data_dir: Path, log_dir: Path, index: int):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"serve-{index}.log", "wb")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            [HYBRIDNAS, "serve", "--port", str(self.port), "--data-dir", str(data_dir)],
            env=env,
            cwd=data_dir.parent,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.base}/api/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"coordinator not ready in {timeout:g} s; see {self.log.name}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 90) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()


def restart_postgres() -> None:
    """Restart the local PostgreSQL cluster (Debian's tools, as `.ci/run` starts it)."""
    version = sorted(os.listdir("/usr/lib/postgresql"), key=lambda v: [int(x) for x in v.split(".")])[-1]
    subprocess.run(
        ["pg_ctlcluster", version, "main", "restart"], check=True, capture_output=True, timeout=120
    )


class Ledger:
    """What the database said along the way: every completed result seen, to check none is lost."""

    def __init__(self, storage, job_id: int):
        self.storage, self.job_id = storage, job_id
        self.completed: dict[int, tuple] = {}

    def look(self) -> None:
        try:
            rows = self.storage.candidates(self.job_id, status=("completed", "reused"))
        except Exception:  # noqa: BLE001 - the database may be restarting: look again later
            return
        for c in rows:
            self.completed.setdefault(c.id, (c.training_key, c.latency_key, c.val_bpb, c.decode_ms))


def run_chaos(
    database_url: str,
    backend: str,
    workdir: Path,
    *,
    seed: int,
    kills: int,
    budget: int,
    postgres_restarts: int = 0,
    coordinator_share: float = 0.3,
    max_gap_s: float = 8.0,
    timeout_s: float = 900.0,
    linger_s: float = 90.0,
) -> ChaosReport:
    """One chaos run; the report says what happened and which checks did not hold (`problems`)."""
    from search.storage import Storage

    rng = random.Random(seed)
    report = ChaosReport(backend, seed, budget)
    run_id = uuid.uuid4().hex
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        MARKER: run_id,
        "HYBRIDNAS_DATABASE_URL": database_url,
        "HYBRIDNAS_TOKEN": TOKEN,
        "HYBRIDNAS_LEASE_S": "3",
        "HYBRIDNAS_POLL_S": "0.2",
        "HYBRIDNAS_SCHEDULER": "false",
        "HYBRIDNAS_RAY_NUM_CPUS": "2",
        "PYTHONUNBUFFERED": "1",
    }
    storage = Storage(database_url)
    started = time.monotonic()
    coordinator = Coordinator(env, data_dir, workdir, report.coordinators_started)
    report.coordinators_started += 1
    try:
        coordinator.ready()
        r = httpx.post(
            f"{coordinator.base}/api/searches", json=chaos_search(budget, seed), headers=AUTH, timeout=30
        )
        r.raise_for_status()
        job_id = r.json()["id"]
        ledger = Ledger(storage, job_id)
        plan = ["coordinator" if rng.random() < coordinator_share else "worker" for _ in range(kills)]
        plan += ["postgres"] * postgres_restarts
        rng.shuffle(plan)
        for target in plan:
            # A random moment while the search works: an evaluation in flight, then a random wait.
            _wait_until(
                lambda: ledger.look() or _in_flight(storage, job_id) or _finished(storage, job_id), 300
            )
            _wait(ledger.look, rng.uniform(0.0, max_gap_s))
            if _finished(storage, job_id):
                break
            if target == "worker":
                workers = _wait_for_workers(run_id, 60)
                if not workers:
                    report.problems.append("no Ray worker to kill within 60 s")
                    continue
                os.kill(rng.choice(workers), signal.SIGKILL)
            elif target == "coordinator":
                coordinator.kill()
                coordinator = Coordinator(env, data_dir, workdir, report.coordinators_started)
                report.coordinators_started += 1
                coordinator.ready()
            else:
                restart_postgres()
                report.postgres_restarts += 1
            if target != "postgres":
                report.kills[target] += 1
        deadline = time.monotonic() + timeout_s
        while not _finished(storage, job_id) and time.monotonic() < deadline:
            ledger.look()
            time.sleep(0.5)
        ledger.look()
        code = coordinator.stop()
        if code != 0:
            report.problems.append(f"the last coordinator exited {code} on SIGTERM")
        _check(report, storage, job_id, ledger, budget)
    finally:
        if coordinator.proc.poll() is None:
            os.killpg(coordinator.proc.pid, signal.SIGKILL)
        report.wall_s = round(time.monotonic() - started, 1)
        left = _wait_gone(run_id, linger_s)
        if left:
            report.problems.append(
                f"{len(left)} process(es) of the run left: {[_cmdline(p)[:60] for p in left]}"
            )
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        storage.close()
    return report


def _wait(poll, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        poll()
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)


def _in_flight(storage, job_id: int) -> bool:
    try:
        return storage.count_candidates(job_id, status="running") > 0
    except Exception:  # noqa: BLE001 - restarting database
        return False


def _wait_for_workers(run_id: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = ray_workers(run_id)
        if workers:
            return workers
        time.sleep(0.2)
    return []


def _wait_gone(run_id: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = run_processes(run_id)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = run_processes(run_id)
    return left


def _finished(storage, job_id: int) -> bool:
    try:
        job = storage.get_job(job_id)
    except Exception:  # noqa: BLE001 - restarting database
        return False
    return job is not None and job.status in ("completed", "failed", "cancelled")


def _check(report: ChaosReport, storage, job_id: int, ledger: Ledger, budget: int) -> None:
    job = storage.get_job(job_id)
    cands = storage.candidates(job_id)
    counts = Counter(c.status for c in cands)
    report.status = job.status
    report.evaluations = job.n_evaluations
    report.completed = counts["completed"] + counts["reused"]
    report.failed = counts["failed"]
    report.reruns = sum(max(0, c.attempts - 1) for c in cands)
    if job.status != "completed" or report.completed + report.failed != budget or job.n_evaluations != budget:
        report.problems.append(
            f"budget not met: {job.status}, {dict(counts)}, n_evaluations {job.n_evaluations}"
        )
    if job.lease_owner is not None:
        report.problems.append(f"the job still holds a lease ({job.lease_owner})")
    with storage.transaction() as conn:
        for table, key in (("training_results", "training_key"), ("latency_results", "latency_key")):
            twice = conn.exec_driver_sql(
                f"SELECT {key} FROM {table} GROUP BY {key} HAVING COUNT(*) > 1"
            ).all()
            if twice:
                report.problems.append(f"{len(twice)} {key}(s) with two results")
    done = [c for c in cands if c.status in ("completed", "reused")]
    if len({c.layout_hash for c in done}) != len(done):
        report.problems.append("a layout completed twice in one search")
    now = {c.id: c for c in cands}
    for cid, seen in ledger.completed.items():
        c = now.get(cid)
        if (
            c is None
            or c.status not in ("completed", "reused")
            or (c.training_key, c.latency_key, c.val_bpb, c.decode_ms) != seen
        ):
            report.problems.append(f"candidate {cid}: a completed result was lost or changed")
    for c in cands:
        if c.status == "failed" and not (c.failure_reason or "").strip():
            report.problems.append(f"candidate {c.id} failed without a reason")


if __name__ == "__main__":  # pragma: no cover - `python -m tests.chaos URL BACKEND DIR` for a quick look
    url, backend, workdir = sys.argv[1:4]
    print(json.dumps(run_chaos(url, backend, Path(workdir), seed=0, kills=3, budget=8).to_dict(), indent=1))

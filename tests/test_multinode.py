"""A search on a real multi-node Ray cluster, on loopback and without containers: a head with no CPUs and a
separate worker node (each its own `ray start` process group with its own temp dir), token authentication
on for both and for the coordinator (`RAY_AUTH_MODE=token`, one token file named by `RAY_AUTH_TOKEN_PATH`),
and a real `hybridnas serve` joining it through RAY_ADDRESS.

- every evaluation runs on the worker node (the stored worker identity names its node id, never the head's,
  and a pid of that node's process tree);
- the worker node is killed (SIGKILL to its process group) mid-search and a new one joins later: the search
  waits for capacity, continues, and completes with nothing lost or duplicated, the rest on the new node.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from search.storage import Storage
from tests.chaos import _alive, _cmdline
from tests.test_reliability import descendants
from tests.test_search_resume import wait_for
from tests.test_service import AUTH, Coordinator, free_port

RAY = str(Path(sys.executable).with_name("ray"))
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])
SEARCH = {
    "name": "multinode",
    "space": {"preset": "benchmark"},
    "strategy": "pareto-aging",
    "strategy_options": {"population_size": 4, "sample_size": 2},
    "executor": "ray",
    "workers": 2,
    "seed": 11,
    "max_retries": 3,
    "timeout_s": 300,
    "proxy": {"steps": 25, "batch_size": 4, "seq_len": 32, "eval_tokens": 512},
    "latency": {"prompt_len": 8, "decode_tokens": 4, "repeats": 2, "throughput": False},
}
# The head notices a dead node in about 3 s instead of Ray's default 30 s or so.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class RayNode:
    """One `ray start --block` (a head or a worker node) in its own session, so one killpg stops it all."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path):
        # Short: Ray's unix socket paths live under the temp dir and must stay under 108 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix=f"hn-{name}-", dir="/tmp")
        self.log = open(log_dir / f"ray-{name}.log", "wb")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.log_path = Path(self.log.name)
        self.killed = False

    def evaluation_workers(self) -> set[int]:
        """The pids of this node's evaluation actors alive now (Ray titles them `ray::EvaluationWorker`)."""
        return {p for p in descendants(self.proc.pid) if _cmdline(p).startswith("ray::EvaluationWorker")}

    def kill(self) -> None:
        """SIGKILL to the whole process group: the node vanishes as a lost machine would, no goodbye."""
        self.killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        else:  # `ray start` itself exited: its group may still hold the node's processes
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Cluster:
    """A head with no CPUs (so nothing runs on it) and worker nodes of 2 CPUs each, on 127.0.0.1, token
    authentication on for all of them; `env` is what a process that joins it needs."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        token_file = tmp_path / "ray_auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        pythonpath = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
        self.env = {
            **environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
            "PYTHONPATH": pythonpath,  # the project's modules import on every node
        }
        self.nodes: list[RayNode] = []
        self.head = self._node(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=0",
                "--num-gpus=0",
                "--include-dashboard=false",
            ],
            FAST_HEALTH_CHECKS,
        )
        self.head_id = self.wait_for_node(lambda n: n["Resources"].get("CPU", 0) == 0)

    def _node(self, name: str, args: list[str], extra_env: dict | None = None) -> RayNode:
        node = RayNode(name, args, {**self.env, **(extra_env or {})}, self.tmp_path)
        self.nodes.append(node)
        return node

    def add_worker(self, name: str) -> tuple[RayNode, str]:
        """A worker node of 2 CPUs; returns it with its Ray node id once the head lists it alive."""
        known = {n["NodeID"] for n in self.alive_nodes()}
        node = self._node(
            name, [f"--address={self.address}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0"]
        )
        node_id = self.wait_for_node(lambda n: n["NodeID"] not in known and n["Resources"].get("CPU") == 2)
        return node, node_id

    def alive_nodes(self) -> list[dict]:
        """The head's view of the cluster (`ray.nodes()` from a short driver of its own, so this test
        process never becomes a Ray driver)."""
        script = (
            "import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print('NODES', json.dumps([n for n in ray.nodes() if n['Alive']]), flush=True)"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, self.address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Ray may print its own warnings (lagging heartbeats) to stdout around ours: find our line.
        lines = [line for line in out.stdout.splitlines() if line.startswith("NODES ")]
        if out.returncode != 0 or not lines:
            return []
        return json.loads(lines[-1].removeprefix("NODES "))

    def wait_for_node(self, match, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in (n for n in self.nodes if not n.killed):
                assert node.proc.poll() is None, node.log_path.read_text()[-3000:]
            found = [n["NodeID"] for n in self.alive_nodes() if match(n)]
            if found:
                return found[0]
            time.sleep(0.5)
        raise AssertionError("timed out waiting for a Ray node to join")

    def close(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head last
            node.close()


class PidWatch:
    """Records, every 0.2 s on a thread, the evaluation actors alive in each node's process tree: the
    actors are killed when the search ends, so their pids must be seen while it runs."""

    def __init__(self):
        self.by_node: dict[str, set[int]] = {}
        self.watched: dict[str, RayNode] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def watch(self, node_id: str, node: RayNode) -> None:
        self.by_node.setdefault(node_id, set())
        self.watched[node_id] = node

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            for node_id, node in list(self.watched.items()):
                self.by_node[node_id] |= node.evaluation_workers()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    made = Cluster(tmp_path)
    try:
        # The coordinator's Ray settings agree with the cluster's: same address, mode and token file.
        for name in [k for k in os.environ if k.startswith("RAY_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("RAY_ADDRESS", made.address)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", made.env["RAY_AUTH_TOKEN_PATH"])
        yield made
    finally:
        made.close()


@pytest.fixture
def watch():
    made = PidWatch()
    try:
        yield made
    finally:
        made.close()


def start_search(coordinator: Coordinator, budget: int) -> int:
    r = httpx.post(
        f"{coordinator.base}/api/searches", json={**SEARCH, "budget": budget}, headers=AUTH, timeout=10
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def workers_of(coordinator: Coordinator, storage: Storage, job_id: int) -> dict[int, list[dict]]:
    """Each evaluated candidate's worker identities, read over REST (`GET /api/candidates/{id}`: the training
    and the latency result each record the worker that produced it)."""
    found = {}
    for cand in storage.candidates(job_id, status=("completed", "failed")):
        detail = httpx.get(f"{coordinator.base}/api/candidates/{cand.id}", timeout=10).json()
        found[cand.id] = [part["worker"] for part in (detail["training"], detail["latency"]) if part]
    return found


def no_key_twice(storage: Storage) -> list:
    with storage.transaction() as conn:
        return conn.exec_driver_sql(
            "SELECT training_key FROM training_results GROUP BY training_key HAVING COUNT(*) > 1"
        ).fetchall()


def assert_ran_on(identities: list[dict], node_id: str, pids: set[int]) -> None:
    assert identities, "no worker identity stored"
    for identity in identities:
        assert identity["node_id"] == node_id, identity
        assert identity["pid"] in pids, (identity, sorted(pids))


def test_every_evaluation_runs_on_the_worker_node(tmp_path, cluster, watch):
    worker, worker_id = cluster.add_worker("worker-1")
    assert worker_id != cluster.head_id
    watch.watch(worker_id, worker)
    watch.watch(cluster.head_id, cluster.head)
    url = f"sqlite:///{tmp_path}/multinode.db"
    coordinator = Coordinator(tmp_path, url)  # it creates the schema
    storage = Storage(url)
    try:
        job_id = start_search(coordinator, budget=4)
        wait_for(
            lambda: storage.get_job(job_id).status in ("completed", "failed"), timeout=240, what="the end"
        )
        job = httpx.get(f"{coordinator.base}/api/searches/{job_id}", timeout=10).json()
        assert job["status"] == "completed", (job, coordinator.log_path.read_text()[-3000:])
        assert job["n_evaluations"] == 4
        workers = workers_of(coordinator, storage, job_id)
    finally:
        coordinator.close()
    assert len(workers) == 4
    for identities in workers.values():
        assert_ran_on(identities, worker_id, watch.by_node[worker_id])
    assert watch.by_node[cluster.head_id] == set()  # nothing ever ran on the head
    assert len({i["pid"] for ids in workers.values() for i in ids}) <= 2  # 2 long-lived actors
    storage.close()


def test_a_lost_worker_node_is_waited_for_and_the_search_finishes_on_the_new_one(tmp_path, cluster, watch):
    first, first_id = cluster.add_worker("worker-1")
    watch.watch(first_id, first)
    url = f"sqlite:///{tmp_path}/multinode.db"
    coordinator = Coordinator(tmp_path, url)
    storage = Storage(url)
    # Enough work that the search is still running when the head sees the node gone (Ray takes seconds to
    # mark it dead, and a quick machine finished 8 candidates before it did).
    budget = 24
    try:
        job_id = start_search(coordinator, budget=budget)
        wait_for(mid_evaluation(storage, job_id), timeout=180, what="two evaluations done and one running")
        first.kill()
        wait_for(
            lambda: first_id not in {n["NodeID"] for n in cluster.alive_nodes()},
            timeout=60,
            what="the head to see the node gone",
        )
        # No node has a CPU now: the search must wait for one, not fail.
        time.sleep(5)
        assert storage.get_job(job_id).status == "running", coordinator.log_path.read_text()[-3000:]
        assert watch.by_node[first_id] and not any(_alive(p) for p in watch.by_node[first_id])
        # Nothing can finish while no node is up: what is done now was done on the first node.
        before = {
            c.id: (c.training_key, c.val_bpb, c.decode_ms)
            for c in storage.candidates(job_id, status="completed")
        }
        second, second_id = cluster.add_worker("worker-2")
        watch.watch(second_id, second)
        wait_for(
            lambda: storage.get_job(job_id).status in ("completed", "failed"), timeout=240, what="the end"
        )
        job = httpx.get(f"{coordinator.base}/api/searches/{job_id}", timeout=10).json()
        assert job["status"] == "completed", (job, coordinator.log_path.read_text()[-3000:])
        workers = workers_of(coordinator, storage, job_id)
    finally:
        coordinator.close()
    after = {c.id: c for c in storage.candidates(job_id)}
    assert sum(c.status in ("completed", "failed", "reused") for c in after.values()) == budget
    assert all(c.status != "failed" or c.failure_reason for c in after.values())
    assert no_key_twice(storage) == []
    assert len(before) >= 2
    for cid, stored in before.items():  # unchanged by the loss of the node that produced them
        assert (after[cid].training_key, after[cid].val_bpb, after[cid].decode_ms) == stored
        assert_ran_on(workers[cid], first_id, watch.by_node[first_id])
    later = [cid for cid, c in after.items() if c.status == "completed" and cid not in before]
    assert later, "nothing was evaluated after the new node joined"
    for cid in later:
        assert_ran_on(workers[cid], second_id, watch.by_node[second_id])
    storage.close()


def mid_evaluation(storage: Storage, job_id: int):
    def check() -> bool:
        counts = storage.candidate_counts(job_id)
        return counts["completed"] >= 2 and counts["running"] >= 1

    return check

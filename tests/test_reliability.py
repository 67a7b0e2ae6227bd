"""What must hold when things go wrong (issue 9, part A), each on the real parts: a Ray worker killed in any
phase is replaced and the search goes on; workers that cannot come back fail the search with the reason;
timeouts and cancels cover the data phase; sub-configs are typed at submission on every entry point; read
commands create nothing; bad bodies are 422/413; idempotent submission under concurrency; failures counted;
no secrets in Ray workers' environments; clean shutdown of `hybridnas serve`, `search run` and `demo`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from api.app import create_app
from api.auth import Auth
from api.settings import Settings
from search.config import SearchConfig
from search.engine import SearchEngine, StopEvent
from search.executors import InlineExecutor, RayExecutor
from search.storage import Storage
from tests import pg
from tests.chaos import _cmdline
from tests.live import free_port

HYBRIDNAS = str(Path(sys.executable).with_name("hybridnas"))
TOKEN = "reliability-token-not-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEARCH = {
    "space": {"preset": "benchmark"},
    "strategy": "pareto-aging",
    "strategy_options": {"population_size": 4, "sample_size": 2},
    "workers": 1,
    "seed": 11,
    "proxy": {"steps": 4, "batch_size": 2, "seq_len": 16, "eval_tokens": 256},
    "latency": {"prompt_len": 4, "decode_tokens": 2, "repeats": 1, "warmup": 0, "throughput": False},
    "data": {"min_val_tokens": 64},
}

storage = pg.storage


def wait_for(predicate, timeout=120.0, what="condition", interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def results(store: Storage, job_id: int, n: int = 1):
    """A wait_for predicate: at least n results; fails at once if the search ended before that."""

    def check() -> bool:
        if store.count_candidates(job_id, status=("completed", "reused")) >= n:
            return True
        job = store.get_job(job_id)
        if job.status in ("completed", "failed", "cancelled"):
            reasons = [c.failure_reason for c in store.candidates(job_id, status="failed")]
            raise AssertionError(f"the search ended {job.status} ({job.error}) first: {reasons}")
        return False

    return check


def create_search(store: Storage, **overrides) -> tuple[int, SearchConfig]:
    config = SearchConfig.model_validate({**SEARCH, **overrides})
    job_id = store.create_job("search", json.loads(config.model_dump_json()), budget=config.budget)
    return job_id, config


class EngineThread:
    """A search engine on a thread of this process with a real executor, which the test can reach (its Ray
    actors, their phases and pids)."""

    def __init__(self, store: Storage, job_id: int, make_executor):
        self.executor = None
        self.stop = StopEvent()
        self.error: BaseException | None = None

        def factory(config):
            self.executor = make_executor(config)
            return self.executor

        self.engine = SearchEngine(store, job_id, factory, stop=self.stop)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.engine.run()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the search did not end"
        if self.error is not None:
            raise self.error


def ray_executor(data_dir: Path, roots: tuple[str, ...], **kw):
    def make(config):
        return RayExecutor(
            str(data_dir),
            config.workers,
            config.cpus_per_worker,
            0,
            config.timeout_s,
            lock_dir=str(data_dir / "locks"),
            data_roots=roots,
            **kw,
        )

    return make


def phase_of(executor: RayExecutor, slot: int = 0) -> str | None:
    import ray

    actor = executor.slots[slot].actor if executor is not None and executor.slots else None
    if actor is None or executor.slots[slot].state != "ready":
        return None
    try:
        return ray.get(actor.current_phase.remote(), timeout=5)
    except Exception:  # noqa: BLE001 - dead or restarting
        return None


def kill_worker(executor: RayExecutor, slot: int = 0) -> int:
    import ray

    pid = ray.get(executor.slots[slot].actor.ping.remote(), timeout=10)
    os.kill(pid, signal.SIGKILL)
    return pid


# ------------------------------------------------------------------------------- a corpus on a named pipe


def corpus_lines(n: int = 200) -> bytes:
    import sysconfig

    source = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    return b"".join(
        json.dumps({"text": f"# {i}\n{source[i * 40 : i * 40 + 800]}"}).encode() + b"\n" for i in range(n)
    )


class PipeCorpus:
    """A JSONL corpus on a named pipe: a reader blocks until `serve()` lets the writer answer, so a worker
    can be held inside its data phase for as long as a test wants."""

    def __init__(self, folder: Path):
        self.path = folder / "corpus.jsonl"
        os.mkfifo(self.path)
        self.allowed = threading.Event()
        self.closed = False
        self.readers = 0
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        body = corpus_lines()
        while not self.closed:
            try:
                with open(self.path, "wb") as pipe:  # blocks until a reader opens
                    self.readers += 1
                    self.allowed.wait()
                    if self.closed:
                        return
                    pipe.write(body)
            except BrokenPipeError:  # the reader was killed while it waited
                continue

    def serve(self) -> None:
        self.allowed.set()

    def close(self) -> None:
        self.closed = True
        self.allowed.set()
        try:  # release a writer blocked in open(): open the read end once, without blocking
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


def release_readers(path: Path) -> None:
    """A reader blocked in open() on a pipe nobody writes: give it an end of file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


# ---------------------------------------------------------------------------- A1: dead workers replaced


def test_a_worker_killed_while_it_loads_its_data_is_replaced(tmp_path):
    """The first evaluation's worker is killed inside the data phase (its corpus read held open): the
    actor is re-created, the candidate retried, and the search spends its whole budget on results."""
    corpus = PipeCorpus(tmp_path)
    with pg.migrated_url("sqlite", tmp_path) as url:
        store = Storage(url)
        job_id, _ = create_search(
            store,
            executor="ray",
            budget=3,
            max_retries=2,
            data={"corpus": str(corpus.path), "min_val_tokens": 64},
        )
        run = EngineThread(store, job_id, ray_executor(tmp_path / "data", (str(tmp_path),)))
        try:
            wait_for(
                lambda: corpus.readers >= 1 and phase_of(run.executor) == "data",
                120,
                "the worker to block in its data phase",
            )
            killed = kill_worker(run.executor)
            corpus.serve()
            run.join(240)
        finally:
            corpus.close()
        job = store.get_job(job_id)
        cands = store.candidates(job_id)
        assert job.status == "completed" and job.n_evaluations == 3
        assert [c.status for c in cands if c.status not in ("completed", "reused")] == []
        assert max(c.attempts for c in cands) == 2  # the killed one ran again, once
        assert corpus.readers >= 2 and killed
        store.close()


def test_a_worker_killed_while_training_and_one_killed_between_evaluations_are_replaced(tmp_path):
    with pg.migrated_url("sqlite", tmp_path) as url:
        store = Storage(url)
        job_id, _ = create_search(
            store,
            executor="ray",
            budget=4,
            max_retries=2,
            # long enough to be caught training; a low rate so no layout diverges (a failure is not the point)
            proxy={
                "steps": 150,
                "batch_size": 4,
                "seq_len": 32,
                "eval_tokens": 256,
                "lr": 1e-3,
                "divergence_factor": 100.0,
            },
        )
        run = EngineThread(store, job_id, ray_executor(tmp_path / "data", (str(tmp_path),)))
        wait_for(lambda: phase_of(run.executor) == "training", 180, "a worker in its training phase")
        first = kill_worker(run.executor)
        wait_for(results(store, job_id), 240, "a result after the kill")
        import ray

        slot = run.executor.slots[0]
        wait_for(lambda: slot.state == "ready" and slot.task is not None, 120, "the next evaluation")
        pid = ray.get(slot.actor.ping.remote(), timeout=30)
        # Between evaluations: the moment the engine takes the result and before it hands out the next.
        wait_for(lambda: slot.task is None, 240, "the worker between evaluations", interval=0.0005)
        os.kill(pid, signal.SIGKILL)
        second = pid
        run.join(600)
        job = store.get_job(job_id)
        cands = store.candidates(job_id)
        assert job.status == "completed" and job.n_evaluations == 4, job
        assert all(c.status in ("completed", "reused") for c in cands), [c.failure_reason for c in cands]
        assert first != second
        store.close()


def test_a_worker_killed_while_it_measures_latency_is_replaced(tmp_path):
    """The latency phase (the device held exclusive): the killed worker's lock is released with its process,
    the evaluation runs again on a fresh actor, and the search completes."""
    with pg.migrated_url("sqlite", tmp_path) as url:
        store = Storage(url)
        job_id, _ = create_search(
            store,
            executor="ray",
            budget=2,
            max_retries=2,
            latency={"prompt_len": 64, "decode_tokens": 64, "repeats": 40, "warmup": 0, "throughput": False},
        )
        run = EngineThread(store, job_id, ray_executor(tmp_path / "data", (str(tmp_path),)))
        wait_for(lambda: phase_of(run.executor) == "latency", 180, "a worker measuring latency")
        kill_worker(run.executor)
        run.join(600)
        job = store.get_job(job_id)
        cands = store.candidates(job_id)
        assert job.status == "completed" and job.n_evaluations == 2, job
        assert all(c.status in ("completed", "reused") for c in cands), [c.failure_reason for c in cands]
        assert max(c.attempts for c in cands) == 2
        store.close()


def test_workers_that_cannot_be_recreated_fail_the_search_with_the_reason(tmp_path):
    """After a worker dies, new actors never start (the resource they need is gone): the search ends
    `failed` saying so, never `completed` with its budget unspent."""
    with pg.migrated_url("sqlite", tmp_path) as url:
        store = Storage(url)
        job_id, _ = create_search(store, executor="ray", budget=6, max_retries=3)
        run = EngineThread(store, job_id, ray_executor(tmp_path / "data", (str(tmp_path),)))
        wait_for(results(store, job_id), 240, "a first result")
        executor = run.executor
        # Restarts bounded tight (the defaults wait minutes, for a cluster to get capacity back) ...
        executor.max_restarts, executor.start_timeout_s, executor.max_backoff_s = 1, 3.0, 0.5
        # ... and a node lost for good: every new actor asks for a resource no node has.
        executor.make_actor = lambda: executor.actor_class.options(resources={"gone": 1}).remote(
            str(tmp_path / "data"), 1, None, None, (str(tmp_path),)
        )
        kill_worker(executor)
        run.join(120)
        job = store.get_job(job_id)
        assert job.status == "failed" and "no Ray worker could be started" in job.error, job
        assert job.n_evaluations < 6
        store.close()


# ------------------------------------------------------------------------- A3: timeouts and cancels


def test_a_corpus_read_that_never_returns_times_out_in_the_data_phase(tmp_path):
    pipe = tmp_path / "stuck.jsonl"
    os.mkfifo(pipe)  # nobody ever writes: open() blocks
    try:
        with pg.migrated_url("sqlite", tmp_path) as url:
            store = Storage(url)
            job_id, _ = create_search(
                store, executor="ray", budget=1, max_retries=0, timeout_s=4, data={"corpus": str(pipe)}
            )
            started = time.monotonic()
            run = EngineThread(store, job_id, ray_executor(tmp_path / "data", (str(tmp_path),)))
            run.join(120)
            (cand,) = store.candidates(job_id)
            assert cand.status == "failed" and cand.failure_reason.startswith("timeout (data)"), cand
            assert store.get_job(job_id).n_evaluations == 1
            assert time.monotonic() - started < 90
            store.close()
    finally:
        release_readers(pipe)


def test_a_cancel_stops_a_search_stuck_in_the_data_phase(tmp_path):
    pipe = tmp_path / "stuck.jsonl"
    os.mkfifo(pipe)
    try:
        with pg.migrated_url("sqlite", tmp_path) as url:
            store = Storage(url)
            job_id, _ = create_search(
                store, executor="ray", budget=2, timeout_s=3600, data={"corpus": str(pipe)}
            )
            run = EngineThread(store, job_id, ray_executor(tmp_path / "data", (str(tmp_path),)))
            wait_for(lambda: phase_of(run.executor) == "data", 120, "the worker stuck reading")
            asked = time.monotonic()
            run.stop.cancel = True
            run.stop.set()
            run.join(30)
            assert time.monotonic() - asked < 15
            assert store.get_job(job_id).status == "cancelled"
            assert store.count_candidates(job_id, status="running") == 0
            store.close()
    finally:
        release_readers(pipe)


def test_the_inline_executor_times_out_a_stuck_data_phase_too(tmp_path):
    pipe = tmp_path / "stuck.jsonl"
    os.mkfifo(pipe)
    try:
        with pg.migrated_url("sqlite", tmp_path) as url:
            store = Storage(url)
            job_id, _ = create_search(
                store, executor="inline", budget=1, max_retries=0, timeout_s=2, data={"corpus": str(pipe)}
            )
            data_dir = str(tmp_path / "data")
            SearchEngine(
                store,
                job_id,
                lambda c: InlineExecutor(
                    data_dir, threads=1, data_roots=(str(tmp_path),), timeout_s=c.timeout_s
                ),
            ).run()
            (cand,) = store.candidates(job_id)
            assert cand.status == "failed" and cand.failure_reason.startswith("timeout (data)"), cand
            store.close()
    finally:
        release_readers(pipe)


# ------------------------------------------------------------------------------------ A8: failures counted


def test_a_candidate_failing_in_the_data_phase_is_counted(storage, tmp_path):
    empty = tmp_path / "empty-corpus"
    empty.mkdir()
    job_id, _ = create_search(storage, executor="inline", budget=3, data={"corpus": str(empty)})
    data_dir = str(tmp_path / "data")
    SearchEngine(
        storage, job_id, lambda c: InlineExecutor(data_dir, threads=1, data_roots=(str(tmp_path),))
    ).run()
    job = storage.get_job(job_id)
    cands = storage.candidates(job_id)
    assert job.status == "completed" and job.n_evaluations == 3
    assert storage.candidate_counts(job_id)["failed"] == 3
    assert all(c.failure_reason.startswith("exception (data)") for c in cands), [
        c.failure_reason for c in cands
    ]


# ------------------------------------------------------------------------------- A9: no secrets in workers


def test_the_coordinators_secrets_are_not_in_ray_workers(tmp_path, monkeypatch):
    import ray

    secrets = {
        "HYBRIDNAS_TOKEN": "token-that-must-stay",
        "HYBRIDNAS_DATABASE_URL": "postgresql://u:password-that-must-stay@db/x",
        "DATABASE_URL": "postgresql://u:password-that-must-stay@db/y",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    executor = RayExecutor(str(tmp_path / "data"), 1, 1, 0, 60, data_roots=(str(tmp_path),))
    try:

        @ray.remote(num_cpus=0)
        def environment() -> tuple[dict, bytes]:
            return dict(os.environ), Path("/proc/self/environ").read_bytes()

        seen, raw = ray.get(environment.remote(), timeout=60)
        actor_pid = executor.worker_pids()[0]
        actor_raw = Path(f"/proc/{actor_pid}/environ").read_bytes()
    finally:
        executor.shutdown()
    for name, value in secrets.items():
        assert name not in seen and value.encode() not in raw and value.encode() not in actor_raw
        assert os.environ[name] == value  # the coordinator keeps its own


# ----------------------------------------------------------- A4/A5: the same checks on every entry point


@pytest.mark.parametrize(
    "change, field",
    [
        ({"proxy": {"steps": 10.0}}, "proxy.steps"),
        ({"proxy": {"batch_size": "8"}}, "proxy.batch_size"),
        ({"proxy": {"min_lr_ratio": float("nan")}}, "proxy.min_lr_ratio"),
        ({"proxy": {"lr": float("inf")}}, "proxy.lr"),
        ({"latency": {"repeats": 2.5}}, "latency.repeats"),
        ({"latency": {"decode_tokens": True}}, "latency.decode_tokens"),
        ({"data": {"val_fraction": "0.1"}}, "data.val_fraction"),
        ({"strategy_options": {"population_size": "6"}}, "strategy_options.population_size"),
        ({"strategy_options": {"protect_front": "no"}}, "strategy_options.protect_front"),
        (
            {"strategy_options": {"mutation_exploration": float("nan")}},
            "strategy_options.mutation_exploration",
        ),
        ({"strategy": "nsga2", "strategy_options": {"crossover_prob": 2}}, "strategy_options.crossover_prob"),
        ({"constraints": {"max_decode_ms": float("inf")}}, "constraints.max_decode_ms"),
    ],
)
def test_mistyped_or_non_finite_sub_config_values_are_refused_naming_the_field(api, change, field):
    client, store = api
    body = json.dumps({"budget": 2, **change}).encode()  # NaN/Infinity as JSON's common extension
    r = client.post("/api/searches", content=body, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field, r.text
    schedule = {"name": "n", "cron": "0 2 * * *", "template": {"budget": 2, **change}}
    r = client.post(
        "/api/schedules",
        content=json.dumps(schedule).encode(),
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == f"template.{field}", r.text
    assert store.count_jobs() == 0 and store.count_schedules() == 0


def test_a_latency_table_must_be_a_valid_table_at_submission(api, tmp_path):
    client, _ = api
    bad = tmp_path / "not-a-table.json"
    bad.write_text(json.dumps({"version": 1, "entries": "no"}))
    body = {
        "budget": 2,
        "strategy": "latency-target",
        "latency_lut": str(bad),
        "strategy_options": {"target_ms": 1.0},
    }
    r = client.post("/api/searches", json=body, headers=AUTH)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "latency_lut", r.text
    assert "not a valid latency table" in r.json()["errors"][0]["message"]


def flat(text: str) -> str:
    """Terminal output with rich's line wrapping undone."""
    return " ".join(text.split())


def cli(tmp_path, *args, timeout=120):
    env = {
        **os.environ,
        "HYBRIDNAS_DATA_DIR": str(tmp_path / "data"),
        "HYBRIDNAS_DATA_ROOTS": json.dumps([str(tmp_path)]),
    }
    return subprocess.run(
        [HYBRIDNAS, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_search_run_applies_the_data_roots_rule_as_a_usage_error(tmp_path):
    config = tmp_path / "search.yaml"
    config.write_text(
        yaml.safe_dump({**SEARCH, "budget": 2, "executor": "inline", "data": {"corpus": "/etc"}})
    )
    done = cli(tmp_path, "search", "run", str(config))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "data.corpus" in done.stderr and "outside the configured data roots" in flat(done.stderr)
    assert not (tmp_path / "data" / "hybridnas.db").exists()  # nothing was created


def test_search_run_refuses_a_mistyped_proxy_setting_naming_it(tmp_path):
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({**SEARCH, "budget": 2, "executor": "inline", "proxy": {"steps": 2.5}}))
    done = cli(tmp_path, "search", "run", str(config))
    assert done.returncode == 2 and "proxy.steps" in done.stderr, done.stderr


@pytest.mark.parametrize("command", [["search", "show", "1"], ["search", "resume", "1"]])
def test_read_commands_never_create_a_database_or_directories(tmp_path, command):
    done = cli(tmp_path, *command)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no database at" in done.stderr
    assert str(tmp_path / "data" / "hybridnas.db") in done.stderr.replace("\n", "")
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------------- A6/A7: the service


@pytest.fixture
def api(tmp_path):
    """The API on a real SQLite database, in process (runners and scheduler off)."""
    from fastapi.testclient import TestClient

    url = f"sqlite:///{tmp_path / 'api.db'}"
    store = Storage(url)
    store.create_schema()
    settings = Settings(
        data_dir=tmp_path / "data", runners=0, scheduler=False, data_roots=[tmp_path], max_body_bytes=4096
    )
    with TestClient(create_app(settings, store, auth=Auth(TOKEN))) as client:
        yield client, store
    store.close()


def test_invalid_utf8_and_too_deep_bodies_are_422_naming_the_body(api):
    client, store = api
    headers = {**AUTH, "content-type": "application/json"}
    r = client.post("/api/searches", content=b'{"name": "\xff\xfe"}', headers=headers)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body", r.text
    assert "UTF-8" in r.json()["errors"][0]["message"]
    deep = b'{"strategy_options": {"a": ' + b"[" * 1500 + b"]" * 1500 + b"}}"
    r = client.post("/api/searches", content=deep, headers=headers)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body", r.text
    r = client.post("/api/searches", content=b'{"budget": 2,', headers=headers)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"
    assert store.count_jobs() == 0


@pytest.fixture(params=pg.BACKENDS)
def live(request, tmp_path):
    """The API under a real uvicorn on loopback, on each backend; (base URL, Storage)."""
    import uvicorn

    with pg.migrated_url(request.param, tmp_path) as url:
        store = Storage(url)
        # admission wide open: these tests race requests on purpose (tests/test_overload.py tests admission)
        settings = Settings(
            data_dir=tmp_path / "data",
            runners=0,
            scheduler=False,
            data_roots=[tmp_path],
            max_body_bytes=4096,
            max_concurrent_requests=64,
            request_threads=16,
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, store, auth=Auth(TOKEN)),
                host="127.0.0.1",
                port=port,
                log_level="warning",
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started, 30, "uvicorn to start")
        try:
            yield f"http://127.0.0.1:{port}", store
        finally:
            server.should_exit = True
            thread.join(30)
            store.close()


def test_a_chunked_body_over_the_limit_is_413(live):
    base, store = live

    def chunks():
        yield b'{"name": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(
        f"{base}/api/searches",
        content=chunks(),
        headers={**AUTH, "content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413, r.text
    assert store.count_jobs() == 0


def test_simultaneous_posts_with_one_idempotency_key_create_one_search(live):
    base, store = live
    rounds, clients = 3, 16
    for round_ in range(rounds):
        key = f"same-key-{round_}"
        barrier = threading.Barrier(clients)

        def post(_, barrier=barrier, key=key):
            with httpx.Client(timeout=60) as client:
                barrier.wait()
                return client.post(
                    f"{base}/api/searches",
                    json={"budget": 2, "name": key},
                    headers={**AUTH, "Idempotency-Key": key},
                )

        with ThreadPoolExecutor(clients) as pool:
            responses = list(pool.map(post, range(clients)))
        assert sorted(r.status_code for r in responses) == [200] * (clients - 1) + [201], [
            r.text for r in responses
        ]
        assert {r.json()["id"] for r in responses} == {responses[0].json()["id"]}
        replayed = [r.headers.get("Idempotent-Replayed") for r in responses if r.status_code == 200]
        assert replayed == ["true"] * (clients - 1)
    assert store.count_jobs() == rounds


# ---------------------------------------------------------------------------------- A2: clean shutdown


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_sigterm_of_serve_with_ray_and_an_open_event_stream_exits_0_and_hands_the_job_back(tmp_path):
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    proc, base, log_path = start_serve(tmp_path, url, HYBRIDNAS_RAY_NUM_CPUS="1")
    store = None
    try:
        wait_for(lambda: _ready(base), 90, "the coordinator")
        search = {
            **SEARCH,
            "executor": "ray",
            "budget": 50,
            "proxy": {"steps": 200, "batch_size": 2, "seq_len": 16, "eval_tokens": 256},
        }
        job_id = httpx.post(f"{base}/api/searches", json=search, headers=AUTH, timeout=30).json()["id"]
        store = Storage(url)
        wait_for(lambda: store.count_candidates(job_id, status="running") >= 1, 180, "a running evaluation")
        wait_for(lambda: any("raylet" in _cmdline(p) for p in descendants(proc.pid)), 60, "Ray under it")
        stream_open = threading.Event()

        def follow():
            with httpx.stream("GET", f"{base}/api/searches/{job_id}/events", timeout=120) as r:
                stream_open.set()
                for _ in r.iter_lines():
                    pass

        threading.Thread(target=follow, daemon=True).start()
        assert stream_open.wait(30)
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-4000:]
        text = log_path.read_text()
        assert "*** SIGTERM received" not in text and "terminate called" not in text and "Aborted" not in text
        assert "Application shutdown complete" in text
        job = store.get_job(job_id)
        assert job.status == "queued" and job.lease_owner is None and job.lease_expires_at is None
        assert store.count_candidates(job_id, status="running") == 0
        wait_for(lambda: not any(alive(p) for p in tree), 30, "every process the coordinator started to end")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if store is not None:
            store.close()


def start_serve(tmp_path: Path, url: str, **settings: str) -> tuple[subprocess.Popen, str, Path]:
    """`hybridnas serve` on a free loopback port in its own process group: (process, base URL, log path)."""
    port = free_port()
    env = {
        **os.environ,
        "HYBRIDNAS_DATABASE_URL": url,
        "HYBRIDNAS_TOKEN": TOKEN,
        "HYBRIDNAS_LEASE_S": "60",
        "HYBRIDNAS_POLL_S": "0.2",
        "HYBRIDNAS_SCHEDULER": "false",
        "PYTHONUNBUFFERED": "1",
        **settings,
    }
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [HYBRIDNAS, "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}", log_path


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/api/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_ctrl_c_of_the_demo_exits_130_and_stops_its_coordinator(tmp_path):
    port = free_port()
    env = {**os.environ, "HYBRIDNAS_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [HYBRIDNAS, "demo", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line.decode(errors="replace"))

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: any("POST /api/searches" in line for line in lines), 180, "the demo's search")
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
        assert proc.wait(120) == 130, "".join(lines)[-3000:]
        wait_for(lambda: not any(alive(p) for p in tree), 60, "the demo's coordinator and Ray to end")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# ----------------------------------------------------------------------- the database gone mid-search


def test_a_database_outage_mid_search_stops_without_writing_and_the_runner_resumes(
    storage, tmp_path, monkeypatch
):
    """A write fails at the connection level (the server restarting): the engine stops and writes nothing
    more (the job stays under its lease); once the lease lapses the runner takes the job again and finishes
    it, nothing evaluated twice."""
    from sqlalchemy import exc as sa_exc

    from api.runner import JobRunner

    job_id, _ = create_search(storage, executor="inline", budget=4)
    real = type(storage).complete_candidate
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise sa_exc.OperationalError(
                "UPDATE candidates ...", {}, Exception("server closed the connection")
            )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(storage), "complete_candidate", flaky)
    data_dir = tmp_path / "data"
    runner = JobRunner(
        storage,
        data_dir,
        lease_s=2.0,
        poll_s=0.1,
        data_roots=(str(tmp_path),),
        executor_factory=lambda c: InlineExecutor(str(data_dir), threads=1),
    )
    runner.start()
    try:
        wait_for(lambda: calls["n"] >= 2, 120, "the failing write")
        held = storage.get_job(job_id)
        assert held.status == "running" and held.lease_owner == runner.owner  # nothing written: still leased
        wait_for(
            lambda: storage.get_job(job_id).status == "completed", 180, "the job to be resumed and finish"
        )
    finally:
        runner.stop()
    job = storage.get_job(job_id)
    cands = storage.candidates(job_id)
    assert job.n_evaluations == 4 and job.lease_owner is None
    assert all(c.status in ("completed", "reused") for c in cands)
    assert max(c.attempts for c in cands) == 2  # the one whose result could not be written ran again


def test_serve_with_two_api_workers_runs_one_runner_and_stops_cleanly(tmp_path):
    """HYBRIDNAS_API_WORKERS=2: two API processes under uvicorn's supervisor, the job runner once (in the
    supervisor). A search submitted to either runs and finishes; SIGTERM mid-search exits 0 and hands the job
    back."""
    url = f"sqlite:///{tmp_path / 'workers.db'}"
    proc, base, log_path = start_serve(tmp_path, url, HYBRIDNAS_API_WORKERS="2")
    store = None
    try:
        wait_for(lambda: _ready(base), 90, "the coordinator")
        workers = [p for p in descendants(proc.pid) if "spawn_main" in _cmdline(p)]
        assert len(workers) == 2, [_cmdline(p) for p in descendants(proc.pid)]
        small = {**SEARCH, "executor": "inline", "budget": 2}
        first = httpx.post(f"{base}/api/searches", json=small, headers=AUTH, timeout=30).json()["id"]
        store = Storage(url)
        wait_for(
            lambda: httpx.get(f"{base}/api/searches/{first}", timeout=10).json()["status"] == "completed",
            240,
            "the first search to finish",
        )
        big = {
            **SEARCH,
            "executor": "inline",
            "budget": 40,
            "proxy": {"steps": 200, "batch_size": 2, "seq_len": 16, "eval_tokens": 256},
        }
        second = httpx.post(f"{base}/api/searches", json=big, headers=AUTH, timeout=30).json()["id"]
        wait_for(lambda: store.count_candidates(second, status="running") >= 1, 120, "the second search")
        assert {j.lease_owner for j in store.list_jobs(status="running")} == {
            store.get_job(second).lease_owner
        }
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log_path.read_text()[-4000:]
        job = store.get_job(second)
        assert job.status == "queued" and job.lease_owner is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if store is not None:
            store.close()

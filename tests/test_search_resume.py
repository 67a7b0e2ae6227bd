"""Kill -9 a running search mid-evaluation, resume it, and check the engine's guarantee on both backends:
the search continues; no key has two completed results; an evaluation in flight at the kill is rerun at most
once; nothing completed is lost."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from search.storage import Storage
from tests import pg

HYBRIDNAS = str(Path(sys.executable).with_name("hybridnas"))


def search_config(tmp_path, executor="inline", budget=7, workers=1):
    config = {
        "name": "kill-test",
        "space": {"preset": "benchmark"},
        "strategy": "pareto-aging",
        "strategy_options": {"population_size": 4, "sample_size": 2},
        "budget": budget,
        "executor": executor,
        "workers": workers,
        "seed": 3,
        "proxy": {"steps": 25, "batch_size": 4, "seq_len": 32, "eval_tokens": 512},
        "latency": {"prompt_len": 8, "decode_tokens": 4, "repeats": 2, "throughput": False},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def env_for(tmp_path):
    return {**os.environ, "HYBRIDNAS_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}


def wait_for(predicate, timeout=240, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def spawn(tmp_path, *args: str) -> tuple[subprocess.Popen, dict]:
    """`hybridnas ARGS` in its own process group (so a kill reaches it alone), output piped; and its env."""
    env = env_for(tmp_path)
    proc = subprocess.Popen(
        [HYBRIDNAS, *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, env


def run_cli(tmp_path, env, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`hybridnas ARGS` to its end in `tmp_path` with `env`; asserts it exited 0 (its output tails if not)."""
    done = subprocess.run(
        [HYBRIDNAS, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def start_search(tmp_path, url, executor, workers):
    """`hybridnas search run` in its own process group; returns (process, its env, a Storage, job counts)."""
    config = search_config(tmp_path, executor, workers=workers)
    proc, env = spawn(tmp_path, "search", "run", str(config), "--db", url)
    storage = Storage(url)

    def counts() -> dict | None:
        """The job's candidate counts by status (None before the job exists); fails if the run ended."""
        if proc.poll() is not None:
            raise AssertionError(f"search ended early: {proc.stdout.read().decode()[-2000:]}")
        jobs = storage.list_jobs() if storage.schema_is_current() else []
        return storage.candidate_counts(jobs[0].id) if jobs else None

    return proc, env, storage, counts


def kill_and_resume(tmp_path, url, executor="inline", workers=1):
    proc, env, storage, job_counts = start_search(tmp_path, url, executor, workers)
    try:

        def mid_evaluation():
            counts = job_counts()
            if counts is None:
                return False
            return counts.get("completed", 0) + counts.get("reused", 0) >= 2 and counts.get("running", 0) >= 1

        wait_for(mid_evaluation, what="two completed evaluations and one running")
        job_id = storage.list_jobs()[0].id
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: a real crash
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    completed_before = {
        c.id: (c.training_key, c.val_bpb) for c in storage.candidates(job_id, status=("completed", "reused"))
    }
    in_flight = [c.id for c in storage.candidates(job_id, status="running")]
    assert completed_before and in_flight
    run_cli(tmp_path, env, "search", "resume", str(job_id), "--db", url)
    job = storage.get_job(job_id)
    assert job.status == "completed"
    after = {c.id: c for c in storage.candidates(job_id)}
    # nothing completed is lost
    for cid, (key, bpb) in completed_before.items():
        assert (
            after[cid].status in ("completed", "reused")
            and after[cid].training_key == key
            and after[cid].val_bpb == bpb
        )
    # an evaluation in flight at the kill ran again at most once
    for cid in in_flight:
        assert after[cid].status in ("completed", "failed", "reused") and after[cid].attempts <= 2
    # the search went on to its budget, and no key has two results
    done = [c for c in after.values() if c.status in ("completed", "failed", "reused")]
    assert len(done) == 7
    keys = [c.training_key for c in done if c.training_key]
    for key in set(keys):
        assert storage.get_training_result(key) is not None
    with storage.transaction() as conn:
        rows = conn.exec_driver_sql(
            "SELECT training_key, COUNT(*) FROM training_results GROUP BY training_key HAVING COUNT(*) > 1"
        ).fetchall()
    assert rows == []
    assert len({c.layout_hash for c in after.values()}) == len(after)  # never the same layout twice
    storage.close()
    return job_id


@pytest.mark.parametrize("backend", pg.BACKENDS)
def test_kill_and_resume_inline(tmp_path, backend):
    with pg.migrated_url(backend, tmp_path) as url:
        kill_and_resume(tmp_path, url)


def test_kill_and_resume_on_ray(tmp_path):
    with pg.migrated_url("sqlite", tmp_path) as url:
        kill_and_resume(tmp_path, url, executor="ray", workers=2)


def raylets() -> int:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if "raylet" in line and "grep" not in line)


def test_ctrl_c_stops_cleanly_and_resume_finishes(tmp_path):
    """SIGINT mid-evaluation: the run ends on its own, nothing is left running (no Ray processes either),
    and `search resume` completes the budget."""
    before = raylets()
    with pg.migrated_url("sqlite", tmp_path) as url:
        proc, env, storage, job_counts = start_search(tmp_path, url, "ray", workers=2)
        try:
            wait_for(lambda: (job_counts() or {}).get("running", 0) >= 1, what="a running evaluation")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(120) == 130  # interrupted: the shell's convention (issue 9: not 0)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        job_id = storage.list_jobs()[0].id
        assert storage.get_job(job_id).status == "queued"
        assert storage.candidate_counts(job_id).get("running", 0) == 0
        wait_for(lambda: raylets() <= before, timeout=30, what="Ray to shut down")
        run_cli(tmp_path, env, "search", "resume", str(job_id), "--db", url)
        assert storage.get_job(job_id).status == "completed"
        storage.close()

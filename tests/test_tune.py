"""Tuning a candidate's training recipe: a real Ray Tune run with ASHA on a local Ray (tiny model, 4 trials of
40 steps, 1 CPU each), stored as the tune job's report; the best recipe is the lowest final val_bpb among
the trials that trained the full budget; bad input is a 422 (REST) or exit 2 (CLI) naming the field; the
dashboard lists the job and its page draws the trials.

The candidate: a real tiny search on the inline executor, once per module."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hybridnas.errors import ApiError
from hybridnas.local import local_client, local_settings, run_job
from search.storage import Storage
from search.tune_config import best_trial
from tests.searched import searched_here
from tests.test_browser import browser  # noqa: F401 - the Chromium fixture
from tests.test_engine import TINY

PROXY = {"steps": 10, "batch_size": 4, "seq_len": 32, "eval_tokens": 512, "log_every": 2}
TUNE = {
    "steps": 40,
    "trials": 4,
    "grace_steps": 10,
    "reduction_factor": 3,  # a trial must beat the top third at its rung to go on: with 4 in turn, one stops
    "lr_range": [1e-5, 3e-2],
    "warmup_range": [0, 4],
    "batch_sizes": [2, 4],
    "concurrent_trials": 1,
    "seed": 3,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished search and one tune job run to its end on its best candidate."""
    root = tmp_path_factory.mktemp("tune")
    with searched_here(root, {**TINY, "budget": 2, "proxy": PROXY}) as (search, mp):
        candidate = min(search.candidates, key=lambda c: c.val_bpb)
        settings = local_settings()
        with local_client(settings) as client:
            made = client.request("POST", "/api/tunes", json={**TUNE, "candidate_id": candidate.id})
        with Storage(search.database_url) as storage:
            run_job(storage, made.json()["id"], settings)
        yield {"url": search.database_url, "search": search, "candidate": candidate, "made": made, "mp": mp}


@pytest.fixture
def tune_job(world):
    with Storage(world["url"]) as storage:
        return storage.get_job(world["made"].json()["id"])


def test_a_tune_job_runs_asha_and_stores_every_trial(world, tune_job):
    assert world["made"].status_code == 201 and tune_job.kind == "tune"
    assert tune_job.status == "completed", tune_job.error
    report = tune_job.result
    trials = report["trials"]
    assert len(trials) == 4 and report["rungs"] == [10, 30]
    assert {t["status"] for t in trials} <= {"completed", "stopped"}
    stopped = [t for t in trials if t["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial early"
    for t in trials:
        steps = [s for s, _ in t["curve"]]
        assert steps == list(range(10, t["stopped_at"] + 1, 10)) and t["val_bpb"] == t["curve"][-1][1]
        assert (
            t["stopped_at"] in (10, 30, 40)
            and t["tokens"] == t["stopped_at"] * t["config"]["batch_size"] * 32
        )
        assert 1e-5 <= t["config"]["lr"] <= 3e-2 and 0 <= t["config"]["warmup_steps"] <= 4
    assert all(t["stopped_at"] < 40 for t in stopped)
    full = [t for t in trials if t["stopped_at"] == 40]
    expected = min(full, key=lambda t: t["val_bpb"])
    assert report["best"] == {
        "trial_id": expected["trial_id"],
        "recipe": expected["config"],
        "val_bpb": expected["val_bpb"],
    }
    assert tune_job.n_evaluations == 4 and tune_job.budget == 4


def test_the_best_recipe_is_what_a_longer_training_reproduces(world, tune_job):
    """The best trial's final val_bpb is what `train` gives with that recipe and budget (the same loop)."""
    import torch

    from proxies.longtrain import train_longer
    from proxies.recipe import load_source_data
    from search.tune_config import Recipe, Source

    source = Source.from_dict(tune_job.config["source"])
    root = world["search"].database_url.removeprefix("sqlite:///").rsplit("/data/", 1)[0]
    data = load_source_data(
        source, tune_job.config["source"]["artifact_path"].split("/artifacts/")[0], (root,)
    )
    best = tune_job.result["best"]
    result, _ = train_longer(
        source, Recipe.model_validate(best["recipe"]), 40, data, torch.device("cpu"), seed=3
    )
    assert result.val_bpb == pytest.approx(best["val_bpb"], abs=1e-6)


def test_best_trial_counts_only_trials_that_reached_the_budget():
    trials = [
        {"trial_id": "a", "status": "stopped", "stopped_at": 10, "val_bpb": 1.0},
        {"trial_id": "b", "status": "completed", "stopped_at": 40, "val_bpb": 3.0},
        {"trial_id": "c", "status": "completed", "stopped_at": 40, "val_bpb": 2.5},
        {"trial_id": "d", "status": "failed", "stopped_at": 40, "val_bpb": 0.5},
    ]
    assert best_trial(trials, 40)["trial_id"] == "c"
    assert best_trial(trials[:1], 40) is None


def _refusal(body: dict) -> ApiError:
    with local_client(local_settings()) as client, pytest.raises(ApiError) as refused:
        client.request("POST", "/api/tunes", json=body)
    return refused.value


@pytest.mark.parametrize(
    "change, field, reason",
    [
        ({"candidate_id": 999999}, "candidate_id", "no candidate 999999"),
        ({"lr_range": [0.1, 0.01]}, "lr_range", "0 < low < high"),
        ({"lr_range": [0.0, 0.01]}, "lr_range", "0 < low < high"),
        ({"grace_steps": 40}, "grace_steps", "must be below steps"),
        ({"trials": 0}, "trials", "greater than or equal to 1"),
        ({"reduction_factor": 1}, "reduction_factor", "greater than or equal to 2"),
        ({"batch_sizes": [0]}, "batch_sizes", "each must be between 1 and 4096"),
        ({"warmup_range": [0, 50]}, "warmup_range", "must be below steps"),
        ({"momentum": 0.9}, "momentum", "Extra inputs are not permitted"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(world, change, field, reason):
    refused = _refusal({**TUNE, "candidate_id": world["candidate"].id, **change})
    assert refused.status == 422
    assert refused.errors[0].field == field and reason in refused.errors[0].message


def test_a_candidate_without_a_completed_training_is_refused(world):
    with Storage(world["url"]) as storage:
        job_id = storage.create_job("search", {"budget": 1})
        pending = storage.add_candidate(job_id, {"operators": "A F"}, "ab" * 32)
        count = storage.count_jobs(kind="tune")
    refused = _refusal({"candidate_id": pending})
    assert refused.status == 422 and refused.errors[0].field == "candidate_id"
    assert "has no completed training" in refused.errors[0].message
    with Storage(world["url"]) as storage:
        assert storage.count_jobs(kind="tune") == count  # nothing queued
        storage.delete_job(job_id)


def test_the_cli_names_bad_input_and_shows_the_report(world, tune_job):
    from api.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["tune", "999999", "--db", world["url"]])
    assert bad.exit_code == 2 and "candidate_id" in bad.output and "no candidate 999999" in bad.output
    ranges = runner.invoke(
        app, ["tune", str(world["candidate"].id), "--lr-range", "0.1,0.01", "--db", world["url"]]
    )
    assert ranges.exit_code == 2 and "lr_range" in ranges.output and "0 < low < high" in ranges.output
    typo = runner.invoke(app, ["tune", str(world["candidate"].id), "--lr-range", "0.1", "--db", world["url"]])
    assert typo.exit_code == 2 and "lr_range" in typo.output and "is not LOW,HIGH" in typo.output
    shown = runner.invoke(app, ["tune-show", str(tune_job.id), "--db", world["url"], "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["result"] == tune_job.result


def test_rest_reads_and_the_token_is_required(world, tune_job):
    from starlette.testclient import TestClient

    from api.app import create_app
    from api.auth import Auth

    app = create_app(local_settings(), auth=Auth("secret-token"))
    with TestClient(app) as http:
        refused = http.post("/api/tunes", json={"candidate_id": world["candidate"].id})
        assert refused.status_code == 401
        detail = http.get(f"/api/tunes/{tune_job.id}").json()
        assert (
            detail["candidate_id"] == world["candidate"].id
            and detail["result"]["best"] == tune_job.result["best"]
        )
        listed = http.get("/api/tunes").json()
        assert [t["id"] for t in listed["items"]] == [tune_job.id]
        assert http.get("/api/tunes/999999").status_code == 404


def test_the_jobs_page_links_the_tune_and_its_page_draws_the_trials(world, tune_job):
    from starlette.testclient import TestClient

    from api.app import create_app
    from api.auth import Auth

    hostile = "<img src=x onerror=alert(1)>"
    with Storage(world["url"]) as storage:
        copy = storage.create_job("tune", tune_job.config, name=hostile)
        storage.set_job_result(copy, tune_job.result)
    with TestClient(create_app(local_settings(), auth=Auth("secret-token"))) as http:
        jobs = http.get("/jobs").text
        tune = http.get(f"/tunes/{tune_job.id}").text
        escaped = http.get(f"/tunes/{copy}").text
        missing = http.get("/tunes/999999")
    assert f'<a href="/tunes/{tune_job.id}">candidate {world["candidate"].id}</a>' in jobs
    assert hostile not in jobs and "&lt;img src=x" in jobs
    rows = tune.split('<table id="trials">')[1].split("</table>")[0].count("<tr")
    assert rows == 1 + len(tune_job.result["trials"])  # the header and one row per trial
    best = tune_job.result["best"]
    assert f'<tr class="best"><td>{best["trial_id"]}</td>' in tune
    assert (
        'id="tune-curves"' in tune
        and "/static/tune.js" in tune
        and "/static/vendor/plotly-basic.min.js" in tune
    )
    data = json.loads(tune.split('id="page-data">')[1].split("</script>")[0])
    assert [t["curve"] for t in data["trials"]] == [
        [list(p) for p in t["curve"]] for t in tune_job.result["trials"]
    ]
    assert hostile not in escaped and "&lt;img src=x" in escaped
    assert missing.status_code == 404
    with Storage(world["url"]) as storage:
        storage.delete_job(copy)


def test_the_tune_page_draws_one_line_per_trial_in_a_real_browser(world, tune_job, browser, tmp_path):  # noqa: F811
    from tests.live import Live
    from tests.test_browser import Page

    with Storage(world["url"]) as storage:
        live = Live(tmp_path, "browser-token", store=storage)
        page = Page(browser, live.base)
        try:
            drawn = page.open(f"/tunes/{tune_job.id}", ready=True).evaluate(
                "() => document.getElementById('tune-curves').data.map(t => [t.x.length, t.line.dash])"
            )
            assert page.errors == []
        finally:
            page.close()
            live.close()
    trials = tune_job.result["trials"]
    assert drawn == [[len(t["curve"]), "solid" if t["status"] == "completed" else "dash"] for t in trials]
    assert min(n for n, _ in drawn) < max(n for n, _ in drawn)  # the stopped trials are the shorter lines


def test_a_service_runner_runs_a_tune_job_and_a_cancel_stops_one(world):
    """The coordinator's path: a JobRunner on its own local Ray takes the queued tune job and completes it;
    a cancelled one ends cancelled, with no report."""
    import time

    from api.runner import JobRunner

    settings = local_settings()
    small = {**TUNE, "candidate_id": world["candidate"].id, "steps": 10, "trials": 2, "grace_steps": 5}
    small["warmup_range"] = [0, 2]
    long = {**small, "steps": 4000, "grace_steps": 1000, "warmup_range": [0, 2]}
    with local_client(settings) as client:
        quick = client.request("POST", "/api/tunes", json=small).json()["id"]
    with Storage(world["url"]) as storage:
        runner = JobRunner(
            storage, settings.resolved_data_dir(), poll_s=0.05, ray_num_cpus=2,
            data_roots=settings.resolved_data_roots(),
        )  # fmt: skip
        runner.start()
        try:
            _wait(lambda: storage.get_job(quick).status == "completed", "the quick tune to complete")
            assert len(storage.get_job(quick).result["trials"]) == 2
            with local_client(settings) as client:
                slow = client.request("POST", "/api/tunes", json=long).json()["id"]
                _wait(lambda: storage.get_job(slow).status == "running", "the long tune to start")
                time.sleep(3.0)  # its trials under way
                client.request("POST", f"/api/tunes/{slow}/cancel")
            _wait(lambda: not runner.running_jobs, "the runner to stop the cancelled tune")
        finally:
            runner.stop()
        cancelled = storage.get_job(slow)
        assert cancelled.status == "cancelled" and cancelled.result is None


def _wait(predicate, what: str, timeout: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_the_tune_modules_of_search_import_no_torch_nor_worker_package():
    import subprocess
    import sys

    code = (
        "import sys, search.tune_config, search.tune_runner; "
        "worker = ('torch', 'models', 'proxies', 'latency', 'web'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in worker]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

"""Experiment tracking with MLflow (the `[mlflow]` extra), against a local SQLite tracking store (MLflow 3's
file store is in maintenance mode): a real tiny search on the inline executor is logged as one experiment,
one run per candidate, the layout as params, the results as metrics, the loss curve as a metric history and
`layout.json` as an artifact; a broken store never fails the search; nothing imports mlflow untracked.

Without mlflow installed the MLflow tests are skipped, except under CI=true, where they must run."""

import json
import logging
import subprocess
import sys

import pytest

from search.config import SearchConfig
from search.engine import SearchEngine
from search.executors import InlineExecutor
from search.layout import Layout
from search.storage import Storage
from search.tracking import (
    ARTIFACT,
    LOSS_CURVE_METRIC,
    TRACKING_ENV,
    TrackingUnavailable,
    experiment_name,
    tracker_for,
)
from tests import pg

TINY = {
    "name": "tracked",
    "space": {"preset": "benchmark"},
    "strategy": "pareto-aging",
    "strategy_options": {"population_size": 4, "sample_size": 2},
    "executor": "inline",
    "workers": 1,
    "proxy": {"steps": 3, "batch_size": 2, "seq_len": 16, "eval_tokens": 64, "log_every": 1},
    "latency": {"prompt_len": 4, "decode_tokens": 2, "repeats": 1, "warmup": 0, "throughput": False},
}


@pytest.fixture
def mlflow():
    if pg.in_ci():
        import mlflow  # CI installs the dev extra, which brings mlflow: never skipped there

        return mlflow
    return pytest.importorskip("mlflow")


@pytest.fixture
def storage(tmp_path):
    with pg.migrated_url("sqlite", tmp_path) as url:
        store = Storage(url)
        try:
            yield store
        finally:
            store.close()


def create_search(storage, budget, **overrides):
    config = SearchConfig.model_validate({**TINY, "budget": budget, **overrides})
    return storage.create_job("search", json.loads(config.model_dump_json()), name=config.name, budget=budget)


def run_search(storage, tmp_path, tracker, budget=5, **overrides):
    job_id = create_search(storage, budget, **overrides)
    data_dir = str(tmp_path / "data")
    SearchEngine(storage, job_id, lambda c: InlineExecutor(data_dir, threads=1), tracker=tracker).run()
    assert storage.get_job(job_id).status == "completed"
    return job_id


def runs_of(client, storage, job_id):
    """The experiment of the search and its runs by candidate id."""
    experiment = client.get_experiment_by_name(experiment_name(storage.get_job(job_id)))
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return experiment, {int(r.data.tags["hybridnas.candidate_id"]): r for r in runs}


def test_a_search_is_logged_to_mlflow(mlflow, storage, tmp_path, monkeypatch):
    import models.registry as registry

    def broken(layout, backend):
        raise RuntimeError("deltanet kernel exploded")

    monkeypatch.setitem(registry.BUILDERS, "deltanet", broken)  # some candidates fail: FAILED runs
    uri = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    first = run_search(storage, tmp_path, tracker_for(uri), budget=5)
    second = run_search(storage, tmp_path, tracker_for(uri), budget=5)  # the same proposals, reused

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert {e.name for e in client.search_experiments()} >= {
        f"hybridnas search {first} tracked",
        f"hybridnas search {second} tracked",
    }
    statuses = set()
    for job_id in (first, second):
        experiment, runs = runs_of(client, storage, job_id)
        assert experiment.tags["hybridnas.job_id"] == str(job_id)
        assert experiment.artifact_location.startswith((tmp_path / "tracking").as_uri())  # beside the db
        candidates = storage.candidates(job_id)
        assert sorted(runs) == sorted(c.id for c in candidates)  # one run per candidate
        for cand in candidates:
            run = runs[cand.id]
            statuses.add(cand.status)
            assert run.info.run_name == f"candidate {cand.id}"
            assert run.data.tags["hybridnas.status"] == cand.status
            assert run.data.tags["hybridnas.layout_hash"] == cand.layout_hash
            layout = Layout.from_dict(cand.layout)
            dims = {k: str(v) for k, v in layout.architecture().items() if k != "operators"}
            expected = {"operators": layout.compact(), **dims}
            if layout.name is not None:
                expected["name"] = layout.name
            assert run.data.params == expected
            path = client.download_artifacts(run.info.run_id, ARTIFACT, str(tmp_path / f"dl-{cand.id}"))
            with open(path) as f:
                assert json.load(f) == cand.layout
            if cand.status == "failed":
                assert run.info.status == "FAILED"
                assert run.data.tags["hybridnas.failure_reason"] == cand.failure_reason
                assert "deltanet kernel exploded" in cand.failure_reason
                assert run.data.tags["hybridnas.failed_phase"] == "model"
                assert "val_bpb" not in run.data.metrics
                continue
            assert run.info.status == "FINISHED"
            metrics = run.data.metrics
            assert metrics["val_bpb"] == cand.val_bpb
            assert metrics["decode_ms"] == cand.decode_ms
            assert metrics["n_params"] == cand.n_params
            latency = storage.get_latency_result(cand.latency_key)
            assert metrics["prefill_ms"] == latency.prefill_ms  # measured, so logged
            assert "throughput_tokens_per_s" not in metrics  # not measured (throughput off)
            stored_curve = storage.get_training_result(cand.training_key).result["loss_curve"]
            history = client.get_metric_history(run.info.run_id, LOSS_CURVE_METRIC)
            assert len(history) == TINY["proxy"]["steps"]  # log_every=1: one point per step
            assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
                (step, loss) for step, loss in stored_curve
            ]
    assert statuses == {"completed", "failed", "reused"}


def test_a_broken_tracking_store_does_not_fail_the_search(mlflow, storage, tmp_path, caplog):
    (tmp_path / "a-file").write_text("not a folder")
    tracker = tracker_for(f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")  # cannot be created
    with caplog.at_level(logging.WARNING, logger="hybridnas.engine"):
        job_id = run_search(storage, tmp_path, tracker, budget=3)
    assert {c.status for c in storage.candidates(job_id)} <= {"completed", "reused", "failed"}
    assert len(storage.candidates(job_id)) == 3
    warnings = [r for r in caplog.records if "experiment tracking failed" in r.getMessage()]
    assert len(warnings) == 1  # once, then the search goes on untracked
    assert "a-file" not in repr(tracker)


def test_the_service_runner_tracks_its_jobs(mlflow, storage, tmp_path):
    import time

    from mlflow.tracking import MlflowClient

    from api.runner import JobRunner

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job_id = create_search(storage, budget=2)
    data_dir = tmp_path / "data"
    runner = JobRunner(
        storage,
        data_dir,
        executor_factory=lambda c: InlineExecutor(str(data_dir), threads=1),
        poll_s=0.05,
        tracking_uri=uri,
    )
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while storage.get_job(job_id).status != "completed":
            assert time.monotonic() < deadline, "the job did not complete"
            time.sleep(0.05)
    finally:
        runner.stop()
    _experiment, runs = runs_of(MlflowClient(tracking_uri=uri), storage, job_id)
    assert sorted(runs) == sorted(c.id for c in storage.candidates(job_id))


def test_no_uri_no_tracker():
    assert tracker_for(None) is None and tracker_for("") is None


def test_a_uri_without_mlflow_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(TrackingUnavailable, match=TRACKING_ENV):
        tracker_for("sqlite:///mlflow.db")


def test_mlflow_is_not_imported_without_tracking():
    code = (
        "import sys, search.engine, search.tracking, api.runner\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

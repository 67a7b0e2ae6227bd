"""Running a study (`search/studies/`): its planned runs, one `study-run` job each under the study, run in
order by the search engine on the caller's executor factory; then the report from their candidates.

Resumable like a search: a run is made once (its job is keyed `study:<study id>:<run key>`), a finished one is
never run again, an unfinished one continues where it stopped; every evaluation's result is stored under its
keys, so nothing a search (or another study) trained is trained twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict

from search.engine import SearchEngine, StopEvent
from search.studies import Reference, Study, StudyError, parse_study

log = logging.getLogger("hybridnas.studies")


def run_key(study_id: int, key: str) -> str:
    return f"study:{study_id}:{key}"


def candidate_dicts(storage, job_id: int) -> list[dict]:
    """A job's candidates as dicts, each with its training result's metrics (`training`) and its latency
    result's device fingerprint (`device_fingerprint`)."""
    details = storage.result_details_of(job_id)
    out = []
    for c in storage.candidates(job_id):
        training, device = details.get(c.id, (None, None))
        row = asdict(c)
        row["training"] = (
            None if training is None else {k: v for k, v in training.items() if k != "loss_curve"}
        )
        row["device_fingerprint"] = device
        out.append(row)
    return out


def references(storage, study: Study) -> dict[str, Reference]:
    """The jobs the study reads, each with its candidates (a missing job is left out)."""
    out = {}
    for name, job_id in study.references().items():
        job = storage.get_job(job_id)
        if job is not None:
            out[name] = Reference(asdict(job), candidate_dicts(storage, job_id))
    return out


def study_runs(storage, study_id: int) -> list:
    """The study's run jobs, made now where missing (in plan order). Raises StudyError when the study cannot
    be planned (a verdict's search not finished...)."""
    job = storage.get_job(study_id)
    study = parse_study(job.config)
    runs = []
    for run in study.plan(references(storage, study)):
        child = storage.get_job_by_idempotency_key(run_key(study_id, run.key))
        if child is None:
            storage.create_job(
                "study-run",
                run.search_config,
                name=f"{job.name or job.kind} / {run.key}",
                budget=run.search_config["budget"],
                idempotency_key=run_key(study_id, run.key),
                parent_id=study_id,
            )
            child = storage.get_job_by_idempotency_key(run_key(study_id, run.key))
        runs.append((run.key, child))
    return runs


def run_study(
    storage,
    study_id: int,
    executor_factory: Callable,
    stop: threading.Event | None = None,
    on_progress: Callable | None = None,
    tracker=None,
) -> tuple[str, str | None]:
    """Run the study's unfinished runs, then store its report. (status, error) to end the study with:
    completed; failed with the run's reason; cancelled or queued when `stop` was set. The study's progress
    counts its runs' evaluations against their budgets."""
    stop = stop if stop is not None else StopEvent()
    try:
        runs = study_runs(storage, study_id)
    except StudyError as exc:
        return "failed", str(exc)
    total = sum(child.budget or 0 for _, child in runs)

    def progress(p) -> None:
        done = sum((storage.get_job(child.id).n_evaluations or 0) for _, child in runs)
        storage.update_progress(study_id, done, total)
        if on_progress is not None:
            on_progress(p)

    for key, child in runs:
        if child.status == "completed":
            continue
        log.info("study %d: run %s (job %d, %s evaluations)", study_id, key, child.id, child.budget)
        SearchEngine(
            storage, child.id, executor_factory, stop=stop, on_progress=progress, tracker=tracker
        ).run()
        if stop.is_set():
            return ("cancelled" if getattr(stop, "cancel", False) else "queued"), None
        child = storage.get_job(child.id)
        if child.status != "completed":
            return "failed", f"run {key} (job {child.id}) {child.status}: {child.error}"
    study = parse_study(storage.get_job(study_id).config)
    report = study.analyse(
        {key: candidate_dicts(storage, child.id) for key, child in runs}, references(storage, study)
    )
    storage.set_job_result(study_id, report)
    storage.update_progress(study_id, sum(storage.get_job(c.id).n_evaluations for _, c in runs), total)
    return "completed", None

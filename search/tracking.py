"""Experiment tracking (optional: the `[mlflow]` extra): every evaluation of a search logged to MLflow.

With `HYBRIDNAS_MLFLOW_TRACKING_URI` set, the engine hands each recorded result (completed, reused or failed)
to a `Tracker`. `MlflowTracker` keeps one experiment per search (`hybridnas search <id> <name>`) and one run
per candidate (`candidate <id>`):

- params: the layout (`operators` as its compact string, e.g. "A F M2 F", and the dims its operators use;
  the name and vocabulary when set);
- metrics: `val_bpb`, `decode_ms`, the other latency metrics that were measured (`db.LATENCY_METRICS`),
  `n_params`, `val_loss`; the training loss curve as the history of `train_loss` (one value per logged step);
- artifact: `layout.json` (the candidate's layout as stored);
- tags: the candidate's id, generation, parent, layout hash, status (`completed`, `reused`, `failed`) and, for
  a failed candidate (a FAILED run), its reason and phase.

mlflow is imported only here, and only once a tracker is made: an install without the extra never imports it.
Nothing secret is logged (no token, no database URL, not the tracking URI): only the layout, its results and
a few fields of the search's config. The engine makes sure a tracking error never stops a search.

A local store needs no server: `sqlite:///path/mlflow.db` (its artifacts go beside the database, in
`mlartifacts/`). MLflow 3 keeps its file store (`file:///...`, `./mlruns`) in maintenance mode and refuses it
unless `MLFLOW_ALLOW_FILE_STORE=true`.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote

from search.layout import Layout
from search.storage.records import finite_float, latency_metric_values

if TYPE_CHECKING:
    from search.evaluation import EvaluationResult
    from search.storage import CandidateRecord, JobRecord

TRACKING_ENV = "HYBRIDNAS_MLFLOW_TRACKING_URI"
LOSS_CURVE_METRIC = "train_loss"
ARTIFACT = "layout.json"
_TAG = "hybridnas."
_MAX_TAG = 5000  # MLflow's limit is 8000 characters per tag value
_BATCH = 1000  # entities per log_batch call (MLflow's limit)


class TrackingUnavailable(RuntimeError):
    """Tracking is configured but cannot be used (mlflow is not installed)."""


class Tracker(Protocol):
    def log_evaluation(
        self, job: JobRecord, candidate: CandidateRecord, result: EvaluationResult | None
    ) -> None:
        """Log one recorded result: `candidate` as stored after it completed, was reused or failed;
        `result` the evaluation's training and latency dicts (None when nothing was measured)."""


def tracker_for(uri: str | None) -> Tracker | None:
    """The tracker a tracking URI asks for: None without one; an `MlflowTracker` (which contacts its store
    only when it first logs). Raises TrackingUnavailable if mlflow is not installed."""
    if not uri:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise TrackingUnavailable(
            f"{TRACKING_ENV} is set but mlflow is not installed ({exc}): install the extra "
            f"(pip install 'hybridnas[mlflow]') or unset {TRACKING_ENV}"
        ) from exc
    return MlflowTracker(uri)


def experiment_name(job: JobRecord) -> str:
    name = f"hybridnas search {job.id}"
    return f"{name} {job.name[:200]}" if job.name else name


def layout_params(layout: Layout) -> dict[str, str]:
    """The layout as MLflow params: the compact operator string and the dims its operators use."""
    params = {"operators": layout.compact()}
    params.update({k: str(v) for k, v in layout.architecture().items() if k != "operators"})
    if layout.name is not None:
        params["name"] = layout.name
    if layout.vocab_size is not None:
        params["vocab_size"] = str(layout.vocab_size)
    return params


def evaluation_metrics(candidate: CandidateRecord, result: EvaluationResult | None) -> dict[str, float]:
    """The run's metrics (the stored values first, the worker's where nothing was stored); finite only."""
    training = (result.training if result is not None else None) or {}
    values = {
        "val_bpb": candidate.val_bpb if candidate.val_bpb is not None else training.get("val_bpb"),
        "decode_ms": candidate.decode_ms
        if candidate.decode_ms is not None
        else (result.decode_ms if result is not None else None),
        **latency_metric_values(result.latency if result is not None else None),
        "n_params": candidate.n_params if candidate.n_params is not None else training.get("n_params"),
        "val_loss": training.get("val_loss"),
    }
    out = {}
    for name, value in values.items():
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and finite_float(value) is not None:
            out[name] = float(value)
    return out


def loss_curve(result: EvaluationResult | None) -> list[tuple[int, float]]:
    """The training's (step, loss) points (a list of pairs, as the proxy logs them); finite losses only."""
    points = ((result.training if result is not None else None) or {}).get("loss_curve") or []
    out = []
    for point in points:
        step, loss = point
        if finite_float(loss) is not None:
            out.append((int(step), float(loss)))
    return out


def _ms(moment) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def _local_artifacts(uri: str) -> str | None:
    """For a local SQLite store, artifacts beside the database (MLflow's default is the process's working
    folder, `./mlruns`); otherwise the store decides."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :]).split("?")[0]
    if not path or path == ":memory:":
        return None
    return (Path(path).expanduser().resolve().parent / "mlartifacts").as_uri()


class MlflowTracker:
    """Logs to the MLflow tracking store at `tracking_uri` through its own `MlflowClient` (never the fluent
    API's process-wide active run, so jobs in several threads do not mix)."""

    def __init__(self, tracking_uri: str, artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location or _local_artifacts(tracking_uri)
        self._client = None
        self._experiments: dict[int, str] = {}

    @property
    def client(self):
        if self._client is None:  # a SQLite store is opened (and migrated) here: on the first log
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def experiment_id(self, job: JobRecord) -> str:
        """The search's experiment, made on its first run. A same-named experiment of another search (another
        database's job with this id) is told apart by the job's creation time: this one gets a suffix."""
        if job.id in self._experiments:
            return self._experiments[job.id]
        identity = job.created_at.isoformat() if job.created_at else ""
        base = experiment_name(job)
        for n in range(1, 1000):
            name = base if n == 1 else f"{base} ({n})"
            found = self.client.get_experiment_by_name(name)
            if found is None:
                tags = {
                    f"{_TAG}job_id": str(job.id),
                    f"{_TAG}job_created_at": identity,
                    f"{_TAG}job_name": job.name or "",
                    f"{_TAG}strategy": str(job.config.get("strategy", "")),
                    f"{_TAG}objectives": ",".join(job.config.get("objectives") or []),
                }
                experiment = self.client.create_experiment(
                    name, artifact_location=self.artifact_location, tags=tags
                )
                break
            if found.tags.get(f"{_TAG}job_created_at") == identity:
                if found.lifecycle_stage == "deleted":
                    self.client.restore_experiment(found.experiment_id)
                experiment = found.experiment_id
                break
        else:
            raise RuntimeError(f"no free experiment name for {base!r}")
        self._experiments[job.id] = experiment
        return experiment

    def log_evaluation(
        self, job: JobRecord, candidate: CandidateRecord, result: EvaluationResult | None
    ) -> None:
        from mlflow.entities import Metric, Param

        client = self.client
        failed = candidate.status == "failed"
        tags = {
            f"{_TAG}job_id": str(job.id),
            f"{_TAG}candidate_id": str(candidate.id),
            f"{_TAG}status": candidate.status,
            f"{_TAG}generation": str(candidate.generation),
            f"{_TAG}layout_hash": candidate.layout_hash,
            f"{_TAG}attempts": str(candidate.attempts),
        }
        if candidate.parent_id is not None:
            tags[f"{_TAG}parent_id"] = str(candidate.parent_id)
        if candidate.mutation:
            tags[f"{_TAG}mutation"] = json.dumps(candidate.mutation, sort_keys=True)[:_MAX_TAG]
        if failed:
            tags[f"{_TAG}failure_reason"] = (candidate.failure_reason or "failed")[:_MAX_TAG]
            if result is not None and result.failed_phase:
                tags[f"{_TAG}failed_phase"] = result.failed_phase
        run = client.create_run(
            self.experiment_id(job),
            start_time=_ms(candidate.started_at or candidate.created_at),
            run_name=f"candidate {candidate.id}",
            tags=tags,
        )
        run_id = run.info.run_id
        status = "FAILED" if failed else "FINISHED"
        try:
            now = int(time.time() * 1000)
            params = [Param(k, v) for k, v in layout_params(Layout.from_dict(candidate.layout)).items()]
            metrics = [Metric(k, v, now, 0) for k, v in evaluation_metrics(candidate, result).items()]
            metrics += [Metric(LOSS_CURVE_METRIC, loss, now, step) for step, loss in loss_curve(result)]
            client.log_batch(run_id, metrics=metrics[: _BATCH - len(params)], params=params)
            for i in range(_BATCH - len(params), len(metrics), _BATCH):
                client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
            client.log_text(run_id, json.dumps(candidate.layout, indent=2, sort_keys=True), ARTIFACT)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status=status, end_time=_ms(candidate.finished_at))

    def __repr__(self) -> str:  # the URI may hold credentials: never shown
        return "MlflowTracker(...)"


__all__ = [
    "TRACKING_ENV",
    "MlflowTracker",
    "Tracker",
    "TrackingUnavailable",
    "evaluation_metrics",
    "experiment_name",
    "layout_params",
    "loss_curve",
    "tracker_for",
]

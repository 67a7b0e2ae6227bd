"""Submitting a search, a study or a tune job (REST, the CLI through it, schedules), and the data-path checks
that schedule templates share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi.exceptions import RequestValidationError

from api.schemas import SearchCreate, StudyCreate
from api.tune_schemas import TuneCreate
from search.storage import JobRecord, Storage


class SubmitError(ValueError):
    """A submission refused for a reason the caller reports: `field` names the input, `conflict` means 409."""

    def __init__(self, field: str, reason: str, conflict: bool = False):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.conflict = field, reason, conflict

    def as_validation_error(self, *within: str) -> RequestValidationError:
        """The 422 a route raises: the field's path in the body (`within` a nested object, such as a
        template)."""
        return RequestValidationError(
            [{"loc": ("body", *within, *self.field.split(".")), "type": "value_error", "msg": self.reason}]
        )


@dataclass
class Submitted:
    job: JobRecord
    replayed: bool  # an Idempotency-Key matched an earlier request: no new search


def check_data_paths(body: SearchCreate, data_roots: Sequence[Path]) -> SearchCreate:
    """Corpus, tokenizer and latency-table paths must resolve inside the configured data roots (no `../` or
    link escapes). The body back, with the latency table's path made absolute (the coordinator reads it)."""
    from proxies.corpus import CorpusError, resolve_data_path

    data = body.data
    paths = [("data.corpus", data.corpus[3:] if data.corpus.startswith("hf:") else data.corpus)]
    if data.tokenizer.startswith("file:"):
        paths.append(("data.tokenizer", data.tokenizer[5:]))
    if body.latency_lut:
        paths.append(("latency_lut", body.latency_lut))
    for field, raw in paths:
        if field == "data.corpus" and raw == "stdlib":
            continue
        try:
            resolved = resolve_data_path(raw, data_roots)
        except CorpusError as exc:
            raise SubmitError(field, str(exc)) from None
        if field == "latency_lut":
            _check_latency_table(resolved)
            body = body.model_copy(update={"latency_lut": str(resolved)})
    return body


def _check_latency_table(path: Path) -> None:
    """A table the engine can read (`hybridnas latency build-lut` writes them), or a SubmitError saying
    why."""
    from search.latency_model import LatencyTable

    try:
        LatencyTable.load(path)
    except (ValueError, TypeError, KeyError) as exc:
        raise SubmitError("latency_lut", f"not a valid latency table: {exc}") from None


def submit_search(
    storage: Storage,
    body: SearchCreate,
    *,
    idempotency_key: str | None = None,
    data_roots: Sequence[Path] | None = None,
) -> Submitted:
    """Store a validated search config as a queued job (a runner takes it from the queue)."""
    if data_roots is not None:
        body = check_data_paths(body, data_roots)
    config = body.search_config()
    if body.warm_start_job is not None and storage.get_job(body.warm_start_job) is None:
        raise SubmitError("warm_start_job", f"no search {body.warm_start_job} to warm-start from")
    return _queue_once(
        storage,
        "search",
        config,
        idempotency_key,
        name=body.name,
        priority=body.priority,
        budget=body.budget,
        priority_must_match=True,
    )


def _queue_once(
    storage: Storage,
    kind: str,
    config: dict,
    idempotency_key: str | None,
    *,
    name: str | None,
    priority: int,
    budget: int | None = None,
    priority_must_match: bool = False,
) -> Submitted:
    """The job queued, or the one an earlier request with this Idempotency-Key made (a replay); a 409
    SubmitError when that request asked for something else."""
    job_id, created = storage.create_job_once(
        kind, config, name=name, priority=priority, budget=budget, idempotency_key=idempotency_key
    )
    job = storage.get_job(job_id)
    assert job is not None
    if idempotency_key is not None and (
        job.kind != kind or job.config != config or (priority_must_match and job.priority != priority)
    ):
        raise SubmitError("Idempotency-Key", "already used for a different request", conflict=True)
    return Submitted(job, not created)


def check_study(body: StudyCreate, data_roots: Sequence[Path], storage: Storage | None = None) -> None:
    """A study can be planned (a verdict's search and depth-width study exist, are finished and comparable:
    checked when `storage` is given), and every run it plans passes a search's checks (its data paths inside
    the data roots). SubmitError names the field."""
    from search.studies import StudyError
    from search.study_runner import references

    if body.references() and storage is None:
        return
    try:
        runs = body.plan(references(storage, body) if storage is not None else {})
    except StudyError as exc:
        raise SubmitError(exc.field, exc.reason) from None
    for run in runs:
        check_data_paths(SearchCreate.model_validate(run.search_config), data_roots)


def submit_study(
    storage: Storage,
    body: StudyCreate,
    *,
    idempotency_key: str | None = None,
    data_roots: Sequence[Path] | None = None,
) -> Submitted:
    """Store a validated study config as a queued job of its kind."""
    if data_roots is not None:
        check_study(body, data_roots, storage)
    config = body.study_config()
    return _queue_once(storage, body.kind, config, idempotency_key, name=body.name, priority=body.priority)


def submit_tune(
    storage: Storage, body: TuneCreate, data_dir: Path, *, idempotency_key: str | None = None
) -> Submitted:
    """Store a tune job for a candidate that can be tuned (SubmitError names the field when it cannot)."""
    from search.tune_config import TUNE_KIND, TuneError, check_tune

    try:
        spec, source = check_tune(storage, body, data_dir)
    except TuneError as exc:
        raise SubmitError(exc.field, exc.reason) from None
    config = {**spec.model_dump(), "source": source.to_dict()}
    return _queue_once(
        storage,
        TUNE_KIND,
        config,
        idempotency_key,
        name=spec.name,
        priority=spec.priority,
        budget=spec.trials,
    )

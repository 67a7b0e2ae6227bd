"""Searches without a server: `run_search` for notebooks and scripts, and the in-process API the CLI reads a
local database through (the same routes, checks and schemas as a coordinator's, with no socket).

    result = hybridnas.run_search({"budget": 12, "executor": "inline"})
    result.front, result.candidates, result.hypervolume_history, result.to_dataframe()
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from api.schemas import CandidateSummary, SearchDetail
from hybridnas.client import Client
from hybridnas.config import validate_search_config
from hybridnas.errors import HybridnasError
from search.config import SearchConfig
from search.layout import Layout

CLI_LEASE_S = 30.0


def local_settings(database_url: str | None = None, **overrides: Any):
    """The service's settings (environment, `.env`), with this database and no runner or scheduler."""
    from api.settings import Settings

    values = {"runners": 0, "scheduler": False, **overrides}
    if database_url is not None:
        values["database_url"] = database_url
    return Settings(**values)


@contextmanager
def local_client(settings=None) -> Iterator[Client]:
    """A `Client` over the API served in this process (no socket) on the settings' database, migrated to the
    newest schema if it is behind. The token is made for this call only."""
    from starlette.testclient import TestClient

    from api.app import create_app
    from api.auth import Auth

    settings = settings or local_settings()
    token = secrets.token_urlsafe(24)
    app = create_app(settings, auth=Auth(token))
    with TestClient(app, base_url="http://local", raise_server_exceptions=True) as http:
        yield Client("http://local", token, http=http, retries=0)


def run_job(
    storage,
    job_id: int,
    settings,
    stop: threading.Event | None = None,
    on_progress: Callable | None = None,
) -> None:
    """Run a queued (or stopped) search, study or tune job here to its end, under a lease as a service runner
    would, so that a coordinator on the same database never runs it at the same time."""
    from search.engine import SearchEngine, StopEvent
    from search.executors import executor_factory
    from search.leases import LeaseHeld, held_lease, owner_id, take_job
    from search.study_runner import run_study
    from search.tracking import tracker_for

    owner = owner_id("cli@")
    try:
        job = take_job(storage, job_id, owner, CLI_LEASE_S)
    except LeaseHeld as exc:
        raise HybridnasError(str(exc)) from None
    stop = stop if stop is not None else StopEvent()
    factory = executor_factory(settings.ensure_data_dir(), settings.resolved_data_roots())
    tracker = tracker_for(settings.mlflow_tracking_uri)
    with held_lease(storage, job_id, owner, CLI_LEASE_S, stop):
        if job.kind == "search":
            SearchEngine(
                storage,
                job_id,
                factory,
                stop=stop,
                on_progress=on_progress,
                lease_owner=owner,
                tracker=tracker,
            ).run()
            return
        if job.kind == "tune":
            from search.tune_runner import run_tune

            data_dir, roots = settings.ensure_data_dir(), settings.resolved_data_roots()
            outcome = run_tune(storage, job_id, data_dir, roots, stop)
        else:
            outcome = run_study(storage, job_id, factory, stop=stop, on_progress=on_progress, tracker=tracker)
    storage.release_job(job_id, owner, outcome[0], error=outcome[1])  # once the heartbeat has stopped


@dataclass
class SearchResult:
    """A finished (or stopped) search, read back through the API's schemas."""

    search: SearchDetail
    front: list[CandidateSummary]
    candidates: list[CandidateSummary]
    hypervolume_history: list[tuple[int, float]] = field(default_factory=list)  # (evaluations, hypervolume)
    database_url: str = ""
    _layouts: dict[int, dict] = field(default_factory=dict, repr=False)

    @property
    def id(self) -> int:
        return self.search.id

    def layout(self, candidate_id: int) -> Layout:
        return Layout.from_dict(self._layouts[candidate_id])

    def to_dataframe(self):
        """One row per candidate (pandas), with `operators` (compact) and `d_model` from its layout."""
        from hybridnas.frames import to_dataframe

        rows = []
        for c in self.candidates:
            layout = self.layout(c.id)
            rows.append(
                {**c.model_dump(mode="json"), "operators": layout.compact(), "d_model": layout.d_model}
            )
        return to_dataframe(rows)


def run_search(
    config: dict | str | Path | SearchConfig,
    database_url: str | None = None,
    executor: Literal["ray", "inline"] | None = "ray",
    progress: Callable | None = None,
) -> SearchResult:
    """Run a search in this process to its end and return its results. `config`: a dict, a YAML/JSON path or
    a `SearchConfig`, checked as POST /api/searches checks it (`ConfigError` names the field). The database:
    `database_url`, else the settings' (SQLite under the data dir). `executor` overrides the config's (None:
    keep it). `progress(p)` is called after each evaluation (`p.n_evaluations`, `p.budget`, ...)."""
    from search.storage import Storage

    settings = local_settings(database_url)
    checked = validate_search_config(config, settings.data_roots)
    if executor is not None:
        checked = checked.model_copy(update={"executor": executor})
    settings.ensure_data_dir()
    with local_client(settings) as client:
        created = client.submit(checked)
        with Storage(settings.resolved_database_url()) as storage:
            run_job(storage, created.id, settings, on_progress=progress)
            return read_result(client, storage, created.id)


def read_result(client: Client, storage, search_id: int) -> SearchResult:
    """The search through the API's schemas (layouts straight from the storage: one read, not one each)."""
    curve = client.hypervolume(search_id)
    return SearchResult(
        search=client.search(search_id),
        front=client.pareto(search_id).items,
        candidates=client.candidates(search_id),
        hypervolume_history=list(zip(curve.n_evaluations, curve.hypervolume)),
        database_url=storage.url,
        _layouts={c.id: c.layout for c in storage.candidates(search_id)},
    )

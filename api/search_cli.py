"""`hybridnas search ...`: searches on the local database (in this process, no server) or, with `--url` or
HYBRIDNAS_URL, on a coordinator over REST. Both go through the same API routes (locally served in-process),
so every check, error and JSON shape is the service's own.

Exit codes: 0 done; 1 the work failed (a failed search, a refused change, nothing by that id); 2 a usage or
validation error (naming the field); 130 interrupted (Ctrl-C: running evaluations are cancelled, their
candidates go back to pending, and `search resume ID` continues).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hybridnas.client import Client
from hybridnas.errors import ApiError, ConfigError, HybridnasError

search_app = typer.Typer(
    help="Run, inspect and manage searches: the local database, or a coordinator with --url.",
    no_args_is_help=True,
)
console = Console(width=max(140, Console().width))
err = Console(stderr=True, soft_wrap=True)  # messages stay one line each (logs, CI output)

DB = typer.Option(None, "--db", help="database URL (default: the settings': SQLite under the data dir)")
URL = typer.Option(None, "--url", envvar="HYBRIDNAS_URL", help="a coordinator's URL: work on it over REST")
JSON = typer.Option(False, "--json", help="machine-readable JSON on stdout")
SEARCH = typer.Argument(..., help="the search's id, or its name (the newest of that name)")
FAILED_STATUSES = ("failed", "cancelled")


def _exit_for(exc: Exception) -> int:
    if isinstance(exc, ConfigError) or (isinstance(exc, ApiError) and exc.status == 422):
        return 2
    return 1


@contextmanager
def reported() -> Iterator[None]:
    """The public API's errors as a message on stderr and the exit code they mean."""
    try:
        yield
    except (HybridnasError, ApiError) as exc:
        if isinstance(exc, ConfigError):
            lines = "\n".join(f"  {e.field or 'config'}: {e.message}" for e in exc.errors)
            err.print(f"[red]invalid {exc.source}[/red]\n{lines}", highlight=False)
        else:
            err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(_exit_for(exc)) from None


def _local_settings(db: str | None, create: bool):
    """The settings for the local database; without `create` a missing SQLite file is an error naming where
    it was looked for, and nothing is created (read commands never leave files behind)."""
    from hybridnas.local import local_settings
    from search.storage import sqlite_path

    settings = local_settings(db)
    path = sqlite_path(settings.resolved_database_url())
    if create:
        settings.ensure_data_dir()
    elif path is not None and not path.is_file():
        err.print(f"[red]no database at {path}[/red] (a search run there would make one; or pass --db URL)")
        raise typer.Exit(1)
    return settings


@contextmanager
def searches_api(url: str | None, db: str | None, create: bool = False) -> Iterator[Client]:
    """A client of the coordinator at `url`, else of the local database (served in this process)."""
    from hybridnas.local import local_client

    with reported():
        if url:
            with Client(url) as client:
                yield client
        else:
            with local_client(_local_settings(db, create)) as client:
                yield client


def _dump(value) -> None:
    if isinstance(value, list):
        data = [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in value]
    else:
        data = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    sys.stdout.write(json.dumps(data) + "\n")


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------ run


@contextmanager
def interruptible(resume_hint: str) -> Iterator[tuple[threading.Event, list[int]]]:
    """A stop event that Ctrl-C or SIGTERM sets (saying how to resume), and the signals received; the
    previous handlers are put back at the end."""
    from search.engine import StopEvent

    stop, received = StopEvent(), []

    def on_signal(signum, frame):
        err.print(f"[yellow]stopping: cancelling running evaluations (resume with `{resume_hint}`)[/yellow]")
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop, received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_engine(storage, job_id: int, settings, show_front: bool = True) -> None:
    """Run the search here (Ctrl-C or SIGTERM stops it resumably), with a progress display; the front at the
    end. Exits 1 when the search failed, 128 + the signal when interrupted."""
    from api.progress import progress_bar
    from hybridnas.local import run_job
    from search.storage import DatabaseUnavailable

    job = storage.get_job(job_id)
    fields = {"failed": 0, "reused": 0, "HV": "-"}
    try:
        with (
            interruptible(f"hybridnas search resume {job_id}") as (stop, received),
            reported(),
            progress_bar(f"search {job_id}", total=job.budget, fields=fields) as update,
        ):

            def on_progress(p):
                hv = f"{p.hypervolume:.4f}" if p.hypervolume is not None else "-"
                update(completed=p.n_evaluations, failed=p.n_failed, reused=p.n_reused, HV=hv)

            run_job(storage, job_id, settings, stop=stop, on_progress=on_progress)
    except DatabaseUnavailable as exc:
        err.print(f"[red]{exc}[/red]: the search stopped; `hybridnas search resume {job_id}` continues it")
        raise typer.Exit(1) from None
    if show_front:
        print_front(storage, job_id)
    if received:  # interrupted: the shell's convention, 128 + the signal (130 for Ctrl-C)
        raise typer.Exit(128 + received[0])
    if storage.get_job(job_id).status == "failed":
        err.print(f"[red]search {job_id} failed[/red]: {storage.get_job(job_id).error}")
        raise typer.Exit(1)


def print_front(storage, job_id: int) -> None:
    from search.layout import Layout

    job = storage.get_job(job_id)
    front = storage.candidates(job_id, on_front=True)
    table = Table(
        "id",
        "operators",
        "d_model",
        "params",
        "val_bpb",
        "decode ms/token",
        "mutation",
        title=f"search {job_id} ({job.status}): Pareto front, {len(front)} of "
        f"{storage.count_candidates(job_id)} candidates",
    )
    for cand in sorted(front, key=lambda c: c.val_bpb):
        layout = Layout.from_dict(cand.layout)
        table.add_row(
            str(cand.id),
            layout.compact(),
            str(layout.d_model),
            f"{cand.n_params:,}",
            f"{cand.val_bpb:.4f}",
            f"{cand.decode_ms:.3f}",
            (cand.mutation or {}).get("detail", "initial") if cand.mutation else "initial",
        )
    console.print(table)


def _wait_remote(client: Client, search_id: int, as_json: bool) -> None:
    final = client.wait(search_id, progress=True)
    if as_json:
        _dump(final)
    else:
        _print_detail(client, final)
    if final.status in FAILED_STATUSES:
        raise typer.Exit(1)


@search_app.command("run")
def search_run(
    config_path: Path = typer.Argument(..., help="search config (YAML or JSON)"),
    db: str = DB,
    url: str = URL,
    as_json: bool = JSON,
) -> None:
    """Start a search and follow it to the end: here (Ctrl-C stops; `search resume ID` continues), or with
    --url on that coordinator."""
    from hybridnas.config import validate_search_config
    from search.storage import Storage

    if url:
        with searches_api(url, None) as client:
            created = client.submit(config_path)
            err.print(f"search {created.id} submitted to {client.url}")
            _wait_remote(client, created.id, as_json)
        return
    from hybridnas.local import local_settings

    with reported():  # checked before anything is created
        validate_search_config(config_path, local_settings(db).data_roots)
    settings = _local_settings(db, create=True)
    with searches_api(None, db, create=True) as client:
        created = client.submit(config_path)
    with Storage(settings.resolved_database_url()) as storage:
        err.print(f"search {created.id} created in {storage!r}")
        run_engine(storage, created.id, settings, show_front=not as_json)
        if as_json:
            with searches_api(None, db) as client:
                _dump(client.search(created.id))


@search_app.command("resume")
def search_resume(search: str = SEARCH, db: str = DB, url: str = URL, as_json: bool = JSON) -> None:
    """Continue a stopped search: here from the database, or with --url back into that coordinator's
    queue (then followed to its end)."""
    from search.storage import Storage

    with searches_api(url, db) as client:
        detail = client.search(search)
        if url:
            client.resume(detail.id)
            _wait_remote(client, detail.id, as_json)
            return
    if detail.kind != "search":
        err.print(f"[red]job {detail.id} is a {detail.kind}, not a search[/red]")
        raise typer.Exit(1)
    settings = _local_settings(db, create=False)
    with Storage(settings.resolved_database_url()) as storage:
        if detail.status != "completed":
            run_engine(storage, detail.id, settings)
        else:
            print_front(storage, detail.id)


# ------------------------------------------------------------------------------------------------ reads


@search_app.command("list")
def search_list(
    status: str = typer.Option(None, help="only searches with this status"),
    db: str = DB,
    url: str = URL,
    as_json: bool = JSON,
) -> None:
    """Every search, newest first."""
    with searches_api(url, db) as client:
        items = client.searches(status=status)
    if as_json:
        _dump(items)
        return
    table = Table("id", "name", "status", "evaluations", "budget", "created", "finished", title="searches")
    for s in items:
        table.add_row(
            str(s.id),
            s.name or "",
            s.status,
            str(s.n_evaluations),
            _fmt(s.budget),
            s.created_at.strftime("%Y-%m-%d %H:%M"),
            s.finished_at.strftime("%Y-%m-%d %H:%M") if s.finished_at else "",
        )
    console.print(table)


def _print_detail(client: Client, detail) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(detail.counts.items())) or "none"
    console.print(
        f"[bold]search {detail.id}[/bold] {detail.name or ''}: {detail.status}, {detail.n_evaluations}/"
        f"{_fmt(detail.budget)} evaluations; candidates: {counts}; hypervolume {_fmt(detail.hypervolume)}"
    )
    if detail.error:
        console.print(f"[red]error[/red] {detail.error}", highlight=False)
    front = client.pareto(detail.id)
    table = Table("id", "generation", "val_bpb", "decode ms/token", "params", title="Pareto front")
    for c in sorted(front.items, key=lambda c: (c.val_bpb is None, c.val_bpb)):
        table.add_row(str(c.id), str(c.generation), _fmt(c.val_bpb), _fmt(c.decode_ms, 3), _fmt(c.n_params))
    console.print(table)
    if detail.config.get("fidelity"):
        _print_rungs(client.rungs(detail.id))


def _print_rungs(rungs) -> None:
    """A multi-fidelity search's rungs: runs, promotions, front size, hypervolume, steps trained."""
    title = f"Rungs (each promotes its best 1/{rungs.eta}; {rungs.training_steps} steps trained in all)"
    table = Table(
        "rung", "steps", "completed", "running", "failed", "promoted", "front", "hypervolume", title=title
    )
    for r in rungs.rungs:
        done = r.counts.get("completed", 0) + r.counts.get("reused", 0)
        table.add_row(
            str(r.rung),
            str(r.steps),
            str(done),
            str(r.counts.get("running", 0)),
            str(r.counts.get("failed", 0)),
            str(r.promoted),
            str(len(r.front)),
            _fmt(r.hypervolume),
        )
    console.print(table)


@search_app.command("show")
def search_show(search: str = SEARCH, db: str = DB, url: str = URL, as_json: bool = JSON) -> None:
    """A search: its status, counts, hypervolume and Pareto front."""
    with searches_api(url, db) as client:
        detail = client.search(search)
        if as_json:
            data = detail.model_dump(mode="json")
            data["front"] = client.pareto(detail.id).model_dump(mode="json")["items"]
            if detail.config.get("fidelity"):
                data["rungs"] = client.rungs(detail.id).model_dump(mode="json")["rungs"]
            _dump(data)
        else:
            _print_detail(client, detail)


@search_app.command("candidates")
def search_candidates(
    search: str = SEARCH,
    status: str = typer.Option(None, help="only candidates with this status"),
    db: str = DB,
    url: str = URL,
    as_json: bool = JSON,
) -> None:
    """Every candidate of a search, by id."""
    with searches_api(url, db) as client:
        items = client.candidates(search, status=status)
    if as_json:
        _dump(items)
        return
    table = Table("id", "parent", "generation", "status", "val_bpb", "decode ms/token", "params", "front")
    for c in items:
        table.add_row(
            str(c.id),
            _fmt(c.parent_id),
            str(c.generation),
            c.status,
            _fmt(c.val_bpb),
            _fmt(c.decode_ms, 3),
            _fmt(c.n_params),
            "*" if c.on_front else "",
        )
    console.print(table)


@search_app.command("export")
def search_export(
    search: str = SEARCH,
    out: Path = typer.Option(None, "--out", "-o", help="file to write (default: stdout)"),
    fmt: str = typer.Option("csv", "--format", help="csv or jsonl"),
    db: str = DB,
    url: str = URL,
) -> None:
    """Every candidate of a search as CSV or JSON Lines (the API's candidates.csv / candidates.jsonl)."""
    if fmt not in ("csv", "jsonl"):
        raise typer.BadParameter(f"{fmt!r} is not csv or jsonl", param_hint="--format")
    with searches_api(url, db) as client:
        search_id = client.search_id(search)
        text = client.request("GET", f"/api/searches/{search_id}/candidates.{fmt}").text
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        err.print(f"search {search_id}: {max(text.count(chr(10)) - (fmt == 'csv'), 0)} candidates -> {out}")


# ------------------------------------------------------------------------------------------------ changes


@search_app.command("cancel")
def search_cancel(search: str = SEARCH, db: str = DB, url: str = URL, as_json: bool = JSON) -> None:
    """Cancel a queued or running search (its evaluations in flight stop; `search resume` continues)."""
    with searches_api(url, db) as client:
        detail = client.cancel(search)
    _dump(detail) if as_json else err.print(f"search {detail.id}: {detail.status}")


@search_app.command("delete")
def search_delete(
    search: str = SEARCH,
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
    db: str = DB,
    url: str = URL,
) -> None:
    """Delete a search that is not running, with its candidates (shared results stay for other searches)."""
    with searches_api(url, db) as client:
        detail = client.search(search)
        if not yes and not typer.confirm(f"delete search {detail.id} ({detail.name or 'unnamed'})?"):
            raise typer.Exit(1)
        client.delete(detail.id)
    err.print(f"search {detail.id} deleted")

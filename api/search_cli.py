"""`hybridnas search run CONFIG.yaml` / `hybridnas search resume ID`: a search from the command line, no
server.

Ctrl-C stops cleanly: running evaluations are cancelled, their candidates go back to pending, and
`search resume ID` continues.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

search_app = typer.Typer(
    help="Run and resume searches from the command line (no server needed).", no_args_is_help=True
)
console = Console(width=max(140, Console().width))
err = Console(stderr=True)


def _storage(db: str | None, *, create: bool = True, migrate: bool = True):
    """The database (SQLite under the data dir unless --db says otherwise). `create`: made (and migrated) if
    missing, for commands that start searches; otherwise a missing database is an error naming where it was
    looked for, and nothing is created (read commands never leave files behind)."""
    from api.settings import get_settings
    from search.storage import Storage, sqlite_path

    url = db or get_settings().resolved_database_url()
    path = sqlite_path(url)
    if not create and path is not None and not path.is_file():
        err.print(f"[red]no database at {path}[/red] (a search run there would make one; or pass --db URL)")
        raise typer.Exit(1)
    storage = Storage(url)
    if create or (migrate and not storage.schema_is_current()):
        storage.create_schema()
    elif storage.schema_revision() is None:
        err.print(f"[red]{storage!r} holds no hybridnas database[/red]")
        raise typer.Exit(1)
    return storage


def load_search_config(path: Path):
    import yaml
    from pydantic import ValidationError

    from search.config import SearchConfig

    try:
        text = path.read_text()
    except OSError as exc:
        raise typer.BadParameter(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"{path}: not valid YAML/JSON ({exc})") from None
    from api.errors import validation_errors
    from api.schemas import SearchCreate
    from api.settings import get_settings
    from api.submit import SubmitError, check_data_paths

    try:  # the service's checks: the same models, limits and data-roots rule as POST /api/searches
        body = check_data_paths(SearchCreate.model_validate(data or {}), get_settings().data_roots)
        return SearchConfig.model_validate(body.search_config())
    except ValidationError as exc:
        errors = validation_errors(list(exc.errors()))
    except SubmitError as exc:
        errors = [{"field": exc.field, "msg": exc.reason}]
    lines = [f"  {e['field'] or 'config'}: {e['msg']}" for e in errors]
    err.print(f"[red]invalid search config[/red] {path}:\n" + "\n".join(lines))
    raise typer.Exit(2)


CLI_LEASE_S = 30.0


def take_job(storage, job_id: int) -> str:
    """Take the job under a lease for this command (as a service runner would), so a coordinator on the same
    database never runs it at the same time; the owner's name. A job held by a live owner elsewhere is
    refused (exit 1)."""
    from search.leases import LeaseHeld, owner_id, take_job

    owner = owner_id("cli@")
    try:
        take_job(storage, job_id, owner, CLI_LEASE_S)
    except LeaseHeld as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    return owner


def run_engine(storage, job_id: int, data_dir: Path) -> None:
    from api.settings import get_settings
    from search.engine import SearchEngine, StopEvent
    from search.executors import executor_factory
    from search.leases import held_lease
    from search.storage import DatabaseUnavailable

    owner = take_job(storage, job_id)
    stop = StopEvent()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    received: list[int] = []

    def on_signal(signum, frame):  # Ctrl-C or SIGTERM: stop cleanly; the state stays resumable
        err.print(
            "[yellow]stopping: cancelling running evaluations (resume with `hybridnas search resume "
            f"{job_id}`)[/yellow]"
        )
        received.append(signum)
        stop.set()

    for sig in previous:
        signal.signal(sig, on_signal)
    job = storage.get_job(job_id)
    try:
        with (
            held_lease(storage, job_id, owner, CLI_LEASE_S, stop),
            Progress(
                TextColumn("search {task.fields[job]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("failed {task.fields[failed]} reused {task.fields[reused]} HV {task.fields[hv]}"),
                TimeElapsedColumn(),
                console=err,
            ) as bar,
        ):
            task = bar.add_task("search", total=job.budget, job=job_id, failed=0, reused=0, hv="-")

            def on_progress(p):
                bar.update(
                    task,
                    completed=p.n_evaluations,
                    failed=p.n_failed,
                    reused=p.n_reused,
                    hv=f"{p.hypervolume:.4f}" if p.hypervolume is not None else "-",
                )

            engine = SearchEngine(
                storage,
                job_id,
                executor_factory(data_dir, get_settings().resolved_data_roots()),
                stop=stop,
                on_progress=on_progress,
                lease_owner=owner,
            )
            engine.run()
    except DatabaseUnavailable as exc:
        err.print(f"[red]{exc}[/red]: the search stopped; `hybridnas search resume {job_id}` continues it")
        raise typer.Exit(1) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print_front(storage, job_id)
    if received:  # interrupted: the shell's convention, 128 + the signal (130 for Ctrl-C)
        raise typer.Exit(128 + received[0])


def print_front(storage, job_id: int) -> None:
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
    from search.layout import Layout

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


@search_app.command("run")
def search_run(
    config_path: Path = typer.Argument(..., help="search config (YAML or JSON)"),
    db: str = typer.Option(None, help="database URL (default: SQLite under the data dir)"),
) -> None:
    """Start a search and run it to the end (Ctrl-C stops; `search resume ID` continues)."""
    from api.settings import get_settings

    config = load_search_config(config_path)
    get_settings().ensure_data_dir()
    storage = _storage(db)
    job_id = storage.create_job(
        "search", json.loads(config.model_dump_json()), name=config.name, budget=config.budget
    )
    err.print(f"search {job_id} created in {storage!r}")
    run_engine(storage, job_id, get_settings().resolved_data_dir())


@search_app.command("resume")
def search_resume(job_id: int = typer.Argument(...), db: str = typer.Option(None)) -> None:
    """Continue a stopped search from the database."""
    from api.settings import get_settings

    storage = _storage(db, create=False)
    job = storage.get_job(job_id)
    if job is None or job.kind != "search":
        err.print(f"[red]no search with id {job_id}[/red]")
        raise typer.Exit(1)
    if job.status == "completed":
        print_front(storage, job_id)
        return
    run_engine(storage, job_id, get_settings().resolved_data_dir())


@search_app.command("show")
def search_show(job_id: int = typer.Argument(...), db: str = typer.Option(None)) -> None:
    """Print a search's Pareto front."""
    storage = _storage(db, create=False, migrate=False)
    if storage.get_job(job_id) is None:
        err.print(f"[red]no search with id {job_id}[/red]")
        raise typer.Exit(1)
    print_front(storage, job_id)

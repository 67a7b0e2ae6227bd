"""The `hybridnas` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from api.cli_latency import latency_app
from api.cli_model import register_model_commands
from api.cli_proxy import proxy_app
from api.cli_tune import register as register_tune_commands
from api.search_cli import search_app
from api.study_cli import study_app
from search.layout import LayoutError, load_layout
from search.params import count_parameters, format_count
from search.presets import get_preset, preset_names, resolve_layout

app = typer.Typer(
    help="hybridnas: search for latency-optimal hybrid small language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
layouts_app = typer.Typer(help="Inspect and check layouts.", no_args_is_help=True)
app.add_typer(layouts_app, name="layouts")

app.add_typer(latency_app, name="latency", help="Latency look-up tables and predictions.")
app.add_typer(search_app, name="search")
app.add_typer(study_app, name="study")
app.add_typer(proxy_app, name="proxy")
register_model_commands(app)
register_tune_commands(app)
console = Console(width=max(140, Console().width))
err_console = Console(stderr=True, soft_wrap=True)


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        sys.stdout.write(f"hybridnas {version('hybridnas')}\n")
        raise typer.Exit()


@app.callback()
def global_options(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="more log output (-v: debug)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="warnings and errors only"),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Logging for every command: HYBRIDNAS_LOG_LEVEL / HYBRIDNAS_LOG_FORMAT, with -v / -q over the level."""
    from pydantic import ValidationError

    from api.settings import get_settings
    from search.logs import configure_logging

    try:
        settings = get_settings()
    except ValidationError as exc:  # a bad HYBRIDNAS_* value: name it, before any command runs
        from api.errors import validation_errors

        for error in validation_errors(list(exc.errors())):
            err_console.print(
                f"[red]invalid setting[/red] HYBRIDNAS_{error['field'].upper()}: {error['msg']}"
            )
        raise typer.Exit(2) from None
    level = "debug" if verbose else "warning" if quiet else settings.log_level
    configure_logging(level, settings.log_format)


def _counts_json(count) -> dict:
    return {"total": count.total, "non_embedding": count.non_embedding, "embedding": count.embedding}


@layouts_app.command("list")
def layouts_list(as_json: bool = typer.Option(False, "--json", help="print JSON instead")) -> None:
    """List the presets with their parameter counts."""
    rows = []
    for name in preset_names():
        layout = get_preset(name)
        vocab = layout.vocab_size or 256
        count = count_parameters(layout, vocab)
        rows.append((name, layout, vocab, count))
    if as_json:
        data = [
            {
                "name": name,
                "n_operators": len(layout.operators),
                "d_model": layout.d_model,
                "vocab_size": vocab,
                "parameters": _counts_json(count),
            }
            for name, layout, vocab, count in rows
        ]
        sys.stdout.write(json.dumps(data) + "\n")
        return
    table = Table("preset", "operators", "d_model", "params (total)")
    for name, layout, _, count in rows:
        table.add_row(name, str(len(layout.operators)), str(layout.d_model), format_count(count.total))
    console.print(table)
    console.print("(presets without a published vocabulary are counted with the 256-symbol byte tokenizer)")


@layouts_app.command("show")
def layouts_show(
    layout: str = typer.Argument(..., help="a preset name or a layout file"),
    as_json: bool = typer.Option(
        False, "--json", help="print JSON: the canonical layout, its hash and parameter counts"
    ),
    layout_only: bool = typer.Option(
        False, "--layout-only", help="print the canonical layout JSON alone (a file `layouts validate` reads)"
    ),
    vocab_size: int = typer.Option(
        None, "--vocab-size", help="vocabulary for counting (default: the layout's own, else 256 = bytes)"
    ),
) -> None:
    """Print a layout with its parameter counts."""
    try:
        lo = resolve_layout(layout)
        vocab = vocab_size or lo.vocab_size or 256
        count = count_parameters(lo, vocab)
    except LayoutError as exc:
        err_console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(1) from None
    if layout_only:
        sys.stdout.write(lo.to_json() + "\n")
        return
    if as_json:
        data = {
            "name": lo.name or layout,
            "hash": lo.content_hash,
            "compact": lo.compact(),
            "layout": json.loads(lo.to_json()),
            "vocab_size": vocab,
            "parameters": _counts_json(count),
        }
        sys.stdout.write(json.dumps(data) + "\n")
        return
    console.print(f"[bold]{lo.name or layout}[/bold]  hash {lo.content_hash[:16]}")
    console.print(f"operators ({len(lo.operators)}): {lo.compact()}")
    mix = Counter(lo.operators)
    console.print("mix: " + ", ".join(f"{n} x{c}" for n, c in mix.most_common()))
    table = Table("dim", "value")
    for key, value in lo.architecture().items():
        if key != "operators":
            table.add_row(key, str(value))
    console.print(table)
    counts = Table("parameters", "count", "exact")
    counts.add_row("total", format_count(count.total), f"{count.total:,}")
    counts.add_row("non-embedding", format_count(count.non_embedding), f"{count.non_embedding:,}")
    counts.add_row(
        f"embedding (vocab {vocab}, {'tied' if lo.tied_embeddings else 'untied'})",
        format_count(count.embedding),
        f"{count.embedding:,}",
    )
    console.print(counts)


@layouts_app.command("validate")
def layouts_validate(path: Path = typer.Argument(..., help="a layout file (JSON or YAML)")) -> None:
    """Check a layout file: exit 0 if valid, 1 with the error otherwise."""
    try:
        lo = load_layout(path)
    except LayoutError as exc:
        err_console.print(f"[red]invalid[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"valid: {len(lo.operators)} operators, hash {lo.content_hash}")


@app.command()
def demo(
    steps: int = typer.Option(30, help="training steps per scaled-down preset (with --presets)"),
    decode_tokens: int = typer.Option(64, help="tokens decoded for the latency figure (with --presets)"),
    presets: bool = typer.Option(False, help="also short-train and profile the scaled-down presets here"),
    service: bool = typer.Option(True, help="run the search through the service (--no-service: in-process)"),
    port: int = typer.Option(8000, help="the coordinator's port on 127.0.0.1"),
    exit_when_done: bool = typer.Option(
        False, "--exit-when-done", help="stop the server when the search ends"
    ),
    budget: int = typer.Option(None, min=1, help="the demo search's evaluations (default: its config's)"),
) -> None:
    """Count the presets, start the coordinator, submit a real search over REST and follow it."""
    from api.demo import run_demo

    run_demo(
        console,
        steps=steps,
        decode_tokens=decode_tokens,
        presets=presets,
        service=service,
        port=port,
        exit_when_done=exit_when_done,
        budget=budget,
    )


db_app = typer.Typer(help="The database: upgrade its schema, show its revision.", no_args_is_help=True)
app.add_typer(db_app, name="db")
DB_OPTION = typer.Option(
    None,
    "--db",
    help="database URL (default: the service's: HYBRIDNAS_DATABASE_URL, else SQLite under the data dir)",
)


def _database(db: str | None, create: bool):
    """The database `--db` or the settings name; `create`: the data dir is made for the default SQLite file,
    else a missing SQLite file is an error (nothing is created)."""
    from api.settings import get_settings
    from search.storage import Storage, sqlite_path

    settings = get_settings()
    url = db or settings.resolved_database_url()
    path = sqlite_path(url)
    if create and db is None and settings.database_url is None:
        settings.ensure_data_dir()
    elif not create and path is not None and not path.is_file():
        err_console.print(f"[red]no database at {path}[/red] (`hybridnas db upgrade` makes one)")
        raise typer.Exit(1)
    return Storage(url)


@db_app.command("upgrade")
def db_upgrade(
    revision: str = typer.Argument("head", help="the revision to upgrade to"),
    db: str = DB_OPTION,
) -> None:
    """Migrate the database to the newest schema (what `serve` does at start; same as `alembic upgrade
    head`)."""
    with _database(db, create=True) as storage:
        before = storage.schema_revision()
        storage.upgrade_schema(revision)
        after = storage.schema_revision()
        err_console.print(f"{storage!r}: {before or 'empty'} -> {after}")


@db_app.command("current")
def db_current(
    db: str = DB_OPTION, as_json: bool = typer.Option(False, "--json", help="print JSON instead")
) -> None:
    """The database's schema revision and the newest one this version knows."""
    with _database(db, create=False) as storage:
        state = {
            "database": repr(storage),
            "revision": storage.schema_revision(),
            "head": storage.head_revision(),
        }
    state["current"] = state["revision"] == state["head"]
    if as_json:
        sys.stdout.write(json.dumps(state) + "\n")
    else:
        console.print(
            f"{state['database']}: revision {state['revision'] or 'none (empty)'}, newest {state['head']}"
            + ("" if state["current"] else "  (run `hybridnas db upgrade`)")
        )


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    data_dir: Path = typer.Option(None, help="data dir (default: HYBRIDNAS_DATA_DIR or ./.hybridnas)"),
    runners: int = typer.Option(None, help="jobs this process runs at once (0: API only; default: settings)"),
    scheduler: bool = typer.Option(None, "--scheduler/--no-scheduler", help="fire scheduled searches here"),
    log_level: str = typer.Option(
        None, help="debug, info, warning, error (default: -v/-q, HYBRIDNAS_LOG_LEVEL)"
    ),
) -> None:
    """Start the coordinator: REST API (OpenAPI at /docs), dashboard (/), job runner and scheduler."""
    from api.serve import serve as run_server

    run_server(host, port, data_dir, runners, scheduler, log_level)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()

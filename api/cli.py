"""The `hybridnas` command line (typer + rich)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from api.cli_latency import latency_app
from api.cli_proxy import proxy_app
from api.search_cli import search_app
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
app.add_typer(proxy_app, name="proxy")
console = Console(width=max(140, Console().width))
err_console = Console(stderr=True)


@layouts_app.command("list")
def layouts_list() -> None:
    """List the presets."""
    table = Table("preset", "operators", "d_model", "params (total)")
    for name in preset_names():
        layout = get_preset(name)
        count = count_parameters(layout, layout.vocab_size or 256)
        table.add_row(name, str(len(layout.operators)), str(layout.d_model), format_count(count.total))
    console.print(table)
    console.print("(presets without a published vocabulary are counted with the 256-symbol byte tokenizer)")


@layouts_app.command("show")
def layouts_show(
    layout: str = typer.Argument(..., help="a preset name or a layout file"),
    as_json: bool = typer.Option(False, "--json", help="print the canonical JSON instead"),
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
    if as_json:
        sys.stdout.write(lo.to_json() + "\n")
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
    )


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    data_dir: Path = typer.Option(None, help="data dir (default: HYBRIDNAS_DATA_DIR or ./.hybridnas)"),
    runners: int = typer.Option(None, help="jobs this process runs at once (0: API only; default: settings)"),
    scheduler: bool = typer.Option(None, "--scheduler/--no-scheduler", help="fire scheduled searches here"),
    log_level: str = typer.Option("info", help="debug, info, warning, error"),
) -> None:
    """Start the coordinator: REST API (OpenAPI at /docs), dashboard (/), job runner and scheduler."""
    from api.serve import serve as run_server

    run_server(host, port, data_dir, runners, scheduler, log_level)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()

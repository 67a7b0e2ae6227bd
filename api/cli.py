"""The `hybridnas` command line (typer + rich)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from api.cli_latency import latency_app
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


proxy_app = typer.Typer(
    help="The short-training proxy: train one layout, or measure the proxy's fidelity.", no_args_is_help=True
)
app.add_typer(proxy_app, name="proxy")


def _load_config_file(path: Path | None) -> dict:
    if path is None:
        return {}
    import json

    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise typer.BadParameter(f"{path}: cannot be read ({exc.strerror})", param_hint="--config") from None
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except Exception as exc:
        raise typer.BadParameter(f"{path}: not valid JSON/YAML ({exc})", param_hint="--config") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: must hold a mapping", param_hint="--config")
    return data


@proxy_app.command("train")
def proxy_train(
    layout: str = typer.Argument(..., help="a layout file (JSON/YAML) or a preset name"),
    config: Path = typer.Option(
        None, "--config", help="JSON/YAML with optional sections: proxy, latency, data"
    ),
    steps: int = typer.Option(None, help="override proxy.steps"),
    no_latency: bool = typer.Option(False, "--no-latency", help="skip the latency measurement"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
) -> None:
    """Evaluate one layout (short training + latency) and print the result as JSON."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from api.demo import data_dir
    from proxies.worker import evaluate

    try:
        lo = resolve_layout(layout)
    except LayoutError as exc:
        err_console.print(f"[red]invalid layout[/red] {exc}")
        raise typer.Exit(1) from None
    settings = _load_config_file(config)
    unknown = sorted(set(settings) - {"proxy", "latency", "data"})
    if unknown:
        raise typer.BadParameter(
            f"unknown section {unknown[0]!r} (known: proxy, latency, data)", param_hint="--config"
        )
    proxy = dict(settings.get("proxy") or {})
    if steps is not None:
        proxy["steps"] = steps
    with Progress(
        TextColumn("training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=None, loss="-")

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.3f}")

        try:
            result = evaluate(
                lo,
                proxy,
                settings.get("latency"),
                data_config=settings.get("data"),
                data_dir=data_dir(),
                device=None if device == "auto" else device,
                measure_latency=not no_latency,
                progress=progress,
            )
        except (TypeError, ValueError) as exc:
            err_console.print(f"[red]bad configuration[/red] {exc}")
            raise typer.Exit(2) from None
    sys.stdout.write(result.to_json() + "\n")
    if result.status != "completed":
        err_console.print(f"[red]failed[/red] {result.failure_reason}")
        raise typer.Exit(1)


@proxy_app.command("fidelity")
def proxy_fidelity(
    out: Path = typer.Option(Path("benchmarks/results/fidelity"), help="folder for runs.csv and the report"),
    n_layouts: int = typer.Option(24, "--n", help="layouts (presets + random)"),
    short_steps: int = typer.Option(100, help="steps of the short budget"),
    long_factor: int = typer.Option(10, help="the long budget is this many times the short one"),
    workers: int = typer.Option(2, help="training processes (one thread each)"),
    lr: float = typer.Option(3e-3, help="peak learning rate"),
    warmup_fraction: float = typer.Option(0.1, help="warmup share of each schedule"),
    seq_len: int = typer.Option(128),
    eval_tokens: int = typer.Option(65536),
    report_only: bool = typer.Option(False, help="recompute the report from the existing table"),
) -> None:
    """Rank correlation of short- vs long-training val_bpb (resumes from OUT/runs.csv)."""
    from api.demo import data_dir
    from proxies.fidelity import (
        FidelityConfig,
        fidelity_report,
        read_rows,
        run_fidelity,
        write_report,
    )

    config = FidelityConfig(
        n_layouts=n_layouts,
        short_steps=short_steps,
        long_factor=long_factor,
        workers=workers,
        lr=lr,
        warmup_fraction=warmup_fraction,
        seq_len=seq_len,
        eval_tokens=eval_tokens,
    )
    command = "hybridnas proxy fidelity " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])
    command = command.strip()
    if report_only:
        report = fidelity_report(read_rows(out / "runs.csv"), config)
        write_report(report, out, command)
    else:
        report = run_fidelity(
            config,
            out,
            data_dir(),
            command,
            on_row=lambda r: console.print(
                f"{r['run']:>10} {r['operators']:<32} bpb={r['val_bpb']} {r['status']} {r['wall_s']}s"
            ),
        )
    console.print((out / "report.md").read_text())

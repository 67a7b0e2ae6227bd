"""`hybridnas proxy train` / `hybridnas proxy fidelity`: the short-training proxy from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from search.layout import LayoutError
from search.presets import resolve_layout

console = Console(width=max(140, Console().width))
err_console = Console(stderr=True)

proxy_app = typer.Typer(
    help="The short-training proxy: train one layout, or measure the proxy's fidelity.", no_args_is_help=True
)


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

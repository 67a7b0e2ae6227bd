"""`hybridnas proxy train` / `hybridnas proxy fidelity`: the short-training proxy from the command line.

Exit codes: 0 done; 1 the evaluation failed (`proxy train`: the reason on stderr); 2 a usage or validation
error, naming the option or config field at fault; 130 interrupted (Ctrl-C; `proxy fidelity` keeps every
finished row and a rerun of the same command resumes).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from search.layout import LayoutError
from search.presets import resolve_layout

console = Console(width=max(140, Console().width))
err_console = Console(stderr=True, soft_wrap=True)  # messages stay one line each (greppable)

proxy_app = typer.Typer(
    help="The short-training proxy: train one layout, or measure the proxy's fidelity.", no_args_is_help=True
)

INTERRUPTED = 130
SECTIONS = ("proxy", "latency", "data")


def _usage_error(title: str, errors: Iterable[tuple[str, str]]) -> None:
    """Print `field: message` lines under `title` on stderr and exit 2."""
    lines = "\n".join(f"  {field}: {message}" for field, message in errors)
    err_console.print(f"[red]{title}[/red]\n{lines}", highlight=False)
    raise typer.Exit(2)


def _pydantic_errors(exc: Exception, prefix: str = "", names: dict[str, str] | None = None) -> list:
    """(field, message) pairs of a pydantic ValidationError, the field under `prefix` (`proxy.lr`) or
    renamed by `names` (a setting -> the option that sets it)."""
    from api.errors import validation_errors

    pairs = []
    for error in validation_errors(list(exc.errors())):
        field = error["field"] or "config"
        if names is not None:
            field = names.get(field.split(".")[0], field)
        pairs.append((f"{prefix}{field}", error["msg"]))
    return pairs


def data_path_errors(data: Any, data_roots: Sequence[str | Path], names: dict[str, str]) -> list:
    """(option, reason) for each corpus/tokenizer path of a DataConfig outside the data roots or missing:
    the rule of the service (`api.submit.check_data_paths`), for settings that come from the command line."""
    from proxies.corpus import CorpusError, resolve_data_path

    paths = [("corpus", data.corpus[3:] if data.corpus.startswith("hf:") else data.corpus)]
    if data.tokenizer.startswith("file:"):
        paths.append(("tokenizer", data.tokenizer[5:]))
    errors = []
    for field, raw in paths:
        if field == "corpus" and raw == "stdlib":
            continue
        try:
            resolve_data_path(raw, data_roots)
        except CorpusError as exc:
            errors.append((names[field], str(exc)))
    return errors


def _load_config_file(path: Path | None) -> dict:
    if path is None:
        return {}
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise typer.BadParameter(f"{path}: cannot be read ({exc.strerror})", param_hint="--config") from None
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except Exception as exc:
        raise typer.BadParameter(f"{path}: not valid JSON/YAML ({exc})", param_hint="--config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: must hold a mapping", param_hint="--config")
    return data


def _train_settings(config: Path | None, steps, corpus, tokenizer):
    """The validated (ProxyConfig, LatencyConfig, DataConfig) of `proxy train`, or exit 2 naming the field."""
    from pydantic import ValidationError

    from search.evaluation import DataConfig, LatencyConfig, ProxyConfig

    settings = _load_config_file(config)
    unknown = sorted(set(settings) - set(SECTIONS))
    if unknown:
        _usage_error(
            "bad configuration",
            [(name, f"unknown section (known: {', '.join(SECTIONS)})") for name in unknown],
        )
    sections = {}
    for name in SECTIONS:
        value = settings.get(name)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            _usage_error("bad configuration", [(name, "must be a mapping of settings")])
        sections[name] = dict(value)
    if steps is not None:
        sections["proxy"]["steps"] = steps
    if corpus is not None:
        sections["data"]["corpus"] = corpus
    if tokenizer is not None:
        sections["data"]["tokenizer"] = tokenizer
    errors, models = [], {}
    for name, model in (("proxy", ProxyConfig), ("latency", LatencyConfig), ("data", DataConfig)):
        try:
            models[name] = model.from_dict(sections[name])
        except ValidationError as exc:
            errors += _pydantic_errors(exc, f"{name}.")
    if errors:
        _usage_error("bad configuration", errors)
    return models["proxy"], models["latency"], models["data"]


def _check_device(device: str) -> str | None:
    import re

    if device == "auto":
        return None
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise typer.BadParameter(f"{device!r}: expected cpu, cuda, cuda:N or auto", param_hint="--device")
    return device


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _result_table(result, layout_name: str) -> Table:
    training = result.training or {}
    latency = result.latency or {}
    table = Table(title=f"proxy evaluation: {layout_name} ({result.layout_hash[:12]})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    status = "[green]completed[/green]" if result.status == "completed" else f"[red]{result.status}[/red]"
    prefill = (latency.get("prefill_ms") or {}).get("median")
    throughput = (latency.get("throughput_tokens_per_s") or {}).get("median")
    rows = [
        ("status", status),
        ("val_bpb", _fmt(result.val_bpb)),
        ("val_loss", _fmt(training.get("val_loss"))),
        ("final train loss", _fmt(training.get("final_train_loss"))),
        ("steps", _fmt(training.get("steps_done"))),
        ("params", f"{result.trained_params:,}" if result.trained_params is not None else "-"),
        ("decode ms/token", _fmt(result.decode_ms)),
        ("prefill ms", _fmt(prefill)),
        ("throughput tokens/s", _fmt(throughput, 1)),
        ("training wall s", _fmt(training.get("wall_s"), 2)),
        ("total wall s", _fmt((result.timings or {}).get("total_s"), 2)),
    ]
    if result.failure_reason:
        rows.append(("failure", result.failure_reason))
    for name, value in rows:
        table.add_row(name, value)
    return table


@proxy_app.command("train")
def proxy_train(
    layout: str = typer.Argument(..., help="a layout file (JSON/YAML) or a preset name"),
    config: Path = typer.Option(
        None, "--config", help="JSON/YAML with optional sections: proxy, latency, data"
    ),
    steps: int = typer.Option(None, min=1, help="override proxy.steps"),
    corpus: str = typer.Option(None, help="override data.corpus (a path inside the data roots, or stdlib)"),
    tokenizer: str = typer.Option(None, help="override data.tokenizer (bytes, bpe:VOCAB, file:PATH)"),
    no_latency: bool = typer.Option(False, "--no-latency", help="skip the latency measurement"),
    device: str = typer.Option("auto", help="cpu, cuda[:N] or auto"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON (EvaluationResult)"),
) -> None:
    """Evaluate one layout (short training + latency): a table of the result, or JSON with --json.

    Exit codes: 0 completed, 1 the evaluation failed, 2 bad layout/config, 130 interrupted."""
    from api.demo import data_dir
    from api.progress import progress_bar
    from api.settings import get_settings
    from proxies.worker import evaluate

    torch_device = _check_device(device)
    try:
        lo = resolve_layout(layout)
    except LayoutError as exc:
        _usage_error("invalid layout", [("layout", str(exc))])
    proxy, latency, data = _train_settings(config, steps, corpus, tokenizer)
    roots = get_settings().resolved_data_roots()
    bad_paths = data_path_errors(data, roots, {"corpus": "data.corpus", "tokenizer": "data.tokenizer"})
    if bad_paths:
        _usage_error("bad configuration", bad_paths)
    try:
        with progress_bar("training", total=proxy.total_steps, fields={"loss": "-"}) as update:

            def progress(step: int, total: int, loss: float) -> None:
                update(completed=step, total=total, loss=f"{loss:.3f}")

            result = evaluate(
                lo,
                proxy,
                latency,
                data_config=data,
                data_dir=data_dir(),
                data_roots=roots,
                device=torch_device,
                measure_latency=not no_latency,
                progress=progress,
            )
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(INTERRUPTED) from None
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        console.print(_result_table(result, lo.name or layout))
    if result.status != "completed":
        err_console.print(f"[red]failed[/red] {result.failure_reason}", highlight=False)
        raise typer.Exit(1)


# A fidelity setting -> the option that sets it (validation errors name the option).
_FIDELITY_OPTIONS = {
    "n_layouts": "--n",
    "short_steps": "--short-steps",
    "long_factor": "--long-factor",
    "workers": "--workers",
    "steps": "--short-steps",
    "lr": "--lr",
    "warmup_fraction": "--warmup-fraction",
    "seq_len": "--seq-len",
    "eval_tokens": "--eval-tokens",
    "corpus": "--corpus",
    "tokenizer": "--tokenizer",
}


def _fidelity_data(config, data_dir: Path, roots):
    """Validate the fidelity config and load its corpus (cached), or exit 2 naming the option."""
    from pydantic import ValidationError

    from proxies.corpus import CorpusError
    from proxies.fidelity import load_fidelity_data

    try:
        config.validate()
    except ValidationError as exc:
        _usage_error("bad fidelity settings", _pydantic_errors(exc, names=_FIDELITY_OPTIONS))
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        _usage_error("bad fidelity settings", [(_FIDELITY_OPTIONS.get(field, field), message)])
    bad_paths = data_path_errors(config.data_config(), roots, _FIDELITY_OPTIONS)
    if bad_paths:
        _usage_error("bad fidelity settings", bad_paths)
    try:
        return load_fidelity_data(config, data_dir, roots)
    except CorpusError as exc:
        _usage_error("bad fidelity settings", [("--corpus", str(exc))])
    except ValueError as exc:  # the tokenizer (a corpus problem is a CorpusError)
        _usage_error("bad fidelity settings", [("--tokenizer", str(exc))])


@proxy_app.command("fidelity")
def proxy_fidelity(
    out: Path = typer.Option(
        None,
        help="folder for runs.csv and the report (default: DATA_DIR/fidelity/<config key>, one per config)",
    ),
    n_layouts: int = typer.Option(24, "--n", min=1, help="layouts (presets + random)"),
    short_steps: int = typer.Option(100, min=1, help="steps of the short budget"),
    long_factor: int = typer.Option(10, min=1, help="the long budget is this many times the short one"),
    workers: int = typer.Option(2, min=0, help="training processes (one thread each); 0: this process"),
    lr: float = typer.Option(3e-3, help="peak learning rate"),
    warmup_fraction: float = typer.Option(0.1, help="warmup share of each schedule"),
    seq_len: int = typer.Option(128),
    eval_tokens: int = typer.Option(65536),
    corpus: str = typer.Option(
        "stdlib", help='the training text, as a search\'s data.corpus: "stdlib", a path inside the data roots'
    ),
    tokenizer: str = typer.Option(
        "bytes", help='as a search\'s data.tokenizer: "bytes", "bpe:VOCAB", "file:PATH"'
    ),
    report_only: bool = typer.Option(False, help="recompute the report from the existing table"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Rank correlation of short- vs long-training val_bpb. Resumes from OUT/runs.csv, reusing only rows
    trained under this same config (steps, learning rate, corpus, tokenizer, ...: its content hash).

    Exit codes: 0 done, 2 bad settings, 130 interrupted (finished rows are kept; rerun to resume)."""
    from api.demo import data_dir
    from api.settings import get_settings
    from proxies.fidelity import FidelityConfig, FidelityTableError, report_from_table, run_key, write_report

    config = FidelityConfig(
        n_layouts=n_layouts,
        short_steps=short_steps,
        long_factor=long_factor,
        workers=workers,
        lr=lr,
        warmup_fraction=warmup_fraction,
        seq_len=seq_len,
        eval_tokens=eval_tokens,
        corpus=corpus,
        tokenizer=tokenizer,
    )
    settings = get_settings()
    roots = settings.resolved_data_roots()
    folder = data_dir()
    data = _fidelity_data(config, folder, roots)
    key = run_key(config, data.fingerprint)
    out = out if out is not None else folder / "fidelity" / key[:16]
    command = ("hybridnas proxy fidelity " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])).strip()
    try:
        if report_only:
            report = report_from_table(config, out, key)
            out.mkdir(parents=True, exist_ok=True)
            write_report(report, out, command)
        else:
            err_console.print(f"runs of config {key[:16]} in {out}", highlight=False)
            report = _run_with_progress(config, out, folder, command, roots, data, quiet=as_json)
    except FidelityTableError as exc:
        _usage_error("bad fidelity settings", [("--out", str(exc))])
    except KeyboardInterrupt:
        err_console.print(
            f"[yellow]interrupted[/yellow]: finished rows are kept in {out / 'runs.csv'}; "
            "rerun the same command to resume",
            highlight=False,
        )
        raise typer.Exit(INTERRUPTED) from None
    if as_json:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
    else:
        console.print((out / "report.md").read_text(), highlight=False)


def _run_with_progress(config, out: Path, folder: Path, command: str, roots, data, *, quiet: bool) -> dict:
    """`run_fidelity` under a progress bar over the planned runs; each finished row also printed (to
    stdout) unless `quiet`."""
    from api.progress import progress_bar
    from proxies.fidelity import run_fidelity

    state = {"done": 0, "failed": 0}
    with progress_bar("fidelity runs", total=None, fields={"failed": 0, "last": "-"}) as update:

        def on_start(done: int, planned: int) -> None:
            state["done"] = done
            update(completed=done, total=planned)

        def on_row(row: dict) -> None:
            state["done"] += 1
            state["failed"] += row["status"] != "completed"
            bpb = f"{row['val_bpb']:.4f}" if isinstance(row.get("val_bpb"), float) else "-"
            update(completed=state["done"], failed=state["failed"], last=f"{row['run']} bpb {bpb}")
            if not quiet:
                console.print(
                    f"{row['run']:>10} {row['operators']:<32} bpb={bpb} {row['status']} {row['wall_s']}s",
                    highlight=False,
                )

        return run_fidelity(
            config, out, folder, command, on_row, data_roots=roots, data=data, on_start=on_start
        )

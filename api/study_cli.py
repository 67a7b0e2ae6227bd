"""`hybridnas study fidelity|depth-width|ablation|verdict CONFIG.yaml`: a study from the command line, here
(the local database, no server; Ctrl-C stops it resumably, `study resume ID` continues) or with `--url` on a
coordinator.

`study show ID` prints a study's report (`--json`: the API's StudyDetail). Exit codes as for `search`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from api.search_cli import DB, JSON, URL, _local_settings, interruptible, reported, searches_api
from hybridnas.errors import ConfigError, FieldError

study_app = typer.Typer(
    help="Studies beside the search: proxy fidelity, the depth-width law, ablations, the verdict.",
    no_args_is_help=True,
)
console = Console(width=max(140, Console().width))
err = Console(stderr=True, soft_wrap=True)


def _load_study(path: Path, kind: str, data_roots) -> dict:
    """The study config (the file's, with `kind`) checked as POST /api/studies checks it."""
    from pydantic import TypeAdapter, ValidationError

    from api.errors import validation_errors
    from api.schemas import StudyCreate
    from api.submit import SubmitError, check_study
    from hybridnas.config import read_config_file

    data = {**read_config_file(path), "kind": kind}
    try:
        body = TypeAdapter(StudyCreate).validate_python(data)
        check_study(body, data_roots)
    except ValidationError as exc:
        raise ConfigError(
            [FieldError(e["field"], e["msg"]) for e in validation_errors(list(exc.errors()))], str(path)
        ) from None
    except SubmitError as exc:
        raise ConfigError([FieldError(exc.field, exc.reason)], str(path)) from None
    return data


def _run_here(storage, study_id: int, settings) -> None:
    """Run the study in this process under a lease (as a runner would); Ctrl-C stops it resumably. Exits 1
    when it failed, 128 + the signal when interrupted."""
    from api.progress import progress_bar
    from hybridnas.local import run_job

    with (
        interruptible(f"hybridnas study resume {study_id}") as (stop, received),
        reported(),
        progress_bar(f"study {study_id}") as update,
    ):

        def on_progress(p):
            job = storage.get_job(study_id)
            update(completed=job.n_evaluations, total=job.budget)

        run_job(storage, study_id, settings, stop=stop, on_progress=on_progress)
    if received:
        raise typer.Exit(128 + received[0])
    job = storage.get_job(study_id)
    if job.status == "failed":
        err.print(f"[red]study {study_id} failed[/red]: {job.error}")
        raise typer.Exit(1)


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _interval(ci) -> str:
    return "-" if not ci else f"{_num(ci[0])} - {_num(ci[1])}"


def _print_depth_width(result: dict) -> None:
    if "law" in result:
        law = result["law"]
        intervals = result.get("intervals", {})
        table = Table("constant", "value", "95 % bootstrap interval", title="L(D, W) = L0 + a·D^-α + b·W^-β")
        for name in ("l0", "a", "alpha", "b", "beta"):
            lo, hi = intervals.get(name, (None, None))
            table.add_row(name, f"{law[name]:.4g}", "-" if lo is None else f"{lo:.4g} - {hi:.4g}")
        console.print(table)
        console.print(f"fit rmse {law['rmse']:.4f} over {law['n_points']} points")
    if "extrapolation" in result:
        ex = result["extrapolation"]
        console.print(
            f"extrapolation (fit on D <= {ex['fit_max_depth']}, W <= {ex['fit_max_width']}, "
            "predict the rest): "
            f"max error {100 * ex['max_relative_error']:.2f} %, mean {100 * ex['mean_relative_error']:.2f} %"
        )
    for budget in result.get("budgets", []):
        law_pick, measured_pick = budget["by_law"], budget["by_measured_loss"]

        def fmt(pick):
            return (
                "none meets it"
                if pick is None
                else f"D{pick['depth']:g} W{pick['width']:g} ({pick['loss']:.4f})"
            )

        console.print(
            f"budget {budget['budget_ms']} ms/token: by the law {fmt(law_pick)}; "
            f"by measured loss {fmt(measured_pick)}"
        )


def _print_fidelity(result: dict) -> None:
    table = Table("comparison", "layouts", "Spearman", "95 % interval", "Kendall", title="proxy fidelity")
    for label, key in (
        ("short against long", "short_vs_long"),
        ("seed-noise ceiling", "seed_noise_ceiling"),
        ("within ±25 % of the median size", "within_param_band"),
    ):
        stat = result.get(key) or {}
        table.add_row(
            label,
            str(stat.get("n", 0)),
            _num(stat.get("spearman")),
            _interval(stat.get("spearman_ci95")),
            _num(stat.get("kendall")),
        )
    console.print(table)
    met = result.get("target_met")
    verdict = "not judged" if met is None else "met" if met else "not met"
    console.print(f"target (Spearman >= 0.9, interval above 0.75): {verdict}")


def _print_ablation(result: dict) -> None:
    table = Table(
        "arm",
        "pairs",
        "mean Δ val_bpb",
        "95 % interval",
        "what it says",
        "step-time overhead",
        title="ablations (arm − baseline, paired by seed)",
    )
    for arm, r in result.get("arms", {}).items():
        d, o = r["val_bpb_difference"], r["step_time_overhead"]
        overhead = "-" if o.get("mean") is None else f"{100 * o['mean']:+.1f} %"
        table.add_row(arm, str(d["n"]), _num(d.get("mean")), _interval(d.get("ci95")), r["effect"], overhead)
    console.print(table)


def _print_verdict(result: dict) -> None:
    table = Table(
        "budget ms",
        "best hybrid",
        "val_bpb",
        "best Llama",
        "val_bpb",
        "gain",
        "outcome",
        title="hybrid against Llama at equal latency",
    )

    def side(point):
        if point is None:
            return "none meets it", "-"
        seeds = point.get("seeds") or {}
        value = seeds.get("mean") if seeds.get("n") else point["val_bpb"]
        law = " (law)" if point.get("source") == "law" else ""
        return (
            f"{point['name']}{law} {_num(point['decode_ms'], 3)} ms",
            f"{_num(value)} ({seeds.get('n', 0)} seeds)",
        )

    for r in result.get("budgets", []):
        gain = "-" if r["gain"] is None else f"{_num(r['gain'])} ± {_num(r['gain_se'])}"
        table.add_row(_num(r["budget_ms"], 3), *side(r["hybrid"]), *side(r["llama"]), gain, r["outcome"])
    console.print(table)
    n = {"hybrid_better": 0, "budgets_judged": 0, "llama_better": 0, "within_noise": 0, **result["summary"]}
    console.print(
        f"hybrid better at {n['hybrid_better']} of {n['budgets_judged']} budgets judged, "
        f"Llama better at {n['llama_better']}, within seed noise at {n['within_noise']}"
    )


PRINTERS = {
    "depth-width": _print_depth_width,
    "fidelity": _print_fidelity,
    "ablation": _print_ablation,
    "verdict": _print_verdict,
}


def print_report(detail: dict) -> None:
    result = detail.get("result") or {}
    console.print(f"[bold]study {detail['id']}[/bold] {detail.get('name') or ''}: {detail['status']}")
    if detail.get("error"):
        console.print(f"[red]{detail['error']}[/red]")
    if result:
        PRINTERS[detail["kind"]](result)
    for key in ("fit_error", "extrapolation_error", "error"):
        if key in result:
            console.print(f"[yellow]{key.replace('_', ' ')}[/yellow]: {result[key]}")


def _wait_remote(client, study_id: int, as_json: bool) -> None:
    detail = client.wait_study(study_id).model_dump(mode="json")  # polls, with a progress display
    sys.stdout.write(json.dumps(detail) + "\n") if as_json else print_report(detail)
    if detail["status"] != "completed":
        raise typer.Exit(1)


def _run_kind(kind: str, config_path: Path, db: str | None, url: str | None, as_json: bool) -> None:
    """Submit a study of `kind` from its config file; run it here (or follow it on `url`), then print it."""
    from hybridnas.local import local_settings
    from search.storage import Storage

    if url:
        with searches_api(url, None) as client:
            body = {**_read(config_path), "kind": kind}
            study_id = client.request("POST", "/api/studies", json=body).json()["id"]
            err.print(f"study {study_id} submitted to {client.url}")
            _wait_remote(client, study_id, as_json)
        return
    with reported():
        data = _load_study(config_path, kind, local_settings(db).data_roots)
    settings = _local_settings(db, create=True)
    with searches_api(None, db, create=True) as client:
        study_id = client.request("POST", "/api/studies", json=data).json()["id"]
    with Storage(settings.resolved_database_url()) as storage:
        err.print(f"study {study_id} created in {storage!r}")
        _run_here(storage, study_id, settings)
    _show(study_id, db, None, as_json)


KIND_HELP = {
    "depth-width": "Train and measure a depth x width grid of one layer pattern, fit the scaling law, "
    "recommend (D, W) per latency budget.",
    "fidelity": "Rank layouts by the short proxy, by the proxy with another seed and by a K times longer "
    "training: how far the proxy can be trusted, on any corpus and tokenizer.",
    "ablation": "Train layouts with and without weight normalization and meta tokens over several seeds; the "
    "paired differences in val_bpb with their intervals, and the step-time overhead.",
    "verdict": "Set a finished search's front against a depth-width study's best Llama at each latency "
    "budget, with the seed noise of both.",
}


def _kind_command(kind: str):
    def command(
        config_path: Path = typer.Argument(..., help="the study's config (YAML or JSON; `kind` is implied)"),
        db: str = DB,
        url: str = URL,
        as_json: bool = JSON,
    ) -> None:
        _run_kind(kind, config_path, db, url, as_json)

    command.__doc__ = KIND_HELP[kind]
    return command


for _kind in KIND_HELP:
    study_app.command(_kind)(_kind_command(_kind))


def _read(path: Path) -> dict:
    from hybridnas.config import read_config_file

    with reported():
        return read_config_file(path)


@study_app.command("resume")
def study_resume(study_id: int = typer.Argument(...), db: str = DB) -> None:
    """Continue a stopped study here, from the database."""
    from search.storage import Storage

    settings = _local_settings(db, create=False)
    with Storage(settings.resolved_database_url()) as storage:
        job = storage.get_job(study_id)
        if job is None or job.parent_id is not None or job.kind in ("search", "study-run"):
            err.print(f"[red]no study {study_id}[/red]")
            raise typer.Exit(1)
        if job.status != "completed":
            _run_here(storage, study_id, settings)
    _show(study_id, db, None, False)


def _show(study_id: int, db: str | None, url: str | None, as_json: bool) -> None:
    with searches_api(url, db) as client:
        detail = client.request("GET", f"/api/studies/{study_id}").json()
    sys.stdout.write(json.dumps(detail) + "\n") if as_json else print_report(detail)


@study_app.command("show")
def study_show(
    study_id: int = typer.Argument(...), db: str = DB, url: str = URL, as_json: bool = JSON
) -> None:
    """A study's status and report."""
    _show(study_id, db, url, as_json)

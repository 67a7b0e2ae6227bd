"""`hybridnas tune CANDIDATE_ID` (tune the candidate's training recipe with Ray Tune + ASHA: a `tune` job,
run here on the local database, or with `--url` on a coordinator) and `hybridnas train CANDIDATE_ID --steps N`
(train it longer from its proxy weights, here, checkpointed and resumable: rerun the same command after a
kill). Bad input exits 2 naming the field, as POST /api/tunes answers 422."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from api.search_cli import DB, JSON, URL, _local_settings, interruptible, reported, searches_api
from hybridnas.errors import ConfigError, FieldError

console = Console(width=max(140, Console().width))
err = Console(stderr=True, soft_wrap=True)


def _refused(field: str, reason: str, source: str) -> ConfigError:
    return ConfigError([FieldError(field, reason)], source)


# ---- tune -----------------------------------------------------------------------------------------------


def print_tune(detail: dict) -> None:
    """The tune job's status, its trials (best first) and the best recipe."""
    console.print(
        f"[bold]tune {detail['id']}[/bold] of candidate {detail['candidate_id']}: {detail['status']}"
    )
    if detail.get("error"):
        console.print(f"[red]{detail['error']}[/red]")
    result = detail.get("result") or {}
    table = Table("trial", "lr", "warmup", "weight_norm", "batch", "status", "stopped at", "val_bpb")
    for t in sorted(
        result.get("trials", []), key=lambda t: (t.get("val_bpb") is None, t.get("val_bpb") or 0)
    ):
        r = t["config"]
        bpb = "-" if t.get("val_bpb") is None else f"{t['val_bpb']:.4f}"
        recipe = (f"{r['lr']:.3g}", str(r["warmup_steps"]), str(r["weight_norm"]), str(r["batch_size"]))
        table.add_row(t["trial_id"], *recipe, t["status"], str(t.get("stopped_at")), bpb)
    if result.get("trials"):
        console.print(table)
    best = result.get("best")
    if best:
        console.print(f"best recipe {json.dumps(best['recipe'])}: val_bpb {best['val_bpb']:.4f}")


def _tune_body(
    candidate_id, steps, trials, grace, rf, lr_range, warmup_range, batch_sizes, seed, name
) -> dict:
    body = {"candidate_id": candidate_id, "trials": trials, "reduction_factor": rf, "seed": seed}
    optional = {
        "steps": steps,
        "grace_steps": grace,
        "lr_range": lr_range,
        "warmup_range": warmup_range,
        "batch_sizes": batch_sizes,
        "name": name,
    }
    return {**body, **{k: v for k, v in optional.items() if v is not None}}


def _pair(text: str | None, kind: type, field: str) -> list | None:
    """`LOW,HIGH` as two numbers (the API checks their bounds), or a ConfigError naming the field."""
    if text is None:
        return None
    parts = text.replace(",", " ").split()
    try:
        if len(parts) != 2:
            raise ValueError
        return [kind(p) for p in parts]
    except ValueError:
        with reported():
            raise _refused(field, f"{text!r} is not LOW,HIGH ({kind.__name__}s)", "tune") from None


def _run_tune_here(db: str | None, body: dict, as_json: bool) -> None:
    from hybridnas.local import run_job
    from search.storage import Storage

    settings = _local_settings(db, create=True)
    with searches_api(None, db, create=True) as client:
        tune_id = client.request("POST", "/api/tunes", json=body).json()["id"]
    with Storage(settings.resolved_database_url()) as storage:
        err.print(f"tune {tune_id} created in {storage!r}")
        with interruptible(f"hybridnas tune-resume {tune_id}") as (stop, received), reported():
            run_job(storage, tune_id, settings, stop=stop)
        if received:
            raise typer.Exit(128 + received[0])
    _show_tune(tune_id, db, None, as_json)


def _show_tune(tune_id: int, db: str | None, url: str | None, as_json: bool) -> None:
    with searches_api(url, db) as client:
        detail = client.request("GET", f"/api/tunes/{tune_id}").json()
    sys.stdout.write(json.dumps(detail) + "\n") if as_json else print_tune(detail)
    if detail["status"] != "completed":
        raise typer.Exit(1)


def _wait_remote(url: str, body: dict, as_json: bool) -> None:
    import time

    with searches_api(url, None) as client:
        tune_id = client.request("POST", "/api/tunes", json=body).json()["id"]
        err.print(f"tune {tune_id} submitted to {client.url}")
        while client.request("GET", f"/api/tunes/{tune_id}").json()["status"] in ("queued", "running"):
            time.sleep(2.0)
    _show_tune(tune_id, None, url, as_json)


def tune(
    candidate_id: int = typer.Argument(..., help="the candidate whose training recipe is tuned"),
    steps: int = typer.Option(None, "--steps", help="optimizer steps per trial (default: 4x the proxy's)"),
    trials: int = typer.Option(8, "--trials", help="recipes sampled"),
    grace_steps: int = typer.Option(None, "--grace-steps", help="ASHA's first rung (default: steps / 4)"),
    reduction_factor: int = typer.Option(2, "--reduction-factor", help="ASHA keeps 1/this at each rung"),
    lr_range: str = typer.Option(None, "--lr-range", help="LOW,HIGH: lr sampled log-uniformly in it"),
    warmup_range: str = typer.Option(None, "--warmup-range", help="LOW,HIGH: warmup steps sampled in it"),
    batch_sizes: list[int] = typer.Option(None, "--batch-size", help="a batch size choice (repeatable)"),
    seed: int = typer.Option(0, "--seed", help="seeds the recipe sampler and the trials' data order"),
    name: str = typer.Option(None, "--name", help="a name for people"),
    db: str = DB,
    url: str = URL,
    as_json: bool = JSON,
) -> None:
    """Tune a candidate's training recipe (lr, warmup, weight normalization, batch size) with Ray Tune's
    ASHA, each trial trained from its proxy weights; the best recipe is what `hybridnas train --recipe best`
    then runs."""
    body = _tune_body(
        candidate_id, steps, trials, grace_steps, reduction_factor,
        _pair(lr_range, float, "lr_range"),
        _pair(warmup_range, int, "warmup_range"),
        batch_sizes or None, seed, name,
    )  # fmt: skip
    if url:
        _wait_remote(url, body, as_json)
    else:
        _run_tune_here(db, body, as_json)


def tune_show(tune_id: int = typer.Argument(...), db: str = DB, url: str = URL, as_json: bool = JSON) -> None:
    """A tune job's status, trials and best recipe."""
    _show_tune(tune_id, db, url, as_json)


def tune_resume(tune_id: int = typer.Argument(...), db: str = DB, as_json: bool = JSON) -> None:
    """Run a stopped (cancelled, failed or interrupted) tune job again here; its trials start over."""
    from hybridnas.local import run_job
    from search.storage import Storage

    settings = _local_settings(db, create=False)
    with Storage(settings.resolved_database_url()) as storage:
        job = storage.get_job(tune_id)
        if job is None or job.kind != "tune":
            err.print(f"[red]no tune job {tune_id}[/red]")
            raise typer.Exit(1)
        if job.status != "completed":
            with interruptible(f"hybridnas tune-resume {tune_id}") as (stop, _received), reported():
                run_job(storage, tune_id, settings, stop=stop)
    _show_tune(tune_id, db, None, as_json)


# ---- train ----------------------------------------------------------------------------------------------


def _train_inputs(storage, settings, candidate_id: int, recipe: str | None, steps: int, every: int):
    from search.tune_config import TuneError, recipe_for, resolve_source

    if steps < 1:
        raise _refused("steps", "must be at least 1", "train")
    if every < 0:
        raise _refused("checkpoint_every", "must be 0 (none) or more", "train")
    try:
        source = resolve_source(storage, candidate_id, settings.resolved_data_dir())
        chosen, tune_id = recipe_for(storage, source, recipe)
    except TuneError as exc:
        raise _refused(exc.field, exc.reason, "train") from None
    return source, chosen, tune_id


def train(
    candidate_id: int = typer.Argument(..., help="the candidate to train longer, from its proxy weights"),
    steps: int = typer.Option(..., "--steps", help="optimizer steps to train"),
    recipe: str = typer.Option(
        None,
        "--recipe",
        help="best (the newest completed tune job's best) or a tune job's id; default: the proxy's",
    ),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="steps between checkpoints (0: none)"),
    seed: int = typer.Option(0, "--seed", help="seeds the data order"),
    db: str = DB,
    as_json: bool = JSON,
) -> None:
    """Train a candidate longer from its proxy weights into <data_dir>/trained/candidate-<ID>/final/; rerun
    the same command after a kill to continue from the last checkpoint."""
    from proxies.recipe import train_candidate
    from proxies.train import TrainingFailed
    from search.storage import Storage

    settings = _local_settings(db, create=False)
    with reported(), Storage(settings.resolved_database_url()) as storage:
        source, chosen, tune_id = _train_inputs(
            storage, settings, candidate_id, recipe, steps, checkpoint_every
        )
    err.print(f"training candidate {candidate_id} {steps} steps with {json.dumps(chosen.model_dump())}"
              + (f" (tune {tune_id})" if tune_id else " (the proxy's recipe)"))  # fmt: skip
    try:
        summary = train_candidate(
            source, chosen, steps, settings.resolved_data_dir(), settings.resolved_data_roots(),
            checkpoint_every=checkpoint_every, seed=seed,
        )  # fmt: skip
    except (TrainingFailed, ValueError) as exc:
        err.print(f"[red]training failed[/red]: {exc}")
        raise typer.Exit(1) from None
    summary["tune_id"] = tune_id
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    if summary.get("resumed_from"):
        console.print(f"resumed from the checkpoint at step {summary['resumed_from']}")
    console.print(
        f"candidate {candidate_id}: val_bpb {source.val_bpb:.4f} (proxy) -> {summary['val_bpb']:.4f} "
        f"after {steps} steps; weights in {summary['final']}"
    )


def register(app: typer.Typer) -> None:
    """The commands on the top-level app (api/cli.py)."""
    app.command("tune")(tune)
    app.command("tune-show")(tune_show)
    app.command("tune-resume")(tune_resume)
    app.command("train")(train)

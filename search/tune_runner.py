"""Running a tune job: Ray Tune over the candidate's training recipe, with the ASHA scheduler (metric val_bpb,
mode min, time attribute `step` = optimizer steps), on this process's Ray (local, or RAY_ADDRESS's cluster;
started through `search.executors.init_ray` so secrets stay out of worker environments).

Each trial (`proxies.recipe.run_trial`, reached by module path: nothing here imports torch) trains the
candidate from its proxy weights with the sampled recipe for `steps` optimizer steps, reporting val_bpb every
`grace_steps` steps: ASHA's rungs (grace x reduction_factor^k) all fall on reports. The report stored on the
job: every trial (recipe, status completed / stopped (by ASHA) / failed, its curve [(step, val_bpb)...], the
step it stopped at, the tokens it saw), the best recipe and its val_bpb (`search.tune_config.best_trial`).

Cancelling stops every trial (a Tune stopper watches the job's stop event); a rerun starts the trials over.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import threading
import time
from pathlib import Path

from search.tune_config import Source, TuneSpec, best_trial

log = logging.getLogger("hybridnas.tune")

# Jobs running in this process: the Tune stopper and callback find theirs by job id (they must not hold
# threading objects: Tune may pickle them with its experiment state).
_ACTIVE: dict[int, tuple[object, threading.Event]] = {}


def spec_of(config: dict) -> tuple[TuneSpec, Source]:
    return TuneSpec.model_validate({k: v for k, v in config.items() if k != "source"}), Source.from_dict(
        config["source"]
    )


def _trial(config: dict, source: dict, steps: int, report_every: int, seed: int, data_dir: str, data_roots):
    importlib.import_module("proxies.recipe").run_trial(
        config, source, steps, report_every, seed, data_dir, data_roots
    )


def _stopper(job_id: int):
    """A Tune stopper that ends every trial once the job's stop event is set (pickled by reference)."""
    from ray import tune

    class StopOnCancel(tune.Stopper):
        def __call__(self, trial_id, result) -> bool:
            return self.stop_all()

        def stop_all(self) -> bool:
            return _stop_set(job_id)

    return StopOnCancel()


def _stop_set(job_id: int) -> bool:
    return job_id in _ACTIVE and _ACTIVE[job_id][1].is_set()


def _trial_done(job_id: int, done: int, total: int) -> None:
    if job_id in _ACTIVE:
        _ACTIVE[job_id][0].update_progress(job_id, done, total)


def _progress(job_id: int, total: int):
    """A Tune callback counting finished trials into the job's progress."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            _trial_done(job_id, self.done, total)

        on_trial_error = on_trial_complete

    return Progress()


def rungs(spec: TuneSpec) -> list[int]:
    """ASHA's milestones below the full budget."""
    out, milestone = [], spec.grace_steps
    while milestone < spec.steps:
        out.append(milestone)
        milestone *= spec.reduction_factor
    return out


def _tune_parts(job_id: int, spec: TuneSpec):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    space = {
        "lr": tune.loguniform(*spec.lr_range),
        "warmup_steps": tune.randint(spec.warmup_range[0], spec.warmup_range[1] + 1),
        "weight_norm": tune.choice(spec.weight_norm),
        "batch_size": tune.choice(spec.batch_sizes),
    }
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=spec.steps,
        grace_period=spec.grace_steps,
        reduction_factor=spec.reduction_factor,
    )
    tune_config = tune.TuneConfig(
        metric="val_bpb",
        mode="min",
        scheduler=scheduler,
        search_alg=BasicVariantGenerator(random_state=spec.seed),
        num_samples=spec.trials,
        max_concurrent_trials=spec.concurrent_trials or None,
    )
    return space, tune_config, _stopper(job_id), [_progress(job_id, spec.trials)]


def _run_tuner(job_id: int, spec: TuneSpec, source: Source, data_dir: Path, data_roots):
    from ray import tune

    space, tune_config, stopper, callbacks = _tune_parts(job_id, spec)
    trainable = tune.with_parameters(
        _trial,
        source=source.to_dict(),
        steps=spec.steps,
        report_every=spec.report_every,
        seed=spec.seed,
        data_dir=str(data_dir),
        data_roots=tuple(data_roots),
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": spec.cpus_per_trial}),
        param_space=space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=f"tune-{job_id}-{time.time_ns()}",  # a rerun starts over, beside the earlier attempt
            storage_path=str(data_dir / "tune"),
            stop=stopper,
            callbacks=callbacks,
            verbose=0,
        ),
    )
    return tuner.fit()


def _trial_row(result, spec: TuneSpec, seq_len: int) -> dict:
    frame = result.metrics_dataframe
    curve = []
    if frame is not None and "step" in frame:
        curve = [(int(s), float(v)) for s, v in zip(frame["step"], frame["val_bpb"]) if not math.isnan(v)]
    stopped_at = curve[-1][0] if curve else 0
    if result.error is not None:
        status = "failed"
    else:
        status = "completed" if stopped_at == spec.steps else "stopped"
    config = {k: result.config[k] for k in ("lr", "warmup_steps", "weight_norm", "batch_size")}
    error = None if result.error is None else str(result.error).strip().splitlines()[-1][:300]
    return {
        "trial_id": str((result.metrics or {}).get("trial_id") or Path(result.path).name),
        "config": config,
        "status": status,
        "curve": curve,
        "stopped_at": stopped_at,
        "val_bpb": curve[-1][1] if curve else None,
        "tokens": stopped_at * config["batch_size"] * seq_len,
        "error": error,
    }


def tune_report(trial_rows: list[dict], spec: TuneSpec, source: Source) -> dict:
    best = best_trial(trial_rows, spec.steps)
    return {
        "trials": trial_rows,
        "best": None
        if best is None
        else {"trial_id": best["trial_id"], "recipe": best["config"], "val_bpb": best["val_bpb"]},
        "steps": spec.steps,
        "grace_steps": spec.grace_steps,
        "reduction_factor": spec.reduction_factor,
        "rungs": rungs(spec),
        "budget": "optimizer steps per trial, any batch size (tokens = steps x batch_size x seq_len)",
        "source_val_bpb": source.val_bpb,
        "candidate_id": source.candidate_id,
    }


def run_tune(
    storage, job_id: int, data_dir: Path, data_roots, stop: threading.Event
) -> tuple[str, str | None]:
    """Run the tune job's trials on Ray, store its report; (status, error) to end the job with."""
    from search.executors import import_ray, init_ray

    spec, source = spec_of(storage.get_job(job_id).config)
    ray = import_ray()
    started = not ray.is_initialized()
    if started:  # a CLI run: this thread starts Ray and shuts it down (a service runner's Ray is up already)
        init_ray(os.cpu_count() or 1)
    _ACTIVE[job_id] = (storage, stop)
    try:
        storage.update_progress(job_id, 0, spec.trials)
        grid = _run_tuner(job_id, spec, source, Path(data_dir).resolve(), data_roots)
        if stop.is_set():
            return ("cancelled" if getattr(stop, "cancel", False) else "queued"), None
        seq_len = source.proxy["seq_len"]
        report = tune_report([_trial_row(r, spec, seq_len) for r in grid], spec, source)
    finally:
        _ACTIVE.pop(job_id, None)
        if started:
            ray.shutdown()
    storage.set_job_result(job_id, report)
    storage.update_progress(job_id, len(report["trials"]), spec.trials)
    if report["best"] is None:
        reasons = {t["error"] for t in report["trials"] if t["error"]}
        return "failed", "no trial trained the full budget" + (
            f": {'; '.join(sorted(reasons))}" if reasons else ""
        )
    log.info(
        "tune %d: best val_bpb %.4f with %s", job_id, report["best"]["val_bpb"], report["best"]["recipe"]
    )
    return "completed", None

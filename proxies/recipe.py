"""The worker side of tuning and longer training: one tune trial (a recipe trained from the candidate's proxy
weights for the tune budget, its val_bpb reported to Ray Tune at every rung interval) and `hybridnas train`
(the same loop, checkpointed, into `<data_dir>/trained/candidate-<ID>/`). Both go through
`proxies.longtrain.train_longer`, so a tuned recipe is exactly what `train --recipe best` runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from search.evaluation import DataConfig
from search.tune_config import Recipe, Source, TuneError


def trained_folder(data_dir: str | Path, candidate_id: int) -> Path:
    return Path(data_dir).resolve() / "trained" / f"candidate-{candidate_id}"


def load_source_data(source: Source, data_dir: str | Path, data_roots):
    """The search's data, checked to be the corpus the proxy weights were trained on."""
    from proxies.dataset import load_data

    data = load_data(DataConfig.from_dict(source.data), data_dir, data_roots)
    meta_path = Path(source.artifact_path) / "meta.json"
    trained_on = json.loads(meta_path.read_text()).get("corpus") if meta_path.is_file() else None
    if trained_on is not None and trained_on.get("key") != data.fingerprint.get("key"):
        raise TuneError(
            "data", "the corpus or tokenizer changed since the candidate's proxy weights were trained"
        )
    return data


def _finished(folder: Path, source: Source, recipe: Recipe, steps: int, seed: int) -> dict | None:
    """The final folder's meta when it holds this very run already."""
    meta_path = folder / "final" / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    same = (meta.get("steps"), meta.get("recipe"), meta.get("source_artifact_key"), meta.get("seed"))
    return meta if same == (steps, recipe.model_dump(), source.training_key, seed) else None


def train_candidate(
    source: Source,
    recipe: Recipe,
    steps: int,
    data_dir: str | Path,
    data_roots=(".",),
    *,
    checkpoint_every: int = 0,
    seed: int = 0,
    device: str | None = None,
    stop_after: int | None = None,
    evaluate_every: int = 0,
) -> dict:
    """Train the candidate `steps` steps longer, resuming from its checkpoint folder when one of this plan is
    there; the final folder written when done, the checkpoints then removed. A summary: status, val_bpb,
    curves, the folders (`resumed_from` when it continued a checkpoint; `already` when the final folder held
    this run before)."""
    from proxies.longtrain import save_final, train_longer
    from proxies.train import resolve_device

    folder = trained_folder(data_dir, source.candidate_id)
    done = _finished(folder, source, recipe, steps, seed)
    if done is not None:
        return {
            "status": "completed",
            "already": True,
            "val_bpb": done["val_bpb"],
            "final": str(folder / "final"),
        }
    data = load_source_data(source, data_dir, data_roots)
    result, model = train_longer(
        source,
        recipe,
        steps,
        data,
        resolve_device(device),
        seed=seed,
        evaluate_every=evaluate_every,
        checkpoint_dir=folder / "checkpoint",
        checkpoint_every=checkpoint_every,
        stop_after=stop_after,
    )
    summary = {**result.to_dict(), "already": False, "folder": str(folder)}
    if result.status == "completed":
        final = save_final(folder, model, data.tokenizer, source, result, seed)
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)
        summary["final"] = str(final)
    return summary


def run_trial(
    config: dict, source: dict, steps: int, report_every: int, seed: int, data_dir: str, data_roots
):
    """One Ray Tune trial: the sampled recipe trained from the proxy weights, val_bpb reported every
    `report_every` steps and at the end (`step` is ASHA's time attribute). Runs in a Ray worker."""
    import torch
    from ray import tune

    from proxies.longtrain import train_longer
    from proxies.train import resolve_device

    torch.set_num_threads(
        max(1, int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)))
    )
    recipe = Recipe.model_validate(config)
    source_ = Source.from_dict(source)
    data = load_source_data(source_, data_dir, data_roots)

    def report(step: int, metrics: dict) -> None:
        tune.report({"step": step, "val_bpb": metrics["val_bpb"], "val_loss": metrics["val_loss"]})

    train_longer(
        source_,
        recipe,
        steps,
        data,
        resolve_device(None),
        seed=seed,
        evaluate_every=report_every,
        on_evaluate=report,
    )

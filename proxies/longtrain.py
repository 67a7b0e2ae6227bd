"""Training a candidate longer, from its proxy weights: the loop that tune trials and `hybridnas train` run.

The model is built as the proxy built it (the search's ProxyConfig: meta tokens, seed), then loaded with the
proxy's trained weights (the candidate's artifact); the recipe (`search.tune_config.Recipe`) overrides lr,
warmup, weight normalization and batch size. Schedule: a linear re-warmup over `warmup_steps` from the
loaded weights, then a new cosine over the remaining steps of this budget to `min_lr_ratio` x lr (the
proxy's cosine ended at its minimum; a fresh optimizer needs the warmup to build its moments). Validation is
scored with the proxy's evaluation settings whatever the recipe, so step 0 reproduces the candidate's stored
val_bpb and trials of different batch sizes are scored alike.

Checkpoints (`checkpoint_every` steps) go to `<folder>/checkpoint/step-<N>/` in proxies.checkpoints'
format (written to a temporary folder and renamed into place; state.json adds the run's plan, curves, best
loss). A rerun of the same plan continues from the newest one, bit for bit as if never stopped. The final
weights go to `<folder>/final/` (`model.safetensors`, `tokenizer.json`, `layout.json`, `meta.json`: steps,
val_bpb, recipe, source artifact key), the format `hybridnas export --weights trained` reads.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.weight_norm import normalize_weights
from proxies.artifacts import save_weights_folder
from proxies.checkpoints import load_checkpoint, write_checkpoint
from proxies.train import apply_update, build_model, checked_loss, evaluate_bpb, make_optimizer, sample_batch
from search.evaluation import ProxyConfig
from search.layout import Layout
from search.tune_config import Recipe, Source

CHECKPOINT_PREFIX = "step-"
DATA_SEED_OFFSET = 1  # the continuation's data order is not the proxy's (that would replay its batches)


class PlanMismatch(ValueError):
    """A checkpoint made by another plan (other steps, recipe or source): resuming it would mix two runs."""


@dataclass
class LongResult:
    status: str  # "completed" | "stopped" (stop_after) | "failed"
    steps: int
    steps_done: int
    recipe: dict
    source_key: str
    val_bpb: float | None = None
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val_bpb), step 0 first
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def run_config(source: Source, recipe: Recipe, steps: int) -> ProxyConfig:
    """The source's ProxyConfig with the recipe's values and this budget (read by model and optimizer)."""
    return ProxyConfig.from_dict(source.proxy).replace(
        steps=steps, tokens=None, lr=recipe.lr, weight_norm=recipe.weight_norm, batch_size=recipe.batch_size
    )


def lr_at(recipe: Recipe, min_lr_ratio: float, steps: int, step: int) -> float:
    """Linear re-warmup over recipe.warmup_steps, then cosine to min_lr_ratio x lr at the last step."""
    warmup = recipe.warmup_steps
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return recipe.lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_source_model(source: Source, recipe: Recipe, steps: int, vocab_size: int, device: torch.device):
    """The proxy's model with its trained weights (normalized when the recipe adds weight normalization)."""
    from safetensors.torch import load_file

    proxy = ProxyConfig.from_dict(source.proxy)
    model = build_model(Layout.from_dict(source.layout), vocab_size, proxy, device)
    model.load_state_dict(
        load_file(str(Path(source.artifact_path) / "model.safetensors"), device=str(device))
    )
    if recipe.weight_norm and not proxy.weight_norm:
        normalize_weights(model)
    return model


def _plan(source: Source, recipe: Recipe, steps: int, seed: int) -> dict:
    return {"steps": steps, "recipe": recipe.model_dump(), "source_key": source.training_key, "seed": seed}


# ---- checkpoints ----------------------------------------------------------------------------------------


def save_checkpoint(
    folder: Path, step: int, model, optimizer, rng: np.random.Generator, progress: dict
) -> Path:
    """Atomically as `<folder>/step-<N>` (proxies.checkpoints' format); older checkpoints removed after."""
    final = write_checkpoint(folder / f"{CHECKPOINT_PREFIX}{step:09d}", step, model, optimizer, rng, progress)
    for old in checkpoints(folder)[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest first (a renamed folder is complete by construction)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


# ---- the loop -------------------------------------------------------------------------------------------


def train_longer(
    source: Source,
    recipe: Recipe,
    steps: int,
    data,
    device: torch.device,
    *,
    seed: int = 0,
    evaluate_every: int = 0,
    on_evaluate: Callable[[int, dict], None] | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
    stop_after: int | None = None,
) -> tuple[LongResult, torch.nn.Module]:
    """Train the candidate `steps` more steps from its proxy weights with `recipe`. Validation every
    `evaluate_every` steps and at the end (`on_evaluate(step, metrics)` hears each); checkpoints every
    `checkpoint_every` steps into `checkpoint_dir`, resumed from when one of the same plan is there.
    `stop_after` ends the run after that many steps (status "stopped"), as a kill would. Raises
    TrainingFailed (non-finite or diverging loss) and PlanMismatch."""
    started = time.perf_counter()
    config = run_config(source, recipe, steps)
    proxy = ProxyConfig.from_dict(source.proxy)
    plan = _plan(source, recipe, steps, seed)
    model = load_source_model(source, recipe, steps, data.vocab_size, device)
    optimizer = make_optimizer(model, config)
    rng = np.random.default_rng([seed, DATA_SEED_OFFSET])
    result = LongResult("running", steps, 0, recipe.model_dump(), source.training_key)
    best = math.inf
    found = checkpoints(checkpoint_dir) if checkpoint_dir is not None else []
    if found:
        state, rng = load_checkpoint(found[-1], model, optimizer, device)
        if state["plan"] != plan:
            raise PlanMismatch(
                f"checkpoint: {found[-1]} was made for {state['plan']}, not {plan}: rerun with the same "
                f"options, or delete {checkpoint_dir} to start again"
            )
        result.steps_done = result.resumed_from = state["step"]
        result.val_curve = [tuple(p) for p in state["val_curve"]]
        result.loss_curve = [tuple(p) for p in state["loss_curve"]]
        best = state["best_loss"]
    else:
        result.val_curve.append((0, evaluate_bpb(model, data, proxy, device)["val_bpb"]))
    for step in range(result.steps_done, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(recipe, config.min_lr_ratio, steps, step)
        x, y = sample_batch(data.train, rng, config.batch_size, config.seq_len, device)
        loss, loss_value = checked_loss(model, x, y, config, device, step, best, recipe.warmup_steps)
        best = min(best, loss_value)
        apply_update(model, optimizer, loss, config)
        done = result.steps_done = step + 1
        if step % config.log_every == 0 or done == steps:
            result.loss_curve.append((step, round(loss_value, 6)))
        if done == steps or (evaluate_every and done % evaluate_every == 0):
            metrics = evaluate_bpb(model, data, proxy, device)
            result.val_curve.append((done, metrics["val_bpb"]))
            if on_evaluate is not None:
                on_evaluate(done, metrics)
        if checkpoint_dir is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
            progress = {"plan": plan, "val_curve": result.val_curve, "loss_curve": result.loss_curve}
            save_checkpoint(checkpoint_dir, done, model, optimizer, rng, {**progress, "best_loss": best})
        if stop_after is not None and done >= stop_after and done < steps:
            result.status = "stopped"
            break
    else:
        result.status = "completed"
        result.val_bpb = result.val_curve[-1][1]
    result.wall_s = time.perf_counter() - started
    return result, model


def save_final(folder: Path, model, tokenizer, source: Source, result: LongResult, seed: int) -> Path:
    """`<folder>/final/`: model.safetensors, tokenizer.json, layout.json, meta.json (atomically renamed)."""
    meta = {
        "steps": result.steps,
        "val_bpb": result.val_bpb,
        "recipe": result.recipe,
        "source_artifact_key": source.training_key,
        "candidate_id": source.candidate_id,
        "search_id": source.search_id,
        "source_val_bpb": source.val_bpb,
        "seed": seed,
        "vocab_size": tokenizer.vocab_size,
        "schedule": "linear re-warmup over recipe.warmup_steps, then cosine over the remaining steps",
        "val_curve": result.val_curve,
        "proxy_config": run_config(source, Recipe.model_validate(result.recipe), result.steps).to_dict(),
    }
    layout_json = Layout.from_dict(source.layout).to_json()
    return save_weights_folder(folder / "final", model, tokenizer, layout_json, meta, fsync=True)

"""Tuning a candidate's training recipe, and training it longer (torch-free): the tune job's settings, the
recipe it tunes, the candidate it starts from, and how its report picks the best recipe.

- `Recipe`: the ProxyConfig overrides a tune job searches over (lr, warmup_steps, weight_norm, batch_size)
  and that `hybridnas train` runs with; `Recipe.of_proxy` is the search's own.
- `TuneSpec`: a tune job's settings, validated the same way on REST, the CLI and the client (unknown fields
  refused, bounds named by field). Every trial runs the same number of optimizer steps (`steps`), whatever
  its batch size: a trial with twice the batch sees twice the tokens.
- `Source`: what a continued training starts from (the candidate's layout, its proxy weights' artifact, the
  search's proxy and data settings); `resolve_source` refuses a candidate without a completed training with
  a `TuneError` naming the field.
- `best_trial`: the trial with the lowest final val_bpb among those that reached the full budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from search.db import CANDIDATE_DONE_STATUSES, MAX_ID
from search.evaluation import Bool, DataConfig, Float, Int, ProxyConfig

DEFAULT_STEPS_FACTOR = 4  # the tune budget: this many times the search's proxy steps, unless given
TUNE_KIND = "tune"


class TuneError(ValueError):
    """A tune or train request refused: `field` names the input, `reason` says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class Recipe(BaseModel):
    """The training recipe of a continued training: the ProxyConfig values a tune job searches over."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lr: Float = Field(gt=0, le=10, description="peak learning rate")
    warmup_steps: Int = Field(ge=0, le=10_000_000, description="linear re-warmup steps before the cosine")
    weight_norm: Bool = Field(description="normalized weights, Adam without weight decay")
    batch_size: Int = Field(ge=1, le=4096, description="sequences per optimizer step")

    @classmethod
    def of_proxy(cls, proxy: ProxyConfig) -> Recipe:
        """The search's own recipe: its proxy's lr, warmup, weight normalization and batch size."""
        return cls(
            lr=proxy.lr,
            warmup_steps=proxy.warmup_steps,
            weight_norm=proxy.weight_norm,
            batch_size=proxy.batch_size,
        )


LrRange = Annotated[list[Float], Field(min_length=2, max_length=2)]
StepRange = Annotated[list[Int], Field(min_length=2, max_length=2)]


class TuneSpec(BaseModel):
    """A tune job: ASHA over recipes of one candidate, each trial trained from its proxy weights."""

    model_config = ConfigDict(extra="forbid")
    candidate_id: Int = Field(ge=1, le=MAX_ID, description="the candidate whose recipe is tuned")
    name: str | None = Field(None, max_length=200, description="a name for people")
    priority: Int = Field(0, ge=-1000, le=1000, description="queue order: higher first")
    steps: Int | None = Field(
        None,
        ge=2,
        le=10_000_000,
        description=f"optimizer steps per trial (None: {DEFAULT_STEPS_FACTOR}x the proxy's)",
    )
    trials: Int = Field(8, ge=1, le=256, description="recipes sampled")
    grace_steps: Int | None = Field(
        None, ge=1, le=10_000_000, description="ASHA's first rung, in steps (None: a quarter of steps)"
    )
    reduction_factor: Int = Field(2, ge=2, le=16, description="ASHA keeps 1/reduction_factor at each rung")
    lr_range: LrRange = Field([1e-4, 1e-2], description="[low, high]: lr is sampled log-uniformly in it")
    warmup_range: StepRange = Field([0, 20], description="[low, high]: warmup_steps sampled uniformly in it")
    batch_sizes: list[Int] = Field([4, 8, 16], min_length=1, max_length=16, description="batch size choices")
    weight_norm: list[Bool] = Field(
        [False, True], min_length=1, max_length=2, description="weight_norm choices"
    )
    seed: Int = Field(
        0, ge=0, le=2**31 - 1, description="seeds the recipe sampler and every trial's data order"
    )
    cpus_per_trial: Float = Field(1.0, gt=0, le=256, description="Ray CPUs per trial")
    concurrent_trials: Int = Field(
        0, ge=0, le=256, description="trials at once (0: as the Ray resources allow)"
    )

    @model_validator(mode="after")
    def _ranges(self) -> TuneSpec:
        low, high = self.lr_range
        if not 0 < low < high <= 10:
            raise ValueError("lr_range: needs 0 < low < high <= 10")
        if not 0 <= self.warmup_range[0] <= self.warmup_range[1]:
            raise ValueError("warmup_range: needs 0 <= low <= high")
        if any(not 1 <= b <= 4096 for b in self.batch_sizes):
            raise ValueError("batch_sizes: each must be between 1 and 4096")
        self._check_budget()
        return self

    def _check_budget(self) -> None:
        if self.steps is None:
            return
        if self.grace_steps is not None and self.grace_steps >= self.steps:
            raise ValueError(f"grace_steps: {self.grace_steps} must be below steps ({self.steps})")
        if self.warmup_range[1] >= self.steps:
            raise ValueError(
                f"warmup_range: its high end {self.warmup_range[1]} must be below steps ({self.steps})"
            )

    def resolved(self, proxy: ProxyConfig) -> TuneSpec:
        """Defaults that depend on the search filled in: steps, grace_steps. TuneError names a bad field."""
        steps = self.steps if self.steps is not None else DEFAULT_STEPS_FACTOR * proxy.total_steps
        grace = self.grace_steps if self.grace_steps is not None else max(1, steps // 4)
        try:
            return TuneSpec.model_validate({**self.model_dump(), "steps": steps, "grace_steps": grace})
        except ValueError as exc:
            raise TuneError(*_first_error(exc)) from None

    @property
    def report_every(self) -> int:
        """Steps between a trial's val_bpb reports: the grace period, so every ASHA rung is reported."""
        return self.grace_steps or 1


def _first_error(exc: ValueError) -> tuple[str, str]:
    errors = getattr(exc, "errors", None)
    if errors is None:
        return "body", str(exc)
    first = errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    field, _, reason = message.partition(": ")
    return (field, reason) if reason else (".".join(map(str, first["loc"])) or "body", message)


@dataclass(frozen=True)
class Source:
    """What a continued training of a candidate starts from."""

    candidate_id: int
    search_id: int
    layout: dict
    training_key: str
    artifact_path: str
    val_bpb: float
    proxy: dict  # the search's ProxyConfig, as the proxy weights were trained
    data: dict  # the search's DataConfig

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Source:
        return cls(**data)


def artifact_inside(path: str | Path, data_dir: str | Path) -> Path:
    """The artifact folder, resolved, if it lies inside `<data_dir>/artifacts/` and holds weights."""
    root = (Path(data_dir) / "artifacts").resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise TuneError("candidate_id", f"its artifact {path} is outside the data dir's artifacts folder")
    if not (resolved / "model.safetensors").is_file():
        raise TuneError("candidate_id", f"its proxy weights are missing ({resolved / 'model.safetensors'})")
    return resolved


def resolve_source(storage, candidate_id: int, data_dir: str | Path) -> Source:
    """The candidate's training source, or TuneError("candidate_id", why not)."""
    candidate = storage.get_candidate(candidate_id)
    if candidate is None:
        raise TuneError("candidate_id", f"no candidate {candidate_id}")
    if candidate.status not in CANDIDATE_DONE_STATUSES or candidate.training_key is None:
        raise TuneError(
            "candidate_id", f"candidate {candidate_id} has no completed training ({candidate.status})"
        )
    training = storage.get_training_result(candidate.training_key)
    if training is None or training.status != "completed" or training.val_bpb is None:
        raise TuneError("candidate_id", f"candidate {candidate_id} has no completed training result")
    if not training.artifact_path:
        raise TuneError("candidate_id", f"candidate {candidate_id} kept no proxy weights (no artifact)")
    artifact = artifact_inside(training.artifact_path, data_dir)
    search = storage.get_job(candidate.job_id)
    return Source(
        candidate_id=candidate_id,
        search_id=candidate.job_id,
        layout=candidate.layout,
        training_key=candidate.training_key,
        artifact_path=str(artifact),
        val_bpb=training.val_bpb,
        proxy=ProxyConfig.from_dict(search.config.get("proxy")).to_dict(),
        data=DataConfig.from_dict(search.config.get("data")).to_dict(),
    )


def check_tune(storage, spec: TuneSpec, data_dir: str | Path) -> tuple[TuneSpec, Source]:
    """The spec with its defaults resolved against the candidate's search, and the candidate's source."""
    source = resolve_source(storage, spec.candidate_id, data_dir)
    return spec.resolved(ProxyConfig.from_dict(source.proxy)), source


def best_trial(trials: list[dict], max_steps: int) -> dict | None:
    """The trial with the lowest final val_bpb among those that trained all `max_steps` steps."""
    finished = [
        t
        for t in trials
        if t.get("status") == "completed" and t.get("stopped_at") == max_steps and t.get("val_bpb")
    ]
    return min(finished, key=lambda t: t["val_bpb"], default=None)


def tune_jobs_of(storage, candidate_id: int) -> list:
    """The candidate's tune jobs, newest first."""
    jobs = [
        j
        for j in storage.list_jobs(kind=TUNE_KIND, limit=None)
        if j.config.get("candidate_id") == candidate_id
    ]
    return sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)


def recipe_for(storage, source: Source, choice: str | None) -> tuple[Recipe, int | None]:
    """The recipe `hybridnas train --recipe` names, and the tune job it came from: `best` (the newest
    completed tune job of the candidate with a best recipe, else the search's proxy recipe), a tune job's
    id, or None (the search's proxy recipe)."""
    proxy_recipe = Recipe.of_proxy(ProxyConfig.from_dict(source.proxy))
    if choice is None:
        return proxy_recipe, None
    if choice == "best":
        for job in tune_jobs_of(storage, source.candidate_id):
            if job.status == "completed" and (job.result or {}).get("best"):
                return Recipe.model_validate(job.result["best"]["recipe"]), job.id
        return proxy_recipe, None
    if not choice.isdigit():
        raise TuneError("recipe", f"{choice!r} is neither 'best' nor a tune job's id")
    job = storage.get_job(int(choice)) if int(choice) <= MAX_ID else None
    if job is None or job.kind != TUNE_KIND:
        raise TuneError("recipe", f"no tune job {choice}")
    if job.config.get("candidate_id") != source.candidate_id:
        raise TuneError(
            "recipe", f"tune job {choice} tuned candidate {job.config.get('candidate_id')}, not this one"
        )
    best = (job.result or {}).get("best")
    if job.status != "completed" or not best:
        raise TuneError("recipe", f"tune job {choice} is {job.status} and has no best recipe")
    return Recipe.model_validate(best["recipe"]), job.id

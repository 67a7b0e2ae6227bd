"""The REST shapes of tune jobs: `TuneCreate` (the body of POST /api/tunes: `search.tune_config.TuneSpec`),
`TuneOut` in lists and `TuneDetail` with the settings as run and the report."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from api.schemas import JobOut
from search.storage import JobRecord
from search.tune_config import TuneSpec

TuneCreate = TuneSpec

TUNE_EXAMPLES = {
    "small": {
        "summary": "8 recipes of candidate 12, ASHA from 25 steps",
        "value": {"candidate_id": 12, "steps": 200, "trials": 8, "grace_steps": 25, "reduction_factor": 2},
    }
}


class TuneOut(JobOut):
    """A tune job: Ray Tune's ASHA over one candidate's training recipe."""

    candidate_id: int = Field(description="the candidate whose recipe is tuned")
    progress: float | None = Field(None, description="trials finished / trials (0..1)")

    @classmethod
    def of(cls, job: JobRecord) -> TuneOut:
        progress = None if not job.budget else min(1.0, job.n_evaluations / job.budget)
        return cls(**JobOut.of(job).model_dump(), candidate_id=job.config["candidate_id"], progress=progress)


class TuneDetail(TuneOut):
    """A tune job with its settings (defaults resolved), its source and, once it completed, its report."""

    config: dict[str, Any] = Field(description="the settings as run, with `source` (the candidate's proxy)")
    result: dict[str, Any] | None = Field(
        None,
        description="the report: `trials` (config, status completed/stopped/failed, curve [(step, "
        "val_bpb)...], stopped_at, tokens), `best` (recipe: lr, warmup_steps, weight_norm, batch_size; "
        "val_bpb), steps, grace_steps, reduction_factor, rungs",
    )

    @classmethod
    def of(cls, job: JobRecord) -> TuneDetail:
        return cls(**TuneOut.of(job).model_dump(), config=job.config, result=job.result)

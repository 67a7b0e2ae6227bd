"""What every study kind shares: the evaluation settings it takes from a search's config, the runs it plans
(grid searches), and the contract the runner (`search/study_runner.py`) drives.

A study kind is a pydantic model with `plan(references)` (its runs, in order), `analyse(runs,
references)` (the report from the runs' candidates) and `references()` (other jobs it reads, by name: a
verdict reads a search and a depth-width study). Candidates reach `analyse` as dicts: the stored candidate's
fields plus `training`, its training result's metrics (tokens_per_s, wall_s, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from search.config import SearchConfig
from search.layout import Layout

# How runs are executed: the same fields, checks and defaults as a search's.
EXECUTION_FIELDS = ("executor", "workers", "cpus_per_worker", "gpus_per_worker", "timeout_s", "max_retries")
# What an evaluation's numbers depend on: the training, the latency measurement, the text.
EVALUATION_FIELDS = ("proxy", "latency", "data")


def _fields(names: tuple[str, ...]) -> dict[str, Any]:
    return {
        name: (SearchConfig.model_fields[name].annotation, SearchConfig.model_fields[name]) for name in names
    }


ExecutionSettings = create_model(
    "ExecutionSettings", __config__=ConfigDict(extra="forbid"), **_fields(EXECUTION_FIELDS)
)
RunSettings = create_model("RunSettings", __base__=ExecutionSettings, **_fields(EVALUATION_FIELDS))


@dataclass(frozen=True)
class StudyRun:
    key: str  # unique within the study: names the run's job (`study:<id>:<key>`)
    search_config: dict[str, Any]  # a grid search's config


@dataclass(frozen=True)
class Reference:
    """A job a study reads: its config, status, stored report and candidates (as dicts)."""

    job: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)


class StudyError(ValueError):
    """A study that cannot be planned or analysed as configured; names the field and the reason."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


class Study(BaseModel):
    """A study kind's base: a name, and the contract the runner drives."""

    name: str | None = Field(None, max_length=200, description="a name for people")
    # The report as one table (the CSV download): its columns, and `table(report)` its rows.
    columns: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def table(cls, report: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def references(self) -> dict[str, int]:
        """Other jobs this study reads ({name: job id}); none by default."""
        return {}

    def plan(self, references: dict[str, Reference]) -> list[StudyRun]:
        raise NotImplementedError

    def analyse(self, runs: dict[str, list[dict]], references: dict[str, Reference]) -> dict[str, Any]:
        raise NotImplementedError


def run_config(
    study: BaseModel, key: str, layouts: list[Layout], evaluation: dict[str, Any] | None = None, **proxy: Any
) -> StudyRun:
    """A grid search over `layouts` with the study's execution settings and its evaluation settings (or those
    given), the proxy's fields changed by `proxy` (a seed, the steps, weight_norm...)."""
    settings = {name: getattr(study, name) for name in EXECUTION_FIELDS}
    evaluation = evaluation or {name: getattr(study, name) for name in EVALUATION_FIELDS}
    settings.update(
        {k: (v.model_dump(mode="json") if isinstance(v, BaseModel) else v) for k, v in evaluation.items()}
    )
    if proxy:
        settings["proxy"] = {**settings["proxy"], **proxy}
    config = SearchConfig.model_validate(
        {
            **settings,
            "name": study.name,
            "strategy": "grid",
            "strategy_options": {"layouts": [layout.to_dict() for layout in layouts]},
            "budget": len(layouts),
            "objectives": ("val_bpb", "decode_ms"),
        }
    )
    return StudyRun(key, config.model_dump(mode="json"))


def by_layout(candidates: list[dict]) -> dict[str, dict]:
    """Candidates by layout hash."""
    return {c["layout_hash"]: c for c in candidates}

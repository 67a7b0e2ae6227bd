"""A search's configuration: validated before anything runs (pydantic; errors name the field).

name, space (a named space or its settings), strategy + options, objectives, budget, constraints,
proxy / latency / data settings (the workers' own models, `search.evaluation`), executor and resources.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from search.db import OBJECTIVE_COLUMNS
from search.evaluation import DataConfig, LatencyConfig, ProxyConfig
from search.multifidelity import FidelityConfig
from search.space import SearchSpace, SpaceError, benchmark_space, cpu_space
from search.strategies.base import Constraints
from search.strategies.options import strategy_kwargs

OBJECTIVES = OBJECTIVE_COLUMNS  # every objective is a column of the candidates table
MAX_DIM = 1 << 20  # any width, count or dimension of a space (a space built with 10**20 would hang)
Count = Annotated[int, Strict()]
NAMED_SPACES = {"cpu": cpu_space, "benchmark": benchmark_space, "paper": SearchSpace}


class SpaceSettings(BaseModel):
    """The search space: a named preset, with any of its settings overridden."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["cpu", "benchmark", "paper"] | None = Field(
        "cpu", description="the named space the other settings override (cpu: small, for CPUs)"
    )
    mixers: list[str] | None = Field(
        None, max_length=8, description="token-mixer operators a layout may use (`GET /api/operators`)"
    )
    ratios: list[tuple[Count, Count]] | None = Field(
        None,
        max_length=8,
        description="mixer ratios a block type may mix its two mixers at: [a, b]; [0, 1] for one mixer type",
    )
    ffn_counts: list[Count] | None = Field(None, max_length=4, description="FFNs that may follow each mixer")
    n_stages: int | None = Field(
        None, ge=1, le=8, description="stages of a layout (each repeats one block type)"
    )
    max_operators: int | None = Field(
        None, ge=1, le=128, description="operators in a layout at most (the last stage is trimmed first)"
    )
    widths: list[Count] | None = Field(
        None, min_length=1, max_length=32, description="the model widths (d_model) a layout may have"
    )
    dims: dict[str, Any] | None = Field(
        None, max_length=32, description="layout dimensions for every width (head_dim, kv_group, ...)"
    )

    @field_validator("ratios", "ffn_counts", "widths")
    @classmethod
    def _bounded_counts(cls, value):
        for number in (n for item in value or () for n in (item if isinstance(item, tuple) else (item,))):
            if abs(number) > MAX_DIM:
                raise ValueError(f"{number} exceeds {MAX_DIM}")
        return value

    @field_validator("dims")
    @classmethod
    def _bounded_dims(cls, value):
        for key, number in (value or {}).items():
            if isinstance(number, (int, float)) and not isinstance(number, bool) and abs(number) > MAX_DIM:
                raise ValueError(f"{key}: {number} exceeds {MAX_DIM}")
        return value

    def build(self) -> SearchSpace:
        base = NAMED_SPACES[self.preset or "cpu"]()
        overrides = {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}
        for key in ("mixers", "ratios", "ffn_counts", "widths"):
            if key in overrides:
                overrides[key] = tuple(
                    tuple(x) if isinstance(x, (list, tuple)) else x for x in overrides[key]
                )
        if "dims" in overrides:
            overrides["dims"] = {**base.dims, **overrides["dims"]}
        settings = {
            f: getattr(base, f)
            for f in ("mixers", "ratios", "ffn_counts", "n_stages", "max_operators", "widths", "dims")
        }
        settings.update(overrides)
        return SearchSpace(**settings)


class SearchConfig(BaseModel):
    """What a search runs: the space, the strategy, the objectives and budget, and how candidates are
    evaluated (every field optional; unknown fields refused)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200, description="a name for people")
    space: SpaceSettings = Field(default_factory=SpaceSettings, description="the layouts searched over")
    strategy: str = Field(
        "pareto-aging",
        description="how candidates are proposed: pareto-aging, nsga2, random or latency-target",
    )
    strategy_options: dict[str, Any] = Field(
        default_factory=dict,
        max_length=32,
        description="the strategy's own settings (`search.strategies.options`: population_size, ...)",
    )
    objectives: tuple[str, str] = Field(
        ("val_bpb", "decode_ms"),
        description="the two objectives, both minimized: val_bpb, decode_ms, n_params",
    )
    budget: int = Field(16, ge=1, le=100_000, description="evaluations (a reused result counts as one)")
    reused_counts: bool = Field(
        True, description="a stored result reused for an equal layout counts toward the budget"
    )
    cycle: int | None = Field(
        None, ge=1, le=1024, description="children proposed per cycle (default: workers)"
    )
    initial: Literal["presets", "random"] = Field(
        "presets", description="the initial population: the named preset layouts, or random ones"
    )
    warm_start_job: int | None = Field(
        None, ge=1, le=2**31 - 1, description="start from this search's Pareto front"
    )
    constraints: Constraints = Field(
        default_factory=Constraints, description="budgets a candidate must meet (latency, parameters, memory)"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds every random choice (numpy takes < 2**32)")
    proxy: ProxyConfig = Field(default_factory=ProxyConfig, description="the short training")
    fidelity: FidelityConfig | None = Field(
        None,
        description="multi-fidelity: rungs of training steps (the proxy's own steps are then unused); a "
        "candidate starts at the lowest and is promoted while it ranks in its rung's best 1/eta",
    )
    latency: LatencyConfig = Field(
        default_factory=lambda: LatencyConfig(decode_tokens=32, repeats=3, throughput=False),
        description="the latency measurement",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="the training text and tokenizer")
    executor: Literal["ray", "inline"] = Field(
        "ray",
        description="ray: Ray actors, one per worker (a local Ray, or the cluster at RAY_ADDRESS); inline: "
        "threads of the runner's process",
    )
    workers: int = Field(2, ge=1, le=1024, description="evaluations in parallel")
    cpus_per_worker: float = Field(1, gt=0, le=256, description="CPUs each worker reserves (Ray)")
    gpus_per_worker: float = Field(
        0, ge=0, le=8, description="GPUs each worker reserves (Ray; fractions share one)"
    )
    timeout_s: float = Field(
        1800, gt=0, le=7 * 24 * 3600, description="seconds an evaluation may run before it fails"
    )
    max_retries: int = Field(1, ge=0, le=10, description="times a failed evaluation is tried again")
    latency_lut: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        pattern=r"^[^\x00]+$",
        description="a latency table (`hybridnas latency build-lut`): the "
        "latency-target strategy's width rule reads it",
    )
    hypervolume_bounds: dict[str, tuple[float, float]] | None = Field(
        None,
        description="per objective [lower, upper] of the normalized hypervolume space (fixed for the "
        "search; searches compare only with equal bounds). Default: lower 0, upper 1.2 x the "
        "largest value in the initial population's results (the presets, by default)",
    )

    @field_validator("hypervolume_bounds")
    @classmethod
    def _bounds(cls, value):
        if value is None:
            return value
        for name, (lower, upper) in value.items():
            if name not in OBJECTIVES:
                raise ValueError(f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
            if not (math.isfinite(lower) and math.isfinite(upper) and upper > lower):
                raise ValueError(f"{name}: need finite lower < upper, got [{lower}, {upper}]")
        return value

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, value):
        for name in value:
            if name not in OBJECTIVES:
                raise ValueError(f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
        if value[0] == value[1]:
            raise ValueError("the two objectives must differ")
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value):
        from search.strategies import STRATEGIES

        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r} (known: {', '.join(STRATEGIES)})")
        return value

    @model_validator(mode="after")
    def _bounds_cover_objectives(self):
        if self.hypervolume_bounds is not None and set(self.hypervolume_bounds) != set(self.objectives):
            raise ValueError(f"hypervolume_bounds: give exactly the objectives {list(self.objectives)}")
        return self

    @model_validator(mode="after")
    def _rungs_fit_the_proxy(self):
        if self.fidelity is None:
            return self
        if self.proxy.tokens is not None:
            raise ValueError("proxy.tokens: a multi-fidelity search's rungs give the budget in steps")
        if self.proxy.schedule != "cosine" or self.proxy.fixed_warmup_steps is not None:
            raise ValueError("proxy.schedule: the rungs set the schedule (wsd) and warmup themselves")
        self.fidelity.check_proxy(self.proxy)
        return self

    @model_validator(mode="after")
    def _space_builds(self):
        try:
            space = self.build_space()
        except SpaceError as exc:
            raise ValueError(f"space.{exc.field}: {exc.reason}") from None
        try:
            strategy_kwargs(
                self.strategy, self.strategy_options
            )  # the engine builds it through the same model
        except ValueError as exc:
            raise ValueError(f"strategy_options.{exc}") from None
        # The strategy is built once here so bad options (a population larger than the space, a budget no
        # layout can meet) are refused at submission, not when a runner starts the search.
        if self.strategy == "latency-target":  # its table is read when the search starts (a path check first)
            if not self.latency_lut:
                raise ValueError(
                    "latency_lut: the latency-target strategy needs a latency table (a file written "
                    "by `hybridnas latency build-lut`)"
                )
            return self
        from search.strategies import make_strategy

        try:
            make_strategy(
                self.strategy,
                space,
                objectives=tuple(self.objectives),
                seed=self.seed,
                constraints=self.constraints.model_dump(),
                **self.strategy_options,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"strategy_options: {exc}") from None
        return self

    def build_space(self) -> SearchSpace:
        return self.space.build()

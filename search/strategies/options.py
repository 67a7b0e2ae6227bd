"""Each strategy's own settings (`strategy_options` of a search config), as strict pydantic models: the
same models check a config at submission and build the strategy in the engine (`make_strategy`), so an
option the strategy would refuse is refused before anything runs, naming the field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from search.evaluation import Bool, Float, Int


class StrategyOptions(BaseModel):
    """Options every strategy takes (None: the strategy's own default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    population_size: Int | None = Field(None, ge=2, le=100_000, description="members of the population")
    sample_size: Int | None = Field(
        None, ge=1, le=100_000, description="tournament size (parents are the best of this many members)"
    )


class AgingOptions(StrategyOptions):
    protect_front: Bool = Field(True, description="front members do not age out of the population")
    selection: Literal["hypervolume", "crowding"] = Field(
        "hypervolume", description="tie-break among equal Pareto ranks"
    )
    adapt_mutations: Bool = Field(
        True, description="favour the mutation kinds whose children enter the front"
    )
    mutation_window: Int = Field(100, ge=1, le=100_000, description="recent children the mix is learnt from")
    mutation_exploration: Float = Field(0.2, ge=0, le=1, description="share of the uniform mix kept")


class LatencyTargetOptions(AgingOptions):
    target_ms: Float | None = Field(
        None, gt=0, le=1e6, description="the latency target (default: constraints.max_decode_ms)"
    )
    adapt_mutations: Literal[False] = Field(
        False, description="not supported: the mix stays uniform, as in the paper"
    )


class NSGA2Options(StrategyOptions):
    crossover_prob: Float = Field(
        0.9, ge=0, le=1, description="probability a child is made by crossover of two parents (else a copy)"
    )
    swapping_prob: Float = Field(
        0.5,
        ge=0,
        le=1,
        description="probability each parameter is taken from the other parent in a crossover",
    )
    mutation_prob: Float | None = Field(
        None,
        ge=0,
        le=1,
        description="probability each parameter of a child is mutated (None: 1 / number of parameters)",
    )


class GridOptions(BaseModel):
    """The grid's one option: its layouts (the studies make them; see search/studies/)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layouts: list[dict[str, Any]] = Field(
        min_length=1, max_length=10_000, description="the layouts to evaluate, in order (layout dicts)"
    )


STRATEGY_OPTIONS: dict[str, type[BaseModel]] = {
    "pareto-aging": AgingOptions,
    "latency-target": LatencyTargetOptions,
    "nsga2": NSGA2Options,
    "random": StrategyOptions,
    "grid": GridOptions,
}


def strategy_kwargs(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The validated options a strategy is built with (only those given: the rest keep its defaults).
    ValueError naming the option (`population_size: ...`) for a bad one."""
    model = STRATEGY_OPTIONS.get(name)
    if model is None:
        raise ValueError(f"unknown search strategy {name!r} (known: {', '.join(STRATEGY_OPTIONS)})")
    try:
        return model.model_validate(options).model_dump(exclude_unset=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unknown option of {name!r} (known: {', '.join(model.model_fields)})"
        raise ValueError(f"{where}: {message}") from None

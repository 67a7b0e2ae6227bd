"""Search strategies behind one small ask/tell interface (Optuna-like).

    strategy = make_strategy("pareto-aging", space, objectives=("val_bpb", "decode_ms"), seed=0,
                             population_size=20, sample_size=5, initial=[...], constraints=Constraints(...))
    for proposal in strategy.ask(10):        # one cycle: 10 new layouts, none evaluated or pending before
        ...evaluate proposal.layout...
        strategy.tell(proposal.hash, {"val_bpb": ..., "decode_ms": ...})   # or None when it failed
    state = strategy.state_dict()            # JSON-serializable; load_state_dict(state) resumes exactly

Adding a strategy is one entry in STRATEGIES (a `Strategy` subclass implementing `_propose`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from search.layout import Layout
from search.space import SearchSpace
from search.strategies.aging import LatencyTargetStrategy, ParetoAgingStrategy
from search.strategies.base import Constraints, Proposal, Strategy, estimate_memory_bytes
from search.strategies.grid import GridStrategy
from search.strategies.options import STRATEGY_OPTIONS, strategy_kwargs
from search.strategies.random_search import RandomStrategy


def _nsga2(space: SearchSpace, **kw: Any) -> Strategy:
    from search.strategies.nsga2 import NSGA2Strategy  # imports optuna only when used

    return NSGA2Strategy(space, **kw)


STRATEGIES: dict[str, Any] = {
    "pareto-aging": ParetoAgingStrategy,
    "latency-target": LatencyTargetStrategy,
    "nsga2": _nsga2,
    "random": RandomStrategy,
    "grid": GridStrategy,
}
DEFAULT_STRATEGY = "pareto-aging"


def make_strategy(
    name: str,
    space: SearchSpace,
    *,
    objectives: Sequence[str] = ("val_bpb", "decode_ms"),
    seed: int = 0,
    population_size: int | None = None,
    sample_size: int | None = None,
    initial: Iterable[Layout] | None = None,
    constraints: Constraints | None = None,
    latency_table: Any = None,
    **kw: Any,
) -> Strategy:
    """A strategy by name. Raises ValueError for an unknown name, a population larger than the space, a
    latency budget no layout can meet, or other bad settings — before anything runs."""
    factory = STRATEGIES.get(name)
    if factory is None:
        raise ValueError(f"unknown search strategy {name!r} (known: {', '.join(STRATEGIES)})")
    given = {"population_size": population_size, "sample_size": sample_size, **kw}
    try:
        options = strategy_kwargs(name, {k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise ValueError(f"strategy {name!r}: bad settings: {exc}") from None
    return factory(
        space,
        objectives=tuple(objectives),
        seed=seed,
        initial=list(initial or []),
        constraints=constraints,
        latency_table=latency_table,
        **options,
    )


__all__ = [
    "Constraints",
    "DEFAULT_STRATEGY",
    "LatencyTargetStrategy",
    "ParetoAgingStrategy",
    "Proposal",
    "RandomStrategy",
    "STRATEGIES",
    "STRATEGY_OPTIONS",
    "Strategy",
    "estimate_memory_bytes",
    "make_strategy",
]

"""Multi-fidelity search: rungs of training budget, and which candidates climb them (pure Python).

A search with `fidelity: {rungs: [25, 100, 400], eta: 3}` trains each new candidate for the lowest rung's
steps. A candidate at rung r is promoted to rung r+1 as soon as it ranks in the best 1/eta of every result
at rung r so far (asynchronous successive halving: no rung is waited for), ranked by non-dominated sorting
of the search's objectives with ties inside a front broken by hypervolume contribution (larger first). Its
latency is measured once; only its training climbs.

Every rung trains with a warmup-stable-decay schedule (`ProxyConfig.schedule="wsd"`) sharing its warmup,
so rung r+1's run is rung r's up to rung r's stable-phase end: a promotion continues from that checkpoint
(trained steps: rungs[r+1] - stable(r)) instead of from scratch, with the same result a fresh rung r+1 run
gets. `RungLadder` holds each rung's results and decides the promotions; the engine builds it from the
database (its rung rows are the truth), the benchmark replay from a table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from search.evaluation import Bool, Float, ProxyConfig
from search.pareto import rank_and_contribution

Steps = Annotated[int, Strict(), Field(ge=2, le=10_000_000)]


class FidelityConfig(BaseModel):
    """Rungs of training budget (optimizer steps, increasing) and the promotion rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rungs: list[Steps] = Field(
        min_length=2, max_length=8, description="steps at each rung, increasing (e.g. [25, 100, 400])"
    )
    eta: Annotated[int, Strict()] = Field(
        3, ge=2, le=16, description="a rung promotes its best 1/eta (by Pareto rank, then HV contribution)"
    )
    decay_fraction: Float = Field(
        0.2, gt=0, lt=1, description="share of each rung's steps spent in the wsd decay"
    )
    continuation: Bool = Field(
        True, description="a promotion continues from the lower rung's stable-phase checkpoint (False: fresh)"
    )

    @model_validator(mode="after")
    def _increasing(self) -> Self:
        for low, high in zip(self.rungs, self.rungs[1:]):
            if high <= low:
                raise ValueError(f"rungs: must increase, got {low} then {high}")
        return self

    @property
    def top(self) -> int:
        return len(self.rungs) - 1

    def proxy_at(self, proxy: ProxyConfig, rung: int) -> ProxyConfig:
        """The rung's training settings: the search's proxy at the rung's steps, wsd, with the warmup of the
        lowest rung (every rung shares it, so each rung's run begins as the lower rungs' did)."""
        warmup = int(proxy.warmup_fraction * self.rungs[0])
        return proxy.replace(
            steps=self.rungs[rung],
            tokens=None,
            schedule="wsd",
            decay_fraction=self.decay_fraction,
            fixed_warmup_steps=warmup,
        )

    def stable_steps(self, proxy: ProxyConfig, rung: int) -> int:
        return self.proxy_at(proxy, rung).stable_steps

    def steps_to_train(self, proxy: ProxyConfig, rung: int, continued: bool) -> int:
        """Optimizer steps a rung's run trains: the whole rung fresh, or from the lower rung's stable end."""
        if rung == 0 or not continued:
            return self.rungs[rung]
        return self.rungs[rung] - self.stable_steps(proxy, rung - 1)

    def check_proxy(self, proxy: ProxyConfig) -> None:
        """Every rung's schedule must be valid (its decay must leave the warmup whole)."""
        for rung in range(len(self.rungs)):
            try:
                self.proxy_at(proxy, rung)
            except ValueError as exc:
                raise ValueError(f"fidelity.rungs[{rung}]: {exc}") from None


def promotion_order(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points best first: Pareto rank, then hypervolume contribution within the front (larger
    first), then arrival order."""
    if not points:
        return []
    ranks, contributions = rank_and_contribution(points)
    return sorted(range(len(points)), key=lambda i: (ranks[i], -contributions[i], i))


@dataclass
class RungLadder:
    """Each rung's results (candidate id -> objective values, in arrival order) and the promotions made
    (a candidate is promoted from rung r when it has a result or a run at rung r+1)."""

    n_rungs: int
    eta: int
    results: list[dict[int, tuple[float, ...]]] = field(default_factory=list)
    started: list[set[int]] = field(default_factory=list)  # runs begun at each rung (finished or not)

    def __post_init__(self) -> None:
        self.results = self.results or [{} for _ in range(self.n_rungs)]
        self.started = self.started or [set() for _ in range(self.n_rungs)]

    def start(self, candidate_id: int, rung: int) -> None:
        self.started[rung].add(candidate_id)

    def record(self, candidate_id: int, rung: int, values: Sequence[float] | None) -> None:
        """A rung's result (None: the run failed; it holds a place in no ranking)."""
        self.started[rung].add(candidate_id)
        if values is not None:
            self.results[rung][candidate_id] = tuple(float(v) for v in values)

    def qualified(self, rung: int) -> list[int]:
        """The candidates in rung `rung`'s best 1/eta right now, best first."""
        ids = list(self.results[rung])
        keep = len(ids) // self.eta
        if keep == 0:
            return []
        order = promotion_order([self.results[rung][i] for i in ids])
        return [ids[i] for i in order[:keep]]

    def promotions(self) -> list[tuple[int, int]]:
        """(candidate id, rung to train at) for every qualified candidate not yet promoted, the higher rungs
        first (finishing a climb before starting another, as ASHA does)."""
        out = []
        for rung in reversed(range(self.n_rungs - 1)):
            out.extend((c, rung + 1) for c in self.qualified(rung) if c not in self.started[rung + 1])
        return out

    def highest(self, candidate_id: int) -> int | None:
        """The highest rung with a result for this candidate."""
        return next((r for r in reversed(range(self.n_rungs)) if candidate_id in self.results[r]), None)

    def at(self, rung: int) -> dict[int, tuple[float, ...]]:
        return self.results[rung]

    @classmethod
    def build(
        cls, n_rungs: int, eta: int, rows: Iterable[tuple[int, int, Sequence[float] | None]]
    ) -> RungLadder:
        """From (candidate id, rung, values or None: running or failed) rows, in arrival order."""
        ladder = cls(n_rungs, eta)
        for candidate_id, rung, values in rows:
            ladder.record(candidate_id, rung, values)
        return ladder


@dataclass(frozen=True)
class RungSummary:
    """One rung of a search: its runs by status, the promotions out of it, its front and hypervolume."""

    rung: int
    steps: int
    counts: dict[str, int]
    promoted: int
    front: list[dict]  # {candidate_id, <objective>: value, ...}, by the first objective
    hypervolume: float | None
    steps_trained: int


def summarize_rungs(
    fidelity: FidelityConfig, runs: Sequence, objectives: Sequence[str], hv_space
) -> list[RungSummary]:
    """Per rung, from a search's rung runs (`RungRunRecord`s): each rung's front is that of the results at
    that rung, its hypervolume in the search's fixed space (`HypervolumeSpace`; None before it is set)."""
    from search.pareto import pareto_front

    out = []
    for rung, steps in enumerate(fidelity.rungs):
        mine = [r for r in runs if r.rung == rung]
        done = [r for r in mine if r.status in ("completed", "reused") and r.objectives]
        points = [[r.objectives[name] for name in objectives] for r in done]
        front = (
            sorted((done[i] for i in pareto_front(points)), key=lambda r: r.objectives[objectives[0]])
            if done
            else []
        )
        counts: dict[str, int] = {}
        for r in mine:
            counts[r.status] = counts.get(r.status, 0) + 1
        out.append(
            RungSummary(
                rung=rung,
                steps=steps,
                counts=counts,
                promoted=sum(1 for r in runs if r.rung == rung + 1),
                front=[
                    {"candidate_id": r.candidate_id, **{n: r.objectives[n] for n in objectives}}
                    for r in front
                ],
                hypervolume=hv_space.hypervolume([[r.objectives[n] for n in objectives] for r in front])
                if hv_space is not None and front
                else None,
                steps_trained=sum(r.steps_trained or 0 for r in mine),
            )
        )
    return out

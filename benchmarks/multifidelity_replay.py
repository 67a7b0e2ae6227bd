"""Searches replayed on the compute axis against the benchmark sub-space's rung table: look-ups instead of
training, every training run charged the optimizer steps it would train, one sequential worker.

The table (benchmarks/data/search_space_cpu_rungs.csv, `search_space_table.py --pass rungs`) holds each
layout's val_bpb after 25, 100 and 400 wsd steps; decode latency (search_space_cpu_latency.csv) is measured
once per layout, the same at every rung. Every method pays the same prices (`run_cost`): a rung-0 run costs
its 25 steps; a promotion continued from the lower rung's stable-phase checkpoint costs
`FidelityConfig.steps_to_train(proxy, rung, continued=True)` (80, then 320); a single-fidelity candidate
trains 400 steps fresh. A layout the table lacks (not trained yet, or failed) is a failed evaluation that
costs nothing.

- `replay_multifidelity`: the engine's rule. When the `RungLadder` has promotions, train the first (higher
  rungs first); else ask the strategy for one new candidate at rung 0. The strategy is told the rung-0 result
  and `update`d with each promotion's.
- `replay_single_fidelity`: every candidate at the top rung (400 steps).
- `replay_moasha`: Syne Tune's MOASHA scheduler (the optional extra `moasha`; its full dependencies pull
  xgboost and a 350 MB nccl wheel; the scheduler itself imports only numpy, pandas and dill (measured):
  `pip install --no-deps syne-tune==0.16.0 dill`) driven as a
  library: suggest, then report results at 25 / 100 / 400 steps until it says stop.

Each replay returns a `Curve`: the hypervolume of the top-rung (400-step) results against the steps spent,
with bounds fixed from the whole table's top rung; `Curve.at(steps)` counts only the runs finished by then.
"""

from __future__ import annotations

import bisect
import csv
import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from search.evaluation import ProxyConfig
from search.layout import Layout
from search.multifidelity import FidelityConfig, RungLadder
from search.pareto import HypervolumeSpace, HypervolumeTracker
from search.space import benchmark_space
from search.strategies import make_strategy

OBJECTIVES = ("val_bpb", "decode_ms")
FIDELITY = FidelityConfig(rungs=[25, 100, 400], eta=3)
# The table's proxy (benchmarks/search_space_table.py's PROXY): only its warmup matters to the costs.
PROXY = ProxyConfig(steps=100, batch_size=8, seq_len=128, lr=3e-3, warmup_fraction=0.1, eval_tokens=65536)
TOP = FIDELITY.top


def run_cost(rung: int, continued: bool) -> int:
    """Optimizer steps a run at `rung` trains (continued from the rung below, or fresh)."""
    return FIDELITY.steps_to_train(PROXY, rung, continued)


@dataclass
class RungTable:
    """Each layout's objective values per rung (as loaded: every rung has a result)."""

    values: dict[str, list[dict[str, float] | None]]

    def lookup(self, layout_hash: str, rung: int) -> dict[str, float] | None:
        row = self.values.get(layout_hash)
        return None if row is None else row[rung]

    def top_points(self) -> list[tuple[float, ...]]:
        return [tuple(row[TOP][o] for o in OBJECTIVES) for row in self.values.values() if row[TOP]]

    def hypervolume_space(self) -> HypervolumeSpace:
        """Bounds fixed from every top-rung result of the table."""
        points = self.top_points()
        if not points:
            raise ValueError("rung table: no layout has a top-rung result to fix the hypervolume bounds")
        lower = tuple(min(p[i] for p in points) for i in range(len(OBJECTIVES)))
        upper = tuple(max(p[i] for p in points) for i in range(len(OBJECTIVES)))
        return HypervolumeSpace(OBJECTIVES, lower, upper)


def load_rung_table(rungs_csv: Path, latency_csv: Path) -> tuple[RungTable, int]:
    """The layouts with a completed result at every rung, joined with their decode latency; and how many
    layouts the table holds in all (a layout still being trained, or failed at a rung, is left out: a
    search that proposes it gets a failed evaluation)."""
    latency = {r["layout_hash"]: float(r["decode_ms_per_token"]) for r in csv.DictReader(latency_csv.open())}
    values: dict[str, list[dict[str, float] | None]] = {}
    seen = set()
    for row in csv.DictReader(rungs_csv.open()):
        h, rung = row["layout_hash"], int(row["rung"])
        seen.add(h)
        if int(row["steps"]) != FIDELITY.rungs[rung]:
            expected = FIDELITY.rungs[rung]
            raise ValueError(
                f"{rungs_csv}: rung {rung} of {h[:12]}: steps {row['steps']}, expected {expected}"
            )
        if row["status"] == "completed" and h in latency:
            values.setdefault(h, [None] * len(FIDELITY.rungs))[rung] = {
                "val_bpb": float(row["val_bpb"]),
                "decode_ms": latency[h],
            }
    complete = {h: row for h, row in values.items() if all(v is not None for v in row)}
    return RungTable(complete), len(seen)


@dataclass
class Curve:
    """The top-rung hypervolume after each training run, against the cumulative steps spent."""

    tracker: HypervolumeTracker
    steps: list[int] = field(default_factory=list)
    runs: list[tuple[str, int]] = field(default_factory=list)  # (layout hash, rung) of each training run
    runs_per_rung: list[int] = field(default_factory=lambda: [0] * len(FIDELITY.rungs))
    missing: int = 0  # evaluations of layouts the table lacks (failed, free)

    @property
    def spent(self) -> int:
        return self.steps[-1] if self.steps else 0

    def charge(self, layout_hash: str, rung: int, cost: int, values: dict[str, float] | None) -> None:
        """One training run: its steps, and its result when it is a top-rung one."""
        if values is None:
            self.missing += 1
            cost = 0
        self.runs_per_rung[rung] += values is not None
        self.runs.append((layout_hash, rung))
        self.steps.append(self.spent + cost)
        self.tracker.record(values if rung == TOP else None)

    def at(self, steps: int) -> float:
        """Hypervolume of the top-rung results of the runs finished within `steps` (an equal-compute cut)."""
        done = bisect.bisect_right(self.steps, steps)
        return self.tracker.history[done - 1] if done else 0.0


def _strategy(name: str, options: dict, seed: int):
    return make_strategy(name, benchmark_space(), objectives=OBJECTIVES, seed=seed, **options)


def replay_multifidelity(
    name: str,
    options: dict,
    seed: int,
    table: RungTable,
    hv_space: HypervolumeSpace,
    budget: int,
    eta: int = FIDELITY.eta,
) -> Curve:
    """The engine's multi-fidelity loop with one worker, until `budget` steps are spent; each rung promotes
    its best 1/`eta`."""
    strategy = _strategy(name, options, seed)
    ladder = RungLadder(len(FIDELITY.rungs), eta)
    curve = Curve(HypervolumeTracker(hv_space))
    hashes: list[str] = []  # candidate id -> layout hash
    while curve.spent < budget:
        promotions = ladder.promotions()
        if promotions:
            candidate, rung = promotions[0]
            values = table.lookup(hashes[candidate], rung)
            ladder.record(candidate, rung, None if values is None else [values[o] for o in OBJECTIVES])
            if values is not None:
                strategy.update(hashes[candidate], values, rung)
            curve.charge(hashes[candidate], rung, run_cost(rung, continued=True), values)
            continue
        proposals = strategy.ask(1)
        if not proposals:
            break
        h = proposals[0].layout.content_hash
        hashes.append(h)
        values = table.lookup(h, 0)
        strategy.tell(h, values)
        ladder.record(len(hashes) - 1, 0, None if values is None else [values[o] for o in OBJECTIVES])
        curve.charge(h, 0, run_cost(0, continued=False), values)
    return curve


def replay_single_fidelity(
    name: str, options: dict, seed: int, table: RungTable, hv_space: HypervolumeSpace, budget: int
) -> Curve:
    """Every candidate trained at the top rung, one at a time, until `budget` steps are spent."""
    strategy = _strategy(name, options, seed)
    curve = Curve(HypervolumeTracker(hv_space))
    while curve.spent < budget:
        proposals = strategy.ask(1)
        if not proposals:
            break
        h = proposals[0].layout.content_hash
        values = table.lookup(h, TOP)
        strategy.tell(h, values)
        curve.charge(h, TOP, run_cost(TOP, continued=False), values)
    return curve


def space_layouts() -> list[Layout]:
    """The benchmark space's distinct layouts, in enumeration order (MOASHA's categorical)."""
    space = benchmark_space()
    seen: dict[str, Layout] = {}
    for genome in space.enumerate():
        layout = space.to_layout(genome)
        seen.setdefault(layout.content_hash, layout)
    return list(seen.values())


def position_priority():
    """Syne Tune's non-dominated sort as a per-trial priority: each trial's position in the sorted order.

    MOASHA ranks a rung's results by `MOPriority(objectives)`, read as one priority per trial (lower is
    better); 0.16.0's `NonDominatedPriority` returns the sort's order instead (the trial indices, best first),
    so a new trial's "priority" is the index of whichever trial sorts last, not its own place. This priority
    returns the places (the inverse permutation), everything else being Syne Tune's."""
    import numpy as np
    from syne_tune.optimizer.schedulers.multiobjective.multiobjective_priority import MOPriority
    from syne_tune.optimizer.schedulers.multiobjective.non_dominated_priority import nondominated_sort

    class PositionPriority(MOPriority):
        def priority_unsafe(self, objectives: np.ndarray) -> np.ndarray:
            order = np.asarray(nondominated_sort(objectives, dim=0))
            places = np.empty(len(order), dtype=int)
            places[order] = np.arange(len(order))
            return places

    return PositionPriority()


def make_moasha(hashes: Sequence[str], seed: int, places: bool = False, eta: int = FIDELITY.eta):
    """MOASHA over a categorical of the given layout hashes: grace 25 steps, reduction factor `eta`, max 400,
    both objectives minimized, one bracket (asynchronous successive halving, stopping rule); its default
    non-dominated priority, or (`places`) `position_priority()`."""
    from syne_tune.config_space import choice
    from syne_tune.optimizer.schedulers.multiobjective.moasha import MOASHA

    return MOASHA(
        config_space={"layout": choice(list(hashes))},
        metrics=list(OBJECTIVES),
        do_minimize=True,
        time_attr="steps",
        multiobjective_priority=position_priority() if places else None,
        max_t=FIDELITY.rungs[-1],
        grace_period=FIDELITY.rungs[0],
        reduction_factor=eta,
        random_seed=seed,
    )


def moasha_milestones(eta: int = FIDELITY.eta) -> list[int]:
    """The steps at which MOASHA ranks a trial's result (below max_t, where a trial ends)."""
    bracket = make_moasha(["layout"], 0, eta=eta).brackets[0]
    return sorted(level for level, _ in bracket.rungs if level < FIDELITY.rungs[-1])


def stop_rates(places: bool, trials: int = 200, seed: int = 0) -> tuple[float, float]:
    """How often MOASHA's rung stops a new result that dominates, and one dominated by, every result
    recorded so far (3-29 uniform random points): successive halving should stop the second, never the
    first."""
    import numpy as np
    from syne_tune.optimizer.schedulers.asha import Bracket
    from syne_tune.optimizer.schedulers.multiobjective.multiobjective_priority import NonDominatedPriority

    rng = np.random.RandomState(seed)
    stopped = {"dominating": 0, "dominated": 0}
    for _ in range(trials):
        recorded = rng.uniform(size=(int(rng.randint(3, 30)), 2))
        for case, new in (("dominating", (-1.0, -1.0)), ("dominated", (2.0, 2.0))):
            bracket = Bracket(1, 9, 3, 0, position_priority() if places else NonDominatedPriority())
            for i, point in enumerate(recorded):
                bracket.on_result(i, 1, dict(zip(OBJECTIVES, point)))
            stopped[case] += bracket.on_result(-1, 1, dict(zip(OBJECTIVES, new))) == "STOP"
    return stopped["dominating"] / trials, stopped["dominated"] / trials


def replay_moasha(
    seed: int,
    table: RungTable,
    hv_space: HypervolumeSpace,
    budget: int,
    hashes: Sequence[str] | None = None,
    places: bool = False,
    eta: int = FIDELITY.eta,
) -> Curve:
    """MOASHA with one worker: each suggested trial trains rung by rung (continued) until the scheduler
    stops it or it reaches 400 steps. Its suggestions are uniform draws from the categorical; a layout drawn
    again is redrawn (the strategies never propose a layout twice, and a service reuses a trained result)."""
    import numpy as np
    from syne_tune.backend.trial_status import Trial
    from syne_tune.optimizer.scheduler import SchedulerDecision

    hashes = list(hashes) if hashes is not None else [lo.content_hash for lo in space_layouts()]
    # MOASHA samples the config space with numpy's global generator (Domain.sample without random_state).
    np.random.seed(seed)
    scheduler = make_moasha(hashes, seed, places, eta)
    curve = Curve(HypervolumeTracker(hv_space))
    tried: set[str] = set()
    while curve.spent < budget and len(tried) < len(set(hashes)):
        h = scheduler.suggest().config["layout"]
        if h in tried:
            continue
        tried.add(h)
        trial = Trial(trial_id=len(tried) - 1, config={"layout": h}, creation_time=datetime.datetime.now())
        scheduler.on_trial_add(trial)
        for rung, steps in enumerate(FIDELITY.rungs):
            values = table.lookup(h, rung)
            curve.charge(h, rung, run_cost(rung, continued=rung > 0), values)
            if values is None:
                scheduler.on_trial_remove(trial)
                break
            decision = scheduler.on_trial_result(trial, {"steps": steps, **values})
            if decision == SchedulerDecision.STOP or curve.spent >= budget:
                break
    return curve

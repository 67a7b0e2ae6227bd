"""Aging (regularized) evolution: `pareto-aging` (the default) and `latency-target` (the paper's formulation).

Both keep a population in order of arrival. The first `population_size` proposals are the initial population:
the given `initial` layouts (presets, or an earlier search's Pareto front), then random ones. After that, each
child comes from a tournament: `sample_size` members drawn at random, the best one is the parent, and ONE
one-factor mutation of it (`SearchSpace.mutate_layout`: in the grammar when the parent decodes, at operator
level otherwise) is the child; a child already in the population, already evaluated or pending, or violating a
constraint checkable before evaluation, is drawn again. Every told result joins the population and, once the
population is full, pushes out the oldest member that is not on the population's own Pareto front (the oldest
of all when every member is on it: `protect_front=False` gives plain aging); failed results (told None) are
dropped. Protecting the front was measured on the search-efficiency benchmark (benchmarks/results/
search_efficiency.md): with plain aging, a 40-evaluation budget lost front members to age before their
children were drawn.

- `pareto-aging`: the best sampled member has the lowest Pareto rank on the objectives within the population;
  ties within a front are broken by the member's exclusive **hypervolume contribution** to that front
  (`selection="hypervolume"`, the default: SMS-EMOA's criterion, computed with moocore in the space normalized
  by the population's own objective ranges, reference point 1.1), or by NSGA-II's crowding distance
  (`selection="crowding"`, the rule before). Crowding gives both extremes of a front infinite distance, so the
  tournament kept picking the two ends (the smallest and the largest model) and rarely the members where the
  front bends, which is where the hypervolume — what the search is judged on — is won; the contribution is the
  size of the area only that member holds. Members violating a constraint rank after every feasible one, by
  their violation.
  The mutation kind (operator, ratio, FFN count, block counts, width) is drawn with **adaptive weights**
  (`adapt_mutations=True`, the default, for parents in the grammar): each kind's weight is its smoothed
  success rate, (1 + successes) / (2 + trials), over the last `mutation_window` children told, where a success
  is a child that is feasible and not dominated by (nor equal to) any feasible population member when it
  arrives; the weights are mixed with the uniform mix (`mutation_exploration`, share 0.2), so no applicable
  kind ever drops out. With `adapt_mutations=False` every kind is equally likely (the paper's rule).
- `latency-target`: one latency target (ms); every proposal's width is the largest hidden size whose predicted
  latency meets the target (the latency table's rule), so mutations change the pattern, not the width; the
  parent is the sampled member with the lowest first objective (val_bpb) among those meeting the target
  (measured latency when told), or the least violating one when none does. Mutation kinds stay uniform.
"""

from __future__ import annotations

import math
from typing import Any

from search.layout import Layout
from search.pareto import dominates, pareto_front, rank_and_contribution, rank_and_crowding
from search.space import MUTATION_KINDS, SpaceError
from search.strategies.base import Constraints, Proposal, Strategy, as_constraints

_CHILD_TRIES = 200
SELECTIONS = ("hypervolume", "crowding")


class ParetoAgingStrategy(Strategy):
    name = "pareto-aging"
    uses_population = True
    uses_tournament = True

    def __init__(
        self,
        space,
        *,
        protect_front: bool = True,
        selection: str = "hypervolume",
        adapt_mutations: bool = True,
        mutation_window: int = 100,
        mutation_exploration: float = 0.2,
        **kw: Any,
    ):
        super().__init__(space, **kw)
        self.protect_front = bool(protect_front)
        if selection not in SELECTIONS:
            raise ValueError(
                f"{self.name}: selection must be one of {', '.join(SELECTIONS)}, not {selection!r}"
            )
        self.selection = selection
        self.adapt_mutations = bool(adapt_mutations)
        if isinstance(mutation_window, bool) or not isinstance(mutation_window, int) or mutation_window < 1:
            raise ValueError(
                f"{self.name}: mutation_window must be a positive integer, got {mutation_window!r}"
            )
        self.mutation_window = mutation_window
        if not (isinstance(mutation_exploration, (int, float)) and 0.0 <= mutation_exploration <= 1.0):
            raise ValueError(
                f"{self.name}: mutation_exploration must be between 0 and 1, got {mutation_exploration!r}"
            )
        self.mutation_exploration = float(mutation_exploration)
        # The grammar's mutation kinds this space can apply at all (e.g. no "ffn" with a single FFN count).
        self.mutation_kinds = tuple(
            k
            for k in MUTATION_KINDS
            if {
                "operator": len(space.mixers) > 1,
                "ratio": len(space.ratios) > 1,
                "ffn": len(space.ffn_counts) > 1,
                "blocks": True,
                "width": len(space.widths) > 1,
            }[k]
        )
        self.mutation_outcomes: list[
            list
        ] = []  # [kind, 1 = success / 0], the last `mutation_window` children
        self.population: list[str] = []  # hashes, oldest first
        self.n_initial_issued = 0
        self.initial_queue: list[dict] = [layout.to_dict() for layout in self.initial]
        self._selection: dict[str, tuple] | None = None  # hash -> selection key (cached per population)

    # ---- proposals -----------------------------------------------------------------------------------------
    def _propose(self) -> Proposal | None:
        if self.n_initial_issued < self.population_size:
            layout = self._next_initial()
            if layout is not None:
                self.n_initial_issued += 1
                return Proposal(layout, None, None, 0)
        if not self.population:  # nothing told yet (or everything failed): random layouts until results come
            layout = self.random_new_layout(self._transform)
            return None if layout is None else Proposal(layout, None, None, 0)
        for _ in range(_CHILD_TRIES):
            parent_hash = self._tournament()
            parent = self.layout_of(parent_hash)
            try:
                child, mutation = self._mutate(parent)
            except SpaceError:
                continue
            if child is None or self.seen(child.content_hash) or not self.feasible(child):
                continue
            generation = int(self.records[parent_hash]["generation"]) + 1
            return Proposal(child, parent_hash, mutation.as_dict(), generation)
        self._note("mutation kept producing known or infeasible layouts: proposed a random layout instead")
        layout = self.random_new_layout(self._transform)
        return None if layout is None else Proposal(layout, None, None, 0)

    def _next_initial(self) -> Layout | None:
        while self.initial_queue:
            layout = Layout.from_dict(self.initial_queue.pop(0))
            transformed = self._transform(layout)
            label = layout.name or layout.compact()
            if transformed is None:
                self._note(f"initial layout {label} skipped: no width meets the latency target")
            elif self.seen(transformed.content_hash):
                self._note(f"initial layout {label} skipped: already evaluated or pending")
            elif not self.feasible(transformed):
                self._note(f"initial layout {label} skipped: violates the constraints")
            else:
                return transformed
        return self.random_new_layout(self._transform)

    def _transform(self, layout: Layout) -> Layout | None:
        return layout

    def _mutate(self, parent: Layout):
        if not self.adapt_mutations:
            return self.space.mutate_layout(parent, self.rng)
        genome = self.space.decode(parent)
        if genome is None:  # outside the grammar: operator-level mutations, uniformly
            return self.space.mutate_layout(parent, self.rng)
        weights = self.mutation_weights()
        for _ in range(50):
            kinds = [k for k in self.mutation_kinds if weights[k] > 0]
            while kinds:
                kind = self.rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
                try:
                    child, mutation = self.space.mutate(genome, self.rng, (kind,))
                except SpaceError:  # this kind cannot change this genome: draw another
                    kinds.remove(kind)
                    continue
                child_layout = self.space.to_layout(child)
                if child_layout != parent:  # different genomes can spell the same sequence
                    return child_layout, mutation
                break
            else:
                break
        return self.space.mutate_layout(parent, self.rng)

    def mutation_weights(self) -> dict[str, float]:
        """The probability of each applicable mutation kind: (1 - exploration) x its smoothed success rate
        over the recent children (normalized) + exploration x uniform; uniform when `adapt_mutations` is
        off."""
        kinds = self.mutation_kinds
        uniform = {k: 1.0 / len(kinds) for k in kinds}
        if not self.adapt_mutations:
            return uniform
        trials = dict.fromkeys(kinds, 0)
        wins = dict.fromkeys(kinds, 0)
        for kind, success in self.mutation_outcomes:
            if kind in trials:
                trials[kind] += 1
                wins[kind] += int(success)
        rate = {k: (1 + wins[k]) / (2 + trials[k]) for k in kinds}
        total = sum(rate.values())
        e = self.mutation_exploration
        return {k: (1 - e) * rate[k] / total + e * uniform[k] for k in kinds}

    # ---- selection -----------------------------------------------------------------------------------------
    def _tournament(self) -> str:
        sample = self.rng.sample(self.population, min(self.sample_size, len(self.population)))
        keys = self._selection_keys()
        return min(sample, key=lambda h: keys[h])

    def _selection_keys(self) -> dict[str, tuple]:
        if self._selection is None:
            violations = {
                h: self.violation(self.layout_of(h), self.records[h]["objectives"]) for h in self.population
            }
            feasible = [h for h in self.population if violations[h] == 0.0]
            rank_and_tiebreak = (
                rank_and_contribution if self.selection == "hypervolume" else rank_and_crowding
            )
            ranks, tiebreak = rank_and_tiebreak([self.objective_values(h) for h in feasible])
            keys = {h: (0, r, -c, 0.0) for h, r, c in zip(feasible, ranks, tiebreak)}
            for h in self.population:
                if h not in keys:
                    keys[h] = (1, 0, 0.0, violations[h])
            self._selection = keys
        return self._selection

    # ---- results -------------------------------------------------------------------------------------------
    def _on_result(self, proposal: Proposal, values: dict[str, float] | None) -> None:
        kind = (proposal.mutation or {}).get("kind")
        if self.adapt_mutations and kind in self.mutation_kinds:
            self.mutation_outcomes.append([kind, int(self._improves_population(proposal.hash, values))])
            del self.mutation_outcomes[: -self.mutation_window]
        if values is None:
            return
        self.population.append(proposal.hash)
        while len(self.population) > self.population_size:
            self.population.pop(self._eviction_index())
        self._selection = None

    def _on_update(self, layout_hash: str) -> None:
        self._selection = None  # the selection keys were ranked on the old values

    def _improves_population(self, layout_hash: str, values: dict[str, float] | None) -> bool:
        """A success for the mutation mix: the child is feasible and no feasible member dominates or equals
        it."""
        if values is None or self.violation(self.layout_of(layout_hash), values) != 0.0:
            return False
        point = tuple(values[o] for o in self.objectives)
        for h in self.population:
            other = self.objective_values(h)
            if (other == point or dominates(other, point)) and self.violation(
                self.layout_of(h), self.records[h]["objectives"]
            ) == 0.0:
                return False
        return True

    def _eviction_index(self) -> int:
        """The oldest member, skipping members on the population's Pareto front when `protect_front`."""
        if not self.protect_front:
            return 0
        front = set(pareto_front([self.objective_values(h) for h in self.population]))
        return next((i for i in range(len(self.population)) if i not in front), 0)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "population": list(self.population),
            "ages": [self.n_told - 1 - int(self.records[h]["told"]) for h in self.population],
            "n_initial_issued": self.n_initial_issued,
            "initial_queue": list(self.initial_queue),
            "mutation_outcomes": [list(o) for o in self.mutation_outcomes],
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.population = list(state["population"])
        self.n_initial_issued = int(state["n_initial_issued"])
        self.initial_queue = list(state["initial_queue"])
        # States saved before the adaptive mutation mix have no outcomes: the mix starts uniform.
        self.mutation_outcomes = [[str(k), int(v)] for k, v in state.get("mutation_outcomes", [])]
        self._selection = None


class LatencyTargetStrategy(ParetoAgingStrategy):
    name = "latency-target"

    def __init__(
        self,
        space,
        *,
        target_ms: float | None = None,
        latency_table: Any = None,
        constraints: Constraints | None = None,
        **kw: Any,
    ):
        if latency_table is None:
            raise ValueError(
                "latency-target needs a latency_table (its width rule picks the largest hidden size "
                "whose predicted latency meets the target)"
            )
        constraints = as_constraints(constraints)
        target = target_ms if target_ms is not None else constraints.max_decode_ms
        if target is None or not target > 0:
            raise ValueError(
                "latency-target needs a positive latency target: target_ms=..., or constraints.max_decode_ms"
            )
        if constraints.max_decode_ms != target:
            constraints = Constraints(**{**constraints.to_dict(), "max_decode_ms": float(target)})
        self.target_ms = float(target)
        if kw.pop("adapt_mutations", False):
            raise ValueError(
                "latency-target: adapt_mutations is not supported (its mutation kinds stay uniform, "
                "as in the paper)"
            )
        super().__init__(
            space, latency_table=latency_table, constraints=constraints, adapt_mutations=False, **kw
        )
        self._kinds = tuple(k for k in MUTATION_KINDS if k != "width")

    def _transform(self, layout: Layout) -> Layout | None:
        """The width rule: the largest width of the space whose predicted latency meets the target."""
        width = self.latency_table.largest_width_meeting(
            layout, self.target_ms, self.space.widths, self.context, self.space
        )
        if width is None:
            return None
        fitted = layout.replace(**self.space._dims_for(width))
        return layout if fitted == layout else layout.replace(**self.space._dims_for(width), name=None)

    def _mutate(self, parent: Layout):
        genome = self.space.decode(parent)
        for _ in range(50):
            if genome is not None:
                child_genome, mutation = self.space.mutate(genome, self.rng, self._kinds)
                child = self.space.to_layout(child_genome)
            else:
                child, mutation = self.space.mutate_layout(parent, self.rng)
                if mutation.kind == "width":
                    continue
            child = self._transform(child)
            if child is not None and child != parent:
                return child, mutation
        return None, None

    def _selection_keys(self) -> dict[str, tuple]:
        if self._selection is None:
            keys = {}
            for h in self.population:
                v = self.violation(self.layout_of(h), self.records[h]["objectives"])
                quality = self.objective_values(h)[0]
                keys[h] = (0, quality) if v == 0.0 else (1, v)
            self._selection = keys
        return self._selection

    def _check_constraints_satisfiable(self) -> None:
        try:
            super()._check_constraints_satisfiable()
        except ValueError as exc:
            raise ValueError(
                f"latency-target: the target of {self.target_ms} ms cannot be met — {exc}"
            ) from None

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "target_ms": self.target_ms}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if not math.isclose(float(state.get("target_ms", self.target_ms)), self.target_ms):
            raise ValueError(
                f"latency-target: state target {state.get('target_ms')} ms differs from {self.target_ms} ms"
            )
        super()._load_extra_state(state)

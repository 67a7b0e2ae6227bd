"""The ask/tell interface every search strategy implements, and the machinery they share.

A strategy proposes layouts (`ask(n)`: a cycle of n proposals, to keep every worker busy) and learns from
their results (`tell(hash, objectives)`; `None` = the evaluation failed: a failed layout never enters a
population or a front). It never proposes a layout (by content hash) it has already been told about or that is
still pending. Its whole state is a JSON-serializable dict (`state_dict`), so a search resumes from its
database row: given the same seed and the same sequence of tells, a restored strategy proposes exactly what
the uninterrupted one would have.

Objectives are minimized (negate one to maximize it). Constraints (`Constraints`) are checked before a layout
is proposed where they can be: the analytic parameter count, the latency table's prediction (when a table is
given) and the memory estimate; a told result's measured `decode_ms` (or `memory_bytes`) replaces the
prediction afterwards.

No torch here: layouts, the space, the analytic parameter count and the (pure Python) latency table only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from search.evaluation import Float, Int
from search.layout import Layout
from search.operators import OPERATORS
from search.params import count_parameters
from search.pareto import pareto_front as _front_indices
from search.space import Genome, SearchSpace, Stage

STATE_VERSION = 1
_MAX_NOTES = 100


@dataclass
class Proposal:
    layout: Layout
    parent_hash: str | None
    mutation: dict | None
    generation: int

    @property
    def hash(self) -> str:
        return self.layout.content_hash

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.to_dict(),
            "hash": self.hash,
            "parent_hash": self.parent_hash,
            "mutation": self.mutation,
            "generation": self.generation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Proposal:
        return cls(
            Layout.from_dict(data["layout"]),
            data.get("parent_hash"),
            data.get("mutation"),
            int(data.get("generation", 0)),
        )


class Constraints(BaseModel):
    """Budgets a candidate must meet. `max_decode_ms`: ms/token at batch 1 after a `context`-token prompt
    (measured when told, else the latency table's prediction); `max_params`: the analytic count at
    `vocab_size`; `max_memory`: bytes of weights + decode cache at `context` (`estimate_memory_bytes`, or a
    told `memory_bytes`). `context`: None = the latency table's largest measured context (1024 without
    one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_decode_ms: Float | None = Field(None, gt=0, description="ms/token at batch 1")
    max_params: Int | None = Field(None, gt=0, description="parameters (analytic count)")
    max_memory: Int | None = Field(None, gt=0, description="bytes of weights + decode cache at `context`")
    vocab_size: Int = Field(257, ge=1, le=1 << 20, description="vocabulary the counts assume")
    context: Int | None = Field(
        None, ge=1, le=1 << 20, description="tokens of context for latency and memory"
    )
    element_bytes: Int = Field(
        2, ge=1, le=8, description="bytes per weight / cache element (memory estimate)"
    )

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_decode_ms, self.max_params, self.max_memory))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Constraints:
        return as_constraints(dict(data or {}))


def as_constraints(value: Any) -> Constraints:
    """A Constraints from None, a Constraints, or a mapping of its fields (e.g. a config's model_dump())."""
    if value is None:
        return Constraints()
    if isinstance(value, Constraints):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(Constraints.model_fields))
        if unknown:
            raise ValueError(
                f"unknown constraint(s) {', '.join(unknown)} (known: {', '.join(Constraints.model_fields)})"
            )
        try:
            return Constraints(**value)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"constraints.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    raise ValueError(f"constraints must be a Constraints or a dict, not {type(value).__name__}")


def estimate_memory_bytes(layout: Layout, vocab_size: int, context: int, element_bytes: int = 2) -> int:
    """Weights (analytic count) + the decode cache of one sequence after `context` tokens: K and V per full
    attention layer (a window for sliding-window attention), the recurrent state and conv buffers for Mamba2
    and the DeltaNets."""
    elements = count_parameters(layout, vocab_size).total
    for op in layout.operators:
        cache = OPERATORS[op].cache
        if cache == "kv":
            elements += 2 * layout.n_kv_heads * layout.head_dim * context
        elif cache == "window":
            elements += 2 * layout.n_kv_heads * layout.head_dim * min(context, layout.swa_window)
        elif op == "mamba2":
            d_inner = layout.mamba_expand * layout.d_model
            elements += d_inner * layout.mamba_d_state + (
                d_inner + 2 * layout.mamba_groups * layout.mamba_d_state
            ) * (layout.conv_size - 1)
        elif cache == "state":
            inner = layout.n_heads * layout.head_dim
            elements += layout.n_heads * layout.head_dim * layout.head_dim + 3 * inner * (
                layout.conv_size - 1
            )
    return elements * element_bytes


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: Sequence) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


class Strategy:
    """Base class: bookkeeping of pending and told layouts, constraints, notes, RNG, (de)serialization.
    Subclasses implement `_propose()` (one new Proposal or None when the space is exhausted) and may extend
    `_on_result`, `_extra_state` / `_load_extra_state`."""

    name = "base"
    uses_population = False  # population_size matters (checked against the space's size)
    uses_tournament = False  # sample_size matters
    default_population_size = 20
    default_sample_size = 5

    def __init__(
        self,
        space: SearchSpace,
        *,
        objectives: Sequence[str] = ("val_bpb", "decode_ms"),
        seed: int = 0,
        population_size: int | None = None,
        sample_size: int | None = None,
        initial: Iterable[Layout] | None = None,
        constraints: Constraints | None = None,
        latency_table: Any = None,
    ):
        if not isinstance(space, SearchSpace):
            raise ValueError(f"{self.name}: space must be a SearchSpace, not {type(space).__name__}")
        self.space = space
        self.objectives = tuple(objectives)
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"{self.name}: objectives must be non-empty and distinct, got {self.objectives}")
        self.seed = int(seed)
        self.population_size = int(
            population_size if population_size is not None else self.default_population_size
        )
        self.sample_size = int(
            sample_size if sample_size is not None else min(self.default_sample_size, self.population_size)
        )
        self.constraints = as_constraints(constraints)
        self.latency_table = latency_table
        self.initial = [layout for layout in (initial or [])]
        for index, layout in enumerate(self.initial):
            if not isinstance(layout, Layout):
                raise ValueError(f"{self.name}: initial[{index}] is not a Layout")
        if self.uses_population:
            if self.population_size < 2:
                raise ValueError(
                    f"{self.name}: population_size must be at least 2, got {self.population_size}"
                )
            size = space.size()
            if self.population_size > size:
                raise ValueError(
                    f"{self.name}: population_size {self.population_size} is larger than the search "
                    f"space ({size} genomes)"
                )
            if self.uses_tournament and not 1 <= self.sample_size <= self.population_size:
                raise ValueError(
                    f"{self.name}: sample_size must be between 1 and population_size "
                    f"({self.population_size}), got {self.sample_size}"
                )
        self.context = self._resolve_context()
        self.rng = random.Random(self.seed)
        self.records: dict[str, dict[str, Any]] = {}  # hash -> told result, in tell order
        self.pending: dict[str, Proposal] = {}  # hash -> proposal, in ask order
        self.n_asked = 0
        self.n_told = 0
        self.notes: list[str] = []
        self._layouts: dict[str, Layout] = {}
        self._predicted: dict[str, float] = {}
        self._static: dict[str, float] = {}
        self._enumerated: list[Layout] | None = None
        if self.constraints.active:
            self._check_constraints_satisfiable()

    # ---- the interface -----------------------------------------------------------------------------------
    def ask(self, n: int) -> list[Proposal]:
        """Up to `n` new proposals (fewer only when the space holds no more new feasible layouts)."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        out = []
        for _ in range(n):
            proposal = self._propose()
            if proposal is None:
                self._note("no new feasible layout left to propose")
                break
            h = proposal.hash
            assert h not in self.pending and h not in self.records, "a strategy proposed a known layout"
            self.pending[h] = proposal
            self._layouts[h] = proposal.layout
            self.n_asked += 1
            out.append(proposal)
        return out

    def tell(self, layout_hash: str, objectives: dict[str, float] | None) -> None:
        """The result of a pending proposal; None (or a non-finite objective) marks it failed."""
        if layout_hash not in self.pending:
            known = "already told" if layout_hash in self.records else "never proposed"
            raise ValueError(f"{self.name}: layout {layout_hash[:12]} is not pending ({known})")
        values: dict[str, float] | None = None
        if objectives is not None:
            missing = [o for o in self.objectives if o not in objectives]
            if missing:
                raise ValueError(
                    f"{self.name}: result lacks objective(s) {', '.join(missing)} "
                    f"(objectives: {', '.join(self.objectives)})"
                )
            values = {}
            for key, value in objectives.items():
                try:
                    values[str(key)] = float(value)
                except (TypeError, ValueError):
                    if key in self.objectives:
                        raise ValueError(
                            f"{self.name}: objective {key!r} must be a number, not {value!r}"
                        ) from None
            if not all(math.isfinite(values[o]) for o in self.objectives):
                values = None
        proposal = self.pending.pop(layout_hash)
        self.records[layout_hash] = {
            "layout": proposal.layout.to_dict(),
            "objectives": values,
            "generation": proposal.generation,
            "parent_hash": proposal.parent_hash,
            "told": self.n_told,
        }
        self.n_told += 1
        self._on_result(proposal, values)

    def update(self, layout_hash: str, objectives: dict[str, float], rung: int) -> None:
        """A higher-fidelity result of a told layout (a multi-fidelity search's promotion, trained at `rung`):
        it replaces the told values wherever the strategy reads them from now on (selection, fronts)."""
        record = self.records.get(layout_hash)
        if record is None or record["objectives"] is None:
            state = "pending" if layout_hash in self.pending else "failed" if record else "never proposed"
            raise ValueError(f"{self.name}: layout {layout_hash[:12]} has no told result to update ({state})")
        missing = [o for o in self.objectives if o not in objectives]
        if missing:
            raise ValueError(f"{self.name}: update lacks objective(s) {', '.join(missing)}")
        values = {str(k): float(v) for k, v in objectives.items()}
        if not all(math.isfinite(values[o]) for o in self.objectives):
            raise ValueError(f"{self.name}: update of {layout_hash[:12]} has a non-finite objective")
        record["objectives"], record["rung"] = values, int(rung)
        self._on_update(layout_hash)

    def rung_of(self, layout_hash: str) -> int:
        """The fidelity rung of a told layout's values (0: a single-fidelity search's only one)."""
        return int(self.records[layout_hash].get("rung", 0))

    def state_dict(self) -> dict[str, Any]:
        state = {
            "strategy": self.name,
            "version": STATE_VERSION,
            "seed": self.seed,
            "objectives": list(self.objectives),
            "population_size": self.population_size,
            "sample_size": self.sample_size,
            "constraints": self.constraints.to_dict(),
            "rng": rng_state(self.rng),
            "n_asked": self.n_asked,
            "n_told": self.n_told,
            "pending": [p.to_dict() for p in self.pending.values()],
            "records": [{"hash": h, **r} for h, r in self.records.items()],
            "notes": list(self.notes),
        }
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise ValueError(
                f"state of strategy {state.get('strategy')!r} cannot be loaded into {self.name!r}"
            )
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.name}: state version {state.get('version')!r} is not {STATE_VERSION}")
        if tuple(state["objectives"]) != self.objectives:
            raise ValueError(
                f"{self.name}: state objectives {state['objectives']} differ from {list(self.objectives)}"
            )
        set_rng_state(self.rng, state["rng"])
        self.n_asked, self.n_told = int(state["n_asked"]), int(state["n_told"])
        self.pending = {}
        self._layouts = {}
        for item in state["pending"]:
            proposal = Proposal.from_dict(item)
            self.pending[proposal.hash] = proposal
            self._layouts[proposal.hash] = proposal.layout
        self.records = {}
        for item in state["records"]:
            record = {k: v for k, v in item.items() if k != "hash"}
            self.records[item["hash"]] = record
        self.notes = list(state.get("notes", []))
        self._load_extra_state(state)

    # ---- hooks -------------------------------------------------------------------------------------------
    def _propose(self) -> Proposal | None:
        raise NotImplementedError

    def _on_result(self, proposal: Proposal, values: dict[str, float] | None) -> None:
        pass

    def _on_update(self, layout_hash: str) -> None:
        """A told layout's values changed (`update`): drop whatever was computed from the old ones."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- shared helpers ----------------------------------------------------------------------------------
    def seen(self, layout_hash: str) -> bool:
        return layout_hash in self.records or layout_hash in self.pending

    def layout_of(self, layout_hash: str) -> Layout:
        layout = self._layouts.get(layout_hash)
        if layout is None:
            layout = self._layouts[layout_hash] = Layout.from_dict(self.records[layout_hash]["layout"])
        return layout

    def objective_values(self, layout_hash: str) -> tuple[float, ...] | None:
        values = self.records[layout_hash]["objectives"]
        return None if values is None else tuple(values[o] for o in self.objectives)

    def pareto_front(self) -> list[str]:
        """Hashes of the non-dominated told results among those meeting the constraints (measured values where
        told). Failed evaluations never enter it. Its layouts (`layout_of`) can seed a later search."""
        ok = [
            h
            for h, r in self.records.items()
            if r["objectives"] is not None and self.violation(self.layout_of(h), r["objectives"]) == 0.0
        ]
        return [ok[i] for i in _front_indices([self.objective_values(h) for h in ok])]

    def _note(self, text: str) -> None:
        if text not in self.notes and len(self.notes) < _MAX_NOTES:
            self.notes.append(text)

    def _resolve_context(self) -> int:
        if self.constraints.context is not None:
            return int(self.constraints.context)
        if self.latency_table is not None:
            contexts = self.latency_table.contexts()
            if contexts:
                return int(max(contexts))
        return 1024

    def predicted_decode_ms(self, layout: Layout) -> float:
        """The latency table's prediction (ValueError without a table)."""
        if self.latency_table is None:
            raise ValueError(f"{self.name}: no latency table to predict decode latency with")
        h = layout.content_hash
        if h not in self._predicted:
            self._predicted[h] = float(self.latency_table.predict_decode_ms(layout, self.context))
        return self._predicted[h]

    def violation(self, layout: Layout, measured: dict[str, float] | None = None) -> float:
        """Total relative constraint violation (0 = feasible): sum of max(0, value / budget - 1). Measured
        `decode_ms` / `memory_bytes` replace the prediction / estimate when given."""
        c = self.constraints
        if not c.active:
            return 0.0
        measured = measured or {}
        h = layout.content_hash
        terms = self._static.get(h)
        if terms is None:
            terms = self._static[h] = self._static_terms(layout)
        total = terms["params"]
        if c.max_decode_ms is not None:
            ms = measured.get("decode_ms")
            total += terms["decode_ms"] if ms is None else max(0.0, ms / c.max_decode_ms - 1.0)
        if c.max_memory is not None:
            memory = measured.get("memory_bytes")
            total += terms["memory"] if memory is None else max(0.0, memory / c.max_memory - 1.0)
        return total

    def _static_terms(self, layout: Layout) -> dict[str, float]:
        c = self.constraints
        terms = {"params": 0.0, "decode_ms": 0.0, "memory": 0.0}
        if c.max_params is not None:
            terms["params"] = max(0.0, count_parameters(layout, c.vocab_size).total / c.max_params - 1.0)
        if c.max_decode_ms is not None and self.latency_table is not None:
            try:
                terms["decode_ms"] = max(0.0, self.predicted_decode_ms(layout) / c.max_decode_ms - 1.0)
            except ValueError as exc:
                self._note(
                    f"latency table cannot predict {layout.compact()} at d_model={layout.d_model}: {exc}"
                )
                terms["decode_ms"] = math.inf
        if c.max_memory is not None:
            memory = estimate_memory_bytes(layout, c.vocab_size, self.context, c.element_bytes)
            terms["memory"] = max(0.0, memory / c.max_memory - 1.0)
        return terms

    def feasible(self, layout: Layout) -> bool:
        """Whether the layout meets every constraint checkable before evaluation."""
        return self.violation(layout) == 0.0

    def cheapest_layouts(self) -> list[Layout]:
        """The grammar's cheapest layouts: every stage one block of one block type, at the smallest width.
        Costs (parameters, predicted latency, memory) add up over operators, so when none of these meets a
        budget, no layout of the space does."""
        width = min(self.space.widths)
        out = []
        for block in self.space.block_types:
            genome = Genome(tuple(Stage(block, 1) for _ in range(self.space.n_stages)), width)
            if genome.n_operators <= self.space.max_operators:
                out.append(self.space.to_layout(genome))
        return out

    def _check_constraints_satisfiable(self) -> None:
        candidates = self.cheapest_layouts() + list(self.initial)
        for layout in self.initial:  # the initial layouts at the smallest width too
            try:
                candidates.append(layout.replace(**self.space._dims_for(min(self.space.widths))))
            except ValueError:
                pass
        best, best_layout = math.inf, None
        for layout in candidates:
            v = self.violation(layout)
            if v == 0.0:
                return
            if v < best:
                best, best_layout = v, layout
        detail = ""
        if best_layout is not None:
            parts = []
            c = self.constraints
            if c.max_params is not None:
                parts.append(
                    f"{count_parameters(best_layout, c.vocab_size).total} parameters (budget {c.max_params})"
                )
            if c.max_decode_ms is not None and self.latency_table is not None:
                try:
                    parts.append(
                        f"{self.predicted_decode_ms(best_layout):.4g} ms predicted "
                        f"(budget {c.max_decode_ms} ms)"
                    )
                except ValueError as exc:
                    parts.append(f"latency not predictable: {exc}")
            if c.max_memory is not None:
                parts.append(
                    f"{estimate_memory_bytes(best_layout, c.vocab_size, self.context, c.element_bytes)} "
                    f"bytes (budget {c.max_memory})"
                )
            detail = (
                f"; the closest, {best_layout.compact()} at d_model={best_layout.d_model}, has "
                + ", ".join(parts)
            )
        raise ValueError(
            f"{self.name}: no layout of the space can meet the constraints (checked the cheapest "
            f"layout of every block type at the smallest width and the initial layouts){detail}"
        )

    def all_layouts(self) -> list[Layout]:
        """Every distinct layout of the space, in enumeration order (only for small spaces)."""
        if self._enumerated is None:
            if self.space.size() > 200_000:
                self._enumerated = []
            else:
                seen: dict[str, Layout] = {}
                for genome in self.space.enumerate():
                    layout = self.space.to_layout(genome)
                    seen.setdefault(layout.content_hash, layout)
                self._enumerated = list(seen.values())
        return self._enumerated

    def random_new_layout(self, transform=None, tries: int = 500) -> Layout | None:
        """A random feasible layout not yet seen: sampled from the space (after `transform`, e.g. the width
        rule; a transform returning None rejects the sample); when sampling keeps hitting known layouts, one
        drawn uniformly from the unseen feasible layouts of a small space; None when none is left."""
        for _ in range(tries):
            layout = self.space.sample_uniform_layout(self.rng)
            if transform is not None:
                layout = transform(layout)
                if layout is None:
                    continue
            if not self.seen(layout.content_hash) and self.feasible(layout):
                return layout
        options = []
        for layout in self.all_layouts():
            if transform is not None:
                layout = transform(layout)
                if layout is None:
                    continue
            if not self.seen(layout.content_hash) and self.feasible(layout):
                options.append(layout)
        options = list({layout.content_hash: layout for layout in options}.values())
        return self.rng.choice(options) if options else None

"""`nsga2`: Optuna's `NSGAIISampler` through its ask/tell interface — the baseline a user would reach for.

Encoding (the grammar only): per stage i, categorical parameters `s{i}_mixer_a`, `s{i}_mixer_b` (the space's
mixers), `s{i}_ratio` ("0:1", "1:1", ...), `s{i}_ffns` (FFNs per mixer) and `s{i}_blocks` (1 .. the most
blocks a stage can hold), and `width`. `mixer_b` is ignored at ratio 0:1. Decoded parameters that are not a
layout of the grammar (two equal mixers at a two-mixer ratio, more operators than the limit) or that violate a
constraint checkable before evaluation are told to Optuna as FAILED trials and the sampler is asked again; a
decoded layout that was already evaluated is told with its stored values (Optuna learns it again, nothing is
re-evaluated; such trials count in Optuna's generations as in a plain Optuna loop with a cache); one that is
pending is told FAILED. Initial layouts are enqueued (`enqueue_trial`) when they decode in the grammar and
skipped with a note in `state_dict()["notes"]` otherwise.

State: the Optuna study lives in memory only; our database is the source of truth. `state_dict()` holds every
trial in order (state, params, values, system_attrs — among them `NSGAIISampler:generation`, the
`constraints:<name>` values and `fixed_params` of enqueued trials —, user_attrs; a FAILED trial keeps only its
number and state, since nothing reads it), the parameter distributions once, the study's system_attrs (the
sampler's cached parent populations, `NSGAIISampler:parent:<gen>`, lists of trial ids), and the random states
of the sampler and of its inner RandomSampler. `load_state_dict()` rebuilds a fresh in-memory study with
`optuna.trial.create_trial(...)` + `study.add_trial` in the original order (so trial ids match the cached
parent lists), then restores the study attributes and the random states: a resumed study continues at its
generation, with the same next proposals as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

from search.layout import Layout
from search.space import SINGLE, BlockType, Genome, Stage
from search.strategies.base import Proposal, Strategy

_MAX_INTERNAL_TRIALS = 200  # Optuna trials per proposal before falling back to an enqueued random layout


def _ratio_label(ratio) -> str:
    return f"{ratio[0]}:{ratio[1]}"


class NSGA2Strategy(Strategy):
    name = "nsga2"
    uses_population = True

    def __init__(
        self,
        space,
        *,
        crossover_prob: float = 0.9,
        swapping_prob: float = 0.5,
        mutation_prob: float | None = None,
        **kw: Any,
    ):
        super().__init__(space, **kw)
        import optuna  # lazily: `search` imports no optimizer until a strategy needs it

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._optuna = optuna
        self._sampler_kw = dict(
            crossover_prob=crossover_prob, swapping_prob=swapping_prob, mutation_prob=mutation_prob
        )
        self.generation_key = optuna.samplers.NSGAIISampler._get_generation_key()
        self.distributions = self._make_distributions()
        self._new_study()
        self.trial_of: dict[str, int] = {}  # pending hash -> Optuna trial number
        self.initial_queue: list[dict] = []
        for layout in self.initial:
            genome = space.decode(layout)
            label = layout.name or layout.compact()
            if genome is None:
                self._note(
                    f"initial layout {label} skipped: outside the grammar (nsga2's categorical encoding "
                    f"covers the grammar only)"
                )
            else:
                self.initial_queue.append(self.encode(genome))
        self.n_invalid = 0
        self.n_duplicates = 0

    # ---- encoding ------------------------------------------------------------------------------------------
    def _make_distributions(self) -> dict:
        cat = self._optuna.distributions.CategoricalDistribution
        space = self.space
        min_size = min(b.size for b in space.block_types)
        max_blocks = max(1, (space.max_operators - (space.n_stages - 1) * min_size) // min_size)
        dists = {}
        for i in range(space.n_stages):
            dists[f"s{i}_mixer_a"] = cat(list(space.mixers))
            dists[f"s{i}_mixer_b"] = cat(list(space.mixers))
            dists[f"s{i}_ratio"] = cat([_ratio_label(r) for r in space.ratios])
            dists[f"s{i}_ffns"] = cat(list(space.ffn_counts))
            dists[f"s{i}_blocks"] = cat(list(range(1, max_blocks + 1)))
        dists["width"] = cat(list(space.widths))
        return dists

    def encode(self, genome: Genome) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for i, stage in enumerate(genome.stages):
            block = stage.block
            a = block.mixers[0]
            b = (
                block.mixers[1]
                if len(block.mixers) > 1
                else next((m for m in self.space.mixers if m != a), a)
            )
            params.update(
                {
                    f"s{i}_mixer_a": a,
                    f"s{i}_mixer_b": b,
                    f"s{i}_ratio": _ratio_label(block.ratio),
                    f"s{i}_ffns": block.ffns,
                    f"s{i}_blocks": stage.n_blocks,
                }
            )
        params["width"] = genome.d_model
        return params

    def decode_params(self, params: dict[str, Any]) -> Genome | None:
        """The genome these parameters spell, or None when they are not a layout of the grammar."""
        stages = []
        for i in range(self.space.n_stages):
            ratio = tuple(int(x) for x in str(params[f"s{i}_ratio"]).split(":"))
            a, b = params[f"s{i}_mixer_a"], params[f"s{i}_mixer_b"]
            if ratio == SINGLE:
                mixers = (a,)
            elif a == b:
                return None
            else:
                mixers = (a, b)
            block = BlockType(mixers, ratio, int(params[f"s{i}_ffns"]))
            stages.append(Stage(block, int(params[f"s{i}_blocks"])))
        genome = Genome(tuple(stages), int(params["width"]))
        return genome if genome.n_operators <= self.space.max_operators else None

    # ---- the Optuna study ----------------------------------------------------------------------------------
    def _new_study(self) -> None:
        optuna = self._optuna
        self.sampler = optuna.samplers.NSGAIISampler(
            population_size=self.population_size, seed=self.seed, **self._sampler_kw
        )
        self.study = optuna.create_study(
            storage=optuna.storages.InMemoryStorage(),
            sampler=self.sampler,
            directions=["minimize"] * len(self.objectives),
        )

    def _trial(self, number: int):
        storage = self.study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        return self._optuna.trial.Trial(self.study, trial_id)

    def _constraint_values(self, layout: Layout, values: dict[str, float]) -> dict[str, float]:
        """Optuna constraints (feasible when <= 0): relative excess over each budget."""
        c = self.constraints
        out = {}
        if c.max_params is not None:
            out["params"] = self._static_terms(layout)["params"]
        if c.max_decode_ms is not None:
            ms = values.get("decode_ms")
            out["decode_ms"] = (
                (ms / c.max_decode_ms - 1.0)
                if ms is not None
                else (
                    self.predicted_decode_ms(layout) / c.max_decode_ms - 1.0
                    if self.latency_table is not None
                    else 0.0
                )
            )
        if c.max_memory is not None:
            memory = values.get("memory_bytes")
            out["memory"] = (
                (memory / c.max_memory - 1.0) if memory is not None else self._static_terms(layout)["memory"]
            )
        return out

    def _tell_optuna(self, number: int, layout: Layout | None, values: dict[str, float] | None) -> None:
        state = self._optuna.trial.TrialState
        if values is None:
            self.study.tell(number, state=state.FAIL)
            return
        if self.constraints.active and layout is not None:
            trial = self._trial(number)
            for key, value in self._constraint_values(layout, values).items():
                trial.set_constraint(key, value)
        self.study.tell(number, [values[o] for o in self.objectives])

    def _generation(self, number: int) -> int:
        trial = self.study._storage.get_trial(self._trial(number)._trial_id)
        return int(trial.system_attrs.get(self.generation_key, 0))

    # ---- proposals -----------------------------------------------------------------------------------------
    def _propose(self) -> Proposal | None:
        for attempt in range(_MAX_INTERNAL_TRIALS + 1):
            if attempt == _MAX_INTERNAL_TRIALS:
                layout = self.random_new_layout()
                if layout is None:
                    return None
                self._note("NSGA-II kept proposing invalid or known layouts: enqueued a random new layout")
                self.study.enqueue_trial(self.encode(self.space.decode(layout)))
            elif self.initial_queue:
                self.study.enqueue_trial(self.initial_queue.pop(0))
            trial = self.study.ask(self.distributions)
            genome = self.decode_params(trial.params)
            if genome is None:
                self.n_invalid += 1
                self._tell_optuna(trial.number, None, None)
                continue
            layout = self.space.to_layout(genome)
            h = layout.content_hash
            if h in self.pending:
                self.n_duplicates += 1
                self._tell_optuna(trial.number, None, None)
                continue
            if h in self.records:
                self.n_duplicates += 1
                self._tell_optuna(trial.number, layout, self.records[h]["objectives"])
                continue
            if not self.feasible(layout):
                self.n_invalid += 1
                self._tell_optuna(trial.number, None, None)
                continue
            trial.set_user_attr("layout_hash", h)
            self.trial_of[h] = trial.number
            return Proposal(
                layout, None, {"kind": "nsga2", "trial": trial.number}, self._generation(trial.number)
            )
        return None

    def _on_result(self, proposal: Proposal, values: dict[str, float] | None) -> None:
        number = self.trial_of.pop(proposal.hash)
        self._tell_optuna(number, proposal.layout, values)

    # ---- state ---------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        optuna = self._optuna
        trials = []
        for t in self.study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.FAIL:
                # Nothing reads a failed trial (generations, populations and the search space count complete
                # trials only): keep its place (trial ids must match the cached parent lists), not its
                # content.
                trials.append({"number": t.number, "state": "FAIL"})
                continue
            if t.distributions != self.distributions:
                raise RuntimeError(f"nsga2: trial {t.number} has unexpected distributions")
            trials.append(
                {
                    "number": t.number,
                    "state": t.state.name,
                    "params": dict(t.params),
                    "values": None if t.values is None else list(t.values),
                    "system_attrs": dict(t.system_attrs),
                    "user_attrs": dict(t.user_attrs),
                }
            )
        storage = self.study._storage
        return {
            "optuna": {
                "version": optuna.__version__,
                "generation_key": self.generation_key,
                "population_size": self.population_size,
                "distributions": {
                    k: optuna.distributions.distribution_to_json(d) for k, d in self.distributions.items()
                },
                "trials": trials,
                "study_system_attrs": dict(storage.get_study_system_attrs(self.study._study_id)),
                "sampler_rng": _np_state(self.sampler._rng.rng),
                "random_sampler_rng": _np_state(self.sampler._random_sampler._rng.rng),
            },
            "trial_of": dict(self.trial_of),
            "initial_queue": list(self.initial_queue),
            "n_invalid": self.n_invalid,
            "n_duplicates": self.n_duplicates,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        optuna = self._optuna
        saved = state["optuna"]
        if int(saved["population_size"]) != self.population_size:
            raise ValueError(
                f"nsga2: state population_size {saved['population_size']} differs from {self.population_size}"
            )
        distributions = {
            k: optuna.distributions.json_to_distribution(d) for k, d in saved["distributions"].items()
        }
        if distributions != self.distributions:
            raise ValueError("nsga2: the stored parameter encoding differs from this search space's")
        self._new_study()
        states = optuna.trial.TrialState
        for index, item in enumerate(saved["trials"]):
            if int(item["number"]) != index:
                raise ValueError("nsga2: stored trials are not in order")
            trial_state = states[item["state"]]
            if trial_state == states.FAIL:
                frozen = optuna.trial.create_trial(state=trial_state)
            else:
                frozen = optuna.trial.create_trial(
                    state=trial_state,
                    params=item["params"],
                    distributions=distributions,
                    values=item["values"] if trial_state == states.COMPLETE else None,
                    system_attrs=item["system_attrs"],
                    user_attrs=item["user_attrs"],
                )
            self.study.add_trial(frozen)
        storage = self.study._storage
        for key, value in saved["study_system_attrs"].items():
            storage.set_study_system_attr(self.study._study_id, key, value)
        _set_np_state(self.sampler._rng.rng, saved["sampler_rng"])
        _set_np_state(self.sampler._random_sampler._rng.rng, saved["random_sampler_rng"])
        self.trial_of = {h: int(n) for h, n in state["trial_of"].items()}
        self.initial_queue = list(state["initial_queue"])
        self.n_invalid = int(state.get("n_invalid", 0))
        self.n_duplicates = int(state.get("n_duplicates", 0))

    def current_generation(self) -> int:
        """The highest generation among the study's trials (0 before any)."""
        gens = [t.system_attrs.get(self.generation_key, 0) for t in self.study.get_trials(deepcopy=False)]
        return int(max(gens, default=0))


def _np_state(rng) -> list:
    name, keys, pos, has_gauss, cached = rng.get_state()
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _set_np_state(rng, state: list) -> None:
    import numpy as np

    name, keys, pos, has_gauss, cached = state
    rng.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))

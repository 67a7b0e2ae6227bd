"""Search strategies on a synthetic problem over the closed benchmark sub-space: no repeated layout,
constraints, the width rule, failures kept out of populations and fronts, exact resume, and pareto-aging
beating random."""

import json
import statistics
import subprocess
import sys

import pytest

from search.latency_model import LatencyTable
from search.layout import Layout
from search.params import count_parameters
from search.pareto import HypervolumeSpace, HypervolumeTracker
from search.presets import get_preset
from search.space import SearchSpace, benchmark_space
from search.strategies import STRATEGIES, Constraints, estimate_memory_bytes, make_strategy

# The strategies that search the space (the grid only evaluates the layouts it is given: test_engine.py).
SEARCHING = sorted(set(STRATEGIES) - {"grid"})

SPACE = benchmark_space()
COST = {"attention": 3.0, "mamba2": 2.0, "deltanet": 1.5, "ffn": 1.0}
QUALITY = {"attention": 1.0, "mamba2": 0.8, "deltanet": 0.7, "ffn": 0.5}
TARGET_MS = 12.0


def objective(layout: Layout) -> dict:
    """Noise-free synthetic objectives: quality saturates with (width-scaled) operator capacity, a mix of
    mixer types and attention late in the network help; latency is a sum of per-operator costs scaled by
    width."""
    ops, scale = layout.operators, layout.d_model / 64
    capacity = sum(QUALITY[op] for op in ops) * scale**0.5
    val_bpb = (
        3.0
        - 0.6 * (1 - 2.7 ** (-capacity / 4))
        - 0.05 * (len(set(layout.mixers)) - 1)
        - (0.05 if ops[-2:-1] == ("attention",) else 0.0)
    )
    return {"val_bpb": val_bpb, "decode_ms": 0.5 + sum(COST[op] for op in ops) * scale}


def failing_objective(layout: Layout):
    return None if layout.content_hash[0] in "0123" else objective(layout)  # about a quarter fail


def table() -> LatencyTable:
    """A LUT that predicts exactly the synthetic decode_ms (overhead 0.5 ms, per-op costs x width/64)."""
    entries = [
        {"operator": op, "d_model": w, "context": 128, "decode_ms": cost * w / 64}
        for op, cost in COST.items()
        for w in (32, 48, 64)
    ]
    overhead = [{"d_model": w, "context": 128, "decode_ms": 0.5} for w in (32, 48, 64)]
    return LatencyTable(entries, overhead, config={"vocab_size": 257})


def settings(name: str, seed: int = 0, **kw) -> dict:
    base = dict(seed=seed)
    if name in ("pareto-aging", "latency-target"):
        base.update(population_size=12, sample_size=3)
    if name == "nsga2":
        base.update(population_size=10)
    if name == "latency-target":
        base.update(latency_table=table(), target_ms=TARGET_MS)
    base.update(kw)
    return base


def run(strategy, evaluations: int, fn=objective, batch: int = 4, tracker=None) -> list:
    proposals = []
    while strategy.n_told < evaluations:
        asked = strategy.ask(min(batch, evaluations - strategy.n_told))
        assert asked, "the strategy ran out of layouts"
        for proposal in asked:
            proposals.append(proposal)
            result = fn(proposal.layout)
            strategy.tell(proposal.hash, result)
            if tracker is not None:
                tracker.record(result)
    return proposals


def all_layouts(space=SPACE) -> list:
    seen = {}
    for genome in space.enumerate():
        layout = space.to_layout(genome)
        seen.setdefault(layout.content_hash, layout)
    return list(seen.values())


HV_SPACE = HypervolumeSpace.from_points(("val_bpb", "decode_ms"), [objective(lo) for lo in all_layouts()])


@pytest.mark.parametrize("name", SEARCHING)
def test_sixty_evaluations_without_a_repeat(name):
    strategy = make_strategy(name, SPACE, **settings(name))
    proposals = run(strategy, 60)
    hashes = [p.hash for p in proposals]
    assert len(hashes) == 60 == len(set(hashes))
    assert strategy.n_told == 60 and not strategy.pending
    for p in proposals:
        assert SPACE.decode(p.layout) is not None  # mutations stay in the closed benchmark space
        if p.parent_hash is not None:
            assert p.parent_hash in strategy.records and p.mutation["kind"]
            assert p.generation == strategy.records[p.parent_hash]["generation"] + 1
    json.dumps(strategy.state_dict())  # JSON-serializable
    front = strategy.pareto_front()
    assert front and all(h in strategy.records for h in front)


def test_pareto_aging_beats_random_on_hypervolume():
    finals = {}
    for name in ("pareto-aging", "random"):
        values = []
        for seed in range(10):
            tracker = HypervolumeTracker(HV_SPACE)
            run(make_strategy(name, SPACE, **settings(name, seed)), 60, tracker=tracker)
            assert all(b >= a for a, b in zip(tracker.history, tracker.history[1:]))
            values.append(tracker.current)
        finals[name] = values
    assert statistics.mean(finals["pareto-aging"]) > statistics.mean(finals["random"])


def _drive(strategy, steps: int, log: list) -> None:
    """Ask 3, tell the two oldest pending (some stay pending across the cut); results include failures."""
    for _ in range(steps):
        for p in strategy.ask(3):
            log.append((p.hash, p.parent_hash, p.generation, json.dumps(p.mutation, sort_keys=True)))
        for h in list(strategy.pending)[:2]:
            strategy.tell(h, failing_objective(strategy.pending[h].layout))


@pytest.mark.parametrize("name", SEARCHING)
def test_resume_continues_exactly(name):
    uninterrupted, before = make_strategy(name, SPACE, **settings(name, seed=5)), []
    _drive(uninterrupted, 12, before)
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    resumed = make_strategy(name, SPACE, **settings(name, seed=5))
    resumed.load_state_dict(state)
    assert list(resumed.pending) == list(uninterrupted.pending)
    assert resumed.state_dict() == state
    after_a, after_b = [], []
    _drive(uninterrupted, 8, after_a)
    _drive(resumed, 8, after_b)
    assert after_a == after_b and len(after_a) == 24
    assert not set(h for h, *_ in after_a) & set(h for h, *_ in before)
    # a differently seeded strategy proposes something else (the seed matters)
    other = []
    _drive(make_strategy(name, SPACE, **settings(name, seed=6)), 3, other)
    assert [h for h, *_ in other] != [h for h, *_ in before[:9]]


def test_nsga2_resumes_at_its_generation():
    strategy = make_strategy("nsga2", SPACE, seed=1, population_size=4)
    run(strategy, 30, batch=2)
    generation = strategy.current_generation()
    assert generation >= 3
    state = json.loads(json.dumps(strategy.state_dict()))
    key = state["optuna"]["generation_key"]
    assert key == "NSGAIISampler:generation"
    assert max(t.get("system_attrs", {}).get(key, -1) for t in state["optuna"]["trials"]) == generation
    assert any(k.startswith("NSGAIISampler:parent:") for k in state["optuna"]["study_system_attrs"])
    resumed = make_strategy("nsga2", SPACE, seed=1, population_size=4)
    assert resumed.current_generation() == 0
    resumed.load_state_dict(state)
    assert resumed.current_generation() == generation
    next_a, next_b = strategy.ask(2), resumed.ask(2)
    assert [p.hash for p in next_a] == [p.hash for p in next_b]
    assert [p.generation for p in next_b] == [p.generation for p in next_a]
    assert min(p.generation for p in next_b) >= generation > 0
    # a study rebuilt WITHOUT the generation attributes would restart at generation 0
    stripped = json.loads(json.dumps(state))
    for t in stripped["optuna"]["trials"]:
        t.get("system_attrs", {}).pop(key, None)
    fresh = make_strategy("nsga2", SPACE, seed=1, population_size=4)
    fresh.load_state_dict(stripped)
    assert fresh.current_generation() == 0


@pytest.mark.parametrize("name", SEARCHING)
def test_failed_candidates_never_enter_population_or_front(name):
    strategy = make_strategy(name, SPACE, **settings(name, seed=2))
    run(strategy, 40, fn=failing_objective)
    failed = {h for h, r in strategy.records.items() if r["objectives"] is None}
    assert failed  # the synthetic failures happened
    assert not failed & set(strategy.pareto_front())
    if hasattr(strategy, "population"):
        assert not failed & set(strategy.population)
        assert len(strategy.population) <= strategy.population_size
    if name == "nsga2":
        states = {t.user_attrs.get("layout_hash"): t.state.name for t in strategy.study.get_trials()}
        assert all(states[h] == "FAIL" for h in failed)


def test_plain_aging_evicts_the_oldest():
    strategy = make_strategy(
        "pareto-aging", SPACE, seed=3, population_size=5, sample_size=2, protect_front=False
    )
    proposals = run(strategy, 12, batch=1)
    assert strategy.population == [p.hash for p in proposals[-5:]]
    assert strategy.state_dict()["ages"] == [4, 3, 2, 1, 0]


def test_pareto_aging_evicts_the_oldest_member_off_the_front():
    from search.pareto import pareto_front

    strategy = make_strategy("pareto-aging", SPACE, seed=3, population_size=5, sample_size=2)
    order = []
    for _ in range(14):
        (proposal,) = strategy.ask(1)
        before = list(strategy.population)
        strategy.tell(proposal.hash, objective(proposal.layout))
        order.append(proposal.hash)
        if len(before) == 5:  # full: exactly one member left, the oldest not on the front of the six
            six = before + [proposal.hash]
            front = set(pareto_front([strategy.objective_values(h) for h in six]))
            expected = next((h for i, h in enumerate(six) if i not in front), six[0])
            assert expected not in strategy.population
            assert [h for h in six if h != expected] == strategy.population


def _population_of(values: list, **kw):
    """A pareto-aging strategy whose whole population (sampled entirely by every tournament) has these
    objective values, in this order."""
    strategy = make_strategy(
        "pareto-aging", SPACE, seed=0, population_size=len(values), sample_size=len(values), **kw
    )
    first = strategy.ask(len(values))
    for p, (bpb, ms) in zip(first, values):
        strategy.tell(p.hash, {"val_bpb": bpb, "decode_ms": ms})
    return strategy, [p.hash for p in first]


def test_hypervolume_selection_picks_the_knee_of_the_front():
    # a front of three: two extremes and the knee, plus a dominated member; in (bpb, ms) normalized by the
    # population's ranges the knee holds most of the area (0.66 of 1.1^2), each extreme a thin slab
    values = [(3.0, 30.0), (3.1, 12.0), (4.0, 10.0), (3.6, 25.0)]
    strategy, hashes = _population_of(values)
    assert strategy.selection == "hypervolume"
    keys = strategy._selection_keys()
    assert keys[hashes[3]][1] == 1  # the dominated member ranks after the front
    assert strategy._tournament() == hashes[1]
    assert {p.parent_hash for p in strategy.ask(3)} == {hashes[1]}
    # crowding distance (the rule before) gives both extremes infinite distance: the knee is never the parent
    crowding, hashes = _population_of(values, selection="crowding")
    assert crowding._tournament() in {hashes[0], hashes[2]}
    assert hashes[1] not in {p.parent_hash for p in crowding.ask(3)}
    with pytest.raises(ValueError, match="selection"):
        make_strategy("pareto-aging", SPACE, selection="hv")


def test_mutation_mix_adapts_to_successes_and_keeps_every_kind():
    strategy, hashes = _population_of([(3.0, 30.0), (3.1, 12.0), (4.0, 10.0)])
    assert strategy.mutation_kinds == ("operator", "ratio", "blocks", "width")  # one FFN count: no "ffn"
    assert strategy.mutation_weights() == pytest.approx(dict.fromkeys(strategy.mutation_kinds, 0.25))
    strategy.mutation_outcomes = [["width", 1]] * 8 + [["operator", 0]] * 8
    # rates (1 + wins) / (2 + trials): width 0.9, operator 0.1, ratio and blocks 0.5 (no trials), sum 2.0;
    # weights 0.8 x rate / 2.0 + 0.2 / 4
    expected = {"operator": 0.09, "ratio": 0.25, "blocks": 0.25, "width": 0.41}
    assert strategy.mutation_weights() == pytest.approx(expected)
    parent = strategy.layout_of(hashes[1])
    kinds = [strategy._mutate(parent)[1].kind for _ in range(400)]
    assert kinds.count("width") > 2 * kinds.count("operator") > 0 and kinds.count("ratio") > 0
    assert set(kinds) == set(strategy.mutation_kinds)
    # the paper's uniform mix when adaptation is off: nothing is recorded, every kind equally likely
    plain, _ = _population_of([(3.0, 30.0), (3.1, 12.0), (4.0, 10.0)], adapt_mutations=False)
    run(plain, 12)
    assert plain.mutation_outcomes == [] and set(plain.mutation_weights().values()) == {0.25}
    with pytest.raises(ValueError, match="mutation_window"):
        make_strategy("pareto-aging", SPACE, mutation_window=0)
    with pytest.raises(ValueError, match="mutation_exploration"):
        make_strategy("pareto-aging", SPACE, mutation_exploration=1.5)
    with pytest.raises(ValueError, match="adapt_mutations"):
        make_strategy("latency-target", SPACE, **settings("latency-target"), adapt_mutations=True)
    assert not make_strategy("latency-target", SPACE, **settings("latency-target")).adapt_mutations


def test_mutation_outcomes_credit_children_that_enter_the_front():
    strategy, hashes = _population_of([(3.0, 30.0), (3.1, 12.0), (4.0, 10.0)], mutation_window=3)
    told = []
    for result in (
        {"val_bpb": 2.9, "decode_ms": 9.0},  # dominates the whole population: a success
        {"val_bpb": 5.0, "decode_ms": 50.0},  # dominated: no success
        {"val_bpb": 2.9, "decode_ms": 9.0},  # equal to a member: no success
        None,  # failed: no success
        {"val_bpb": 3.05, "decode_ms": 8.5},
    ):  # a new trade-off: a success
        (child,) = strategy.ask(1)
        strategy.tell(child.hash, result)
        told.append([child.mutation["kind"], 0])
    told[0][1] = told[4][1] = 1
    assert strategy.mutation_outcomes == told[-3:]  # the window keeps the last 3
    # a child violating a measured constraint is no success either
    limited, _ = _population_of(
        [(3.0, 30.0), (3.1, 12.0), (4.0, 10.0)], constraints=Constraints(max_decode_ms=35.0)
    )
    (child,) = limited.ask(1)
    limited.tell(child.hash, {"val_bpb": 2.0, "decode_ms": 40.0})
    assert limited.mutation_outcomes == [[child.mutation["kind"], 0]]


def test_pareto_aging_resume_restores_the_mutation_mix():
    uninterrupted, log = make_strategy("pareto-aging", SPACE, **settings("pareto-aging", seed=9)), []
    _drive(uninterrupted, 16, log)
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    assert len(state["mutation_outcomes"]) > 5 and any(s for _, s in state["mutation_outcomes"])
    resumed = make_strategy("pareto-aging", SPACE, **settings("pareto-aging", seed=9))
    resumed.load_state_dict(state)
    assert (
        resumed.mutation_weights()
        == uninterrupted.mutation_weights()
        != make_strategy("pareto-aging", SPACE, **settings("pareto-aging", seed=9)).mutation_weights()
    )
    assert [p.hash for p in resumed.ask(4)] == [p.hash for p in uninterrupted.ask(4)]
    # a state saved before the adaptive mix (no outcomes) still loads: the mix starts uniform
    old = {k: v for k, v in state.items() if k != "mutation_outcomes"}
    older = make_strategy("pareto-aging", SPACE, **settings("pareto-aging", seed=9))
    older.load_state_dict(old)
    assert older.mutation_outcomes == [] and older.ask(2)


def test_initial_layouts_come_first_and_warm_start():
    initial = [SPACE.sample_layout(__import__("random").Random(s)) for s in range(3)]
    initial.append(get_preset("nemotron-flash-1b-mini"))  # outside the grammar: operator-level mutations
    strategy = make_strategy("pareto-aging", SPACE, seed=0, population_size=6, sample_size=2, initial=initial)
    first = strategy.ask(6)
    assert [p.layout for p in first[:4]] == initial and all(p.generation == 0 for p in first)
    for p in first:
        strategy.tell(
            p.hash, objective(p.layout) if SPACE.decode(p.layout) else {"val_bpb": 2.0, "decode_ms": 30.0}
        )
    children = strategy.ask(10)
    assert all(p.parent_hash in strategy.population for p in children)
    # warm start from the front of an earlier search
    front = [strategy.layout_of(h) for h in strategy.pareto_front()]
    again = make_strategy("pareto-aging", SPACE, seed=1, population_size=6, sample_size=2, initial=front)
    assert [p.layout for p in again.ask(len(front))] == front
    # nsga2 encodes the grammar only: the out-of-grammar preset is skipped with a note
    nsga2 = make_strategy("nsga2", SPACE, seed=0, population_size=4, initial=initial)
    assert any("outside the grammar" in n for n in nsga2.state_dict()["notes"])
    assert [p.layout for p in nsga2.ask(3)] == initial[:3]


def test_constraints_filter_proposals():
    budget = 150_000
    strategy = make_strategy(
        "pareto-aging",
        SPACE,
        seed=0,
        population_size=8,
        sample_size=3,
        constraints=Constraints(max_params=budget, max_decode_ms=9.0),
        latency_table=table(),
    )
    proposals = run(strategy, 30)
    lut = table()
    assert all(count_parameters(p.layout, 257).total <= budget for p in proposals)
    assert all(lut.predict_decode_ms(p.layout, 128) <= 9.0 for p in proposals)
    # a measured latency over the budget ranks the member last (and keeps it out of the front)
    strategy = make_strategy(
        "pareto-aging",
        SPACE,
        seed=0,
        population_size=4,
        sample_size=4,
        constraints=Constraints(max_decode_ms=9.0),
    )
    first = strategy.ask(4)
    for i, p in enumerate(first):
        strategy.tell(
            p.hash, {"val_bpb": 1.0 if i == 0 else 2.0 + i, "decode_ms": 50.0 if i == 0 else 5.0 + i}
        )
    assert first[0].hash not in strategy.pareto_front()
    assert {p.parent_hash for p in strategy.ask(5)} <= {p.hash for p in first[1:]}
    # the memory estimate: weights + cache; full attention's cache grows with the context, Mamba2's does not
    attention, mamba = (
        SPACE.to_layout(SPACE.decode(Layout.from_dict({"operators": ops, **SPACE._dims_for(64)})))
        for ops in ("[A F] x 4", "[M2 F] x 4")
    )
    assert estimate_memory_bytes(attention, 257, 4096) > estimate_memory_bytes(attention, 257, 128)
    assert (
        estimate_memory_bytes(mamba, 257, 4096)
        == estimate_memory_bytes(mamba, 257, 128)
        > 2 * count_parameters(mamba, 257).total
    )


def test_latency_target_uses_the_width_rule():
    lut = table()
    strategy = make_strategy("latency-target", SPACE, **settings("latency-target", seed=4))
    proposals = run(strategy, 40)
    widths = sorted(SPACE.widths)
    for p in proposals:
        assert lut.predict_decode_ms(p.layout, 128) <= TARGET_MS
        wider = [w for w in widths if w > p.layout.d_model]
        for w in wider:  # the largest width meeting the target was taken
            assert lut.predict_decode_ms(p.layout.replace(**SPACE._dims_for(w)), 128) > TARGET_MS
        if p.parent_hash is not None:
            assert strategy.records[p.parent_hash]["objectives"] is not None
    # the constructor refuses what cannot work
    with pytest.raises(ValueError, match="latency_table"):
        make_strategy("latency-target", SPACE, target_ms=10.0)
    with pytest.raises(ValueError, match="cannot be met"):
        make_strategy("latency-target", SPACE, latency_table=lut, target_ms=1.0)
    with pytest.raises(ValueError, match="target"):
        make_strategy("latency-target", SPACE, latency_table=lut)


def test_bad_input_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match=r"'evolution'.*known: pareto-aging, latency-target, nsga2, random"):
        make_strategy("evolution", SPACE)
    with pytest.raises(ValueError, match="mixers"):
        SearchSpace(mixers=())
    tiny = SearchSpace(
        mixers=("attention",),
        ratios=((0, 1),),
        ffn_counts=(1,),
        n_stages=1,
        max_operators=4,
        widths=(64,),
        dims={"head_dim": 16},
    )
    assert tiny.size() == 2
    for name in ("pareto-aging", "latency-target", "nsga2"):
        extra = dict(latency_table=table(), target_ms=50.0) if name == "latency-target" else {}
        with pytest.raises(ValueError, match="larger than the search space"):
            make_strategy(name, tiny, population_size=5, **extra)
    with pytest.raises(ValueError, match="no layout of the space can meet"):
        make_strategy("pareto-aging", SPACE, constraints=Constraints(max_params=1000))
    with pytest.raises(ValueError, match="no layout of the space can meet"):
        make_strategy("random", SPACE, constraints=Constraints(max_decode_ms=0.1), latency_table=table())
    with pytest.raises(ValueError, match="no layout of the space can meet"):  # a config's dict works too
        make_strategy("pareto-aging", SPACE, constraints={"max_params": 1000, "max_decode_ms": None})
    with pytest.raises(ValueError, match="unknown constraint"):
        make_strategy("pareto-aging", SPACE, constraints={"max_flops": 1})
    with pytest.raises(ValueError, match="sample_size"):
        make_strategy("pareto-aging", SPACE, population_size=4, sample_size=9)
    with pytest.raises(ValueError, match="bad settings"):
        make_strategy("random", SPACE, tournament=3)
    strategy = make_strategy("random", SPACE)
    (p,) = strategy.ask(1)
    with pytest.raises(ValueError, match="lacks objective"):
        strategy.tell(p.hash, {"val_bpb": 1.0})
    strategy.tell(p.hash, {"val_bpb": 1.0, "decode_ms": float("nan")})  # non-finite = failed
    assert strategy.records[p.hash]["objectives"] is None
    with pytest.raises(ValueError, match="already told"):
        strategy.tell(p.hash, None)
    with pytest.raises(ValueError, match="never proposed"):
        strategy.tell("0" * 64, None)
    with pytest.raises(ValueError, match="cannot be loaded"):
        make_strategy("pareto-aging", SPACE).load_state_dict(strategy.state_dict())


def test_random_exhausts_a_small_space_without_repeats():
    tiny = SearchSpace(
        mixers=("attention", "mamba2"),
        ratios=((0, 1),),
        ffn_counts=(1,),
        n_stages=1,
        max_operators=6,
        widths=(64,),
        dims={"head_dim": 16, "mamba_head_dim": 16},
    )
    strategy = make_strategy("random", tiny, seed=0)
    got = strategy.ask(100)
    assert len(got) == len({p.hash for p in got}) == len(all_layouts(tiny)) == 6
    assert strategy.ask(1) == []


def test_search_imports_no_torch():
    code = (
        "import sys; import search.pareto, search.strategies, search.strategies.nsga2; "
        "from search.space import benchmark_space; from search.strategies import make_strategy; "
        "s = make_strategy('nsga2', benchmark_space(), population_size=4); p = s.ask(2); "
        "s.tell(p[0].hash, {'val_bpb': 1.0, 'decode_ms': 2.0}); "
        "from search.pareto import HypervolumeSpace; HypervolumeSpace(('a',), (0,), "
        "(1,)).hypervolume([(0.5,)]); "
        "HypervolumeSpace(('a', 'b'), (0, 0), (1, 1)).hypervolume([(0.5, 0.5)]); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

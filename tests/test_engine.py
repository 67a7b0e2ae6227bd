"""The search engine on the in-process executor: budgets, de-duplication and reuse across searches, failures
as data, retries, hypervolume history, bad configs refused before anything runs."""

import json
import threading

import pytest
from pydantic import ValidationError

from search.config import SearchConfig
from search.engine import SearchEngine
from search.executors import InlineExecutor, Outcome
from search.pareto import dominates
from tests import pg

TINY = {
    "space": {"preset": "benchmark"},
    "strategy": "pareto-aging",
    "strategy_options": {"population_size": 4, "sample_size": 2},
    "executor": "inline",
    "workers": 1,
    "proxy": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_tokens": 64},
    "latency": {"prompt_len": 4, "decode_tokens": 2, "repeats": 1, "warmup": 0, "throughput": False},
}

storage = pg.storage


def run_search(storage, tmp_path, budget=6, **overrides):
    config = SearchConfig.model_validate({**TINY, "budget": budget, **overrides})
    job_id = storage.create_job("search", json.loads(config.model_dump_json()), budget=budget)
    data_dir = str(tmp_path / "data")
    engine = SearchEngine(storage, job_id, lambda c: InlineExecutor(data_dir, threads=1))
    engine.run()
    return job_id


def test_search_runs_to_budget_with_a_true_front(storage, tmp_path):
    job_id = run_search(storage, tmp_path, budget=7)
    assert storage.get_job(job_id).status == "completed"
    cands = storage.candidates(job_id)
    assert len(cands) == 7 and len({c.layout_hash for c in cands}) == 7
    done = [c for c in cands if c.status in ("completed", "reused")]
    front = [c for c in done if c.on_front]
    assert front
    points = {c.id: [c.objectives["val_bpb"], c.objectives["decode_ms"]] for c in done}
    for c in done:  # the materialized front is exactly the non-dominated set
        dominated = any(dominates(points[o.id], points[c.id]) for o in done if o.id != c.id)
        assert c.on_front == (not dominated)
    history = [h.hypervolume for h in storage.hypervolume_history(job_id)]
    assert history and all(b >= a - 1e-12 for a, b in zip(history, history[1:]))
    assert any(c.mutation for c in cands)  # children were mutated from parents
    from search.layout import Layout
    from search.params import count_parameters

    assert all(
        c.n_params == count_parameters(Layout.from_dict(c.layout), 257).total for c in done
    )  # bytes: 257
    assert any(c.parent_id for c in cands)


def test_second_search_reuses_stored_results(storage, tmp_path):
    first = run_search(storage, tmp_path, budget=5)
    with storage.transaction() as conn:
        before = conn.exec_driver_sql("SELECT COUNT(*) FROM training_results").scalar()
    second = run_search(storage, tmp_path, budget=5)  # same seed and config: the same proposals
    with storage.transaction() as conn:
        after = conn.exec_driver_sql("SELECT COUNT(*) FROM training_results").scalar()
    reused = storage.candidates(second, status="reused")
    assert len(reused) == 5 and after == before
    first_bpb = {c.layout_hash: c.val_bpb for c in storage.candidates(first)}
    assert all(first_bpb[c.layout_hash] == c.val_bpb for c in reused)


def test_failed_candidates_are_data(storage, tmp_path, monkeypatch):
    import models.registry as registry

    def broken(layout, backend):
        raise RuntimeError("deltanet kernel exploded")

    monkeypatch.setitem(registry.BUILDERS, "deltanet", broken)
    job_id = run_search(storage, tmp_path, budget=8)
    assert storage.get_job(job_id).status == "completed"
    failed = storage.candidates(job_id, status="failed")
    assert failed and all("deltanet kernel exploded" in c.failure_reason for c in failed)
    assert all(c.traceback for c in failed)
    assert not any(c.on_front for c in failed)
    assert all("deltanet" not in json.dumps(c.layout) for c in storage.candidates(job_id, status="completed"))


class FlakyExecutor(InlineExecutor):
    """The first evaluation's worker 'dies'; the engine must retry it."""

    died = False

    def poll(self, timeout):
        if not FlakyExecutor.died and self.queue:
            FlakyExecutor.died = True
            task = self.queue.pop(0)
            return [Outcome(task.task_id, error_kind="worker_died", error="actor died")]
        return super().poll(timeout)


def test_a_dead_worker_is_retried(storage, tmp_path):
    config = SearchConfig.model_validate({**TINY, "budget": 3})
    job_id = storage.create_job("search", json.loads(config.model_dump_json()), budget=3)
    FlakyExecutor.died = False
    SearchEngine(storage, job_id, lambda c: FlakyExecutor(str(tmp_path / "data"), threads=1)).run()
    cands = storage.candidates(job_id)
    assert all(c.status in ("completed", "reused") for c in cands)
    assert max(c.attempts for c in cands) == 2


def test_retries_run_out_into_a_failure(storage, tmp_path):
    class AlwaysDies(InlineExecutor):
        def poll(self, timeout):
            if self.queue:
                task = self.queue.pop(0)
                return [Outcome(task.task_id, error_kind="timeout", error="evaluation exceeded 1 s")]
            return []

    config = SearchConfig.model_validate({**TINY, "budget": 2, "max_retries": 1})
    job_id = storage.create_job("search", json.loads(config.model_dump_json()), budget=2)
    SearchEngine(storage, job_id, lambda c: AlwaysDies(str(tmp_path / "data"), threads=1)).run()
    cands = storage.candidates(job_id)
    assert [c.status for c in cands] == ["failed", "failed"]
    assert all(c.attempts == 2 and c.failure_reason.startswith("timeout") for c in cands)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"strategy": "simulated-annealing"}, "strategy"),
        ({"space": {"preset": "benchmark", "mixers": []}}, "space"),
        ({"objectives": ["val_bpb", "val_bpb"]}, "objectives"),
        ({"budget": 0}, "budget"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_search_config_is_refused(change, field):
    with pytest.raises(ValidationError) as info:
        SearchConfig.model_validate({**TINY, **change})
    assert field in str(info.value)


def test_population_larger_than_the_space_is_refused():
    from search.strategies import make_strategy

    config = SearchConfig.model_validate(
        {**TINY, "space": {"preset": "benchmark", "widths": [48], "mixers": ["attention"]}}
    )
    with pytest.raises(ValueError, match="population"):
        make_strategy("pareto-aging", config.build_space(), population_size=10_000)


def test_warm_start_from_an_earlier_front(storage, tmp_path):
    first = run_search(storage, tmp_path, budget=6)
    front = {c.layout_hash for c in storage.candidates(first, on_front=True)}
    second = run_search(
        storage, tmp_path, budget=len(front) + 1, warm_start_job=first, initial="random", seed=9
    )
    first_layouts = {c.layout_hash for c in storage.candidates(second)[: len(front)]}
    assert front <= first_layouts  # the front seeds the new population, its results reused
    assert all(c.status == "reused" for c in storage.candidates(second) if c.layout_hash in front)


def test_hypervolume_bounds_from_the_config_are_used_from_the_first_result(storage, tmp_path):
    bounds = {"val_bpb": [0.0, 20.0], "decode_ms": [0.0, 50.0]}
    job_id = run_search(storage, tmp_path, budget=3, hypervolume_bounds=bounds)
    history = storage.hypervolume_history(job_id)
    assert [h.n_evaluations for h in history] == [
        1,
        2,
        3,
    ]  # from the first evaluation, not after a population
    state = storage.load_strategy_state(job_id)["hypervolume_space"]
    assert list(state["upper"]) == [20.0, 50.0] and list(state["lower"]) == [0.0, 0.0]
    from search.pareto import HypervolumeSpace

    done = storage.candidates(job_id, status=("completed", "reused"))
    space = HypervolumeSpace(("val_bpb", "decode_ms"), (0.0, 0.0), (20.0, 50.0))
    assert history[-1].hypervolume == pytest.approx(
        space.hypervolume([[c.val_bpb, c.decode_ms] for c in done])
    )


def test_hypervolume_bounds_must_match_the_objectives():
    with pytest.raises(ValidationError, match="hypervolume_bounds"):
        SearchConfig.model_validate({**TINY, "hypervolume_bounds": {"val_bpb": [0, 1]}})
    with pytest.raises(ValidationError, match="lower < upper"):
        SearchConfig.model_validate({**TINY, "hypervolume_bounds": {"val_bpb": [1, 1], "decode_ms": [0, 1]}})


def test_resume_rebuilds_a_front_a_crash_left_stale(storage, tmp_path):
    job_id = run_search(storage, tmp_path, budget=4)
    expected = {c.id for c in storage.candidates(job_id, on_front=True)}
    storage.set_front(job_id, [])  # as if the process died between a result and its front update
    storage.set_job_status(job_id, "queued")
    data_dir = str(tmp_path / "data")
    SearchEngine(storage, job_id, lambda c: InlineExecutor(data_dir, threads=1)).run()
    assert {c.id for c in storage.candidates(job_id, on_front=True)} == expected and expected


@pytest.mark.parametrize("window", ["after_save_before_store", "while_saving", "after_store_before_tell"])
def test_a_stop_inside_either_crash_window_resumes_without_repeating_anything(
    storage, tmp_path, monkeypatch, window
):
    """The two places a kill can split the strategy from the database: proposals saved but not stored yet,
    and a result stored but not told yet. Resuming must neither re-propose nor re-tell anything."""
    from search.strategies.base import Strategy

    config = SearchConfig.model_validate({**TINY, "budget": 6, "workers": 1})
    job_id = storage.create_job("search", json.loads(config.model_dump_json()), budget=6)
    data_dir = str(tmp_path / "data")
    calls = {"n": 0}
    if window == "after_save_before_store":
        real = type(storage).add_candidate

        def add_candidate(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 5:  # the state holding this proposal is saved; the candidate is not stored yet
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)

        monkeypatch.setattr(type(storage), "add_candidate", add_candidate)
    elif window == "while_saving":
        real_save = type(storage).save_strategy_state

        def save_strategy_state(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:  # a kill as the state is written: it never lands
                raise KeyboardInterrupt
            return real_save(self, *args, **kwargs)

        monkeypatch.setattr(type(storage), "save_strategy_state", save_strategy_state)
    else:
        real_tell = Strategy.tell

        def tell(self, layout_hash, objectives):
            calls["n"] += 1
            if calls["n"] == 3:  # the result is stored; the strategy has not heard of it
                raise KeyboardInterrupt
            return real_tell(self, layout_hash, objectives)

        monkeypatch.setattr(Strategy, "tell", tell)
    with pytest.raises(KeyboardInterrupt):
        SearchEngine(storage, job_id, lambda c: InlineExecutor(data_dir, threads=1)).run()
    monkeypatch.undo()
    assert storage.get_job(job_id).status == "queued"
    SearchEngine(storage, job_id, lambda c: InlineExecutor(data_dir, threads=1)).run()
    cands = storage.candidates(job_id)
    assert storage.get_job(job_id).status == "completed"
    assert sum(c.status in ("completed", "reused", "failed") for c in cands) == 6
    assert all(c.attempts <= 1 for c in cands)  # nothing evaluated twice
    state = storage.load_strategy_state(job_id)["strategy"]
    told = {r["hash"] for r in state["records"]}
    assert {c.layout_hash for c in cands if c.status != "pending"} <= told
    assert not (
        {p["hash"] for p in state["pending"]} - {c.layout_hash for c in cands}
    )  # every pending is stored


def test_a_new_training_budget_reuses_the_stored_latency(storage, tmp_path):
    """A second search with another proxy config trains the same layouts again but measures nothing again:
    each candidate completes with the latency stored under its key (the worker reports both keys even when
    it only trains; before, the candidate's latency was looked up under no key and the search crashed)."""
    first = run_search(storage, tmp_path, budget=2)
    second = run_search(storage, tmp_path, budget=2, proxy={**TINY["proxy"], "steps": 3})
    assert storage.get_job(second).status == "completed", storage.get_job(second).error
    before = {c.layout_hash: c for c in storage.candidates(first)}
    after = storage.candidates(second)
    assert {c.layout_hash for c in after} == set(before)
    for c in after:
        assert c.status == "completed" and c.latency_key == before[c.layout_hash].latency_key
        assert c.training_key != before[c.layout_hash].training_key
        assert c.decode_ms == before[c.layout_hash].decode_ms


def test_each_stored_training_records_where_it_ran_and_its_phase_times(storage, tmp_path):
    """The stored training result holds the worker's identity and the evaluation's phase timings (what
    benchmarks/gpu_e2e.py reports per candidate): each phase positive, their sum within the total."""
    job_id = run_search(storage, tmp_path, budget=2)
    details = storage.result_details_of(job_id)
    assert len(details) == 2
    for training, _device in details.values():
        assert training["worker"]["pid"] > 0
        timings = training["timings"]
        assert timings["training_s"] > 0 and timings["latency_s"] > 0
        phases = sum(v for k, v in timings.items() if k != "total_s")
        assert phases <= timings["total_s"] + 1e-3


def grid_layouts(depths=(1, 2, 3), width=64):
    from search.layout import Layout

    dims = {"d_model": width, "n_heads": width // 32, "n_kv_heads": 1, "head_dim": 32}
    return [Layout.from_dict({"operators": ["attention", "ffn"] * d, **dims}).to_dict() for d in depths]


def test_a_grid_search_evaluates_its_layouts_once_each_then_ends(storage, tmp_path):
    """The grid strategy proposes exactly its layouts, in order (one given twice is evaluated once); the
    search ends when they are done, though the budget is larger (it used to wait for more forever)."""
    layouts = grid_layouts((1, 2, 3))
    job_id = run_search(
        storage, tmp_path, budget=10, strategy="grid", strategy_options={"layouts": [*layouts, layouts[0]]}
    )
    job = storage.get_job(job_id)
    assert job.status == "completed", job.error
    cands = sorted(storage.candidates(job_id), key=lambda c: c.id)
    assert [len(c.layout["operators"]) for c in cands] == [2, 4, 6]
    assert all(c.status == "completed" and c.mutation is None for c in cands)


def test_a_grid_resumes_where_it_stopped(storage, tmp_path):
    layouts = grid_layouts((1, 2, 3, 4))
    config = SearchConfig.model_validate(
        {**TINY, "budget": 4, "strategy": "grid", "strategy_options": {"layouts": layouts}}
    )
    job_id = storage.create_job("search", json.loads(config.model_dump_json()), budget=4)
    data_dir = str(tmp_path / "data")
    stop = threading.Event()

    def progress(p):
        if p.n_evaluations >= 2:
            stop.set()

    SearchEngine(
        storage, job_id, lambda c: InlineExecutor(data_dir, threads=1), stop=stop, on_progress=progress
    ).run()
    assert 2 <= storage.count_candidates(job_id, status="completed") < 4
    SearchEngine(storage, job_id, lambda c: InlineExecutor(data_dir, threads=1)).run()
    cands = sorted(storage.candidates(job_id), key=lambda c: c.id)
    assert storage.get_job(job_id).status == "completed"
    assert [len(c.layout["operators"]) for c in cands] == [2, 4, 6, 8]  # each once, in order


def test_a_grid_needs_layouts_naming_the_option():
    with pytest.raises(ValueError, match="strategy_options"):
        SearchConfig.model_validate({**TINY, "strategy": "grid", "strategy_options": {}})

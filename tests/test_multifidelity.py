"""Multi-fidelity search (search.multifidelity, search.rung_runner): the rung settings and their checks, the
Pareto-aware asynchronous promotion rule against brute-force references, and real searches on the inline
executor that climb the rungs — a key per rung, continuation equal to fresh training, reuse across
searches, both strategies, and kill -9 mid-promotion on both backends."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess

import pytest
import yaml
from pydantic import ValidationError

from search.config import SearchConfig
from search.engine import SearchEngine
from search.evaluation import ProxyConfig
from search.executors import InlineExecutor
from search.multifidelity import FidelityConfig, RungLadder, promotion_order
from search.pareto import dominates
from search.space import benchmark_space
from search.strategies import make_strategy
from tests import pg
from tests.test_browser import browser  # noqa: F401 - the Chromium fixture
from tests.test_engine import TINY
from tests.test_search_resume import HYBRIDNAS, env_for, run_cli, wait_for

storage = pg.storage
RUNGS = {"rungs": [4, 8, 16], "eta": 3}


def run_search(storage, data_dir, budget=9, fidelity=RUNGS, **overrides):
    config = SearchConfig.model_validate({**TINY, "budget": budget, "fidelity": fidelity, **overrides})
    job_id = storage.create_job("search", json.loads(config.model_dump_json()), budget=budget)
    SearchEngine(storage, job_id, lambda c: InlineExecutor(str(data_dir), threads=1)).run()
    return job_id


# ---- settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field, reason",
    [
        ({"fidelity": {"rungs": [100, 25]}}, "fidelity", "must increase"),
        ({"fidelity": {"rungs": [25]}}, "fidelity.rungs", "at least 2"),
        ({"fidelity": {"rungs": [25, 100], "eta": 1}}, "fidelity.eta", "greater than or equal to 2"),
        ({"fidelity": {"rungs": [25, 100], "decay_fraction": 1.5}}, "fidelity.decay_fraction", "less than 1"),
        ({"fidelity": {"rungs": [25, 100], "speed": 2}}, "fidelity.speed", "Extra inputs"),
        ({"fidelity": {"rungs": [25, 100]}, "proxy": {"tokens": 4096}}, "", "proxy.tokens"),
        ({"fidelity": {"rungs": [25, 100]}, "proxy": {"schedule": "wsd"}}, "", "proxy.schedule"),
        # a decay of 9 of 10 steps leaves less than rung 0's warmup (5 of 50 steps... kept for every rung)
        ({"fidelity": {"rungs": [50, 60], "decay_fraction": 0.95}}, "", "fidelity.rungs[0]"),
    ],
)
def test_bad_fidelity_settings_are_refused_naming_the_field(change, field, reason):
    with pytest.raises(ValidationError) as info:
        SearchConfig.model_validate({**TINY, **change})
    error = info.value.errors()[0]
    assert ".".join(map(str, error["loc"])) == field and reason in error["msg"], error


def test_every_rung_shares_the_warmup_and_a_promotion_trains_only_past_the_stable_phase():
    fidelity = FidelityConfig(rungs=[25, 100, 400], eta=3)
    proxy = ProxyConfig(lr=1e-3, warmup_fraction=0.1)
    rungs = [fidelity.proxy_at(proxy, r) for r in range(3)]
    assert [p.total_steps for p in rungs] == [25, 100, 400] and {p.warmup_steps for p in rungs} == {2}
    assert [p.stable_steps for p in rungs] == [20, 80, 320]
    # a rung's schedule is the lower rung's up to that one's stable end: continuing from there is exact
    for low, high in itertools.pairwise(rungs):
        assert [low.lr_at(s) for s in range(low.stable_steps)] == [
            high.lr_at(s) for s in range(low.stable_steps)
        ]
    assert high.lr_at(399) == pytest.approx(proxy.min_lr_ratio * 1e-3)
    assert [fidelity.steps_to_train(proxy, r, continued=True) for r in range(3)] == [25, 80, 320]
    assert fidelity.steps_to_train(proxy, 2, continued=False) == 400
    assert len({p.content_hash for p in rungs}) == 3  # the budget is part of each rung's key


def test_new_proxy_settings_leave_existing_keys_unchanged():
    """Adding the schedule settings must not re-key every stored result: at their defaults they are not
    hashed (this digest is ProxyConfig().content_hash from before they existed)."""
    assert ProxyConfig().content_hash.startswith("5f06b11a3446")
    assert ProxyConfig(schedule="wsd").content_hash != ProxyConfig().content_hash


# ---- the promotion rule -------------------------------------------------------------------------------


def _brute_ranks(points):
    """Non-dominated sorting by peeling fronts."""
    ranks, left, rank = {}, set(range(len(points))), 0
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i]) for j in left if j != i)}
        ranks.update(dict.fromkeys(front, rank))
        left -= front
        rank += 1
    return ranks


def _area(points, reference):
    """2-D hypervolume by a sweep over x (independent of search.pareto's)."""
    area, best_y = 0.0, reference[1]
    for x, y in sorted(p for p in points if p[0] < reference[0] and p[1] < reference[1]):
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area


def _brute_order(points):
    ranks = _brute_ranks(points)
    lows = [min(p[m] for p in points) for m in range(2)]
    spans = [max(p[m] for p in points) - lows[m] for m in range(2)]
    norm = [tuple((p[m] - lows[m]) / spans[m] if spans[m] else 0.0 for m in range(2)) for p in points]
    contribution = {}
    for rank in set(ranks.values()):
        members = [i for i in ranks if ranks[i] == rank]
        whole = _area([norm[i] for i in members], (1.1, 1.1))
        for i in members:
            contribution[i] = whole - _area([norm[j] for j in members if j != i], (1.1, 1.1))
    return sorted(range(len(points)), key=lambda i: (ranks[i], -round(contribution[i], 12), i))


@pytest.mark.parametrize("seed", range(5))
def test_promotion_order_is_pareto_rank_then_hypervolume_contribution(seed):
    rng = random.Random(seed)
    points = [(rng.random(), rng.random()) for _ in range(rng.randint(5, 30))]
    points += [points[0]]  # a tie
    assert promotion_order(points) == _brute_order(points)


def test_the_ladder_promotes_as_soon_as_a_candidate_qualifies_and_never_twice():
    rng = random.Random(7)
    ladder, promoted = RungLadder(3, eta=3), []
    for candidate in range(30):
        ladder.record(candidate, 0, (rng.random(), rng.random()))
        while ladder.promotions():  # a rung-1 result may qualify its candidate for rung 2 at once
            cid, rung = ladder.promotions()[0]
            assert (cid, rung) not in promoted
            promoted.append((cid, rung))
            ladder.start(cid, rung)
            ladder.record(cid, rung, (rng.random() / (rung + 1), ladder.at(0)[cid][1]))
        for rung in range(2):  # asynchronous: the rung's best 1/eta so far are all promoted, at once
            n = len(ladder.at(rung))
            best = ladder.qualified(rung)
            assert len(best) == n // 3 and all(c in ladder.at(rung + 1) for c in best)
    assert len(ladder.at(1)) >= 10 and len(ladder.at(2)) >= 3
    assert ladder.highest(promoted[-1][0]) == promoted[-1][1]


def test_an_update_replaces_a_told_layouts_values_in_selection():
    space = benchmark_space()
    strategy = make_strategy("pareto-aging", space, seed=0, population_size=4, sample_size=4)
    proposals = strategy.ask(4)
    for i, p in enumerate(proposals):
        strategy.tell(p.hash, {"val_bpb": 5.0 + i, "decode_ms": 5.0 + i})
    last = proposals[-1].hash
    assert strategy.pareto_front() == [proposals[0].hash]
    strategy.update(last, {"val_bpb": 1.0, "decode_ms": 8.0}, rung=2)  # better trained: on the front now
    assert set(strategy.pareto_front()) == {proposals[0].hash, last} and strategy.rung_of(last) == 2
    restored = make_strategy("pareto-aging", space, seed=0, population_size=4, sample_size=4)
    restored.load_state_dict(json.loads(json.dumps(strategy.state_dict())))
    assert restored.rung_of(last) == 2 and restored.objective_values(last) == (1.0, 8.0)
    with pytest.raises(ValueError, match="no told result"):
        strategy.update("0" * 64, {"val_bpb": 1.0, "decode_ms": 1.0}, rung=1)


# ---- searches ------------------------------------------------------------------------------------------


def _point(cand):
    return (cand.objectives["val_bpb"], cand.objectives["decode_ms"])


def _runs(storage, job_id):
    return storage.rung_runs(job_id)


def _check_promotions(runs, eta: int) -> None:
    """Replay the rule on the stored runs: each promotion began while its candidate was in the best 1/eta of
    the rung below's results finished by then, and at the end no qualified candidate is left unpromoted."""
    names = ("val_bpb", "decode_ms")
    for run in (r for r in runs if r.rung > 0):
        below = [r for r in runs if r.rung == run.rung - 1 and r.finished_at <= run.created_at]
        ladder = RungLadder.build(
            run.rung, eta, [(r.candidate_id, 0, [r.objectives[n] for n in names]) for r in below]
        )
        assert run.candidate_id in ladder.qualified(0), (run.candidate_id, run.rung)
    final = RungLadder.build(
        3, eta, [(r.candidate_id, r.rung, [r.objectives[n] for n in names]) for r in runs]
    )
    assert final.promotions() == []
    for rung in range(2):
        assert len(final.at(rung + 1)) >= len(final.at(rung)) // eta


def test_a_search_climbs_the_rungs_with_a_result_key_per_rung(storage, tmp_path):
    from proxies.worker import result_keys

    job_id = run_search(storage, tmp_path / "data")
    job = storage.get_job(job_id)
    assert job.status == "completed", job.error
    runs = _runs(storage, job_id)
    by_rung = [[r for r in runs if r.rung == k] for k in range(3)]
    assert len(by_rung[0]) == 9 and all(r.status == "completed" for r in runs)
    _check_promotions(runs, eta=3)
    assert len(by_rung[1]) >= 3 and len(by_rung[2]) >= 1
    # each rung's result is stored under that rung's own key: the key a fresh run at the rung's budget has
    config = SearchConfig.model_validate(job.config)
    assert len({r.training_key for r in runs}) == len(runs)
    for run in runs:
        cand = storage.get_candidate(run.candidate_id)
        proxy = config.fidelity.proxy_at(config.proxy, run.rung)
        keys = result_keys(
            cand.layout, proxy, config.latency, data_config=config.data, data_dir=tmp_path / "data"
        )
        assert keys.training_key == run.training_key
        stored = storage.get_training_result(run.training_key)
        assert stored.val_bpb == run.val_bpb and stored.result["steps_done"] == proxy.total_steps
        expected = config.fidelity.steps_to_train(config.proxy, run.rung, continued=run.rung > 0)
        assert run.steps_trained == expected and stored.result["steps_trained"] == expected
        assert (run.continued_from_step is not None) == (run.rung > 0)
    assert storage.training_steps_spent(job_id) == 9 * 4 + len(by_rung[1]) * (8 - 3) + len(by_rung[2]) * (
        16 - 6
    )
    # a candidate shows its highest rung; the front and the hypervolume count the top rung only
    cands = storage.candidates(job_id)
    for cand in cands:
        highest = max(r.rung for r in runs if r.candidate_id == cand.id)
        top_run = next(r for r in runs if r.candidate_id == cand.id and r.rung == highest)
        assert (
            cand.rung == highest
            and cand.val_bpb == top_run.val_bpb
            and cand.training_key == top_run.training_key
        )
    top = [c for c in cands if c.rung == 2]
    front = [c for c in top if not any(dominates(_point(o), _point(c)) for o in top)]
    assert {c.id for c in cands if c.on_front} == {c.id for c in front}
    assert storage.hypervolume_history(job_id)
    # latency was measured once per candidate, at its first rung
    with storage.transaction() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM latency_results").scalar() == 9


@pytest.mark.parametrize("storage", ["sqlite"], indirect=True)  # the engine, not the backend
def test_a_continued_promotion_equals_training_that_rung_fresh(storage, tmp_path):
    """Each promotion continued from the lower rung's checkpoint; training the same rung from scratch must
    give the same val_bpb (fp32 on CPU, the same data order: equal to float rounding) for more steps."""
    from proxies.worker import evaluate

    job_id = run_search(storage, tmp_path / "data")
    config = SearchConfig.model_validate(storage.get_job(job_id).config)
    promoted = [r for r in _runs(storage, job_id) if r.rung > 0]
    assert promoted and all(r.continued_from_step is not None for r in promoted)
    for run in promoted:
        cand = storage.get_candidate(run.candidate_id)
        proxy = config.fidelity.proxy_at(config.proxy, run.rung)
        fresh = evaluate(
            cand.layout,
            proxy,
            config.latency,
            data_config=config.data,
            data_dir=tmp_path / "data",
            measure_latency=False,
            save_artifacts=False,
        )
        assert fresh.training_key == run.training_key
        assert fresh.training["steps_trained"] == run.steps > run.steps_trained
        assert fresh.val_bpb == pytest.approx(run.val_bpb, abs=1e-5), (run.rung, fresh.val_bpb, run.val_bpb)


def test_a_second_search_reuses_every_rung(storage, tmp_path):
    first = run_search(storage, tmp_path / "data")
    with storage.transaction() as conn:
        before = conn.exec_driver_sql("SELECT COUNT(*) FROM training_results").scalar()
    second = run_search(storage, tmp_path / "data")
    with storage.transaction() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM training_results").scalar() == before
    runs = _runs(storage, second)
    assert len(runs) == len(_runs(storage, first))
    assert all(r.status == "reused" and r.steps_trained == 0 for r in runs)
    assert storage.training_steps_spent(second) == 0
    firsts = {
        (storage.get_candidate(r.candidate_id).layout_hash, r.rung): r.val_bpb for r in _runs(storage, first)
    }
    assert {(storage.get_candidate(r.candidate_id).layout_hash, r.rung): r.val_bpb for r in runs} == firsts


@pytest.mark.parametrize("storage", ["sqlite"], indirect=True)  # the engine, not the backend
def test_nsga2_runs_multi_fidelity(storage, tmp_path):
    job_id = run_search(
        storage, tmp_path / "data", budget=10, strategy="nsga2", strategy_options={"population_size": 4}
    )
    assert storage.get_job(job_id).status == "completed"
    runs = _runs(storage, job_id)
    assert sum(r.rung == 0 for r in runs) == 10 and any(r.rung == 2 for r in runs)
    _check_promotions(runs, eta=3)
    state = storage.load_strategy_state(job_id)["strategy"]
    top = next(r for r in runs if r.rung == 2)
    record = next(
        r for r in state["records"] if r["hash"] == storage.get_candidate(top.candidate_id).layout_hash
    )
    assert record["rung"] == 2 and record["objectives"]["val_bpb"] == top.val_bpb


# ---- crash safety ----------------------------------------------------------------------------------------


def _config_file(tmp_path):
    config = {
        **{k: v for k, v in TINY.items() if k != "proxy"},
        "name": "mf-kill",
        "budget": 9,
        "seed": 3,
        "proxy": {"batch_size": 4, "seq_len": 32, "eval_tokens": 512},
        "fidelity": {"rungs": [10, 30, 90], "eta": 3},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("backend", pg.BACKENDS)
def test_kill_9_mid_promotion_resumes_with_no_key_twice_and_nothing_lost(tmp_path, backend):
    from search.storage import Storage

    with pg.migrated_url(backend, tmp_path) as url:
        env = env_for(tmp_path)
        proc = subprocess.Popen(
            [HYBRIDNAS, "search", "run", str(_config_file(tmp_path)), "--db", url],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        store = Storage(url)
        try:

            def promoting():
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                jobs = store.list_jobs() if store.schema_is_current() else []
                return bool(jobs) and any(
                    r.rung > 0 and r.status == "running" for r in store.rung_runs(jobs[0].id)
                )

            wait_for(promoting, what="a promotion in flight")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        job_id = store.list_jobs()[0].id
        before = {(r.candidate_id, r.rung): r for r in store.rung_runs(job_id)}
        in_flight = [k for k, r in before.items() if r.status == "running"]
        run_cli(tmp_path, env, "search", "resume", str(job_id), "--db", url)
        assert store.get_job(job_id).status == "completed"
        after = {(r.candidate_id, r.rung): r for r in store.rung_runs(job_id)}
        for key, run in before.items():  # nothing completed is lost or redone
            if run.status == "completed":
                assert (after[key].training_key, after[key].val_bpb, after[key].attempts) == (
                    run.training_key,
                    run.val_bpb,
                    run.attempts,
                )
        for key in in_flight:  # the promotion in flight at the kill ran again, once
            assert after[key].status == "completed" and after[key].attempts == 2
        assert sum(k[1] == 0 for k in after) == 9 and all(r.status == "completed" for r in after.values())
        _check_promotions(list(after.values()), eta=3)
        keys = [r.training_key for r in after.values()]
        assert len(set(keys)) == len(keys) and all(store.get_training_result(k) for k in keys)
        with store.transaction() as conn:
            assert conn.exec_driver_sql("SELECT COUNT(*) FROM training_results").scalar() == len(keys)
        shown = run_cli(tmp_path, env, "search", "show", str(job_id), "--db", url, "--json", timeout=120)
        listed = json.loads(shown.stdout)["rungs"]
        assert [r["counts"].get("completed", 0) for r in listed] == [
            sum(k[1] == n for k in after) for n in range(3)
        ]
        assert [r["promoted"] for r in listed[:2]] == [sum(k[1] == n for k in after) for n in (1, 2)]
        table = run_cli(tmp_path, env, "search", "show", str(job_id), "--db", url, timeout=120)
        assert "Rungs (each promotes its best 1/3" in table.stdout, table.stdout
        state = store.load_strategy_state(job_id)["strategy"]
        rungs = {r["hash"]: r.get("rung", 0) for r in state["records"]}
        for cid, rung in after:  # the strategy heard of every promotion
            assert rungs[store.get_candidate(cid).layout_hash] >= rung
        store.close()


# ---- through the service ---------------------------------------------------------------------------------


def test_a_rung_search_runs_through_the_service_on_ray_and_its_page_shows_each_rung(tmp_path, browser):  # noqa: F811
    """`hybridnas serve` on the embedded default (SQLite, local Ray): a multi-fidelity search submitted over
    REST climbs its rungs on Ray workers; /rungs reports each rung (the top rung's hypervolume is the
    search's); bad rungs are refused naming the field; the search page draws the rungs in Chromium."""
    import httpx

    from tests.test_browser import Page
    from tests.test_service import AUTH, SEARCH, Coordinator

    url = f"sqlite:///{tmp_path}/service.db"
    coordinator = Coordinator(tmp_path, url, lease_s=30)
    try:
        body = {
            **SEARCH,
            "executor": "ray",
            "workers": 2,
            "proxy": {"batch_size": 4, "seq_len": 32, "eval_tokens": 512},
            "fidelity": {"rungs": [10, 30], "eta": 2},
        }
        bad = httpx.post(
            f"{coordinator.base}/api/searches", json={**body, "fidelity": {"rungs": [30, 10]}}, headers=AUTH
        )
        assert bad.status_code == 422 and "must increase" in bad.text and "fidelity" in bad.text
        created = httpx.post(f"{coordinator.base}/api/searches", json=body, headers=AUTH, timeout=10)
        assert created.status_code == 201, created.text
        search_id = created.json()["id"]

        def finished() -> bool:
            status = httpx.get(f"{coordinator.base}/api/searches/{search_id}", timeout=10).json()["status"]
            assert status in ("queued", "running", "completed"), status
            return status == "completed"

        wait_for(finished, timeout=400, what="the rung search to complete")
        detail = httpx.get(f"{coordinator.base}/api/searches/{search_id}", timeout=10).json()
        rungs = httpx.get(f"{coordinator.base}/api/searches/{search_id}/rungs", timeout=10).json()
        assert [r["steps"] for r in rungs["rungs"]] == [10, 30] and rungs["eta"] == 2
        low, top = rungs["rungs"]
        assert low["counts"].get("completed", 0) == 6 and low["promoted"] == sum(top["counts"].values()) >= 3
        assert top["hypervolume"] == pytest.approx(detail["hypervolume"])
        assert (
            rungs["training_steps"]
            == low["steps_trained"] + top["steps_trained"]
            == 6 * 10 + low["promoted"] * (30 - 8)
        )
        front = httpx.get(f"{coordinator.base}/api/searches/{search_id}/pareto", timeout=10).json()["items"]
        assert {c["id"] for c in front} == {p["candidate_id"] for p in top["front"]}
        assert all(c["rung"] == 1 for c in front)
        workers = {tuple(sorted(r.result["worker"].items())) for r in _training_results(url, search_id)}
        assert all(dict(w).get("node_id") for w in workers)  # trained by Ray actors

        page = Page(browser, coordinator.base)
        try:
            page.open(f"/searches/{search_id}", ready=True)
            page.page.wait_for_function("() => document.querySelectorAll('#rungs tbody tr').length === 2")
            cells = page.page.eval_on_selector_all(
                "#rungs tbody tr", "rows => rows.map(r => r.cells[5].textContent)"
            )
            assert cells == [str(low["promoted"]), "0"]
            traces = page.page.evaluate("() => document.getElementById('rung-fronts').data.map(t => t.name)")
            assert traces == ["rung 0 (10 steps)", "rung 1 (30 steps)"]
            assert page.errors == []
        finally:
            page.close()
    finally:
        coordinator.close()


def _training_results(url, search_id):
    from search.storage import Storage

    store = Storage(url)
    try:
        return [
            store.get_training_result(r.training_key) for r in store.rung_runs(search_id) if r.training_key
        ]
    finally:
        store.close()

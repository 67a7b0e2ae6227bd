"""The compute-axis replay harness (benchmarks/multifidelity_replay.py) on a rung table written in the test
for every layout of the benchmark space: the multi-fidelity replay promotes exactly as a RungLadder fed the
same results says (each promotion in its rung's best 1/eta), every run is charged FidelityConfig's steps,
the equal-compute cut counts only the runs finished by then, and MOASHA (when Syne Tune is installed) is
driven with distinct layouts and continued runs' costs."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from search.evaluation import ProxyConfig
from search.multifidelity import FidelityConfig, RungLadder
from search.pareto import dominates, pareto_front

ROOT = Path(__file__).resolve().parents[1]
RUNG_STEPS = (25, 100, 400)
AGING = {"population_size": 6, "sample_size": 4}


@pytest.fixture(scope="module")
def mf():
    spec = importlib.util.spec_from_file_location(
        "multifidelity_replay", ROOT / "benchmarks/multifidelity_replay.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _noise(layout_hash: str, rung: int) -> float:
    """A fixed pseudo-random number in [-1, 1) per layout and rung (rank flips between rungs)."""
    digest = hashlib.sha256(f"{layout_hash}:{rung}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**31 - 1


def _val_bpb(layout, rung: int) -> float:
    """Longer training and more operators lower val_bpb; the noise reorders layouts from rung to rung."""
    n_ops = len(layout.operators)
    return 2.4 + 3.0 / RUNG_STEPS[rung] ** 0.3 - 0.04 * n_ops + 0.05 * _noise(layout.content_hash, rung)


def _write_table(path: Path, layouts, skip_top: set[str] = frozenset()) -> None:
    columns = ["layout_hash", "operators", "d_model", "rung", "steps", "status", "val_bpb"]
    with (path / "rungs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for layout in layouts:
            for rung, steps in enumerate(RUNG_STEPS):
                failed = rung == 2 and layout.content_hash in skip_top
                writer.writerow(
                    {
                        "layout_hash": layout.content_hash,
                        "operators": " ".join(layout.operators),
                        "d_model": layout.d_model,
                        "rung": rung,
                        "steps": steps,
                        "status": "failed" if failed else "completed",
                        "val_bpb": "" if failed else _val_bpb(layout, rung),
                    }
                )
    with (path / "latency.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["layout_hash", "decode_ms_per_token"])
        writer.writeheader()
        for layout in layouts:
            ms = 0.05 * len(layout.operators) + layout.d_model / 500
            writer.writerow({"layout_hash": layout.content_hash, "decode_ms_per_token": ms})


@pytest.fixture(scope="module")
def table(mf, tmp_path_factory):
    path = tmp_path_factory.mktemp("rungs")
    layouts = mf.space_layouts()
    _write_table(path, layouts)
    loaded, in_table = mf.load_rung_table(path / "rungs.csv", path / "latency.csv")
    assert in_table == len(loaded.values) == len(layouts)
    return loaded, loaded.hypervolume_space(), {lo.content_hash: lo for lo in layouts}


def test_costs_are_the_fidelity_configs_continued_steps(mf):
    fidelity = FidelityConfig(rungs=list(RUNG_STEPS), eta=3)
    proxy = ProxyConfig(steps=100, warmup_fraction=0.1)
    # wsd: rung 0 decays over its last 5 of 25 steps, rung 1 over its last 20 of 100.
    assert [mf.run_cost(r, continued=r > 0) for r in range(3)] == [25, 100 - 20, 400 - 80]
    assert [mf.run_cost(r, continued=r > 0) for r in range(3)] == [
        fidelity.steps_to_train(proxy, r, continued=True) for r in range(3)
    ]
    assert mf.run_cost(2, continued=False) == 400


def test_multifidelity_replay_promotes_as_the_ladder_says(mf, table):
    rungs, hv_space, layouts = table
    budget = 6000
    curve = mf.replay_multifidelity("pareto-aging", AGING, 5, rungs, hv_space, budget)
    ladder = RungLadder(3, 3)
    ids: dict[str, int] = {}
    for layout_hash, rung in curve.runs:
        expected = ladder.promotions()
        if rung == 0:
            assert not expected, f"a new candidate was asked for while {expected} could be promoted"
            assert layout_hash not in ids, "a layout was proposed twice"
            ids[layout_hash] = len(ids)
        else:
            assert expected and expected[0] == (ids[layout_hash], rung)
            # In the rung below's best 1/eta right now: fewer of its results than that dominate it.
            below = ladder.at(rung - 1)
            point = below[ids[layout_hash]]
            assert sum(dominates(p, point) for p in below.values()) < len(below) // 3
        values = rungs.lookup(layout_hash, rung)
        ladder.record(ids[layout_hash], rung, [values["val_bpb"], values["decode_ms"]])
    assert curve.runs_per_rung[2] >= 3, curve.runs_per_rung  # the replay reached the top rung
    # Compute: the sum of each run's steps (a promotion continues from the lower rung's checkpoint).
    costs = {0: 25, 1: 80, 2: 320}
    assert curve.spent == sum(costs[rung] for _, rung in curve.runs)
    assert curve.spent >= budget and curve.steps[-2] < budget


def test_hypervolume_counts_only_top_rung_runs_finished_within_the_compute(mf, table):
    rungs, hv_space, _ = table
    curve = mf.replay_multifidelity("nsga2", {"population_size": 12}, 2, rungs, hv_space, 5000)
    first_top = next(i for i, (_, rung) in enumerate(curve.runs) if rung == 2)
    assert curve.at(curve.steps[first_top] - 1) == 0.0
    for cut in (curve.steps[first_top], 2500, 3333, 5000):
        finished = [
            tuple(rungs.lookup(h, 2)[o] for o in mf.OBJECTIVES)
            for (h, rung), spent in zip(curve.runs, curve.steps)
            if rung == 2 and spent <= cut
        ]
        expected = hv_space.hypervolume([finished[i] for i in pareto_front(finished)])
        assert math.isclose(curve.at(cut), expected, rel_tol=1e-12), cut
        assert expected > 0


def test_single_fidelity_replay_trains_every_candidate_at_400_steps(mf, table):
    rungs, hv_space, _ = table
    curve = mf.replay_single_fidelity("random", {}, 0, rungs, hv_space, 4000)
    assert curve.steps == [400 * (i + 1) for i in range(10)]
    assert {rung for _, rung in curve.runs} == {2}
    tops = [tuple(rungs.lookup(h, 2)[o] for o in mf.OBJECTIVES) for h, _ in curve.runs]
    assert math.isclose(curve.at(4000), hv_space.hypervolume([tops[i] for i in pareto_front(tops)]))
    assert curve.at(3999) <= curve.at(4000)


def test_a_layout_without_every_rung_is_a_free_failed_evaluation(mf, tmp_path):
    layouts = mf.space_layouts()
    dropped = {lo.content_hash for lo in layouts[::2]}
    _write_table(tmp_path, layouts, skip_top=dropped)
    rungs, in_table = mf.load_rung_table(tmp_path / "rungs.csv", tmp_path / "latency.csv")
    assert in_table == len(layouts) and set(rungs.values) == {lo.content_hash for lo in layouts} - dropped
    curve = mf.replay_single_fidelity("random", {}, 1, rungs, rungs.hypervolume_space(), 2000)
    charged = [b - a for a, b in zip([0] + curve.steps, curve.steps)]
    assert [c for (h, _), c in zip(curve.runs, charged) if h in dropped] == [0] * curve.missing
    assert curve.missing > 0 and curve.runs_per_rung[2] == 5


def test_a_row_at_the_wrong_steps_is_refused_naming_rung_and_steps(mf, tmp_path):
    layouts = mf.space_layouts()[:3]
    _write_table(tmp_path, layouts)
    text = (tmp_path / "rungs.csv").read_text().replace(",1,100,", ",1,99,", 1)
    (tmp_path / "rungs.csv").write_text(text)
    with pytest.raises(ValueError, match=r"rung 1 .*steps 99, expected 100"):
        mf.load_rung_table(tmp_path / "rungs.csv", tmp_path / "latency.csv")


def _trials(curve) -> dict[str, list[int]]:
    trials: dict[str, list[int]] = {}
    for layout_hash, rung in curve.runs:
        trials.setdefault(layout_hash, []).append(rung)
    return trials


def test_moasha_is_driven_with_distinct_layouts_and_continued_costs(mf, table):
    pytest.importorskip("syne_tune", reason="the optional extra `moasha` (Syne Tune) is not installed")
    rungs, hv_space, _ = table
    curve = mf.replay_moasha(3, rungs, hv_space, 6000)
    trials = _trials(curve)
    # Each trial climbs from rung 0 until stopped; no layout is tried twice.
    assert all(r == list(range(len(r))) for r in trials.values())
    assert len(trials) == sum(rung == 0 for _, rung in curve.runs)
    assert next(iter(trials.values())) == [0, 1, 2], "ASHA continues the first result of every milestone"
    assert curve.spent == sum({0: 25, 1: 80, 2: 320}[rung] for _, rung in curve.runs)
    assert 0 < sum(len(r) == 1 for r in trials.values()) < len(trials)
    # The same seed replays the same search (MOASHA samples with numpy's global generator, seeded per run).
    assert mf.replay_moasha(3, rungs, hv_space, 6000).runs == curve.runs
    assert mf.replay_moasha(4, rungs, hv_space, 6000).runs != curve.runs


def test_moasha_with_places_halves_by_dominance(mf, table):
    """At each milestone a result dominated by more than a third of the results there so far (itself
    included) is stopped, and one dominating all of them continues."""
    pytest.importorskip("syne_tune", reason="the optional extra `moasha` (Syne Tune) is not installed")
    rungs, hv_space, _ = table
    curve = mf.replay_moasha(7, rungs, hv_space, 8000, places=True)
    seen: list[list[tuple[float, ...]]] = [[], []]  # results at the 25- and 100-step milestones so far
    checked = {"stopped": 0, "continued": 0}
    for layout_hash, climbed in _trials(curve).items():
        for rung in (0, 1):
            if rung >= len(climbed):
                break
            point = tuple(rungs.lookup(layout_hash, rung)[o] for o in mf.OBJECTIVES)
            dominated_by = sum(dominates(p, point) for p in seen[rung])
            continued = len(climbed) > rung + 1
            if dominated_by / (len(seen[rung]) + 1) > 1 / 3:
                assert not continued, (layout_hash[:12], rung, dominated_by, len(seen[rung]))
                checked["stopped"] += 1
            elif seen[rung] and all(dominates(point, p) for p in seen[rung]):
                assert continued or curve.runs[-1][0] == layout_hash, (layout_hash[:12], rung)
                checked["continued"] += 1
            seen[rung].append(point)
    assert checked["stopped"] >= 5 and checked["continued"] >= 1, checked


def test_moasha_with_places_stops_the_dominated_and_keeps_the_dominating(mf):
    pytest.importorskip("syne_tune", reason="the optional extra `moasha` (Syne Tune) is not installed")
    # Successive halving's rule: a result dominating every recorded one is in the best third; one dominated
    # by all is not. Syne Tune 0.16.0's default priority gets the second right and not the first.
    assert mf.stop_rates(places=True, trials=60) == (0.0, 1.0)
    shipped_dominating, shipped_dominated = mf.stop_rates(places=False, trials=60)
    assert shipped_dominated == 1.0 and shipped_dominating > 0.3


def test_compute_mode_writes_the_report_with_every_method(mf, tmp_path):
    pytest.importorskip("syne_tune", reason="the optional extra `moasha` (Syne Tune) is not installed")
    layouts = mf.space_layouts()
    _write_table(tmp_path, layouts)  # the script reads the committed latency table; this one is unused
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "benchmarks/search_efficiency.py"), "--compute", "--seeds", "3"]
    command += ["--seed-offset", "0", "--workers", "1", "--budget-fraction", "0.02"]
    command += ["--rungs-table", str(tmp_path / "rungs.csv"), "--out-dir", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    report = json.loads((out / "search_efficiency_compute.json").read_text())
    budget = round(0.02 * len(layouts)) * 400
    assert report["budget_steps"] == budget and report["layouts_all_rungs"] == len(layouts)
    assert set(report["methods"]) == {
        "MF pareto-aging",
        "MF nsga2",
        "SF pareto-aging",
        "SF nsga2",
        "SF random",
        "MOASHA",
        "MOASHA, ranks as places",
    }
    sf = report["methods"]["SF random"]
    assert sf["runs_per_rung_mean"] == [0, 0, budget / 400] and len(sf["finals"]) == 3
    assert sf["hv_at"][str(budget)]["mean"] == pytest.approx(statistics.mean(sf["finals"]))
    reach = report["reach"]["pareto-aging"]
    if reach["mf_steps"] is not None:
        mf_runs = report["methods"]["MF pareto-aging"]
        assert reach["mf_steps"] <= budget and mf_runs["hv_at"][str(budget)]["mean"] >= reach["sf_final_mean"]
    assert set(report["mf_pareto_aging_greater_p"]["MOASHA"]) == {str(budget * k // 4) for k in (1, 2, 3, 4)}
    text = (out / "search_efficiency_compute.md").read_text()
    assert report["command"] in text and "NOT the held-out set: 0-2" in text
    if importlib.util.find_spec("matplotlib") is not None:  # the plot needs the `bench` extra
        assert (out / "search_efficiency_compute.png").stat().st_size > 10_000


def test_compute_tuning_compares_each_eta_with_single_fidelity_on_tuning_seeds(mf, tmp_path):
    """`--compute-tuning`: one row per eta; its reach is the least compute on the grid where the mean
    hypervolume of MF pareto-aging is at least SF pareto-aging's final mean, on seeds from 0."""
    layouts = mf.space_layouts()
    _write_table(tmp_path, layouts)
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "benchmarks/search_efficiency.py"),
        "--compute-tuning",
        "--seeds",
        "2",
    ]
    command += ["--workers", "1", "--budget-fraction", "0.02", "--rungs-table", str(tmp_path / "rungs.csv")]
    subprocess.run(command + ["--out-dir", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    report = json.loads((out / "search_efficiency_compute_tuning.json").read_text())
    budget = round(0.02 * len(layouts)) * 400
    assert report["seeds"] == [0, 1] and report["budget_steps"] == budget
    assert list(report["etas"]) == ["2", "3", "4", "5"]
    for row in report["etas"].values():
        if row["reach_steps"] is None:
            assert row["hv_mean_at"]["1.0"] < report["sf_final_mean"]
        else:
            assert row["reach_steps"] <= budget and row["reach_share"] == row["reach_steps"] / budget
            assert row["hv_mean_at"]["1.0"] >= report["sf_final_mean"]
        assert row["runs_per_rung_mean"][0] >= row["runs_per_rung_mean"][1] >= row["runs_per_rung_mean"][2]
    text = (out / "search_efficiency_compute_tuning.md").read_text()
    assert report["command"] in text and text.count("\n| ") == 2 + 4

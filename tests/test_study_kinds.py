"""The fidelity, ablation and verdict study kinds (search/studies/): their statistics against independent
references (scipy), the verdict's matching of budgets, each kind run for real (inline executor, real training
and latency) and read over REST, the search page's proxy-trust slot, and a study resumed after kill -9."""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml
from fastapi.testclient import TestClient
from scipy import stats

from api.app import create_app
from api.auth import Auth
from api.settings import Settings
from search.layout import Layout
from search.leases import owner_id, take_job
from search.storage import Storage
from search.studies import AblationStudy, FidelityStudy, Reference, StudyError, VerdictStudy, parse_study
from search.studies.fidelity import fidelity_statistics, judges, trust_key
from search.studies.stats import effect, mean_interval
from search.studies.verdict import Point, check_references, front_of, match_budgets
from search.study_runner import run_study
from tests import pg
from tests.test_engine import TINY, run_search
from tests.test_search_resume import run_cli, spawn, wait_for
from tests.test_studies import inline

TOKEN = "study-kinds-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVALUATION = {"proxy": TINY["proxy"], "latency": TINY["latency"], "executor": "inline", "workers": 1}
SMALL = {"operators": ["attention", "ffn"], "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16}


# ---------------------------------------------------------------------------------------------- statistics


def test_the_paired_interval_is_the_t_interval_scipy_computes():
    diffs = [-0.031, -0.012, -0.044, -0.020, -0.027]
    ours = mean_interval(diffs)
    reference = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert ours["n"] == 5 and ours["mean"] == pytest.approx(sum(diffs) / 5)
    assert ours["ci95"] == pytest.approx([reference.low, reference.high])
    assert effect(ours) == "improves"  # the whole interval below zero: the arm's val_bpb is lower
    assert effect(mean_interval([d + 0.1 for d in diffs])) == "hurts"
    assert effect(mean_interval([-0.01, 0.012, 0.002])) == "no effect distinguishable from seed noise"
    assert mean_interval([0.3])["ci95"] is None and effect(mean_interval([0.3])).startswith("no effect")


def test_the_ablation_pairs_each_arm_with_the_baseline_of_its_seed():
    study = AblationStudy.model_validate({**EVALUATION, "layouts": [SMALL], "seeds": [0, 1, 2]})
    h = Layout.from_dict(SMALL).content_hash
    base = {0: 3.50, 1: 3.56, 2: 3.47}
    shift = {"weight_norm": {0: -0.05, 1: -0.03, 2: -0.04}, "meta_tokens": {0: 0.01, 1: -0.02, 2: 0.00}}
    runs = {f"baseline-s{s}": [_cand(h, v, 1000.0)] for s, v in base.items()}
    for arm, by_seed in shift.items():
        runs |= {f"{arm}-s{s}": [_cand(h, base[s] + d, 800.0)] for s, d in by_seed.items()}
    report = study.analyse(runs, {})
    for arm, by_seed in shift.items():
        r = report["arms"][arm]
        assert [p["seed"] for p in r["pairs"]] == [0, 1, 2]
        assert r["val_bpb_difference"]["mean"] == pytest.approx(sum(by_seed.values()) / 3)
        assert r["step_time_overhead"]["mean"] == pytest.approx(1000 / 800 - 1)
    assert report["arms"]["weight_norm"]["effect"] == "improves"
    assert report["arms"]["meta_tokens"]["effect"].startswith("no effect")
    assert len(AblationStudy.table(report)) == 6
    assert [r.key for r in study.plan({})][:3] == ["baseline-s0", "weight_norm-s0", "meta_tokens-s0"]


def _cand(layout_hash: str, val_bpb: float, tokens_per_s: float) -> dict:
    return {
        "layout_hash": layout_hash,
        "val_bpb": val_bpb,
        "status": "completed",
        "training": {"tokens_per_s": tokens_per_s},
    }


def test_the_fidelity_statistics_are_scipys_rank_correlations():
    pairs = [(f"l{i}", 3.0 + 0.1 * i, 2.5 + 0.09 * i + (0.05 if i == 3 else 0), 1000 + i) for i in range(8)]
    noisy = [(h, a, a + (0.2 if i % 2 else -0.2), n) for i, (h, a, _, n) in enumerate(pairs)]
    report = fidelity_statistics(pairs, noisy, bootstrap=50)
    expected = stats.spearmanr([p[1] for p in pairs], [p[2] for p in pairs]).statistic
    assert report["short_vs_long"]["spearman"] == pytest.approx(expected)
    assert report["short_vs_long"]["kendall"] == pytest.approx(
        stats.kendalltau([p[1] for p in pairs], [p[2] for p in pairs]).statistic
    )
    ceiling = stats.spearmanr([p[1] for p in noisy], [p[2] for p in noisy]).statistic
    assert report["seed_noise_ceiling"]["spearman"] == pytest.approx(ceiling)
    assert report["within_param_band"]["n"] == 8 and report["target_met"] is True
    reversed_ = [(h, a, -b, n) for h, a, b, n in pairs]
    assert fidelity_statistics(reversed_, noisy, bootstrap=50)["target_met"] is False


# ---------------------------------------------------------------------------------------------- verdict


def test_the_verdict_matches_each_budget_with_the_best_layout_that_meets_it():
    hybrids = [
        Point("h1", "a", 1.0, 3.9, "measured"),
        Point("h2", "b", 2.0, 3.6, "measured"),
        Point("h3", "c", 2.5, 3.7, "measured"),
        Point("h4", "d", 4.0, 3.4, "measured"),
    ]
    llamas = [
        Point("D2", "e", 1.5, 3.8, "measured"),
        Point("D4", "f", 3.0, 3.65, "measured"),
        Point("D6", "g", 3.5, 3.5, "law"),
    ]
    matches = match_budgets(hybrids, llamas, [0.5, 1.0, 2.0, 3.0, 3.5, 10.0])
    picks = [(m["hybrid"] and m["hybrid"].name, m["llama"] and m["llama"].name) for m in matches]
    assert picks == [(None, None), ("h1", None), ("h2", "D2"), ("h2", "D4"), ("h2", "D6"), ("h4", "D6")]
    assert [p.name for p in front_of(hybrids)] == ["h1", "h2", "h4"]  # h3 is dominated by h2
    tie = [Point("law", "x", 1.0, 3.0, "law"), Point("measured", "y", 1.0, 3.0, "measured")]
    assert match_budgets([], tie, [1.0])[0]["llama"].name == "measured"


def _reference(kind, status="completed", result=None, **config) -> Reference:
    return Reference({"kind": kind, "status": status, "config": config, "result": result})


def test_a_verdict_refuses_references_it_cannot_compare():
    search = _reference("search", proxy={"steps": 100})
    grid = _reference("depth-width", result={"points": []}, proxy={"steps": 100})
    check_references(search, grid)
    with pytest.raises(StudyError) as refused:
        check_references(search, _reference("depth-width", result={"points": []}, proxy={"steps": 200}))
    assert refused.value.field == "depth_width_id" and "proxy.steps" in refused.value.reason
    with pytest.raises(StudyError) as refused:
        check_references(_reference("search", status="running"), grid)
    assert refused.value.field == "search_id" and "running" in refused.value.reason
    with pytest.raises(StudyError) as refused:
        check_references(search, _reference("search"))
    assert refused.value.field == "depth_width_id"
    other_cpu = Reference(grid.job, [{"device_fingerprint": {"device": "another CPU", "device_type": "cpu"}}])
    here = Reference(search.job, [{"device_fingerprint": {"device": "this CPU", "device_type": "cpu"}}])
    with pytest.raises(StudyError, match="another device"):
        check_references(here, other_cpu)


# ---------------------------------------------------------------------------------------------- for real


def finish(storage, study_id: int, tmp_path) -> tuple[str, str | None]:
    """Run a study as a runner does: under its lease, released with the outcome."""
    owner = owner_id("test@")
    take_job(storage, study_id, owner, 60.0)
    outcome = run_study(storage, study_id, inline(tmp_path))
    storage.release_job(study_id, owner, outcome[0], error=outcome[1])
    return outcome


@pytest.fixture
def store(tmp_path):
    with pg.migrated_url("sqlite", tmp_path) as url:
        storage = Storage(url)
        yield storage
        storage.close()


@pytest.fixture
def client(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data", runners=0, scheduler=False, data_roots=[tmp_path], database_url=None
    )
    settings.ensure_data_dir()
    with TestClient(create_app(settings, auth=Auth(TOKEN))) as c:
        yield c


FIDELITY = {
    "kind": "fidelity",
    **EVALUATION,
    "n_layouts": 3,
    "long_factor": 2,
    "max_operators": 4,
    "d_model": 32,
    "bootstrap": 20,
}


def test_a_fidelity_study_ranks_its_layouts_and_the_search_page_trusts_it(client, tmp_path):
    created = client.post("/api/studies", json=FIDELITY, headers=AUTH)
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]
    store = client.app.state.storage
    assert finish(store, study_id, tmp_path) == ("completed", None)
    detail = client.get(f"/api/studies/{study_id}").json()
    assert [r["kind"] for r in detail["runs"]] == ["study-run"] * 3
    report = detail["result"]
    assert len(report["rows"]) == 3 and report["failed_runs"] == 0
    short, seeded, long_ = ({c.layout_hash: c for c in store.candidates(r["id"])} for r in detail["runs"])
    for row in report["rows"]:
        assert row["short_val_bpb"] == short[row["layout_hash"]].val_bpb
        assert row["short_seed_val_bpb"] == seeded[row["layout_hash"]].val_bpb != row["short_val_bpb"]
        assert row["long_val_bpb"] == long_[row["layout_hash"]].val_bpb
    steps = [store.get_job(r["id"]).config["proxy"] for r in detail["runs"]]
    assert [(p["steps"], p["seed"]) for p in steps] == [(2, 0), (2, 1), (4, 0)]
    assert report["short_vs_long"]["n"] == 3
    assert report["short_vs_long"]["spearman"] == pytest.approx(
        stats.spearmanr(
            [r["short_val_bpb"] for r in report["rows"]], [r["long_val_bpb"] for r in report["rows"]]
        ).statistic
    )
    assert client.get(f"/api/studies/{study_id}/results.csv").text.count("\n") == 4

    same = client.post("/api/searches", json={**TINY, "budget": 2}, headers=AUTH).json()["id"]
    other = client.post(
        "/api/searches", json={**TINY, "budget": 2, "proxy": {**TINY["proxy"], "lr": 0.01}}, headers=AUTH
    ).json()["id"]
    trust = client.get(f"/api/searches/{same}/proxy-trust").json()
    assert trust["study_id"] == study_id and trust["short_vs_long"] == report["short_vs_long"]
    assert client.get(f"/api/searches/{other}/proxy-trust").json()["study_id"] is None
    assert judges(report, trust_key({"proxy": TINY["proxy"]})) and not judges(
        report, trust_key({"proxy": TINY["proxy"], "data": {"corpus": "x.txt"}})
    )
    page = client.get(f"/searches/{same}").text
    assert f'href="/studies/{study_id}"' in page and 'id="trust-spearman"' in page
    assert "No fidelity study was run" in client.get(f"/searches/{other}").text
    study_page = client.get(f"/studies/{study_id}").text
    assert 'id="fidelity"' in study_page and "fidelity-scatter" in study_page


def test_an_ablation_study_trains_each_arm_on_each_seed(store, tmp_path):
    config = AblationStudy.model_validate(
        {**EVALUATION, "layouts": [SMALL], "seeds": [0, 1], "meta_tokens": 4}
    )
    study_id = store.create_job("ablation", config.model_dump(mode="json"))
    assert finish(store, study_id, tmp_path) == ("completed", None)
    runs = {r.name.rsplit(" / ", 1)[-1]: r for r in store.child_jobs(study_id)}
    assert sorted(runs) == sorted(
        f"{a}-s{s}" for a in ("baseline", "weight_norm", "meta_tokens") for s in (0, 1)
    )
    proxies = {key: store.get_job(r.id).config["proxy"] for key, r in runs.items()}
    assert proxies["weight_norm-s1"]["weight_norm"] and proxies["weight_norm-s1"]["seed"] == 1
    assert proxies["meta_tokens-s0"]["meta_tokens"] == 4 and proxies["baseline-s0"]["meta_tokens"] == 0

    def trained(key):
        [cand] = store.candidates(runs[key].id)
        return cand, store.get_training_result(cand.training_key).result

    report = store.get_job(study_id).result
    for arm in ("weight_norm", "meta_tokens"):
        pairs = report["arms"][arm]["pairs"]
        assert [p["seed"] for p in pairs] == [0, 1]
        for p in pairs:
            (base, base_result), (other, other_result) = (
                trained(f"baseline-s{p['seed']}"),
                trained(f"{arm}-s{p['seed']}"),
            )
            assert p["difference"] == pytest.approx(other.val_bpb - base.val_bpb)
            assert p["step_time_overhead"] == pytest.approx(
                base_result["tokens_per_s"] / other_result["tokens_per_s"] - 1
            )
    _, with_meta = trained("meta_tokens-s0")
    _, without = trained("baseline-s0")
    assert with_meta["n_params"] - without["n_params"] == 4 * SMALL["d_model"]  # the arm really has them


def test_a_verdict_sets_a_search_against_the_depth_width_llamas(client, tmp_path):
    store = client.app.state.storage
    search_id = run_search(store, tmp_path, budget=5)
    grid = {"kind": "depth-width", **EVALUATION, "depths": [1, 2, 3], "widths": [32, 64], "bootstrap": 10}
    grid_id = client.post("/api/studies", json=grid, headers=AUTH).json()["id"]
    verdict = {
        "kind": "verdict",
        "search_id": search_id,
        "depth_width_id": grid_id,
        "seeds": [1],
        **EVALUATION,
    }
    verdict.pop("proxy"), verdict.pop("latency")
    early = client.post("/api/studies", json=verdict, headers=AUTH)
    assert early.status_code == 422 and early.json()["errors"][0]["field"] == "depth_width_id", early.text
    assert finish(store, grid_id, tmp_path) == ("completed", None)
    created = client.post("/api/studies", json=verdict, headers=AUTH)
    assert created.status_code == 201, created.text
    verdict_id = created.json()["id"]
    assert finish(store, verdict_id, tmp_path) == ("completed", None)
    report = store.get_job(verdict_id).result
    searched = [c for c in store.candidates(search_id) if c.status in ("completed", "reused")]
    grid_points = [p for p in store.get_job(grid_id).result["points"] if p["val_bpb"] is not None]
    [reseeded] = store.child_jobs(verdict_id)
    again = {c.layout_hash: c.val_bpb for c in store.candidates(reseeded.id)}
    assert store.get_job(reseeded.id).config["proxy"]["seed"] == 1
    assert report["budgets"], report
    for row in report["budgets"]:
        budget = row["budget_ms"]
        best = min((c for c in searched if c.decode_ms <= budget), key=lambda c: c.val_bpb)
        assert row["hybrid"]["layout_hash"] == best.layout_hash and row["hybrid"]["val_bpb"] == best.val_bpb
        assert row["hybrid"]["seeds"]["mean"] == pytest.approx((best.val_bpb + again[best.layout_hash]) / 2)
        meeting = [p for p in grid_points if p["decode_ms"] <= budget]
        if not meeting:
            assert row["llama"] is None and row["gain"] is None
            continue
        llama = min(meeting, key=lambda p: p["val_bpb"])
        assert row["llama"]["name"] == f"D{llama['depth']}-W{llama['width']}"
        assert row["gain"] == pytest.approx(row["llama"]["seeds"]["mean"] - row["hybrid"]["seeds"]["mean"])
        assert row["gain_se"] is not None and row["outcome"] in (
            "hybrid better",
            "llama better",
            "within seed noise",
        )
    assert [p["decode_ms"] for p in report["hybrid_front"]] == sorted(
        r["budget_ms"] for r in report["budgets"]
    )
    page = client.get(f"/studies/{verdict_id}").text
    assert 'id="verdict"' in page and "verdict-fronts" in page
    csv_rows = client.get(f"/api/studies/{verdict_id}/results.csv").text.splitlines()
    assert csv_rows[0].startswith("budget_ms,hybrid,") and len(csv_rows) == 1 + len(report["budgets"])
    unfinished = run_search(store, tmp_path, budget=1, name="other")
    store.transition_job(unfinished, ("completed",), "cancelled", kind="search")
    refused = client.post("/api/studies", json={**verdict, "search_id": unfinished}, headers=AUTH)
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "search_id", refused.text


def test_every_kind_is_refused_naming_its_field(client):
    cases = [
        ({**FIDELITY, "noise_seed": 0}, "noise_seed"),
        ({**FIDELITY, "long_factor": 1}, "long_factor"),
        ({"kind": "ablation", "layouts": ["no-such-preset"]}, "layouts.0"),
        ({"kind": "ablation", "seeds": [1, 1]}, "seeds"),
        ({"kind": "verdict", "depth_width_id": 1}, "search_id"),
        ({"kind": "verdict", "search_id": 1, "depth_width_id": 2}, "search_id"),  # no such search
        ({"kind": "tea-leaves"}, "kind"),
        ({}, "kind"),
    ]
    for body, field in cases:
        refused = client.post("/api/studies", json=body, headers=AUTH)
        assert refused.status_code == 422, (body, refused.text)
        assert refused.json()["errors"][0]["field"] == field, (body, refused.text)
    assert parse_study({"kind": "fidelity"}).n_layouts == 24  # the default study
    assert isinstance(parse_study({"kind": "verdict", "search_id": 1, "depth_width_id": 2}), VerdictStudy)
    assert isinstance(parse_study(FIDELITY), FidelityStudy)


# ---------------------------------------------------------------------------------------------- kill -9


def test_a_study_killed_mid_run_resumes_with_nothing_lost_or_trained_twice(tmp_path):
    config = {
        "name": "kill-study",
        "depths": [1, 2, 3],
        "widths": [32, 64],
        "proxy": {"steps": 25, "batch_size": 4, "seq_len": 32, "eval_tokens": 512},
        "latency": TINY["latency"],
        "executor": "inline",
        "workers": 1,
        "bootstrap": 10,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    proc, env = spawn(tmp_path, "study", "depth-width", str(path), "--db", url)
    storage = None
    try:

        def mid_run():
            nonlocal storage
            if proc.poll() is not None:
                raise AssertionError(f"the study ended early: {proc.stdout.read().decode()[-2000:]}")
            if storage is None:
                if not (tmp_path / "kill.db").exists():
                    return False
                storage = Storage(url)
            if not storage.schema_is_current():
                return False
            runs = storage.list_jobs(kind="study-run")
            counts = storage.candidate_counts(runs[0].id) if runs else {}
            return counts.get("completed", 0) >= 2 and counts.get("running", 0) >= 1

        wait_for(mid_run, what="two finished grid points and one running")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    [study] = storage.list_jobs(kind="depth-width")
    [run] = storage.child_jobs(study.id)
    before = {c.id: (c.training_key, c.val_bpb) for c in storage.candidates(run.id, status="completed")}
    assert study.status == "running" and len(before) >= 2
    run_cli(tmp_path, env, "study", "resume", str(study.id), "--db", url)
    assert storage.get_job(study.id).status == "completed"
    after = {c.id: c for c in storage.candidates(run.id)}
    assert len(after) == 6 and {c.status for c in after.values()} == {"completed"}
    for cid, (key, bpb) in before.items():
        assert (after[cid].training_key, after[cid].val_bpb) == (key, bpb)
    with storage.transaction() as conn:
        twice = conn.exec_driver_sql(
            "SELECT training_key FROM training_results GROUP BY training_key HAVING COUNT(*) > 1"
        ).fetchall()
    assert twice == [] and storage.get_job(study.id).result["n_measured"] == 6
    shown = json.loads(
        run_cli(tmp_path, env, "study", "show", str(study.id), "--db", url, "--json", timeout=120).stdout
    )
    assert shown["status"] == "completed"
    storage.close()

"""Studies as job kinds (search/studies/, search/study_runner.py, api/routes/studies.py): a depth-width
study runs its grid as a `study-run` job through the engine on the inline executor (real training and
latency), stores its report (points, law, extrapolation, budget choices), resumes where it stopped, reuses
every stored result, is taken by the service's job runner, and is submitted and read over REST with the
search checks."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import Auth
from api.settings import Settings
from search.engine import StopEvent
from search.executors import InlineExecutor
from search.studies import DepthWidthStudy, parse_study
from search.study_runner import run_study
from tests import pg
from tests.test_engine import TINY
from tests.test_runner import inline_runner, wait_for

storage = pg.storage
TOKEN = "studies-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STUDY = {
    "kind": "depth-width",
    "name": "tiny grid",
    "depths": [1, 2, 3, 4],
    "widths": [32, 64, 96],
    "proxy": TINY["proxy"],
    "latency": TINY["latency"],
    "executor": "inline",
    "workers": 1,
    "budgets_ms": [1e6, 1e-6],
    "bootstrap": 20,
}


def make_study(storage, **overrides) -> int:
    config = DepthWidthStudy.model_validate({**STUDY, **overrides}).model_dump(mode="json")
    return storage.create_job("depth-width", config, name=config["name"])


def inline(tmp_path):
    return lambda config: InlineExecutor(str(tmp_path / "data"), threads=1)


def test_a_depth_width_study_runs_its_grid_and_reports_the_law(storage, tmp_path):
    study_id = make_study(storage)
    status, error = run_study(storage, study_id, inline(tmp_path))
    assert (status, error) == ("completed", None)
    [run] = storage.child_jobs(study_id)
    assert run.kind == "study-run" and run.parent_id == study_id and run.status == "completed"
    candidates = storage.candidates(run.id)
    assert len(candidates) == 12 and all(c.status == "completed" for c in candidates)
    report = storage.get_job(study_id).result
    points = {(p["depth"], p["width"]): p for p in report["points"]}
    assert set(points) == {(d, w) for d in STUDY["depths"] for w in STUDY["widths"]}
    by_hash = {c.layout_hash: c for c in candidates}
    study = parse_study(storage.get_job(study_id).config)
    for (d, w), point in points.items():
        cand = by_hash[study.layout(d, w).content_hash]
        assert point["val_bpb"] == cand.val_bpb and point["decode_ms"] == cand.decode_ms
        assert len(cand.layout["operators"]) == 2 * d and cand.layout["d_model"] == w
    law = report["law"]
    assert set(law) >= {"l0", "a", "alpha", "b", "beta"} and law["n_points"] == 12
    assert 0 <= law["l0"] <= min(p["val_bpb"] for p in points.values())
    assert set(report["intervals"]) == {"l0", "a", "alpha", "b", "beta"}
    extrapolation = report["extrapolation"]
    assert (extrapolation["fit_max_depth"], extrapolation["fit_max_width"]) == (3, 64)
    assert {(h["depth"], h["width"]) for h in extrapolation["held_out"]} == {
        (d, w) for d, w in points if d == 4 or w == 96
    }
    generous, impossible = report["budgets"]
    lowest = min(points.values(), key=lambda p: p["val_bpb"])
    chosen = generous["by_measured_loss"]
    assert (chosen["depth"], chosen["width"]) == (lowest["depth"], lowest["width"])
    assert generous["by_law"]["predicted"] and impossible["by_law"] is None
    progress = storage.get_job(study_id)
    assert (progress.n_evaluations, progress.budget) == (12, 12)


def test_a_study_resumes_and_a_second_one_trains_nothing_again(storage, tmp_path):
    study_id = make_study(storage, depths=[1, 2], widths=[32, 64, 96])
    stop = StopEvent()

    def halt(p):
        if p.n_evaluations >= 2:
            stop.set()

    status, _ = run_study(storage, study_id, inline(tmp_path), stop=stop, on_progress=halt)
    assert status == "queued"
    [run] = storage.child_jobs(study_id)
    assert storage.count_candidates(run.id, status="completed") < 6
    assert run_study(storage, study_id, inline(tmp_path)) == ("completed", None)
    assert [c.status for c in storage.candidates(run.id)] == ["completed"] * 6  # each point once
    again = make_study(storage, depths=[1, 2], widths=[32, 64, 96], name="again")
    assert run_study(storage, again, inline(tmp_path)) == ("completed", None)
    [rerun] = storage.child_jobs(again)
    assert {c.status for c in storage.candidates(rerun.id)} == {"reused"}
    first, second = (storage.get_job(s).result["points"] for s in (study_id, again))
    assert [p["val_bpb"] for p in first] == [p["val_bpb"] for p in second]


def test_the_job_runner_takes_a_study(storage, tmp_path):
    study_id = make_study(storage, depths=[1, 2, 3], widths=[32, 64])
    runner = inline_runner(storage, tmp_path)
    runner.start()
    try:
        wait_for(lambda: storage.get_job(study_id).status == "completed", what="the study to complete")
    finally:
        runner.stop()
    job = storage.get_job(study_id)
    assert job.result["n_measured"] == 6 and job.lease_owner is None


@pytest.fixture
def client(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data", runners=0, scheduler=False, data_roots=[tmp_path], database_url=None
    )
    settings.ensure_data_dir()
    app = create_app(settings, auth=Auth(TOKEN))
    with TestClient(app) as c:
        yield c


def test_studies_over_rest(client, tmp_path):
    bad = client.post("/api/studies", json={**STUDY, "depths": [3]}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "depths", bad.text
    unknown = client.post("/api/studies", json={**STUDY, "kind": "tea-leaves"}, headers=AUTH)
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "kind", unknown.text
    outside = client.post("/api/studies", json={**STUDY, "data": {"corpus": "/etc"}}, headers=AUTH)
    assert outside.status_code == 422 and outside.json()["errors"][0]["field"] == "data.corpus", outside.text
    assert client.post("/api/studies", json=STUDY).status_code == 401
    created = client.post("/api/studies", json=STUDY, headers={**AUTH, "Idempotency-Key": "grid-1"})
    assert created.status_code == 201, created.text
    study = created.json()
    assert created.headers["Location"] == f"/api/studies/{study['id']}" and study["status"] == "queued"
    replay = client.post("/api/studies", json=STUDY, headers={**AUTH, "Idempotency-Key": "grid-1"})
    assert replay.status_code == 200 and replay.json()["id"] == study["id"]
    listed = client.get("/api/studies").json()
    assert [s["id"] for s in listed["items"]] == [study["id"]] and listed["total"] == 1
    assert client.get(f"/api/studies/{study['id']}").json()["config"]["depths"] == [1, 2, 3, 4]
    assert client.get("/api/studies/999").status_code == 404
    assert client.get(f"/api/searches/{study['id']}").status_code == 404  # a study is not a search
    assert client.post(f"/api/studies/{study['id']}/cancel", headers=AUTH).json()["status"] == "cancelled"
    assert client.post(f"/api/studies/{study['id']}/resume", headers=AUTH).json()["status"] == "queued"
    assert client.delete(f"/api/studies/{study['id']}", headers=AUTH).status_code == 409
    client.post(f"/api/studies/{study['id']}/cancel", headers=AUTH)
    assert client.delete(f"/api/studies/{study['id']}", headers=AUTH).status_code == 204
    assert client.get(f"/api/studies/{study['id']}").status_code == 404


def test_the_points_csv_of_a_finished_study(client, tmp_path):
    store = client.app.state.storage
    study_id = make_study(store, depths=[1, 2, 3], widths=[32, 64])
    assert run_study(store, study_id, inline(tmp_path)) == ("completed", None)
    text = client.get(f"/api/studies/{study_id}/results.csv").text
    header, *rows = text.splitlines()
    assert header.startswith("depth,width,candidate_id,status,val_bpb,predicted_val_bpb") and len(rows) == 6
    detail = client.get(f"/api/studies/{study_id}").json()
    assert detail["result"]["n_measured"] == 6 and [r["kind"] for r in detail["runs"]] == ["study-run"]
    assert json.loads(json.dumps(detail["result"])) == detail["result"]  # plain JSON all the way down


@pytest.mark.parametrize("path", ["/api/searches", "/api/studies"])
def test_a_path_the_file_system_refuses_is_a_422_naming_the_field(client, path):
    """A tokenizer path longer than a file name may be (found by schemathesis): was a 500."""
    body = {**(STUDY if path == "/api/studies" else TINY), "data": {"tokenizer": "file:" + "0" * 3000}}
    refused = client.post(path, json=body, headers=AUTH)
    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["field"] == "data.tokenizer" and "not a usable path" in refused.text


def test_the_study_command_runs_here_and_names_bad_fields(tmp_path):
    import yaml

    from tests.test_cli import cli

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in STUDY.items() if k != "kind"} | {"depths": [1, 2, 3]}))
    done = cli(tmp_path, "study", "depth-width", str(config), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    detail = json.loads(done.stdout)
    assert detail["status"] == "completed" and detail["result"]["n_measured"] == 9
    assert f"study {detail['id']}: 9/9" in done.stderr  # plain progress lines
    shown = cli(tmp_path, "study", "show", str(detail["id"]))
    assert shown.returncode == 0 and "L(D, W)" in shown.stdout and "extrapolation" in shown.stdout
    config.write_text(yaml.safe_dump({"depths": [1], "widths": [32, 33]}))
    bad = cli(tmp_path, "study", "depth-width", str(config))
    assert bad.returncode == 2 and "depths" in bad.stderr, bad.stderr


def test_the_study_page_shows_the_law_the_points_and_links_from_the_jobs_page(client, tmp_path):
    from html.parser import HTMLParser

    store = client.app.state.storage
    study_id = make_study(store, budgets_ms=[1e6])
    assert run_study(store, study_id, inline(tmp_path)) == ("completed", None)
    page = client.get(f"/studies/{study_id}")
    assert page.status_code == 200
    report = store.get_job(study_id).result

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.table = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.table = dict(attrs).get("id")
            elif tag == "tr" and self.table == "points":
                self.rows.append([])

        def handle_data(self, data):
            if self.table == "points" and self.rows and data.strip():
                self.rows[-1].append(data.strip())

    cells = Cells()
    cells.feed(page.text)
    body = [r for r in cells.rows if r and r[0].isdigit()]
    assert [(int(r[0]), int(r[1])) for r in body] == [(p["depth"], p["width"]) for p in report["points"]]
    assert 'id="law"' in page.text and 'id="extrapolation-max"' in page.text and "study.js" in page.text
    jobs = client.get("/jobs").text
    assert f'href="/studies/{study_id}"' in jobs
    assert client.get("/studies/99999").status_code == 404

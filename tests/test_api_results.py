"""The API over a search that really ran (inline executor): fronts for any objective pair and as CSV, the live
evaluation feed, candidate detail with lineage, curves and log tail, resume, and the body-size limit."""

from __future__ import annotations

import csv
import io
import json

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import Auth
from api.settings import Settings
from search.config import SearchConfig
from search.engine import SearchEngine
from search.executors import InlineExecutor
from search.pareto import dominates
from search.storage import Storage
from tests.test_engine import TINY

TOKEN = "results-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A finished 8-evaluation search in SQLite, and a client on it."""
    tmp = tmp_path_factory.mktemp("ran")
    store = Storage(f"sqlite:///{tmp}/api.db")
    store.create_schema()
    config = SearchConfig.model_validate({**TINY, "budget": 8})
    job_id = store.create_job("search", json.loads(config.model_dump_json()), budget=8)
    SearchEngine(store, job_id, lambda c: InlineExecutor(str(tmp / "data"), threads=1)).run()
    client = TestClient(
        create_app(Settings(data_dir=tmp / "data", max_body_bytes=4096), store, auth=Auth(TOKEN))
    )
    yield store, job_id, client
    store.close()


def _points(items, names):
    return {c["id"]: [c[n] for n in names] for c in items}


@pytest.mark.parametrize(
    "pair",
    [
        None,
        ("val_bpb", "decode_ms"),
        ("decode_ms", "val_bpb"),
        ("val_bpb", "n_params"),
        ("n_params", "decode_ms"),
    ],
)
def test_pareto_front_for_any_pair_is_exactly_the_non_dominated_set(ran, pair):
    store, job_id, client = ran
    params = {} if pair is None else {"x": pair[0], "y": pair[1]}
    r = client.get(f"/api/searches/{job_id}/pareto", params=params)
    assert r.status_code == 200
    body = r.json()
    names = list(pair or ("val_bpb", "decode_ms"))
    assert body["objectives"] == names
    done = [c for c in store.candidates(job_id) if c.status in ("completed", "reused")]
    points = {c.id: [getattr(c, n) for n in names] for c in done}
    expected = {i for i, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != i)}
    assert {c["id"] for c in body["items"]} == expected and expected


def test_pareto_csv_matches_the_json_front(ran):
    _, job_id, client = ran
    r = client.get(f"/api/searches/{job_id}/pareto.csv", params={"x": "val_bpb", "y": "n_params"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    front = client.get(f"/api/searches/{job_id}/pareto", params={"x": "val_bpb", "y": "n_params"}).json()[
        "items"
    ]
    assert [int(row["candidate_id"]) for row in rows] == [c["id"] for c in front]
    assert [float(row["val_bpb"]) for row in rows] == [c["val_bpb"] for c in front]
    assert all(row["operators"] and int(row["d_model"]) > 0 for row in rows)


def test_pareto_refuses_a_bad_pair(ran):
    _, job_id, client = ran
    r = client.get(f"/api/searches/{job_id}/pareto", params={"x": "val_bpb", "y": "val_bpb"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "y"
    r = client.get(f"/api/searches/{job_id}/pareto", params={"x": "loss"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "x"


def test_evaluation_feed_pages_through_every_finished_candidate_once(ran):
    store, job_id, client = ran
    seen, cursor = [], None
    for _ in range(10):
        params = {"limit": 3, **({"since": cursor} if cursor else {})}
        r = client.get(f"/api/searches/{job_id}/evaluations", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        if not body["items"]:
            assert body["next"] == cursor  # nothing new: the cursor stays
            break
        seen += [c["id"] for c in body["items"]]
        cursor = body["next"]
    finished = [c.id for c in store.candidates(job_id) if c.finished_at is not None]
    assert sorted(seen) == sorted(finished) and len(seen) == len(set(seen)) == 8
    assert client.get(f"/api/searches/{job_id}/evaluations", params={"since": "yesterday"}).status_code == 422


def test_candidate_detail_has_lineage_curves_fingerprint_and_log_tail(ran):
    store, job_id, client = ran
    child = next(c for c in store.candidates(job_id) if c.parent_id is not None and c.status == "completed")
    body = client.get(f"/api/candidates/{child.id}").json()
    assert body["lineage"][0]["id"] == child.parent_id
    parent = client.get(f"/api/candidates/{child.parent_id}").json()
    assert child.id in parent["children"]
    assert body["training"]["val_bpb"] == pytest.approx(child.val_bpb) and body["training"]["loss_curve"]
    assert body["latency"]["decode_ms_per_token"]["median"] == pytest.approx(child.decode_ms)
    assert body["device_fingerprint"] and isinstance(body["log_tail"], list)


def test_resume_requeues_a_cancelled_search_only(ran):
    store, _, client = ran
    job = client.post("/api/searches", json={"budget": 4}, headers=AUTH).json()["id"]
    assert client.post(f"/api/searches/{job}/resume").status_code == 401
    assert client.post(f"/api/searches/{job}/resume", headers=AUTH).json()["status"] == "queued"  # idempotent
    assert client.post(f"/api/searches/{job}/cancel", headers=AUTH).json()["status"] == "cancelled"
    r = client.post(f"/api/searches/{job}/resume", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["finished_at"] is None
    done = ran[1]
    r = client.post(f"/api/searches/{done}/resume", headers=AUTH)
    assert r.status_code == 409 and "completed" in r.json()["detail"]


def test_bodies_over_the_limit_are_refused_before_parsing(ran):
    _, _, client = ran
    r = client.post(
        "/api/searches",
        content=b"{" + b" " * 5000 + b"}",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 413 and "4096" in r.json()["detail"]
    r = client.post("/api/searches", json={"name": "x" * 5000}, headers=AUTH)
    assert r.status_code == 413


@pytest.mark.parametrize(
    "data, field",
    [
        ({"corpus": "../../etc/passwd"}, "data.corpus"),
        ({"corpus": "/etc/hostname"}, "data.corpus"),
        ({"corpus": "hf:/etc"}, "data.corpus"),
        ({"tokenizer": "file:/etc/passwd"}, "data.tokenizer"),
        ({"corpus": "no-such-folder-here"}, "data.corpus"),
        ({"tokenizer": "sentencepiece"}, "data.tokenizer"),
        ({"shell": "rm -rf /"}, "data.shell"),
    ],
)
def test_data_paths_resolve_only_under_the_roots(ran, data, field):
    store, _, client = ran
    before = store.count_jobs()
    r = client.post("/api/searches", json={"budget": 2, "data": data}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field
    assert store.count_jobs() == before  # nothing stored


def test_a_corpus_inside_the_roots_is_accepted(ran, tmp_path, monkeypatch):
    store, _, client = ran
    monkeypatch.setattr(client.app.state.settings, "data_roots", [tmp_path])
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello " * 100)
    r = client.post("/api/searches", json={"budget": 2, "data": {"corpus": "corpus"}}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "queued"


def test_latency_target_needs_a_table_inside_the_roots(ran):
    store, _, client = ran
    r = client.post("/api/searches", json={"budget": 2, "strategy": "latency-target"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "latency_lut"
    r = client.post(
        "/api/searches",
        json={
            "budget": 2,
            "strategy": "latency-target",
            "latency_lut": "/etc/passwd",
            "strategy_options": {"target_ms": 1.0},
        },
        headers=AUTH,
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "latency_lut"


def test_bad_strategy_options_are_refused_at_submission(ran):
    _, _, client = ran
    for options in ({"bogus": 1}, {"population_size": 10**6}):
        r = client.post("/api/searches", json={"budget": 2, "strategy_options": options}, headers=AUTH)
        (name,) = options
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == f"strategy_options.{name}", r.text


@pytest.mark.parametrize(
    "body, field",
    [
        ({"proxy": {"stepz": 10}}, "proxy.stepz"),
        ({"proxy": {"steps": 10, "tokens": 100}}, "proxy.steps"),
        ({"proxy": {"precision": "fp8"}}, "proxy.precision"),
        ({"proxy": {"steps": 10**9}}, "proxy.steps"),
        ({"latency": {"repeats": 0}}, "latency.repeats"),
        ({"latency": {"method": "magic"}}, "latency.method"),
        ({"latency": {"bogus": 1}}, "latency.bogus"),
    ],
)
def test_worker_settings_are_checked_at_submission(ran, body, field):
    store, _, client = ran
    before = store.count_jobs()
    r = client.post("/api/searches", json={"budget": 2, **body}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field, r.json()
    assert store.count_jobs() == before


def _sse(text):
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        events.append(fields)
    return events


def test_server_sent_events_stream_every_evaluation_then_end(ran):
    store, job_id, client = ran
    with client.stream("GET", f"/api/searches/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.read().decode())
    evaluations = [e for e in events if e.get("event") == "evaluation"]
    finished = [c.id for c in store.finished_since(job_id, None, limit=100)]
    assert [json.loads(e["data"])["id"] for e in evaluations] == finished and len(finished) == 8
    assert events[-1] == {"event": "end", "data": '{"status": "completed"}'}
    assert any(e.get("event") == "status" for e in events)
    # reconnecting with Last-Event-ID resumes after it
    middle = evaluations[4]["id"]
    with client.stream("GET", f"/api/searches/{job_id}/events", headers={"Last-Event-ID": middle}) as r:
        again = [
            json.loads(e["data"])["id"] for e in _sse(r.read().decode()) if e.get("event") == "evaluation"
        ]
    assert again == finished[5:]
    assert client.get(f"/api/searches/{job_id}/events", params={"since": "x"}).status_code == 422
    assert client.get("/api/searches/987654/events").status_code == 404

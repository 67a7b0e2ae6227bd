"""The coordinator REST API (first slice): auth, searches lifecycle, idempotency, validation, pagination."""

from __future__ import annotations

import logging
import stat

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import Auth
from api.settings import Settings
from search.storage import Storage

TOKEN = "test-token-not-secret"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    store = Storage(f"sqlite:///{tmp_path_factory.mktemp('db')}/api.db")
    store.create_schema()
    yield store
    store.close()


@pytest.fixture
def app_settings(tmp_path):
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def client(storage, app_settings):
    app = create_app(app_settings, storage, auth=Auth(TOKEN))
    return TestClient(app)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _create(client, body=None, headers=None):
    return client.post(
        "/api/searches",
        json=body if body is not None else {"name": "t", "budget": 4},
        headers={**AUTH, **(headers or {})},
    )


def _fields(response):
    return {e["field"] for e in response.json()["errors"]}


# ---------------------------------------------------------------------------------------------- auth


def test_mutations_need_the_token(client):
    r = client.post("/api/searches", json={"budget": 4})
    assert r.status_code == 401 and "bearer token" in r.json()["detail"]
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = client.post("/api/searches", json={"budget": 4}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["detail"] == "invalid bearer token"
    r = client.post("/api/searches", json={"budget": 4}, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    job = _create(client).json()["id"]
    for path in (f"/api/searches/{job}/cancel", f"/api/searches/{job}/archive"):
        assert client.post(path).status_code == 401
    assert client.delete(f"/api/searches/{job}").status_code == 401
    assert client.get(f"/api/searches/{job}").json()["status"] == "queued"  # untouched


def test_reads_public_by_default_and_gated_by_setting(client, storage, app_settings, monkeypatch):
    for path in ("/api/health", "/api/ready", "/api/operators", "/api/searches", "/api/jobs"):
        assert client.get(path).status_code == 200, path
    monkeypatch.setenv("HYBRIDNAS_TOKEN", TOKEN)
    monkeypatch.setenv("HYBRIDNAS_REQUIRE_TOKEN_FOR_READS", "true")
    gated = TestClient(create_app(app_settings, storage))
    assert gated.get("/api/searches").status_code == 401
    assert gated.get("/api/operators").status_code == 401
    assert gated.get("/api/searches", headers=AUTH).status_code == 200
    assert gated.get("/api/health").status_code == 200  # probes stay public
    assert gated.get("/api/ready").status_code == 200


def test_token_file_made_0600_and_not_logged(storage, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("HYBRIDNAS_TOKEN", raising=False)
    caplog.set_level(logging.DEBUG)
    data_dir = tmp_path / "svc"
    app = create_app(Settings(data_dir=data_dir), storage)
    path = data_dir / "token"
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32
    assert str(path) in caplog.text and token not in caplog.text
    c = TestClient(app)
    assert c.post("/api/searches", json={"budget": 2}).status_code == 401
    assert (
        c.post("/api/searches", json={"budget": 2}, headers={"Authorization": f"Bearer {token}"}).status_code
        == 201
    )
    # a second start reuses the same token
    again = create_app(Settings(data_dir=data_dir), storage)
    assert again.state.auth.token == token
    assert token not in caplog.text


def test_non_ascii_token_is_a_401_not_a_500(client):
    r = client.post("/api/searches", json={}, headers={"Authorization": "Bearer t\u00e9st".encode()})
    assert r.status_code == 401


# ---------------------------------------------------------------------------------------------- lifecycle


def test_create_get_list_cancel_archive_delete(client, storage):
    r = _create(client, {"name": "life", "budget": 8, "strategy": "random", "priority": 5})
    assert r.status_code == 201, r.text
    body = r.json()
    sid = body["id"]
    assert body["status"] == "queued" and body["priority"] == 5 and body["budget"] == 8
    assert r.headers["Location"] == f"/api/searches/{sid}"
    assert storage.get_job(sid).config["strategy"] == "random"
    assert "priority" not in storage.get_job(sid).config

    d = client.get(f"/api/searches/{sid}").json()
    assert d["progress"] == 0 and d["counts"]["pending"] == 0 and d["hypervolume"] is None
    assert d["config"]["budget"] == 8

    listing = client.get("/api/searches", params={"status": "queued", "limit": 200}).json()
    assert sid in [s["id"] for s in listing["items"]] and listing["limit"] == 200
    assert client.get("/api/searches", params={"status": "cancelled"}).json()["items"] == [] or sid not in [
        s["id"] for s in client.get("/api/searches", params={"status": "cancelled"}).json()["items"]
    ]
    queue = client.get("/api/jobs").json()["items"]
    assert sid in [j["id"] for j in queue]

    assert client.post(f"/api/searches/{sid}/archive", headers=AUTH).status_code == 409  # not finished
    r = client.post(f"/api/searches/{sid}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    assert client.post(f"/api/searches/{sid}/cancel", headers=AUTH).status_code == 200  # idempotent
    r = client.post(f"/api/searches/{sid}/archive", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "archived"
    assert client.post(f"/api/searches/{sid}/cancel", headers=AUTH).status_code == 409
    assert sid not in [j["id"] for j in client.get("/api/jobs").json()["items"]]

    assert client.delete(f"/api/searches/{sid}", headers=AUTH).status_code == 204
    assert client.get(f"/api/searches/{sid}").status_code == 404
    assert client.delete(f"/api/searches/{sid}", headers=AUTH).status_code == 404


def test_detail_candidates_pareto_and_layout(client, storage):
    sid = _create(client, {"budget": 10}).json()["id"]
    ids = []
    for i, (bpb, ms) in enumerate([(2.0, 1.0), (1.5, 2.0), (2.5, 2.5)]):
        cid = storage.add_candidate(sid, {"operators": ["attention", "ffn"], "d_model": 64 + i}, f"h{i}")
        storage.complete_candidate(cid, None, None, bpb, ms, 1000 + i, {"val_bpb": bpb, "decode_ms": ms})
        ids.append(cid)
    failed = storage.add_candidate(sid, {"operators": ["mamba2"]}, "hf")
    storage.fail_candidate(failed, "out of memory", "Traceback ...")
    storage.set_front(sid, ids[:2])
    storage.update_progress(sid, 4)
    storage.record_hypervolume(sid, 4, 0.75)

    d = client.get(f"/api/searches/{sid}").json()
    assert d["progress"] == pytest.approx(0.4) and d["hypervolume"] == 0.75 and d["hypervolume_at"] == 4
    assert d["counts"]["completed"] == 3 and d["counts"]["failed"] == 1

    page = client.get(f"/api/searches/{sid}/candidates", params={"sort": "-val_bpb", "limit": 2}).json()
    assert page["total"] == 4 and [c["val_bpb"] for c in page["items"]] == [2.5, 2.0]
    page = client.get(f"/api/searches/{sid}/candidates", params={"status": "failed"}).json()
    assert [c["id"] for c in page["items"]] == [failed]
    assert client.get(f"/api/searches/{sid}/candidates", params={"sort": "layout; drop"}).status_code == 422
    assert client.get(f"/api/searches/{sid}/candidates", params={"status": "bogus"}).status_code == 422

    front = client.get(f"/api/searches/{sid}/pareto").json()
    assert front["objectives"] == ["val_bpb", "decode_ms"]
    assert [c["id"] for c in front["items"]] == [ids[1], ids[0]]  # by the first objective

    c = client.get(f"/api/candidates/{failed}").json()
    assert c["failure_reason"] == "out of memory" and c["traceback"].startswith("Traceback")
    r = client.get(f"/api/candidates/{ids[0]}/layout.json")
    assert r.status_code == 200 and r.json() == {"operators": ["attention", "ffn"], "d_model": 64}


def test_idempotency_key(client):
    body = {"name": "idem", "budget": 3}
    first = _create(client, body, {"Idempotency-Key": "abc-123"})
    again = _create(client, body, {"Idempotency-Key": "abc-123"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["replayed"] is True
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (
        len(
            [
                s
                for s in client.get("/api/searches", params={"limit": 200}).json()["items"]
                if s["name"] == "idem"
            ]
        )
        == 1
    )
    other = _create(client, {"name": "idem", "budget": 4}, {"Idempotency-Key": "abc-123"})
    assert other.status_code == 409
    assert _create(client, body, {"Idempotency-Key": "x" * 201}).status_code == 422


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "body, field",
    [
        ({"strategy": "bogus"}, "strategy"),
        ({"budget": 0}, "budget"),
        ({"budget": "many"}, "budget"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"space": {"n_stages": 99}}, "space.n_stages"),
        ({"space": {"mixers": ["bogus"]}}, "space.mixers"),
        ({"objectives": ["val_bpb", "val_bpb"]}, "objectives"),
        ({"priority": 10**6}, "priority"),
        ({"name": "x" * 1000}, "name"),
        ({"warm_start_job": 999999}, "warm_start_job"),
    ],
)
def test_422_names_the_field(client, body, field):
    r = _create(client, body)
    assert r.status_code == 422, r.text
    assert field in _fields(r)
    assert field in r.json()["detail"] and r.json()["errors"][0]["message"]


def test_malformed_json_and_non_object_body(client):
    r = client.post(
        "/api/searches", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 422 and "malformed JSON" in r.json()["detail"]
    assert _create(client, [1, 2]).status_code == 422


def test_unknown_ids_404(client):
    for path in (
        "/api/searches/424242",
        "/api/searches/424242/candidates",
        "/api/searches/424242/pareto",
        "/api/candidates/424242",
        "/api/candidates/424242/layout.json",
    ):
        assert client.get(path).status_code == 404, path
    for path in ("/api/searches/424242/cancel", "/api/searches/424242/archive"):
        assert client.post(path, headers=AUTH).status_code == 404
    assert client.get("/api/searches/99999999999999999999999").status_code == 422  # overflow: not a 500
    assert client.get("/api/searches/abc").status_code == 422


def test_pagination_limits(client):
    for params in ({"limit": 1000}, {"limit": 0}, {"offset": -1}, {"status": "nope"}):
        r = client.get("/api/searches", params=params)
        assert r.status_code == 422, params
    assert "limit" in _fields(client.get("/api/searches", params={"limit": 1000}))
    assert client.get("/api/jobs", params={"limit": 201}).status_code == 422
    for i in range(3):
        _create(client, {"name": f"page{i}", "budget": 2})
    p1 = client.get("/api/searches", params={"limit": 2, "offset": 0}).json()
    p2 = client.get("/api/searches", params={"limit": 2, "offset": 2}).json()
    assert len(p1["items"]) == 2 and p1["total"] >= 3
    assert not {s["id"] for s in p1["items"]} & {s["id"] for s in p2["items"]}


def test_operators_health_ready_openapi(client):
    ops = {o["name"]: o for o in client.get("/api/operators").json()}
    assert {"attention", "mamba2", "ffn"} <= set(ops) and ops["mamba2"]["code"] == "M2"
    assert client.get("/api/health").json() == {"status": "ok"}
    ready = client.get("/api/ready").json()
    assert ready["ready"] is True and ready["schema_revision"] == ready["head_revision"]
    assert "/api/searches" in client.get("/openapi.json").json()["paths"]


def test_ready_503_without_schema(tmp_path):
    store = Storage(f"sqlite:///{tmp_path}/empty.db")
    try:
        c = TestClient(create_app(Settings(data_dir=tmp_path / "d"), store, auth=Auth(TOKEN)))
        r = c.get("/api/ready")
        assert r.status_code == 503 and r.json()["ready"] is False
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["status"] == 503 and r.json()["detail"] == r.json()["reason"]
    finally:
        store.close()


def test_huge_space_numbers_rejected_fast(client):
    for space in ({"widths": [10**20]}, {"dims": {"d_model": 10**20}}):
        r = _create(client, {"space": space})
        assert r.status_code == 422 and "exceeds" in r.json()["detail"]
        assert _fields(r) & {"space.widths", "space.dims.d_model"}

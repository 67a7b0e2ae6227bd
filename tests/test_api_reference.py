"""The REST API as a reference: the OpenAPI document describes every operation, field and error, and every
error the API sends is RFC 9457 problem details (`application/problem+json`). In process (TestClient)."""

from __future__ import annotations

import csv
import io
import json

import jsonschema
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import exc as sa_exc

from api.admission import Admission
from api.app import create_app
from api.auth import SESSION_COOKIE, Auth, require_read_token, require_token
from api.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE, PROBLEM_TYPES
from api.routes import searches as search_routes
from api.schedule_schemas import SCHEDULE_EXAMPLES, ScheduleCreate
from api.schemas import SEARCH_EXAMPLES, SearchCreate
from api.settings import Settings
from search.storage import Storage, StorageError

TOKEN = "reference-token-not-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 4096
REF = "#/components/schemas/"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    store = Storage(f"sqlite:///{tmp_path_factory.mktemp('db')}/reference.db")
    store.create_schema()
    yield store
    store.close()


@pytest.fixture
def app(storage, tmp_path):
    return create_app(
        Settings(data_dir=tmp_path / "data", max_body_bytes=MAX_BODY), storage, auth=Auth(TOKEN)
    )


@pytest.fixture
def client(app):
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    app = create_app(
        Settings(data_dir=tmp_path_factory.mktemp("spec")), Storage("sqlite://"), auth=Auth(TOKEN)
    )
    return app.openapi(), [r for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema]


def _operations(doc):
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation


# ------------------------------------------------------------------------------------------ the document


def test_every_operation_has_a_summary_and_a_description(doc):
    spec, routes = doc
    generated = {r.name.replace("_", " ").title() for r in routes}  # FastAPI's default summary
    for path, method, operation in _operations(spec):
        summary, description = operation.get("summary", ""), operation.get("description", "")
        assert summary and summary not in generated, (method, path, summary)
        assert len(description) > 30, (method, path)


def test_every_property_of_every_schema_is_described(doc):
    spec, _ = doc
    schemas = spec["components"]["schemas"]
    missing = [
        f"{name}.{prop}"
        for name, schema in schemas.items()
        for prop, value in schema.get("properties", {}).items()
        if not value.get("description")
    ]
    assert not missing, missing
    for name in (
        "SearchCreate",
        "ProxyConfig",
        "LatencyConfig",
        "DataConfig",
        "SpaceSettings",
        "Constraints",
    ):
        assert name in schemas, name  # the search config's models are in the document, described
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas


def _dependency_calls(dependant):
    for dep in dependant.dependencies:
        yield dep.call
        yield from _dependency_calls(dep)


CONFLICTS = {
    ("post", "/api/searches"),
    ("post", "/api/searches/{search_id}/cancel"),
    ("post", "/api/searches/{search_id}/archive"),
    ("post", "/api/searches/{search_id}/resume"),
    ("delete", "/api/searches/{search_id}"),
}
UNGUARDED = {"/api/health", "/api/ready"}  # admission control lets probes through


def test_each_route_documents_its_errors_as_problem_details(doc):
    spec, routes = doc
    for route in routes:
        for method in route.methods:
            method = method.lower()
            operation = spec["paths"][route.path][method]
            responses = operation["responses"]
            calls = set(_dependency_calls(route.dependant))
            expected = {"500"}
            if calls & {require_token, require_read_token}:
                expected.add("401")
            if require_token in calls:
                expected.add("403")
            if "{" in route.path:
                expected |= {"404", "422"}
            if route.body_field is not None:
                expected |= {"413", "422"}
            if route.dependant.query_params or route.dependant.header_params:
                expected.add("422")
            if (method, route.path) in CONFLICTS:
                expected.add("409")
            if route.path not in UNGUARDED or route.path == "/api/ready":
                expected.add("503")
            errors = {code for code in responses if int(code) >= 400}
            assert errors == expected, (method, route.path, sorted(errors), sorted(expected))
            for code in errors:
                content = responses[code]["content"]
                assert list(content) == [PROBLEM_MEDIA_TYPE], (method, route.path, code)
                ref = content[PROBLEM_MEDIA_TYPE]["schema"]["$ref"]
                model = {"422": "ValidationProblem"}.get(code, "ProblemDetails")
                if route.path == "/api/ready" and code == "503":
                    model = "NotReady"
                assert ref == REF + model, (method, route.path, code, ref)
                assert responses[code]["description"]


def test_the_problem_schemas(doc):
    spec, _ = doc
    schemas = spec["components"]["schemas"]
    problem = schemas["ProblemDetails"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    assert {"type", "title", "status", "detail", "instance"} <= set(problem["properties"])
    validation = schemas["ValidationProblem"]
    assert validation["properties"]["errors"]["items"] == {"$ref": REF + "FieldProblem"}
    assert {"field", "message", "loc", "type"} <= set(schemas["FieldProblem"]["required"])
    for slug in PROBLEM_TYPES:
        assert f"`{slug}`" in problem["properties"]["type"]["description"]


def test_media_types_of_the_downloads_and_streams(doc):
    spec, _ = doc
    paths = spec["paths"]

    def ok(path):
        return paths[path]["get"]["responses"]["200"]["content"]

    for path in ("/api/searches/{search_id}/candidates.csv", "/api/searches/{search_id}/pareto.csv"):
        assert list(ok(path)) == ["text/csv"] and ok(path)["text/csv"]["schema"] == {"type": "string"}
    assert list(ok("/api/searches/{search_id}/events")) == ["text/event-stream"]
    assert list(ok("/api/candidates/{candidate_id}/layout.json")) == ["application/json"]
    jsonl = ok("/api/searches/{search_id}/candidates.jsonl")
    assert list(jsonl) == ["application/jsonl"]
    assert jsonl["application/jsonl"]["itemSchema"] == {"$ref": REF + "CandidateRow"}
    assert set(ok("/api/schema/search-config")) == {"application/json"}


@pytest.mark.parametrize(
    "path, examples, model",
    [("/api/searches", SEARCH_EXAMPLES, SearchCreate), ("/api/schedules", SCHEDULE_EXAMPLES, ScheduleCreate)],
)
def test_the_submission_bodies_have_examples_that_validate(doc, path, examples, model):
    spec, _ = doc
    body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    assert set(body["examples"]) == set(examples) and len(examples) >= 2
    for name, example in body["examples"].items():
        assert example["summary"], name
        model.model_validate(example["value"])
    assert spec["components"]["schemas"][model.__name__]["examples"]


# ------------------------------------------------------------------------------------ the errors, sent


def _problem(response, status: int, slug: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE, response.headers
    body = response.json()
    assert {"type", "title", "status", "detail"} <= set(body), body
    assert body["status"] == status and body["title"] and isinstance(body["detail"], str) and body["detail"]
    assert body["type"].startswith(PROBLEM_BASE)
    if slug is not None:
        assert body["type"] == PROBLEM_BASE + slug, body
    return body


def _fields(body: dict) -> list[str]:
    assert body["errors"], body
    for error in body["errors"]:
        assert isinstance(error["field"], str) and error["message"] and error["type"] and "loc" in error
    return [e["field"] for e in body["errors"]]


def test_404s_for_unknown_ids_and_routes(client):
    for path, what in (
        ("/api/searches/424242", "no search 424242"),
        ("/api/candidates/424242", "no candidate 424242"),
        ("/api/schedules/424242", "no schedule 424242"),
        ("/api/searches/424242/candidates.jsonl", "no search 424242"),
    ):
        body = _problem(client.get(path), 404, "not-found")
        assert body["detail"] == what and body["instance"] == path
    assert (
        _problem(client.delete("/api/schedules/424242", headers=AUTH), 404)["detail"] == "no schedule 424242"
    )
    for path in ("/api/no-such-route", "/no-such-page"):
        assert "no such route" in _problem(client.get(path), 404, "not-found")["detail"]


def test_405(client):
    r = client.put("/api/searches", json={})
    body = _problem(r, 405, "method-not-allowed")
    assert "PUT" in body["detail"] and r.headers["allow"]


def test_401_and_403(client, app, storage, tmp_path, monkeypatch):
    r = client.post("/api/searches", json={})
    assert "bearer token" in _problem(r, 401, "unauthorized")["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    _problem(client.post("/api/searches", json={}, headers={"Authorization": "Bearer wrong"}), 401)
    session = app.state.auth.new_session()
    client.cookies.set(SESSION_COOKIE, session)
    assert "X-CSRF-Token" in _problem(client.post("/api/searches", json={}), 403, "forbidden")["detail"]
    client.cookies.clear()
    gated = TestClient(
        create_app(Settings(data_dir=tmp_path / "g"), storage, auth=Auth(TOKEN, require_token_for_reads=True))
    )
    _problem(gated.get("/api/searches"), 401, "unauthorized")
    _problem(gated.get("/api/schema/search-config"), 401)


def test_409(client):
    job = client.post("/api/searches", json={"name": "conflict"}, headers=AUTH).json()["id"]
    body = _problem(client.post(f"/api/searches/{job}/archive", headers=AUTH), 409, "conflict")
    assert "queued" in body["detail"]
    key = {**AUTH, "Idempotency-Key": "reference-409"}
    assert client.post("/api/searches", json={"budget": 2}, headers=key).status_code == 201
    body = _problem(client.post("/api/searches", json={"budget": 3}, headers=key), 409, "conflict")
    assert "Idempotency-Key" in body["detail"]


def test_413_declared_and_streamed(client):
    headers = {**AUTH, "content-type": "application/json"}
    body = _problem(client.post("/api/searches", content=b"{" + b" " * 5000 + b"}", headers=headers), 413)
    assert body["type"] == PROBLEM_BASE + "body-too-large" and str(MAX_BODY) in body["detail"]

    def chunks():
        yield b'{"name": "'
        yield b"x" * (MAX_BODY + 10)
        yield b'"}'

    _problem(client.post("/api/searches", content=chunks(), headers=headers), 413, "body-too-large")


@pytest.mark.parametrize(
    "method, path, kwargs, field",
    [
        ("post", "/api/searches", {"json": {"proxy": {"lr": -1}}}, "proxy.lr"),
        ("post", "/api/searches", {"json": {"space": {"n_stages": 99}}}, "space.n_stages"),
        ("post", "/api/searches", {"json": {"unknown": 1}}, "unknown"),
        ("post", "/api/searches", {"json": {"data": {"corpus": "/etc"}}}, "data.corpus"),
        ("post", "/api/schedules", {"json": {"name": "n", "cron": "nope", "template": {}}}, "cron"),
        (
            "post",
            "/api/schedules",
            {"json": {"name": "n", "cron": "@daily", "template": {"budget": 0}}},
            "template.budget",
        ),
        ("get", "/api/searches", {"params": {"limit": 0}}, "limit"),
        ("get", "/api/searches/0", {}, "search_id"),
        ("get", "/api/searches/abc", {}, "search_id"),
    ],
)
def test_422_names_the_field(client, method, path, kwargs, field):
    r = getattr(client, method)(path, headers=AUTH, **kwargs)
    body = _problem(r, 422, "validation")
    assert field in _fields(body), body
    assert f"{field}: " in body["detail"]


@pytest.mark.parametrize(
    "content, kind",
    [
        (b"{not json", "json_invalid"),
        (b'{"name": "\xff\xfe"}', "invalid_utf8"),
        (b"[" * 40 + b"]" * 40, "too_deep"),
    ],
)
def test_422_for_bodies_that_do_not_parse(client, content, kind):
    r = client.post("/api/searches", content=content, headers={**AUTH, "content-type": "application/json"})
    body = _problem(r, 422, "validation")
    assert _fields(body) == ["body"] and body["errors"][0]["type"] == kind


def test_422_for_a_query_that_names_the_same_objective_twice(client):
    job = client.post("/api/searches", json={"name": "pair"}, headers=AUTH).json()["id"]
    r = client.get(f"/api/searches/{job}/pareto", params={"x": "val_bpb", "y": "val_bpb"})
    assert _fields(_problem(r, 422)) == ["y"]


def test_503_when_overloaded_keeps_retry_after():
    async def never(scope, receive, send):  # pragma: no cover - admission refuses before it
        raise AssertionError("admitted")

    refusing = TestClient(Admission(never, limit=0, retry_after_s=2))
    r = refusing.get("/api/searches")
    body = _problem(r, 503, "overloaded")
    assert r.headers["retry-after"] == "2" and "Retry-After" in body["detail"]
    assert int(r.headers["content-length"]) == len(r.content)


def test_503_when_storage_or_database_is_down(client, storage, monkeypatch):
    def broken(*_args, **_kwargs):
        raise StorageError("disk on fire at /secret/path")

    monkeypatch.setattr(type(storage), "list_jobs", broken)
    body = _problem(client.get("/api/searches"), 503, "unavailable")
    assert "secret" not in json.dumps(body)

    def down(*_args, **_kwargs):
        raise sa_exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(type(storage), "list_jobs", down)
    r = client.get("/api/searches", params={"limit": 3})
    _problem(r, 503, "unavailable")
    assert r.headers["retry-after"] == "5"


def test_ready_503_is_problem_details_with_the_probe_fields(tmp_path):
    store = Storage(f"sqlite:///{tmp_path}/empty.db")
    try:
        c = TestClient(create_app(Settings(data_dir=tmp_path / "d"), store, auth=Auth(TOKEN)))
        body = _problem(c.get("/api/ready"), 503, "not-ready")
        assert body["ready"] is False and body["reason"] == body["detail"] and body["database"] == "sqlite"
    finally:
        store.close()


def test_500_says_nothing_of_the_failure(client, storage, monkeypatch):
    def crash(*_args, **_kwargs):
        raise RuntimeError(f"password={TOKEN} in /very/secret/module.py")

    monkeypatch.setattr(type(storage), "list_jobs", crash)
    r = client.get("/api/searches", params={"limit": 4})
    assert "unexpected" in _problem(r, 500, "internal")["detail"]
    text = r.text
    assert (
        TOKEN not in text and "secret" not in text and "Traceback" not in text and "RuntimeError" not in text
    )


# ------------------------------------------------------------------------- candidates.jsonl, the schema


@pytest.fixture
def search_with_candidates(client, storage):
    job = client.post("/api/searches", json={"name": "export"}, headers=AUTH).json()["id"]
    layouts = [
        ({"operators": ["attention", "ffn"], "d_model": 64}, 2.0, 1.0),
        ({"operators": ["mamba2", "ffn"], "d_model": 64}, 1.5, 2.0),
        ({"operators": ["mamba2", "ffn", "attention", "ffn"], "d_model": 96}, None, None),
        ({"operators": ["attention", "ffn", "attention", "ffn"], "d_model": 64}, 2.5, 0.5),
        ({"operators": ["mamba2"], "d_model": 64}, None, None),
    ]
    parent = None
    for i, (layout, bpb, ms) in enumerate(layouts):
        cid = storage.add_candidate(job, layout, f"export-{job}-{i}", parent_id=parent, generation=i)
        storage.mark_running(cid)
        if bpb is None and i == 4:
            storage.fail_candidate(cid, "out of memory")
        elif bpb is not None:
            storage.complete_candidate(cid, None, None, bpb, ms, 1000 + i, {"val_bpb": bpb, "decode_ms": ms})
        parent = cid
    return job


def test_candidates_jsonl_has_the_rows_of_the_csv_streamed(client, search_with_candidates, monkeypatch):
    job = search_with_candidates
    monkeypatch.setattr(search_routes, "EXPORT_PAGE", 2)  # several pages
    r = client.get(f"/api/searches/{job}/candidates.jsonl")
    assert r.status_code == 200 and r.headers["content-type"] == "application/jsonl"
    assert f"search-{job}-candidates.jsonl" in r.headers["content-disposition"]
    assert "etag" not in r.headers  # streamed: never buffered by the read cache
    lines = r.text.splitlines()
    rows = [json.loads(line) for line in lines]
    csv_rows = list(csv.DictReader(io.StringIO(client.get(f"/api/searches/{job}/candidates.csv").text)))
    assert len(rows) == len(csv_rows) == 5
    assert [list(row) for row in rows] == [list(search_routes.CSV_COLUMNS)] * 5
    for row, text_row in zip(rows, csv_rows, strict=True):
        assert {k: "" if v is None else str(v) for k, v in row.items()} == text_row
    assert [row["candidate_id"] for row in rows] == sorted(row["candidate_id"] for row in rows)
    assert rows[-1]["status"] == "failed" and rows[-1]["failure_reason"] == "out of memory"
    assert rows[2]["status"] == "running" and rows[2]["val_bpb"] is None


def test_candidates_jsonl_of_an_empty_search(client):
    job = client.post("/api/searches", json={"name": "empty"}, headers=AUTH).json()["id"]
    r = client.get(f"/api/searches/{job}/candidates.jsonl")
    assert r.status_code == 200 and r.text == ""


def test_the_search_config_json_schema(client, doc):
    r = client.get("/api/schema/search-config")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    schema = r.json()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert {k: v for k, v in schema.items() if k != "$schema"} == json.loads(
        json.dumps(SearchCreate.model_json_schema())
    )
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for example in SEARCH_EXAMPLES.values():
        validator.validate(example["value"])
    for bad in ({"budget": 0}, {"proxy": {"lr": "fast"}}, {"unknown": 1}, {"executor": "k8s"}):
        assert not validator.is_valid(bad), bad
    for name in ("proxy", "latency", "data", "space", "constraints", "priority"):
        assert name in schema["properties"], name

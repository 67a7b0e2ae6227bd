"""schemathesis against the coordinator's OpenAPI spec, in process (ASGI transport, no network).

Every operation of `/openapi.json` is exercised with generated requests — valid and invalid ones
(schemathesis' "all" mode), its deterministic boundary cases (coverage phase) and a bounded, derandomized
fuzzing phase — on a real Storage of each backend (SQLite under tmp_path, and PostgreSQL through tests/pg.py:
PostgreSQL's 32-bit INTEGER ids fail where SQLite's 64-bit ones do not), with the bearer token, runners and
scheduler off. Two checks, as the issue asks: no 5xx (`not_a_server_error`; in process a server exception is
raised into the test) and every documented response matches its schema (`response_schema_conformance`).

The database holds one search (id 1) with a few candidates (ids 1..4, one failed, two on the front) and one
schedule (id 1, fired once) before every generated request (re-made if a generated DELETE removed them), so
the id routes hit real rows — the coverage phase always tries the smallest id, 1 — as well as 404s.
`test_edge_cases` sends, through the same checks, requests at edges the generator seldom reaches.

Bounded for CI: fixed seed, `deterministic` generation, no example database, at most MAX_EXAMPLES fuzzed
requests per operation (the coverage phase adds its own fixed set); about a minute for both backends on two
idle cores. pytest-timeout caps each operation.
"""

from __future__ import annotations

from datetime import timedelta

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import response_schema_conformance
from sqlalchemy import select

from api.app import create_app
from api.auth import Auth
from api.settings import Settings
from search import db
from search.storage import Storage
from tests import pg

TOKEN = "schemathesis-token-not-secret"
SEED = 20240611
MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, response_schema_conformance]

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "headers": {"Authorization": f"Bearer {TOKEN}"},
        "generation": {
            "mode": "all",
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
            "with-security-parameters": False,
        },
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
    }
)

SEARCH_ID = 1
SCHEDULE_ID = 1
LAYOUTS = [
    ({"operators": ["attention", "ffn"], "d_model": 64}, 2.0, 1.0),
    ({"operators": ["mamba2", "ffn"], "d_model": 64}, 1.5, 2.0),
    ({"operators": ["gated_deltanet", "ffn"], "d_model": 96}, 2.5, 2.5),
]


def _settings(tmp_path) -> Settings:
    # runners and scheduler off (those settings may not exist yet: then there is nothing to turn off)
    off = {"runners": 0, "scheduler": False}
    return Settings(
        data_dir=tmp_path / "data", **{k: v for k, v in off.items() if k in Settings.model_fields}
    )


def _seed(store: Storage) -> None:
    """Unless there: one search with id 1 and candidates 1..4 (3 completed, 2 of them on the front, 1 failed),
    and one schedule with id 1 that has fired once (queueing search 1). Explicit ids, so they are the same
    rows whatever was generated before (a generated DELETE removes them: they are made again)."""
    now = db.utcnow()
    with store.transaction() as conn:
        if conn.execute(select(db.jobs.c.id).where(db.jobs.c.id == SEARCH_ID)).first() is None:
            conn.execute(
                db.jobs.insert().values(
                    id=SEARCH_ID,
                    kind="search",
                    name="seeded",
                    status="queued",
                    priority=0,
                    n_evaluations=4,
                    budget=10,
                    config={"budget": 10, "objectives": ["val_bpb", "decode_ms"]},
                    created_at=now,
                )
            )
            for i, (layout, bpb, ms) in enumerate(LAYOUTS, start=1):
                conn.execute(
                    db.candidates.insert().values(
                        id=i,
                        job_id=SEARCH_ID,
                        layout_hash=f"seed-{i}",
                        layout=layout,
                        generation=i - 1,
                        parent_id=i - 1 or None,
                        status="completed",
                        attempts=1,
                        val_bpb=bpb,
                        decode_ms=ms,
                        n_params=1000 + i,
                        objectives={"val_bpb": bpb, "decode_ms": ms},
                        on_front=i <= 2,
                        created_at=now,
                        started_at=now,
                        finished_at=now + timedelta(seconds=i),
                    )
                )
            conn.execute(
                db.candidates.insert().values(
                    id=len(LAYOUTS) + 1,
                    job_id=SEARCH_ID,
                    layout_hash="seed-failed",
                    layout={"operators": ["mamba2"]},
                    generation=0,
                    status="failed",
                    attempts=1,
                    failure_reason="out of memory",
                    traceback="Traceback (most recent call last): ...",
                    on_front=False,
                    created_at=now,
                    started_at=now,
                    finished_at=now + timedelta(seconds=9),
                )
            )
            conn.execute(
                db.hypervolume_history.insert().values(
                    job_id=SEARCH_ID, n_evaluations=4, hypervolume=0.75, recorded_at=now
                )
            )
        if conn.execute(select(db.schedules.c.id).where(db.schedules.c.id == SCHEDULE_ID)).first() is None:
            conn.execute(
                db.schedules.insert().values(
                    id=SCHEDULE_ID,
                    name="nightly",
                    cron="0 3 * * *",
                    timezone="Europe/Berlin",
                    template={"budget": 10},
                    enabled=True,
                    warm_start=False,
                    priority=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            conn.execute(
                db.schedule_fires.insert().values(
                    schedule_id=SCHEDULE_ID,
                    due_at=now - timedelta(days=1),
                    fired_at=now,
                    status="fired",
                    job_id=SEARCH_ID,
                )
            )
        if not store.is_sqlite:  # explicit ids do not move PostgreSQL's sequences: move them past the rows
            for table in ("jobs", "candidates", "schedules"):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"GREATEST((SELECT max(id) FROM {table}), 1000))"
                )


@pytest.fixture(params=pg.BACKENDS)
def storage(request, tmp_path):
    """A Storage at head with the seed rows, per backend (PostgreSQL: see tests/pg.py)."""
    with pg.migrated_url(request.param, tmp_path) as url:
        store = Storage(url)
        try:
            _seed(store)
            with store.engine.connect() as conn:
                ids = conn.execute(select(db.candidates.c.id).order_by(db.candidates.c.id)).scalars().all()
            assert ids == [1, 2, 3, 4]
            yield store
        finally:
            store.close()


def _spec_app():
    """The app whose /openapi.json is loaded at collection time (one pytest item per operation); the requests
    go to each test's own app over its own database (`call_and_validate(app=...)`)."""
    import tempfile
    from pathlib import Path

    return create_app(
        _settings(Path(tempfile.gettempdir()) / "hybridnas-schemathesis-spec"),
        Storage("sqlite://"),
        auth=Auth(TOKEN),
    )


schema = schemathesis.openapi.from_asgi("/openapi.json", _spec_app(), config=CONFIG)


@pytest.fixture
def app(storage, tmp_path):
    return create_app(_settings(tmp_path), storage, auth=Auth(TOKEN))


@pytest.mark.timeout(120)
@schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck), print_blob=True)
def test_api_conforms_and_never_500s(case, app, storage):
    _seed(storage)
    case.call_and_validate(app=app, checks=CHECKS)


# Requests at the edges the generator seldom reaches (ids just past PostgreSQL's INTEGER, a cursor whose id
# overflows, a warm-start id past 64 bits), sent through the same schemathesis checks. An operation the spec
# no longer has is skipped.
EDGE_CASES = [
    ("GET", "/api/searches/{search_id}", {"path_parameters": {"search_id": 2**31 - 1}}),
    ("GET", "/api/searches/{search_id}", {"path_parameters": {"search_id": 2**31}}),
    ("POST", "/api/searches/{search_id}/cancel", {"path_parameters": {"search_id": 2**31}}),
    ("GET", "/api/candidates/{candidate_id}", {"path_parameters": {"candidate_id": 2**31}}),
    ("GET", "/api/schedules/{schedule_id}", {"path_parameters": {"schedule_id": 2**31}}),
    (
        "GET",
        "/api/searches/{search_id}/evaluations",
        {
            "path_parameters": {"search_id": SEARCH_ID},
            "query": {"since": "2024-01-01T00:00:00.000000Z~2147483648"},
        },
    ),
    (
        "GET",
        "/api/searches/{search_id}/evaluations",
        {
            "path_parameters": {"search_id": SEARCH_ID},
            "query": {"since": "2024-01-01T00:00:00.000000Z~9999999999999999999"},
        },
    ),
    (
        "GET",
        "/api/searches/{search_id}/evaluations",
        {"path_parameters": {"search_id": SEARCH_ID}, "query": {"since": "2024-01-01Z~1"}},
    ),
    ("POST", "/api/searches", {"body": {"warm_start_job": 2**31}, "media_type": "application/json"}),
    ("POST", "/api/searches", {"body": {"warm_start_job": 2**63}, "media_type": "application/json"}),
]


@pytest.mark.parametrize(
    "method, path, parts",
    EDGE_CASES,
    ids=[
        f"{m} {p} {sorted(k.get('path_parameters', {}).values()) or ''}"
        f"{k.get('query') or k.get('body') or ''}"
        for m, p, k in EDGE_CASES
    ],
)
def test_edge_cases(method, path, parts, app):
    try:
        operation = schema[path][method]
    except KeyError:
        pytest.skip(f"{method} {path} is not in the spec any more")
    case = operation.Case(**parts)
    case.call_and_validate(app=app, headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)

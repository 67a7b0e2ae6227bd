"""The dashboard without a browser: its pages rendered by the app (escaping, empty states, the security
headers), the log-in session and its CSRF token, the forms going through the REST API's checks, the scatter's
bounded sample, the feature panel and the offline API docs. The browser tests are in test_browser.py."""

from __future__ import annotations

import random
import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import CSRF_HEADER, SESSION_COOKIE, SESSION_MAX_AGE_S, Auth
from api.scatter import front_flags, sample_points
from api.settings import Settings
from search.db import LATENCY_METRICS
from search.pareto import pareto_front
from search.storage import PointRecord, Storage
from tests import pg
from tests.dashboard_seed import seed_search

TOKEN = "dashboard-token-not-secret"
XSS = "<script>alert(1)</script>"


def _client(tmp_path, store, require_token_for_reads=False) -> TestClient:
    settings = Settings(data_dir=tmp_path / "data", runners=0, scheduler=False)
    return TestClient(create_app(settings, store, auth=Auth(TOKEN, require_token_for_reads)))


@pytest.fixture
def store(tmp_path):
    storage = Storage(f"sqlite:///{tmp_path / 'dash.db'}")
    storage.create_schema()
    yield storage
    storage.close()


@pytest.fixture
def client(tmp_path, store):
    with _client(tmp_path, store) as c:
        yield c


def log_in(client: TestClient) -> str:
    """Log in through the form; the CSRF token the pages then carry."""
    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"token": TOKEN, "csrf_token": csrf, "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    home = client.get("/")
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', home.text).group(1)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


# ---- pages, escaping, empty states --------------------------------------------------------------------


def test_with_no_searches_the_list_says_so(client):
    r = client.get("/")
    assert r.status_code == 200 and 'id="no-searches"' in r.text


def test_a_script_in_a_name_or_reason_renders_as_text(client, store):
    seeded = seed_search(store, 6, name=XSS, fail_every=3)
    store.fail_candidate(seeded.failed[0], f"data: {XSS}")
    for path in ("/", f"/searches/{seeded.job_id}", f"/candidates/{seeded.failed[0]}", "/jobs"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert XSS not in r.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text, path


def test_every_page_forbids_inline_and_foreign_scripts(client, store):
    seeded = seed_search(store, 12)
    pages = [
        "/",
        f"/searches/{seeded.job_id}",
        f"/candidates/{seeded.ids[3]}",
        "/schedules",
        "/jobs",
        "/login",
    ]
    pages.append(f"/compare?ids={seeded.ids[0]},{seeded.ids[1]}")
    for path in pages:
        r = client.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
        scripts = [attrs for tag, attrs in tags(r.text) if tag == "script"]
        for attrs in scripts:  # every script is a same-origin file or inert JSON data
            assert attrs.get("src", "").startswith("/static/") or attrs.get("type") == "application/json", (
                path,
                attrs,
            )


def test_a_search_whose_candidates_all_failed_shows_empty_plots_and_the_reasons(client, store):
    seeded = seed_search(store, 4, fail_every=1)
    assert client.get(f"/searches/{seeded.job_id}").status_code == 200
    scatter = client.get(f"/api/searches/{seeded.job_id}/scatter").json()
    assert scatter["total"] == 0 and scatter["ids"] == []
    features = client.get(f"/api/searches/{seeded.job_id}/features").json()
    assert features["n_candidates"] == 0 and features["features"] == []
    page = client.get(f"/candidates/{seeded.failed[0]}").text
    assert 'id="failure-reason"' in page and "loss is not finite" in page


def test_unknown_ids_are_404_pages(client):
    assert client.get("/searches/999").status_code == 404
    assert client.get("/candidates/999").status_code == 404
    assert client.get("/compare?ids=1").status_code == 422


def test_the_candidate_page_draws_the_layout_lineage_and_commands(client, store):
    seeded = seed_search(store, 30, with_presets=False)
    child = next(c for c in (store.get_candidate(i) for i in seeded.ids) if c.parent_id is not None)
    page = client.get(f"/candidates/{child.id}").text
    layout = store.get_candidate(child.id).layout
    blocks = [a for tag, a in tags(page) if tag == "span" and "block" in a.get("class", "").split()]
    assert len(blocks) == len(layout["operators"])
    assert f'href="/candidates/{child.parent_id}"' in page  # the parent is in the lineage
    assert child.mutation["kind"] in page
    assert f"/api/candidates/{child.id}/layout.json" in page
    settings = client.get(f"/candidates/{child.id}/evaluation.json")
    assert settings.status_code == 200 and set(settings.json()) <= {"proxy", "latency", "data"}
    missing = client.get("/candidates/999999/evaluation.json")  # the API's one error shape
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["detail"] == "no candidate 999999" and missing.json()["status"] == 404


# ---- log-in, sessions, CSRF ---------------------------------------------------------------------------


def test_logged_out_pages_have_no_state_changing_control(client, store):
    seeded = seed_search(store, 6, status="queued")
    for path in ("/", f"/searches/{seeded.job_id}", "/schedules"):
        posts = [a for tag, a in tags(client.get(path).text) if tag == "form" and a.get("method") == "post"]
        assert posts == [], path


def test_a_forged_post_without_the_csrf_token_is_refused_and_changes_nothing(client, store):
    seeded = seed_search(store, 6, status="queued")
    log_in(client)
    r = client.post(f"/searches/{seeded.job_id}/cancel", data={}, follow_redirects=False)
    assert r.status_code == 403
    r = client.post(
        f"/searches/{seeded.job_id}/cancel", data={"csrf_token": "forged"}, follow_redirects=False
    )
    assert r.status_code == 403
    assert client.post(f"/api/searches/{seeded.job_id}/cancel").status_code == 403  # the session, no header
    assert store.get_job(seeded.job_id).status == "queued"


def test_the_session_and_its_csrf_token_change_state_through_forms_and_the_api(client, store):
    first, second = seed_search(store, 6, status="queued"), seed_search(store, 6, status="queued", seed=1)
    csrf = log_in(client)
    r = client.post(f"/searches/{first.job_id}/cancel", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and store.get_job(first.job_id).status == "cancelled"
    r = client.post(f"/api/searches/{second.job_id}/cancel", headers={CSRF_HEADER: csrf})
    assert r.status_code == 200 and store.get_job(second.job_id).status == "cancelled"


def test_schedules_are_disabled_and_enabled_from_their_page_with_the_csrf_token(client, store):
    schedule = store.create_schedule("nightly", "0 3 * * *", {"budget": 2}, timezone="Europe/Berlin")
    page = client.get("/schedules").text
    assert 'id="schedule-' in page and "Europe/Berlin" in page
    csrf = log_in(client)
    assert client.post(f"/schedules/{schedule}/disable", data={}, follow_redirects=False).status_code == 403
    assert store.get_schedule(schedule).enabled
    r = client.post(f"/schedules/{schedule}/disable", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and not store.get_schedule(schedule).enabled
    r = client.post(f"/schedules/{schedule}/enable", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and store.get_schedule(schedule).enabled
    assert client.post("/schedules/999/enable", data={"csrf_token": csrf}).status_code == 404


def test_the_session_cookie_is_httponly_and_strict_and_a_wrong_token_is_refused(client):
    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    wrong = client.post("/login", data={"token": "nope", "csrf_token": csrf}, follow_redirects=False)
    assert wrong.status_code == 303 and "error=1" in wrong.headers["location"]
    assert SESSION_COOKIE not in client.cookies
    right = client.post("/login", data={"token": TOKEN, "csrf_token": csrf}, follow_redirects=False)
    cookie = right.headers["set-cookie"]
    assert f"{SESSION_COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_the_log_in_form_needs_its_own_csrf_token(client):
    client.get("/login")
    r = client.post("/login", data={"token": TOKEN, "csrf_token": "forged"}, follow_redirects=False)
    assert r.status_code == 403 and SESSION_COOKIE not in client.cookies


def test_a_redirect_after_log_in_stays_on_this_site(client):
    page = client.get("/login", params={"next": "//evil.example/x"})
    assert 'name="next" value="/"' in page.text


def test_sessions_expire_and_a_tampered_one_is_refused():
    auth = Auth(TOKEN)
    session = auth.new_session(now=1_000_000)
    assert auth.session_ok(session, now=1_000_000 + 60)
    assert not auth.session_ok(session, now=1_000_000 + SESSION_MAX_AGE_S + 1)
    issued, nonce, signature = session.split(".")
    assert not auth.session_ok(f"{issued}.{nonce}x.{signature}", now=1_000_000)
    assert not Auth("another").session_ok(session, now=1_000_000)


def test_when_reads_need_the_token_pages_redirect_to_log_in_and_a_session_reads(tmp_path, store):
    seeded = seed_search(store, 6)
    with _client(tmp_path, store, require_token_for_reads=True) as c:
        r = c.get(f"/searches/{seeded.job_id}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
        assert c.get(f"/api/searches/{seeded.job_id}/scatter").status_code == 401
        log_in(c)
        assert c.get(f"/searches/{seeded.job_id}").status_code == 200
        assert c.get(f"/api/searches/{seeded.job_id}/scatter").status_code == 200


# ---- the submit form: the REST API's checks, errors by field -----------------------------------------


def test_the_form_submits_a_search_and_names_a_bad_field(client, store):
    csrf = log_in(client)
    bad = client.post("/searches/new", data={"csrf_token": csrf, "config": "name: x\nbudget: -3\n"})
    assert bad.status_code == 422
    assert re.search(r'data-field="budget"', bad.text) and store.count_jobs(kind="search") == 0
    unknown = client.post("/searches/new", data={"csrf_token": csrf, "config": "bugdet: 3\n"})
    assert unknown.status_code == 422 and 'data-field="bugdet"' in unknown.text
    outside = client.post(
        "/searches/new", data={"csrf_token": csrf, "config": "data: {corpus: /etc/passwd}\n"}
    )
    assert outside.status_code == 422 and 'data-field="data.corpus"' in outside.text
    not_yaml = client.post("/searches/new", data={"csrf_token": csrf, "config": "a: [1,\n"})
    assert not_yaml.status_code == 422 and 'data-field="config"' in not_yaml.text
    good = client.post(
        "/searches/new",
        data={"csrf_token": csrf, "config": '{"name": "from the form", "budget": 3}'},
        follow_redirects=False,
    )
    assert good.status_code == 303
    job_id = int(good.headers["location"].rsplit("/", 1)[1])
    job = store.get_job(job_id)
    assert job.name == "from the form" and job.budget == 3 and job.status == "queued"


# ---- the scatter's bounded sample ---------------------------------------------------------------------


def _points(n: int, seed: int) -> list[PointRecord]:
    rng = random.Random(seed)
    return [PointRecord(i + 1, rng.randrange(12), False, rng.random(), rng.random()) for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_front_flags_match_the_reference_front(seed):
    points = _points(3000, seed)
    points += [PointRecord(9000 + i, 0, False, p.x, p.y) for i, p in enumerate(points[:5])]  # duplicates
    flagged = front_flags(points)
    expected = set(pareto_front([[p.x, p.y] for p in points]))
    assert {i for i, p in enumerate(flagged) if p.on_front} == expected


def test_the_sample_keeps_every_front_point_and_shares_the_rest_by_generation():
    points = front_flags(_points(20_000, 3))
    shown = sample_points(points, 5000)
    n_front = sum(p.on_front for p in points)
    assert len(shown) == 5000
    assert {p.id for p in points if p.on_front} <= {p.id for p in shown}
    rest = [p for p in points if not p.on_front]
    for generation in range(12):  # each generation keeps its share, within one
        n = sum(p.generation == generation for p in rest)
        kept = sum(p.generation == generation and not p.on_front for p in shown)
        assert abs(kept - n * (5000 - n_front) / len(rest)) <= 1, generation
    assert sample_points(points[:100], 5000) == sorted(points[:100], key=lambda p: p.id)


any_backend = pg.storage


def test_the_database_samples_as_the_reference_does(any_backend):
    seeded = seed_search(any_backend, 300, seed=9)
    keep = list(seeded.presets)
    points = any_backend.objective_points(seeded.job_id, "val_bpb", "decode_ms")
    for max_points in (10, 57, 120, 1000):
        shown, total, front = any_backend.objective_point_sample(
            seeded.job_id, "val_bpb", "decode_ms", max_points, keep
        )
        assert shown == sample_points(points, max_points, keep), max_points
        assert total == 300 and front == len(seeded.front)


def test_the_scatter_sends_the_stored_front_and_a_bounded_sample(client, store):
    seeded = seed_search(store, 400)
    s = client.get(f"/api/searches/{seeded.job_id}/scatter", params={"max_points": 50}).json()
    assert s["total"] == 400 and s["shown"] == 50 and s["front"] == len(seeded.front)
    front = {i for i, flag in zip(s["ids"], s["on_front"]) if flag}
    assert front == set(seeded.front)
    assert set(s["presets"].values()) == {"llama", "mamba2"}
    spreads = [v for v, flag in zip(s["y_iqr"], s["on_front"]) if flag]
    assert all(v is None or v > 0 for v in spreads)
    other = client.get(
        f"/api/searches/{seeded.job_id}/scatter", params={"x": "n_params", "y": "val_bpb"}
    ).json()
    rows = [store.get_candidate(i) for i in seeded.ids if i not in seeded.failed]
    expected = {rows[k].id for k in pareto_front([[c.n_params, c.val_bpb] for c in rows])}
    assert {i for i, flag in zip(other["ids"], other["on_front"]) if flag} == expected


@pytest.mark.parametrize(
    "x, y, maximize",
    [
        ("throughput_tokens_per_s", "val_bpb", (True, False)),
        ("cache_bytes_per_sequence", "prefill_ms", (False, False)),
    ],
)
def test_latency_metrics_can_be_plotted_with_their_own_front(client, store, x, y, maximize):
    seeded = seed_search(store, 60)
    s = client.get(f"/api/searches/{seeded.job_id}/scatter", params={"x": x, "y": y}).json()
    rows = []
    for c in (store.get_candidate(i) for i in seeded.ids):
        latency = store.get_latency_result(c.latency_key) if c.latency_key else None
        if c.status == "completed" and latency is not None:
            rows.append(
                (
                    c.id,
                    getattr(latency, x) if x in LATENCY_METRICS else getattr(c, x),
                    getattr(latency, y) if y in LATENCY_METRICS else getattr(c, y),
                )
            )
    assert s["total"] == len(rows) == 40  # the seeded results with a latency measurement
    signs = [-1 if m else 1 for m in maximize]
    expected = {rows[k][0] for k in pareto_front([[signs[0] * a, signs[1] * b] for _, a, b in rows])}
    assert {i for i, flag in zip(s["ids"], s["on_front"]) if flag} == expected
    assert dict(zip(s["ids"], s["x"])) == {i: float(a) for i, a, _ in rows}


def test_the_feature_panel_finds_a_planted_correlation(client, store):
    seeded = seed_search(store, 60, with_presets=False)
    f = client.get(f"/api/searches/{seeded.job_id}/features").json()
    by_name = {e["feature"]: e["spearman"] for e in f["features"]}
    # the seeded decode latency grows with depth (tests/dashboard_seed.py): a strong positive correlation
    assert by_name["depth"]["decode_ms"] > 0.8 and by_name["depth"]["val_bpb"] < -0.5


# ---- static files and the offline docs ----------------------------------------------------------------


def test_plotly_and_the_api_docs_are_served_from_local_files(client):
    from web.assets import PLOTLY_JS, PLOTLY_MAJOR, plotly_js_major

    assert plotly_js_major(PLOTLY_JS) == PLOTLY_MAJOR
    js = client.get("/static/vendor/plotly-basic.min.js")
    assert js.status_code == 200 and f"plotly.js (basic - minified) v{PLOTLY_MAJOR}." in js.text[:200]
    for path in ("/docs", "/redoc"):
        html = client.get(path).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
        assert urls and all(u.startswith("/") for u in urls), (path, urls)
        for url in re.findall(r'src="([^"]+)"', html):
            assert client.get(url).status_code == 200, url

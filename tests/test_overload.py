"""Overload and repeated reads (issue 9, part B): admission refuses the excess at once with 503 and
Retry-After (probes and event streams exempt); the read cache serves repeated GETs, answers 304 to a matching
If-None-Match, never outlives a write of this process, and never serves a token-guarded read to a request
without that token. On a real uvicorn on loopback."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from search.storage import Storage
from tests.live import Live

TOKEN = "overload-token-not-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def live(tmp_path):
    server = Live(tmp_path, TOKEN, max_concurrent_requests=2)
    yield server
    server.close()


def test_the_lifespan_runs_through_every_middleware(live):
    """Each middleware passes the lifespan scope through (one that read a request's fields from it would make
    uvicorn give up the lifespan: no runner, no scheduler, no migrations)."""
    assert live.app.state.background is not None


def test_the_excess_is_refused_at_once_with_retry_after_and_probes_stay_up(live, monkeypatch):
    job = live.store.create_job("search", {"budget": 1}, name="slow", budget=1)
    real = type(live.store).get_job

    def slow_get_job(self, job_id):
        time.sleep(1.0)  # a route that takes a second: the admitted ones hold their slots
        return real(self, job_id)

    monkeypatch.setattr(type(live.store), "get_job", slow_get_job)
    barrier = threading.Barrier(8)

    def get(i):
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            started = time.monotonic()
            r = client.get(f"{live.base}/api/searches/{job}", params={"n": i})  # distinct: no cache hits
            return r, time.monotonic() - started

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(get, range(8)))
    admitted = [r for r, _ in results if r.status_code == 200]
    refused = [(r, t) for r, t in results if r.status_code == 503]
    assert len(admitted) == 2 and len(refused) == 6, [r.status_code for r, _ in results]
    assert all(r.headers["retry-after"] == "1" for r, _ in refused)
    assert all(r.headers["content-type"] == "application/problem+json" for r, _ in refused)
    assert {r.json()["type"] for r, _ in refused} == {"https://hybridnas.dev/problems/overloaded"}
    # At once: every refusal is back before the admitted requests (a second each) are done, whatever the
    # machine's load (an absolute time would only measure the load).
    admitted_s = [t for r, t in results if r.status_code == 200]
    assert max(t for _, t in refused) < min(admitted_s), (refused, admitted_s)
    assert httpx.get(f"{live.base}/api/health", timeout=5).status_code == 200


def test_repeated_reads_come_from_the_cache_with_etags_until_a_write(live):
    from api.cache import ReadCache

    cache = live.middleware(ReadCache)
    job = live.store.create_job("search", {"budget": 1}, name="cached", budget=1)
    with httpx.Client(base_url=live.base, timeout=10) as client:
        first = client.get(f"/api/searches/{job}")
        hits = cache.hits
        second = client.get(f"/api/searches/{job}")
        assert second.status_code == 200 and second.content == first.content and cache.hits == hits + 1
        etag = second.headers["etag"]
        assert client.get(f"/api/searches/{job}", headers={"If-None-Match": etag}).status_code == 304
        # a write through the API: the next read shows it at once
        assert client.post(f"/api/searches/{job}/cancel", headers=AUTH).status_code == 200
        after = client.get(f"/api/searches/{job}")
        assert after.json()["status"] == "cancelled" and after.headers["etag"] != etag
        # a write through another Storage object of this process on the same database: shown at once too
        other = Storage(live.store.url)
        other.set_job_status(job, "queued")
        assert client.get(f"/api/searches/{job}").json()["status"] == "queued"
        other.close()
        assert client.get("/api/health").headers.get("etag") is None  # probes are never cached


def test_streamed_routes_pass_the_read_cache_by():
    """Event streams, streamed exports and model archives are sent as they are made, never buffered whole in
    the cache (an exported model is megabytes)."""
    from api.cache import ReadCache

    cache = ReadCache(None, generation=lambda: 0, ttl_s=1.0, key_on_auth=False)

    def get(path):
        return {"type": "http", "method": "GET", "path": path}

    assert cache.cacheable(get("/api/candidates/3"))
    for path in (
        "/api/searches/1/events",
        "/api/searches/1/candidates.jsonl",
        "/api/candidates/3/export.tar.gz",
    ):
        assert not cache.cacheable(get(path)), path


def test_a_token_guarded_read_is_never_served_from_the_cache_without_the_token(tmp_path):
    server = Live(tmp_path, TOKEN, require_token_for_reads=True)
    try:
        job = server.store.create_job("search", {"budget": 1}, name="guarded", budget=1)
        with httpx.Client(base_url=server.base, timeout=10) as client:
            assert client.get(f"/api/searches/{job}", headers=AUTH).status_code == 200
            assert client.get(f"/api/searches/{job}", headers=AUTH).status_code == 200  # cached now
            assert client.get(f"/api/searches/{job}").status_code == 401
            assert (
                client.get(f"/api/searches/{job}", headers={"Authorization": "Bearer wrong"}).status_code
                == 401
            )
    finally:
        server.close()


def test_a_write_by_another_process_invalidates_the_cache_at_once_on_sqlite(live):
    """SQLite: every commit moves the write-ahead log, so a cached read never outlives another process's
    write (on PostgreSQL the TTL bounds it)."""
    import subprocess
    import sys

    job = live.store.create_job("search", {"budget": 1}, name="watched", budget=1)
    with httpx.Client(base_url=live.base, timeout=10) as client:
        assert client.get(f"/api/searches/{job}").json()["status"] == "queued"
        code = (
            f"from search.storage import Storage; s = Storage({live.store.url!r}); "
            f"s.set_job_status({job}, 'cancelled'); s.close()"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert client.get(f"/api/searches/{job}").json()["status"] == "cancelled"

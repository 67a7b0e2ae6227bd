"""`hybridnas.Client`: the coordinator's REST API from Python, with the API's own schemas as return types.

    client = hybridnas.Client()                   # HYBRIDNAS_URL / HYBRIDNAS_TOKEN / the data dir's token
    search = client.submit("search.yaml")         # or a dict, or a SearchConfig
    search = client.wait(search.id)               # follows the event stream, with a progress bar
    front = client.pareto(search.id).items

Requests are retried with backoff on 503 (honouring Retry-After) and on connection errors; a submission
carries an idempotency key, so a retried one never queues a second search.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from api.schedule_schemas import FireOut, ScheduleOut
from api.schemas import (
    CandidateDetail,
    CandidateSummary,
    HypervolumeOut,
    ParetoOut,
    RungsOut,
    SearchCreated,
    SearchDetail,
    SearchOut,
    StudyDetail,
    StudyOut,
)
from hybridnas.config import load_config
from hybridnas.errors import ApiError, HybridnasError
from search.config import SearchConfig
from search.layout import Layout

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, TOKEN_ENV = "HYBRIDNAS_URL", "HYBRIDNAS_TOKEN"
RETRY_STATUSES = (502, 503, 504)
PAGE = 200  # the API's largest page
T = TypeVar("T", bound=BaseModel)


def _default_token() -> str | None:
    """HYBRIDNAS_TOKEN, else the token file of this machine's data dir (a coordinator started here)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    from api.auth import TOKEN_FILE
    from api.settings import Settings

    path = Settings().resolved_data_dir() / TOKEN_FILE
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


class Client:
    """The REST API of a coordinator at `url` (default: HYBRIDNAS_URL, else http://127.0.0.1:8000).

    `token` (default: HYBRIDNAS_TOKEN, else the data dir's token file) is sent with every request; reads
    need it only when the server requires tokens for reads. `retries`: attempts after the first, with
    exponential backoff from `backoff_s`, on 502/503/504 and connection errors."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        retries: int = 6,
        backoff_s: float = 0.25,
        http: httpx.Client | None = None,
    ):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else _default_token()
        self.retries, self.backoff_s = retries, backoff_s
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = http or httpx.Client(base_url=self.url, timeout=timeout_s)
        self.http.headers.update(headers)

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _wait_before_retry(self, attempt: int, response: httpx.Response | None) -> None:
        delay = self.backoff_s * (2**attempt)
        if response is not None:
            try:
                delay = max(delay, float(response.headers.get("Retry-After", 0)))
            except ValueError:
                pass
        time.sleep(min(delay, 10.0))

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call, retried on overload and connection errors; a 4xx/5xx raises `ApiError`."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if last:
                    raise HybridnasError(f"cannot reach the coordinator at {self.url}: {exc}") from exc
                self._wait_before_retry(attempt, None)
                continue
            if response.status_code in RETRY_STATUSES and not last:
                self._wait_before_retry(attempt, response)
                continue
            if response.status_code >= 400:
                raise ApiError.from_response(response.status_code, response.reason_phrase, _json(response))
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _get(self, path: str, model: type[T], **params: Any) -> T:
        clean = {k: v for k, v in params.items() if v is not None}
        return model.model_validate(self.request("GET", path, params=clean).json())

    def _pages(self, path: str, model: type[T], **params: Any) -> list[T]:
        items, offset = [], 0
        adapter = TypeAdapter(list[model])
        while True:
            clean = {k: v for k, v in params.items() if v is not None}
            page = self.request("GET", path, params={**clean, "limit": PAGE, "offset": offset}).json()
            items.extend(adapter.validate_python(page["items"]))
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return items

    # ------------------------------------------------------------------ searches

    def submit(
        self,
        config: dict | str | Path | SearchConfig,
        *,
        priority: int | None = None,
        idempotency_key: str | None = None,
    ) -> SearchCreated:
        """Queue a search: `config` as a dict, a YAML/JSON file path or a `SearchConfig`. The idempotency key
        (a new one by default) makes the retries of this call safe."""
        body = load_config(config)
        if priority is not None:
            body["priority"] = priority
        key = idempotency_key or f"client-{uuid.uuid4()}"
        response = self.request("POST", "/api/searches", json=body, headers={"Idempotency-Key": key})
        return SearchCreated.model_validate(response.json())

    def searches(self, status: str | None = None) -> list[SearchOut]:
        """Every search (newest first), optionally with one status."""
        return self._pages("/api/searches", SearchOut, status=status)

    def search(self, search: int | str) -> SearchDetail:
        """A search by id, or by name (the newest of that name)."""
        return self._get(f"/api/searches/{self.search_id(search)}", SearchDetail)

    def search_id(self, search: int | str) -> int:
        if isinstance(search, int) or (isinstance(search, str) and search.isdigit()):
            return int(search)
        named = [s for s in self.searches() if s.name == search]
        if not named:
            raise HybridnasError(f"no search named {search!r} at {self.url}")
        return max(named, key=lambda s: s.id).id

    def cancel(self, search: int | str) -> SearchDetail:
        return self._post_detail(search, "cancel")

    def resume(self, search: int | str) -> SearchDetail:
        return self._post_detail(search, "resume")

    def archive(self, search: int | str) -> SearchDetail:
        return self._post_detail(search, "archive")

    def _post_detail(self, search: int | str, action: str) -> SearchDetail:
        response = self.request("POST", f"/api/searches/{self.search_id(search)}/{action}")
        return SearchDetail.model_validate(response.json())

    def delete(self, search: int | str) -> None:
        """Delete a finished search with its candidates (shared results stay, for other searches)."""
        self.request("DELETE", f"/api/searches/{self.search_id(search)}")

    def candidates(self, search: int | str, status: str | None = None) -> list[CandidateSummary]:
        return self._pages(
            f"/api/searches/{self.search_id(search)}/candidates", CandidateSummary, status=status
        )

    def candidate(self, candidate_id: int) -> CandidateDetail:
        return self._get(f"/api/candidates/{candidate_id}", CandidateDetail)

    def layout(self, candidate_id: int) -> Layout:
        """A candidate's layout, ready for `models` or `hybridnas layouts`."""
        return Layout.from_dict(self.candidate(candidate_id).layout)

    def pareto(self, search: int | str, x: str | None = None, y: str | None = None) -> ParetoOut:
        """The Pareto front over two objectives (default: the search's own)."""
        return self._get(f"/api/searches/{self.search_id(search)}/pareto", ParetoOut, x=x, y=y)

    def rungs(self, search: int | str) -> RungsOut:
        """A multi-fidelity search's rungs: runs, promotions, each rung's front and hypervolume."""
        return self._get(f"/api/searches/{self.search_id(search)}/rungs", RungsOut)

    def hypervolume(self, search: int | str) -> HypervolumeOut:
        return self._get(f"/api/searches/{self.search_id(search)}/hypervolume", HypervolumeOut)

    def candidates_dataframe(self, search: int | str):
        """Every candidate as a pandas DataFrame (the `candidates.jsonl` rows; needs pandas)."""
        from hybridnas.frames import to_dataframe

        response = self.request("GET", f"/api/searches/{self.search_id(search)}/candidates.jsonl")
        return to_dataframe([json.loads(line) for line in response.text.splitlines() if line.strip()])

    # ------------------------------------------------------------------ following a search

    def events(self, search: int | str, since: str | None = None) -> Iterator[tuple[str, dict]]:
        """The search's event stream as (event, data) pairs until its `end`, reconnecting from the last
        event id when the connection drops (a coordinator restart, the stream's time limit)."""
        from httpx_sse import connect_sse

        search_id = self.search_id(search)
        last_id, failures = since, 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(
                    self.http, "GET", f"/api/searches/{search_id}/events", headers=headers, timeout=None
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        body = _json(source.response)
                        raise ApiError.from_response(
                            source.response.status_code, source.response.reason_phrase, body
                        )
                    for event in source.iter_sse():
                        failures = 0
                        if event.id:
                            last_id = event.id
                        data = json.loads(event.data) if event.data else {}
                        yield event.event, data
                        if event.event == "end":
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                failures += 1
                if failures > self.retries:
                    raise HybridnasError(f"lost the event stream of search {search_id}: {exc}") from exc
                self._wait_before_retry(failures - 1, None)

    def wait(self, search: int | str, progress: bool = True) -> SearchDetail:
        """Follow the search until it ends (a progress bar on stderr with `progress`); the final search."""
        search_id = self.search_id(search)
        detail = self.search(search_id)
        if detail.status in ("completed", "failed", "cancelled", "archived"):
            return detail
        if not progress:
            for _ in self.events(search_id):
                pass
            return self.search(search_id)
        from api.progress import progress_bar

        fields = {"status": detail.status, "failed": detail.counts.get("failed", 0)}
        with progress_bar(f"search {search_id}", total=detail.budget, fields=fields) as update:
            failed = fields["failed"]
            for event, data in self.events(search_id):
                if event == "evaluation":
                    failed += data.get("status") == "failed"
                    update(failed=failed)
                elif event == "status":
                    update(completed=data.get("n_evaluations"), status=data.get("status"))
                elif event == "end":
                    update(status=data.get("status"))
            final = self.search(search_id)
            update(completed=final.n_evaluations, status=final.status)
        return final

    # ------------------------------------------------------------------ studies

    def submit_study(self, config: dict | str | Path, kind: str | None = None) -> StudyDetail:
        """Queue a study (`config` a dict or a YAML/JSON path; `kind` as in the config, or given here)."""
        body = load_config(config) if not isinstance(config, dict) else dict(config)
        if kind is not None:
            body["kind"] = kind
        key = f"client-{uuid.uuid4()}"
        response = self.request("POST", "/api/studies", json=body, headers={"Idempotency-Key": key})
        return StudyDetail.model_validate(response.json())

    def studies(self, kind: str | None = None) -> list[StudyOut]:
        return self._pages("/api/studies", StudyOut, kind=kind)

    def study(self, study_id: int) -> StudyDetail:
        return self._get(f"/api/studies/{study_id}", StudyDetail)

    def wait_study(self, study_id: int, poll_s: float = 2.0, progress: bool = True) -> StudyDetail:
        """Poll the study until it ends (a progress bar on stderr with `progress`); the final study."""
        from contextlib import nullcontext

        from api.progress import progress_bar

        bar = progress_bar(f"study {study_id}") if progress else nullcontext(lambda **_: None)
        with bar as update:
            while True:
                detail = self.study(study_id)
                update(completed=detail.n_evaluations, total=detail.budget, status=detail.status)
                if detail.status in ("completed", "failed", "cancelled", "archived"):
                    return detail
                time.sleep(poll_s)

    # ------------------------------------------------------------------ schedules

    def schedules(self) -> list[ScheduleOut]:
        return self._pages("/api/schedules", ScheduleOut)

    def schedule(self, schedule_id: int) -> ScheduleOut:
        return self._get(f"/api/schedules/{schedule_id}", ScheduleOut)

    def create_schedule(
        self, name: str, cron: str, template: dict | str | Path | SearchConfig, **options: Any
    ) -> ScheduleOut:
        """A cron schedule of searches (`options`: timezone, enabled, warm_start, priority)."""
        body = {"name": name, "cron": cron, "template": load_config(template), **options}
        return ScheduleOut.model_validate(self.request("POST", "/api/schedules", json=body).json())

    def update_schedule(self, schedule_id: int, **changes: Any) -> ScheduleOut:
        response = self.request("PATCH", f"/api/schedules/{schedule_id}", json=changes)
        return ScheduleOut.model_validate(response.json())

    def delete_schedule(self, schedule_id: int) -> None:
        self.request("DELETE", f"/api/schedules/{schedule_id}")

    def fires(self, schedule_id: int) -> list[FireOut]:
        return self._pages(f"/api/schedules/{schedule_id}/fires", FireOut)

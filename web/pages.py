"""The dashboard's pages and form posts.

Reads follow `HYBRIDNAS_REQUIRE_TOKEN_FOR_READS` (a session cookie counts as the token); every state change
needs a session and its CSRF token, and goes through the same functions as the REST API (the same checks).
Every page carries a Content-Security-Policy that allows scripts from this origin only.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import yaml
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError

from api.auth import CSRF_FIELD, SESSION_COOKIE, SESSION_MAX_AGE_S, session_of
from api.errors import problem, validation_errors
from api.routes import candidates as candidate_routes
from api.routes import schedules as schedule_routes
from api.routes import searches as search_routes
from api.routes import studies as study_routes
from api.routes import tunes as tune_routes
from api.routes import views as view_routes
from api.routes.candidates import CandidateId
from api.routes.schedules import ScheduleId
from api.routes.searches import SearchId
from api.routes.studies import StudyId
from api.routes.tunes import TuneId
from api.schedule_schemas import SchedulePatch
from api.schemas import MAX_ID, SearchCreate, make_cursor
from api.submit import SubmitError, submit_search
from search.config import SearchConfig
from search.db import CANDIDATE_STATUSES, JOB_STATUSES, JOB_TERMINAL_STATUSES, PLOT_AXES, STUDY_KINDS
from search.layout import Layout
from search.storage import Storage
from web import views

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
LOGIN_COOKIE = "hybridnas_login"  # the log-in form's own CSRF nonce (there is no session yet)
CSP = (
    "default-src 'self'; script-src 'self'; "
    # plotly.js sets inline styles and injects its own <style> element: styles need 'unsafe-inline'.
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# Points the scatter shows at first (every front point among them); up to the API's 5,000 on request. On a
# 2-core machine 1,000 points drew in 1.2 s against 1.5 s for 2,500 (benchmarks/results/dashboard_load.md).
SHOWN_POINTS = 1000
POINT_CHOICES = (1000, 2500, 5000)
EXAMPLE_SEARCH = """# A search: every field is optional (see the README's "search config").
name: my-search
strategy: pareto-aging
budget: 24
objectives: [val_bpb, decode_ms]
proxy:
  steps: 40
data:
  corpus: stdlib
"""

environment = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=select_autoescape(default=True))
environment.filters.update(number=views.number, utc=views.utc)
environment.globals.update(axis_titles=views.AXIS_TITLES, colour=views.operator_colour)
templates = Jinja2Templates(env=environment)
router = APIRouter(include_in_schema=False)


# ---- helpers ---------------------------------------------------------------------------------------------


def _storage(request: Request) -> Storage:
    return request.app.state.storage


def _local_path(value: str | None) -> str:
    """A redirect target on this site only (no scheme, no host, no '//' or backslash tricks)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


class LoginRequired(Exception):
    def __init__(self, path: str):
        self.path = path


class Refused(Exception):
    """A state change refused (403): no session, or not its CSRF token."""


def _reader(request: Request) -> str | None:
    """The session, if any; when reads need the token and there is none, the log-in page instead."""
    session = session_of(request)
    if session is None and request.app.state.auth.require_token_for_reads:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return session


def plot_scripts(page_script: str) -> tuple[str, ...]:
    """The scripts of a page with plots, under /static/, in load order."""
    return ("vendor/plotly-basic.min.js", "dashboard.js", page_script)


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    session = session_of(request)
    auth = request.app.state.auth
    base = {
        "logged_in": session is not None,
        "csrf": auth.csrf_token(session) if session else "",
        "csrf_field": CSRF_FIELD,
        "nav": context.pop("nav", ""),
        "page_data": "",
        "scripts": (),
    }
    return templates.TemplateResponse(
        request, name, {**base, **context}, status_code=status_code, headers=SECURITY_HEADERS
    )


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    return render(request, "error.html", {"status_code": status_code, "message": message}, status_code)


async def _form_with_csrf(request: Request) -> dict[str, str]:
    """The posted form, after checking that a logged-in user sent it with the session's CSRF token."""
    session = session_of(request)
    if session is None:
        raise Refused("log in to change anything")
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if not request.app.state.auth.csrf_ok(session, form.get(CSRF_FIELD)):
        raise Refused("missing or invalid CSRF token: reload the page and try again")
    return form


def _see_other(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303, headers={"Cache-Control": "no-store"})


# ---- log-in ----------------------------------------------------------------------------------------------


@router.get("/login")
def login_page(
    request: Request,
    next_path: Annotated[str | None, Query(alias="next", max_length=2000)] = None,
    error: Annotated[str | None, Query(max_length=8)] = None,
) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    response = render(
        request,
        "login.html",
        {
            "next": _local_path(next_path),
            "login_csrf": request.app.state.auth.csrf_token(f"login:{nonce}"),
            "failed": error is not None,
            "nav": "login",
        },
        401 if error is not None else 200,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=600,
        httponly=True,
        samesite="strict",
        path="/login",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    auth = request.app.state.auth
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    next_path = _local_path(form.get("next"))
    if not nonce or not auth.csrf_ok(f"login:{nonce}", form.get(CSRF_FIELD)):
        return error_page(request, 403, "the log-in form expired: reload it and try again")
    if not auth.check(form.get("token", "").strip()):
        return _see_other(f"/login?error=1&next={quote(next_path)}")
    response = _see_other(next_path)
    response.set_cookie(
        SESSION_COOKIE,
        auth.new_session(),
        max_age=SESSION_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    await _form_with_csrf(request)
    response = _see_other("/")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# ---- searches --------------------------------------------------------------------------------------------


@router.get("/")
def searches_page(
    request: Request,
    status: Annotated[str | None, Query(max_length=16)] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> HTMLResponse:
    _reader(request)
    storage = _storage(request)
    status = status if status in JOB_STATUSES else None
    limit = 50
    jobs = storage.list_jobs(status=status, kind="search", limit=limit, offset=offset)
    ids = [j.id for j in jobs]
    counts, best = storage.counts_by_job(ids), storage.best_by_job(ids)
    rows = []
    for job in jobs:
        last = storage.latest_hypervolume(job.id)
        rows.append(
            {
                "job": job,
                "strategy": job.config.get("strategy", "pareto-aging"),
                "counts": counts.get(job.id, {}),
                "hypervolume": None if last is None else last.hypervolume,
                "best_val_bpb": best.get(job.id),
            }
        )
    total = storage.count_jobs(status=status, kind="search")
    return render(
        request,
        "searches.html",
        {
            "rows": rows,
            "total": total,
            "status": status or "",
            "statuses": JOB_STATUSES,
            "offset": offset,
            "limit": limit,
            "nav": "searches",
        },
    )


@router.get("/searches/new")
def new_search_page(request: Request) -> HTMLResponse:
    _reader(request)
    if session_of(request) is None:
        return _see_other("/login?next=/searches/new")
    return render(request, "new_search.html", {"text": EXAMPLE_SEARCH, "errors": [], "nav": "new"})


def _parse_config(text: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise SubmitError("config", f"not valid YAML or JSON{where}") from None
    if not isinstance(data, dict):
        raise SubmitError("config", "must be a mapping of fields (name: ..., budget: ...)")
    return data


@router.post("/searches/new")
async def submit_search_form(request: Request) -> Response:
    form = await _form_with_csrf(request)
    text = form.get("config", "")
    errors: list[dict[str, Any]] = []
    try:
        body = SearchCreate.model_validate(_parse_config(text))
        submitted = submit_search(_storage(request), body, data_roots=request.app.state.settings.data_roots)
    except ValidationError as exc:
        errors = validation_errors([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
    except SubmitError as exc:
        errors = [{"field": exc.field, "msg": exc.reason}]
    if errors:
        for error in errors:
            error["field"] = str(error.get("field") or "").removeprefix("body.") or "config"
        return render(request, "new_search.html", {"text": text, "errors": errors, "nav": "new"}, 422)
    return _see_other(f"/searches/{submitted.job.id}")


@router.get("/searches/{search_id}")
def search_page(
    request: Request,
    search_id: SearchId,
    points: Annotated[int, Query(description=f"points the scatter shows: one of {POINT_CHOICES}")] = 0,
) -> HTMLResponse:
    _reader(request)
    shown = points if points in POINT_CHOICES else SHOWN_POINTS
    storage = _storage(request)
    job = storage.get_job(search_id)
    if job is None or job.kind != "search":
        return error_page(request, 404, f"no search {search_id}")
    detail = search_routes.get_search(search_id, storage)
    objectives = search_routes.own_objectives(job, None, None)
    last = storage.last_finished(search_id)
    data = {
        "cursor": make_cursor(*last) if last else None,  # the live feed starts after what the page shows
        "search_id": search_id,
        "objectives": objectives,
        "choices": list(PLOT_AXES),
        "titles": views.AXIS_TITLES,
        "status": job.status,
        "terminal": list(JOB_TERMINAL_STATUSES),
        "statuses": list(CANDIDATE_STATUSES),
        "fidelity": bool(job.config.get("fidelity")),
    }
    x, y = objectives[1], objectives[0]  # latency across, quality up: how the paper draws its fronts
    preload = {
        "scatter": f"/api/searches/{search_id}/scatter?x={x}&y={y}&max_points={shown}",
        "table": f"/api/searches/{search_id}/candidates?limit=25&offset=0&sort=id",
    }
    return render(
        request,
        "search.html",
        {
            "preload": preload,
            "max_points": shown,
            "point_choices": POINT_CHOICES,
            "job": job,
            "detail": detail,
            "trust": view_routes.proxy_trust(search_id, storage),
            "objectives": objectives,
            "choices": PLOT_AXES,
            "statuses": CANDIDATE_STATUSES,
            "page_data": views.page_data(data),
            "scripts": plot_scripts("search.js"),
            "nav": "searches",
        },
    )


SEARCH_ACTIONS = {
    "cancel": search_routes.cancel_search,
    "resume": search_routes.resume_search,
    "archive": search_routes.archive_search,
}


@router.post("/searches/{search_id}/{action}")
async def search_action(request: Request, search_id: SearchId, action: str) -> Response:
    await _form_with_csrf(request)
    handler = SEARCH_ACTIONS.get(action)
    if handler is None:
        return error_page(request, 404, f"no action {action!r}")
    try:
        handler(search_id, _storage(request))
    except HTTPException as exc:
        return error_page(request, exc.status_code, str(exc.detail))
    return _see_other(f"/searches/{search_id}")


# ---- candidates ------------------------------------------------------------------------------------------


def _stage_sizes(storage: Storage, candidate) -> list[int] | None:
    """Operators per stage, as the candidate's search space reads its layout (None: outside the grammar, or
    a space that no longer builds)."""
    job = storage.get_job(candidate.job_id)
    try:
        space = SearchConfig.model_validate(job.config).build_space()
        genome = space.decode(Layout.from_dict(candidate.layout))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return None if genome is None else [stage.block.size * stage.n_blocks for stage in genome.stages]


def _candidate_view(storage: Storage, candidate_id: int) -> dict[str, Any] | None:
    """What the candidate and compare pages show, from the REST API's own candidate detail."""
    try:
        c = candidate_routes.get_candidate(candidate_id, storage)
    except HTTPException:
        return None
    blocks, layout = views.layout_strip(c.layout, _stage_sizes(storage, c))
    return {
        "c": c,
        "blocks": blocks,
        "layout": layout,
        "loss_curve": [list(p) for p in (c.training or {}).get("loss_curve") or []],
        "latency": views.latency_metrics(c.latency),
        "fingerprint": c.device_fingerprint or {},
    }


@router.get("/candidates/{candidate_id}")
def candidate_page(request: Request, candidate_id: CandidateId) -> HTMLResponse:
    _reader(request)
    storage = _storage(request)
    view = _candidate_view(storage, candidate_id)
    if view is None:
        return error_page(request, 404, f"no candidate {candidate_id}")
    c = view["c"]
    children = [storage.get_candidate(i) for i in c.children[:50]]
    base_url = str(request.base_url).rstrip("/")
    return render(
        request,
        "candidate.html",
        {
            **view,
            "lineage": c.lineage,
            "children": [child for child in children if child is not None],
            "legend": views.legend(),
            "commands": views.cli_commands(c.id, base_url),
            "page_data": views.page_data({"curves": [{"id": c.id, "points": view["loss_curve"]}]}),
            "scripts": plot_scripts("curves.js"),
            "nav": "searches",
        },
    )


@router.get("/candidates/{candidate_id}/evaluation.json")
def evaluation_settings(request: Request, candidate_id: CandidateId) -> Response:
    """The proxy, latency and data settings of the candidate's search (for `hybridnas proxy train
    --config`)."""
    _reader(request)
    storage = _storage(request)
    c = storage.get_candidate(candidate_id)
    job = storage.get_job(c.job_id) if c is not None else None
    if c is None or job is None:
        return problem(404, detail=f"no candidate {candidate_id}", instance=request.url.path)
    settings = {k: job.config[k] for k in ("proxy", "latency", "data") if k in job.config}
    return JSONResponse(
        settings,
        headers={"Content-Disposition": f'attachment; filename="candidate-{candidate_id}-evaluation.json"'},
    )


@router.get("/compare")
def compare_page(request: Request, ids: Annotated[str, Query(max_length=100)] = "") -> HTMLResponse:
    _reader(request)
    wanted = [int(p) for p in ids.replace(" ", "").split(",") if p.isdigit() and 0 < int(p) <= MAX_ID]
    wanted = list(dict.fromkeys(wanted))
    if not 2 <= len(wanted) <= 4:
        return error_page(request, 422, "ids: give two to four candidate ids, e.g. /compare?ids=3,7")
    storage = _storage(request)
    shown = [v for v in (_candidate_view(storage, i) for i in wanted) if v is not None]
    if len(shown) < len(wanted):
        missing = sorted(set(wanted) - {v["c"].id for v in shown})
        return error_page(request, 404, f"no candidate {', '.join(map(str, missing))}")
    curves = [{"id": v["c"].id, "points": v["loss_curve"]} for v in shown]
    return render(
        request,
        "compare.html",
        {
            "shown": shown,
            "legend": views.legend(),
            "page_data": views.page_data({"curves": curves}),
            "scripts": plot_scripts("curves.js"),
            "nav": "",
        },
    )


# ---- schedules and jobs ----------------------------------------------------------------------------------


@router.get("/schedules")
def schedules_page(request: Request) -> HTMLResponse:
    _reader(request)
    storage = _storage(request)
    page = schedule_routes.list_schedules(request, storage, limit=200, offset=0, enabled=None)
    rows = [
        {
            "s": s,
            "local": views.local_time(s.next_due_at, s.timezone),
            "fires": storage.list_fires(s.id, limit=5),
        }
        for s in page.items
    ]
    return render(request, "schedules.html", {"rows": rows, "total": page.total, "nav": "schedules"})


@router.post("/schedules/{schedule_id}/{action}")
async def schedule_action(request: Request, schedule_id: ScheduleId, action: str) -> Response:
    await _form_with_csrf(request)
    if action not in ("enable", "disable"):
        return error_page(request, 404, f"no action {action!r}")
    patch = SchedulePatch(enabled=action == "enable")
    try:
        schedule_routes.patch_schedule(schedule_id, patch, request, _storage(request))
    except HTTPException as exc:
        return error_page(request, exc.status_code, str(exc.detail))
    return _see_other("/schedules")


@router.get("/jobs")
def jobs_page(request: Request) -> HTMLResponse:
    _reader(request)
    storage = _storage(request)
    active = storage.queue(["queued", "running"], None, limit=200, offset=0)
    recent = storage.list_jobs(limit=50, offset=0)
    return render(
        request, "jobs.html", {"active": active, "recent": recent, "study_kinds": STUDY_KINDS, "nav": "jobs"}
    )


def _study_plot_data(kind: str, result: dict, config: dict) -> dict:
    """What study.js plots, by kind."""
    if kind == "depth-width":
        return {
            "points": result.get("points", []),
            "law": result.get("law"),
            "budgets": config.get("budgets_ms", []),
        }
    if kind == "fidelity":
        return {"rows": result.get("rows", [])}
    if kind == "ablation":
        return {"arms": {arm: r["pairs"] for arm, r in result.get("arms", {}).items()}}
    return {"fronts": {"hybrid": result.get("hybrid_front", []), "llama": result.get("llama_front", [])}}


@router.get("/studies/{study_id}")
def study_page(request: Request, study_id: StudyId) -> HTMLResponse:
    """A study: its runs and its report by kind, with plots: depth-width, the law, the extrapolation check,
    the budget choices and loss/latency against depth per width; fidelity, the rank correlations and short
    against long val_bpb; ablation, each arm's paired differences; verdict, each budget and both fronts."""
    _reader(request)
    try:
        detail = study_routes.get_study(study_id, _storage(request))
    except HTTPException:
        return error_page(request, 404, f"no study {study_id}")
    result = detail.result or {}
    return render(
        request,
        "study.html",
        {
            "study": detail,
            "result": result,
            "constants": ("l0", "a", "alpha", "b", "beta"),
            "page_data": views.page_data(
                {"kind": detail.kind, **_study_plot_data(detail.kind, result, detail.config)}
            ),
            "scripts": plot_scripts("study.js"),
            "nav": "jobs",
        },
    )


@router.get("/tunes/{tune_id}")
def tune_page(request: Request, tune_id: TuneId) -> HTMLResponse:
    """A tune job: its best recipe, its trials' table and their val_bpb curves (ASHA's stopped trials are
    the shorter lines)."""
    _reader(request)
    try:
        detail = tune_routes.get_tune(tune_id, _storage(request))
    except HTTPException:
        return error_page(request, 404, f"no tune job {tune_id}")
    result = detail.result or {}
    trials = [{k: t[k] for k in ("trial_id", "status", "curve")} for t in result.get("trials", [])]
    return render(
        request,
        "tune.html",
        {
            "tune": detail,
            "result": result,
            "page_data": views.page_data({"trials": trials}),
            "scripts": plot_scripts("tune.js"),
            "nav": "jobs",
        },
    )


def install_pages(app) -> None:
    """The page routes, and the redirect to the log-in page for a reader without a session."""

    @app.exception_handler(LoginRequired)
    async def _login(_request: Request, exc: LoginRequired) -> Response:
        return _see_other(f"/login?next={quote(exc.path)}")

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> Response:
        return error_page(request, 403, str(exc))

    app.include_router(router)

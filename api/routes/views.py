"""/api/searches/{id}/scatter, /hypervolume, /features and /proxy-trust: what the dashboard's search page
shows, computed on the server (the front is the materialized one; a large search sends a bounded sample)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from api.auth import require_read_token
from api.errors import error_responses
from api.features import MAX_CANDIDATES, feature_correlations
from api.routes.deps import StorageDep, job_or_404
from api.routes.searches import SearchId, own_objectives
from api.scatter import MAX_POINTS, front_flags, sample_points
from api.schemas import FeatureEffect, FeaturesOut, HypervolumeOut, ProxyTrustOut, ScatterOut
from search.db import CANDIDATE_DONE_STATUSES, MAXIMIZED, PLOT_AXES
from search.layout import Layout

router = APIRouter(
    prefix="/api/searches",
    tags=["views"],
    dependencies=[Depends(require_read_token)],
    responses=error_responses(401, 404, 422, 500, 503),
)

# Which latency statistic holds the measured spread of a plotted value (the profiler's median and IQR).
SPREAD_OF = {
    "decode_ms": "decode_ms_per_token",
    "prefill_ms": "prefill_ms",
    "throughput_tokens_per_s": "throughput_tokens_per_s",
}
Axis = Literal[PLOT_AXES]  # type: ignore[valid-type]
AxisX = Annotated[
    Axis | None, Query(description="across: an objective or a latency metric (default: the search's own)")
]
AxisY = Annotated[
    Axis | None, Query(description="up: an objective or a latency metric (default: the search's own)")
]


def _spreads(results: dict[int, dict], name: str, ids: list[int]) -> list[float | None]:
    """The measured IQR of `name` per point, from the front's latency `results` (None elsewhere)."""
    stat = SPREAD_OF.get(name)
    out: list[float | None] = []
    for i in ids:
        value = ((results.get(i) or {}).get(stat) or {}).get("iqr") if stat else None
        out.append(float(value) if isinstance(value, (int, float)) else None)
    return out


@router.get(
    "/{search_id}/scatter",
    response_model=ScatterOut,
    summary="Points for a scatter of two objectives or latency metrics: the front and a sample of the rest",
)
def scatter(
    search_id: SearchId,
    storage: StorageDep,
    x: AxisX = None,
    y: AxisY = None,
    max_points: Annotated[int, Query(ge=10, le=MAX_POINTS, description="points sent at most")] = MAX_POINTS,
) -> ScatterOut:
    """Column by column (what a plot takes): every point of the front of the two axes, and a bounded sample
    of the others (the named starting layouts always among them), with the latency spread (IQR) of front
    points and their compact layouts for hover text. `x` and `y` must differ (422 naming `y`)."""
    job = job_or_404(storage, search_id)
    objectives = own_objectives(job, x, y)
    names = storage.initial_layout_names(search_id)
    if sorted(objectives) == sorted(own_objectives(job, None, None)):  # the stored front: sampled in SQL
        shown, total, front = storage.objective_point_sample(search_id, *objectives, max_points, names)
    else:  # another pair: its front is computed here, over every point (throughput: higher is better)
        maximize = (objectives[0] in MAXIMIZED, objectives[1] in MAXIMIZED)
        points = front_flags(storage.objective_points(search_id, *objectives), maximize)
        shown, total = sample_points(points, max_points, keep=names.keys()), len(points)
        front = sum(p.on_front for p in points)
    ids = [p.id for p in shown]
    flags = [p.on_front for p in shown]
    front_ids = [p.id for p in shown if p.on_front]
    spread = any(name in SPREAD_OF for name in objectives)
    results = storage.latency_results_of(front_ids) if spread else {}  # error bars: the front's only
    return ScatterOut(
        search_id=search_id,
        objectives=objectives,
        total=total,
        shown=len(shown),
        front=front,
        ids=ids,
        generations=[p.generation for p in shown],
        on_front=flags,
        x=[p.x for p in shown],
        y=[p.y for p in shown],
        x_iqr=_spreads(results, objectives[0], ids),
        y_iqr=_spreads(results, objectives[1], ids),
        presets={str(i): names[i] for i in ids if i in names},
        layouts=_compact_layouts(storage, front_ids),
    )


def _compact_layouts(storage, ids: list[int]) -> dict[str, str]:
    """The front's layouts as short strings, for hover text."""
    out = {}
    for candidate_id, data in storage.layouts_of(ids[:1000]).items():
        layout = Layout.from_dict(data)
        out[str(candidate_id)] = f"{layout.compact()} (d_model {layout.d_model})"
    return out


@router.get("/{search_id}/hypervolume", response_model=HypervolumeOut, summary="The hypervolume over time")
def hypervolume(search_id: SearchId, storage: StorageDep) -> HypervolumeOut:
    """The normalized hypervolume of the front for the search's own objectives, each time it was recorded
    as evaluations finished, oldest first."""
    job_or_404(storage, search_id)
    history = storage.hypervolume_history(search_id)
    return HypervolumeOut(
        search_id=search_id,
        n_evaluations=[h.n_evaluations for h in history],
        hypervolume=[h.hypervolume for h in history],
        recorded_at=[h.recorded_at for h in history],
    )


@router.get(
    "/{search_id}/features",
    response_model=FeaturesOut,
    summary="Rank correlations of layout features (depth, width, operator mix) with the objectives",
)
def features(search_id: SearchId, storage: StorageDep) -> FeaturesOut:
    """Spearman rank correlations between layout features and each objective, over the latest completed
    candidates (at most 2,000), strongest first; null where there are under 3 values or one is constant."""
    job = job_or_404(storage, search_id)
    objectives = own_objectives(job, None, None)
    done = storage.candidates(search_id, status=CANDIDATE_DONE_STATUSES, order_by="-id", limit=MAX_CANDIDATES)
    layouts = [Layout.from_dict(c.layout) for c in done]
    values = {name: [getattr(c, name) for c in done] for name in objectives}
    effects = feature_correlations(layouts, values)
    return FeaturesOut(
        search_id=search_id,
        n_candidates=len(done),
        features=[FeatureEffect(feature=f, spearman=rho) for f, rho in effects],
    )


@router.get(
    "/{search_id}/proxy-trust",
    response_model=ProxyTrustOut,
    summary="The latest proxy-fidelity result for the search's proxy and data settings",
)
def proxy_trust(search_id: SearchId, storage: StorageDep) -> ProxyTrustOut:
    """From the newest completed `fidelity` study whose proxy config hash and data settings equal the
    search's; `study_id` is null when none was run."""
    from search.studies.fidelity import judges, trust_key

    key = trust_key(job_or_404(storage, search_id).config)
    proxy_hash = key[0]
    for study in storage.list_jobs(kind="fidelity", status="completed", limit=None):
        if study.result and judges(study.result, key):
            fields = ("short_vs_long", "seed_noise_ceiling", "within_param_band", "target_met")
            return ProxyTrustOut(
                search_id=search_id,
                study_id=study.id,
                proxy_config_hash=proxy_hash,
                **{k: study.result.get(k) for k in fields},
            )
    return ProxyTrustOut(search_id=search_id, proxy_config_hash=proxy_hash)

"""Request and response bodies of the REST API (pydantic), kept apart from the storage records. Every field
has a description: they are the OpenAPI document's reference (tests/test_api_reference.py holds them to it).
Errors are problem details (`api/errors.py`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from api.errors import UNION_TAG_PREFIX, ProblemDetails
from search.config import SearchConfig
from search.db import MAX_ID
from search.storage import CandidateRecord, JobRecord
from search.studies import AblationStudy, DepthWidthStudy, FidelityStudy, VerdictStudy

T = TypeVar("T")

MAX_PAGE = 200
MAX_OFFSET = 1_000_000_000


# Named examples of a search config (POST /api/searches; a schedule's template).
SEARCH_EXAMPLES: dict[str, dict[str, Any]] = {
    "minimal": {
        "summary": "The defaults: the CPU space, pareto-aging, 16 evaluations",
        "value": {"name": "first-search"},
    },
    "typical": {
        "summary": "A small CPU search on the bundled corpus",
        "value": {
            "name": "cpu-small",
            "strategy": "pareto-aging",
            "budget": 24,
            "objectives": ["val_bpb", "decode_ms"],
            "space": {"preset": "cpu", "widths": [64, 96]},
            "proxy": {"steps": 40},
            "data": {"corpus": "stdlib"},
            "executor": "inline",
            "workers": 1,
            "priority": 5,
        },
    },
    "constrained": {
        "summary": "Random sampling under a latency and size budget",
        "value": {
            "name": "budgeted",
            "strategy": "random",
            "budget": 32,
            "constraints": {"max_decode_ms": 5.0, "max_params": 2000000},
            "seed": 7,
        },
    },
}


class SearchCreate(SearchConfig):
    """A search config (every field optional; unknown fields rejected) plus its queue priority."""

    model_config = ConfigDict(json_schema_extra={"examples": [e["value"] for e in SEARCH_EXAMPLES.values()]})

    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first; FIFO within a priority")

    def search_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"priority"})


class Page(BaseModel, Generic[T]):
    """One page of a list: `items` from `offset` on, at most `limit` of them, out of `total`."""

    items: list[T] = Field(description="this page's items, in the list's order")
    total: int = Field(description="items in the whole list (every page), with the same filters")
    limit: int = Field(description="the page size asked for")
    offset: int = Field(description="items skipped before this page")


class JobOut(BaseModel):
    """A job of the queue: a search, or another kind of run."""

    id: int = Field(description="the job's id (a search's id is its job's)")
    kind: str = Field(description="what the job runs: search, fidelity, depth-width or ablation")
    name: str | None = Field(description="the name it was submitted with")
    status: str = Field(description="queued, running, completed, failed, cancelled or archived")
    priority: int = Field(description="higher runs first; FIFO within a priority")
    created_at: datetime = Field(description="when it was submitted (UTC)")
    started_at: datetime | None = Field(description="when a runner first took it (UTC)")
    finished_at: datetime | None = Field(description="when it completed, failed or was cancelled (UTC)")
    n_evaluations: int = Field(description="evaluations done so far (a reused result counts as one)")
    budget: int | None = Field(description="evaluations it runs in all")
    error: str | None = Field(description="why it failed (failed jobs only)")
    schedule_id: int | None = Field(description="the schedule that queued it, if any")

    @classmethod
    def of(cls, job: JobRecord) -> JobOut:
        return cls(**{name: getattr(job, name) for name in cls.model_fields if hasattr(job, name)})


class QueueJobOut(JobOut):
    """A job with its lease: which runner holds it, and until when."""

    lease_owner: str | None = Field(description="the runner (host:pid:slot) holding the job while it runs")
    lease_expires_at: datetime | None = Field(
        description="when the lease lapses unless renewed; then another runner may take the job (UTC)"
    )
    heartbeat_at: datetime | None = Field(description="the holder's last renewal (UTC)")


class SearchOut(JobOut):
    """A search in a list."""

    progress: float | None = Field(None, description="evaluations done / budget (0..1)")


class SearchDetail(SearchOut):
    """A search with its config and what it has found so far."""

    config: dict[str, Any] = Field(
        description="the search config as stored: what was submitted, defaults filled in (without priority)"
    )
    counts: dict[str, int] = Field(description="candidates by status")
    hypervolume: float | None = Field(None, description="the latest recorded hypervolume")
    hypervolume_at: int | None = Field(None, description="evaluations when it was recorded")


class SearchCreated(SearchOut):
    """The search a submission queued (or, for a replayed Idempotency-Key, the one queued before)."""

    replayed: bool = Field(False, description="true when an Idempotency-Key matched an earlier request")


class CandidateSummary(BaseModel):
    """A candidate architecture of a search, without its layout and results."""

    id: int = Field(description="the candidate's id")
    job_id: int = Field(description="the search it belongs to")
    layout_hash: str = Field(description="hash of the layout: equal layouts share stored results")
    parent_id: int | None = Field(description="the candidate it was mutated from (none: initial population)")
    generation: int = Field(description="0 for the initial population, then one more than its parent's")
    status: str = Field(description="pending, running, completed, failed or reused (a stored result)")
    attempts: int = Field(description="evaluations started (more than one after a retry)")
    val_bpb: float | None = Field(
        description="validation bits per byte after the short training (lower: better)"
    )
    decode_ms: float | None = Field(description="decode latency, ms per token at batch 1 (lower: better)")
    n_params: int | None = Field(description="parameters (analytic count)")
    on_front: bool = Field(description="on the search's Pareto front for its own objectives")
    created_at: datetime = Field(description="when it was proposed (UTC)")
    finished_at: datetime | None = Field(description="when its evaluation ended (UTC)")
    rung: int | None = Field(
        None, description="multi-fidelity: the rung its values were trained at (null: single-fidelity)"
    )

    @classmethod
    def of(cls, candidate: CandidateRecord) -> CandidateSummary:
        return cls(**{name: getattr(candidate, name) for name in cls.model_fields})


class CandidateDetail(CandidateSummary):
    """A candidate in full: layout, lineage, results and, for a failure, why."""

    layout: dict[str, Any] = Field(
        description="the architecture (operators, d_model, dimensions): `layout.json` downloads it"
    )
    mutation: dict[str, Any] | None = Field(
        description="how it was made from its parent: `kind` and `detail`"
    )
    objectives: dict[str, Any] | None = Field(description="{objective: value} once evaluated")
    training_key: str | None = Field(
        description="key of its stored training result (shared by equal layouts)"
    )
    latency_key: str | None = Field(description="key of its stored latency result (per device)")
    failure_reason: str | None = Field(description="why its evaluation failed (failed only)")
    traceback: str | None = Field(description="the worker's traceback of the failure (failed only)")
    started_at: datetime | None = Field(description="when its evaluation started (UTC)")
    lineage: list[LineageItem] = Field(default_factory=list, description="ancestors, parent first")
    children: list[int] = Field(default_factory=list, description="ids of candidates mutated from this one")
    training: dict[str, Any] | None = Field(None, description="short-training metrics and curves")
    latency: dict[str, Any] | None = Field(None, description="latency statistics")
    device_fingerprint: dict[str, Any] | None = Field(
        None, description="the device the latency was measured on (model, driver, library versions)"
    )
    log_tail: list[str] = Field(default_factory=list, description="the worker's last log lines")


class ParetoOut(BaseModel):
    """A search's Pareto front for two objectives."""

    search_id: int = Field(description="the search")
    objectives: list[str] = Field(description="[x, y]: the two objectives, both minimized")
    items: list[CandidateSummary] = Field(description="the front's candidates, by the first objective")


class RungFrontPoint(BaseModel):
    """A candidate on a rung's front, with its values at that rung."""

    model_config = ConfigDict(extra="allow")  # one field per objective of the search
    candidate_id: int = Field(description="the candidate")


class RungOut(BaseModel):
    """One rung of a multi-fidelity search."""

    rung: int = Field(description="0 for the lowest")
    steps: int = Field(description="training steps at this rung")
    counts: dict[str, int] = Field(
        description="this rung's runs by status (pending, running, completed, ...)"
    )
    promoted: int = Field(description="candidates promoted from this rung to the next")
    front: list[RungFrontPoint] = Field(
        description="the Pareto front of this rung's results, by the first objective"
    )
    hypervolume: float | None = Field(description="that front's hypervolume in the search's fixed space")
    steps_trained: int = Field(description="optimizer steps this search trained at this rung (reuse: none)")


class RungsOut(BaseModel):
    """A search's rungs (empty for a single-fidelity search)."""

    search_id: int = Field(description="the search")
    objectives: list[str] = Field(description="the search's two objectives")
    eta: int | None = Field(description="each rung promotes its best 1/eta (null: single-fidelity)")
    continuation: bool | None = Field(description="promotions continue from the lower rung's checkpoint")
    training_steps: int = Field(description="optimizer steps trained over every rung")
    rungs: list[RungOut] = Field(description="lowest first")


class CandidateRow(BaseModel):
    """One candidate in an export: a row of `candidates.csv` / `pareto.csv`, a line of `candidates.jsonl`."""

    candidate_id: int = Field(description="the candidate's id")
    layout_hash: str = Field(description="hash of the layout")
    operators: str = Field(description="the layout's operators as short codes, e.g. `A F M2 F`")
    d_model: int = Field(description="the model width")
    val_bpb: float | None = Field(description="validation bits per byte")
    decode_ms: float | None = Field(description="decode latency, ms per token")
    n_params: int | None = Field(description="parameters (analytic count)")
    generation: int = Field(description="0 for the initial population, then one more than its parent's")
    parent_id: int | None = Field(description="the candidate it was mutated from")
    status: str = Field(description="pending, running, completed, failed or reused")
    failure_reason: str | None = Field(description="why its evaluation failed")
    rung: int | None = Field(description="multi-fidelity: the rung of its values (empty: single-fidelity)")


# The live feed's cursor: "<finished_at, UTC ISO-8601>Z~<candidate id>" (opaque to clients).
CURSOR_PATTERN = r"^[0-9T:.\-]{10,40}Z~[0-9]{1,10}$"


def make_cursor(finished_at: datetime, candidate_id: int) -> str:
    return (
        f"{finished_at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%f')}Z~{candidate_id}"  # no "+": URL-safe
    )


def parse_cursor(cursor: str | None) -> tuple[datetime, int] | None:
    """The (finished_at, id) of a cursor; ValueError (a 422) for one that does not parse."""
    if cursor is None:
        return None
    at, _, candidate_id = cursor.rpartition("~")
    try:
        parsed = datetime.fromisoformat(at)
    except ValueError:
        raise ValueError(f"since: not a cursor this API returned ({cursor!r})") from None
    if not candidate_id.isdigit() or int(candidate_id) > MAX_ID:
        raise ValueError(f"since: not a cursor this API returned ({cursor!r})")
    return parsed, int(candidate_id)


class EvaluationFeed(BaseModel):
    """Evaluations that finished after a cursor, and the search's progress."""

    search_id: int = Field(description="the search")
    status: str = Field(description="the search's status now")
    n_evaluations: int = Field(description="evaluations done so far")
    budget: int | None = Field(description="evaluations it runs in all")
    items: list[CandidateSummary] = Field(description="finished after the cursor, oldest first")
    next: str | None = Field(None, description="pass as `since` to get what finishes next")


class LineageItem(BaseModel):
    """An ancestor of a candidate."""

    id: int = Field(description="the ancestor's candidate id")
    generation: int = Field(description="its generation")
    mutation: dict[str, Any] | None = Field(description="how it was made from its own parent")
    val_bpb: float | None = Field(description="its validation bits per byte")
    decode_ms: float | None = Field(description="its decode latency, ms per token")


class OperatorOut(BaseModel):
    """An operator a layout can use (the registry in `search.operators`)."""

    name: str = Field(description="its name in layouts, e.g. `mamba2`")
    code: str = Field(description="its short code in compact layouts, e.g. `M2`")
    kind: str = Field(description="`mixer` (mixes tokens) or `ffn` (mixes channels)")
    description: str = Field(description="what it is")
    dims: list[str] = Field(description="the layout dimensions it reads (head_dim, kv_group, ...)")
    cache: str = Field(description="its decode cache: `kv` (grows with context), `window`, `state` or `none`")
    code_version: int = Field(
        description="bumped when its code changes results (stored results are keyed on it)"
    )


class Health(BaseModel):
    """The process answers."""

    status: str = Field("ok", description="always `ok`")


class Ready(BaseModel):
    """Whether this coordinator can serve: its database answers and its schema is at head."""

    ready: bool = Field(description="true when the database answers and its schema is at head")
    database: str = Field(description="the database's dialect (sqlite, postgresql)")
    schema_revision: str | None = Field(None, description="the database's migration revision")
    head_revision: str | None = Field(None, description="the newest revision this code knows")
    reason: str | None = Field(None, description="why it is not ready")


class NotReady(ProblemDetails):
    """A 503 of the readiness probe: problem details with the probe's fields."""

    ready: bool = Field(False, description="always false")
    database: str = Field(description="the database's dialect (sqlite, postgresql)")
    schema_revision: str | None = Field(None, description="the database's migration revision, if it answered")
    head_revision: str | None = Field(None, description="the newest revision this code knows, if read")
    reason: str = Field(description="why it is not ready (the same as `detail`)")


class ScatterOut(BaseModel):
    """A scatter's points, column by column (what a plot takes): every front point, and a sample of the
    rest."""

    search_id: int = Field(description="the search")
    objectives: list[str] = Field(description="[x, y], both minimized")
    total: int = Field(description="finished candidates with both objectives")
    shown: int = Field(description="points sent (the columns' length)")
    front: int = Field(description="points on the front (every one is shown)")
    ids: list[int] = Field(description="each point's candidate id")
    generations: list[int] = Field(description="each point's generation")
    on_front: list[bool] = Field(description="whether each point is on the front of these two axes")
    x: list[float] = Field(description="each point's x value")
    y: list[float] = Field(description="each point's y value")
    x_iqr: list[float | None] = Field(description="the measured spread (IQR) of x, for latency; front only")
    y_iqr: list[float | None] = Field(description="the measured spread (IQR) of y, for latency; front only")
    presets: dict[str, str] = Field(description="{candidate id: name} of the named starting layouts shown")
    layouts: dict[str, str] = Field(description="{candidate id: compact layout} of the front points")


class HypervolumeOut(BaseModel):
    """The front's hypervolume as the search went on, column by column."""

    search_id: int = Field(description="the search")
    n_evaluations: list[int] = Field(description="evaluations done at each record")
    hypervolume: list[float] = Field(description="the normalized hypervolume at each record (higher: better)")
    recorded_at: list[datetime] = Field(description="when each was recorded (UTC)")


class FeatureEffect(BaseModel):
    """How one layout feature goes with the objectives."""

    feature: str = Field(description="the feature (depth, width, a share of an operator, ...)")
    spearman: dict[str, float | None] = Field(description="{objective: rank correlation}")


class ProxyTrustOut(BaseModel):
    """How far the search's proxy can be trusted: the latest fidelity study run with its proxy config and
    data settings, or none."""

    search_id: int = Field(description="the search")
    study_id: int | None = Field(None, description="the fidelity study (null: none was run for this proxy)")
    proxy_config_hash: str = Field(description="the search's proxy config hash, which the study must share")
    short_vs_long: dict[str, Any] | None = Field(
        None, description="Spearman and Kendall of short against long val_bpb, with 95 % intervals"
    )
    seed_noise_ceiling: dict[str, Any] | None = Field(
        None, description="the same between two seeds of the short proxy: the most one can expect"
    )
    within_param_band: dict[str, Any] | None = Field(
        None, description="the same among layouts within ±25 % of the median parameter count"
    )
    target_met: bool | None = Field(None, description="Spearman >= 0.9 with its interval's lower end >= 0.75")


class FeaturesOut(BaseModel):
    """Rank correlations of layout features with the objectives, over the completed candidates."""

    search_id: int = Field(description="the search")
    n_candidates: int = Field(description="completed candidates the correlations are computed over")
    features: list[FeatureEffect] = Field(description="one entry per feature")


# ---------------------------------------------------------------------------------------------- studies

STUDY_EXAMPLES = {
    "depth-width": {
        "summary": "Llama layers, depths 2-12 x widths 32-128, a short proxy, two latency budgets",
        "value": {
            "kind": "depth-width",
            "name": "llama depth-width",
            "depths": [2, 4, 6, 8, 12],
            "widths": [32, 64, 96, 128],
            "proxy": {"steps": 100},
            "budgets_ms": [2.0, 4.0],
            "workers": 2,
        },
    },
    "fidelity": {
        "summary": "Does the 100-step proxy rank 24 layouts as 1000 steps do, on a prose corpus?",
        "value": {
            "kind": "fidelity",
            "name": "proxy fidelity, prose",
            "proxy": {"steps": 100},
            "long_factor": 10,
            "data": {"corpus": "data/prose/fortunes.jsonl"},
        },
    },
    "ablation": {
        "summary": "Weight normalization and 16 meta tokens on the CPU hybrid, 3 seeds",
        "value": {"kind": "ablation", "layouts": ["nemotron-flash-1b-mini"], "seeds": [0, 1, 2]},
    },
    "verdict": {
        "summary": "Search 3's front against depth-width study 1 at equal latency",
        "value": {"kind": "verdict", "search_id": 3, "depth_width_id": 1, "seeds": [1, 2]},
    },
}


class Queued(BaseModel):
    """What a submission adds to a study's config: its place in the queue."""

    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first; FIFO within a priority")

    def study_config(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"priority"})


class DepthWidthCreate(DepthWidthStudy, Queued):
    """A depth-width study (`search/studies/depth_width.py`) and its queue priority."""


class FidelityCreate(FidelityStudy, Queued):
    """A proxy-fidelity study (`search/studies/fidelity.py`) and its queue priority."""


class AblationCreate(AblationStudy, Queued):
    """An ablation study (`search/studies/ablation.py`) and its queue priority."""


class VerdictCreate(VerdictStudy, Queued):
    """A verdict (`search/studies/verdict.py`) and its queue priority."""


STUDY_TAG = UNION_TAG_PREFIX  # tags the union's members; api/errors.py leaves it out of field names


def _study_kind(value: Any) -> str | None:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"{STUDY_TAG}{kind}" if isinstance(kind, str) else None


StudyCreate = Annotated[
    Annotated[DepthWidthCreate, Tag(f"{STUDY_TAG}depth-width")]
    | Annotated[FidelityCreate, Tag(f"{STUDY_TAG}fidelity")]
    | Annotated[AblationCreate, Tag(f"{STUDY_TAG}ablation")]
    | Annotated[VerdictCreate, Tag(f"{STUDY_TAG}verdict")],
    Discriminator(
        _study_kind,
        custom_error_type="study_kind",
        custom_error_message="kind: must be one of depth-width, fidelity, ablation, verdict",
    ),
]


class StudyOut(JobOut):
    """A study: a job whose runs are grid searches, analysed into a report."""

    progress: float | None = Field(None, description="its runs' evaluations done / their budgets (0..1)")


class StudyDetail(StudyOut):
    """A study with its config, its runs and, once it completed, its report."""

    config: dict[str, Any] = Field(description="the study's config, as validated (defaults filled in)")
    runs: list[JobOut] = Field(description="its runs (jobs of kind `study-run`), in plan order")
    result: dict[str, Any] | None = Field(
        None,
        description="the report, by kind (depth-width: points, law, intervals, extrapolation, budgets; "
        "fidelity: the rank correlations and rows; ablation: each arm's paired differences; verdict: "
        "each budget's hybrid against the Llama, and both fronts)",
    )

"""/api/health (the process answers), /api/ready (database reachable, schema at head), /api/operators, and
/api/schema/search-config (the JSON Schema of a search config, for editors)."""

from __future__ import annotations

from functools import cache
from typing import Any

from fastapi import APIRouter, Depends

from api.auth import require_read_token
from api.errors import error_responses, problem
from api.routes.deps import StorageDep
from api.schemas import Health, NotReady, OperatorOut, Ready, SearchCreate
from search.operators import OPERATORS

router = APIRouter(prefix="/api", tags=["service"], responses=error_responses(500))

NOT_READY = {
    503: {
        "model": NotReady,
        "description": "Not ready: the database does not answer, or its schema is not at head (problem "
        "details of type `not-ready`, with the probe's fields)",
    }
}


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
def health() -> Health:
    """Always `{"status": "ok"}` while the process serves requests; it reads nothing (use `/api/ready` for
    the database). Public, and never refused by admission control."""
    return Health()


@router.get(
    "/ready",
    response_model=Ready,
    responses=NOT_READY,
    summary="Readiness: the database answers, schema at head",
)
def ready(storage: StorageDep):
    """200 when this coordinator can serve requests; otherwise 503 with the reason, so that a load balancer
    sends traffic elsewhere. Public, and never refused by admission control."""
    try:
        current, head = storage.schema_revision(), storage.head_revision()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database means "not ready"
        return _not_ready(storage.dialect, f"database unreachable: {type(exc).__name__}")
    if current != head:
        return _not_ready(
            storage.dialect, "database schema is not at head: run the migrations", current, head
        )
    return Ready(ready=True, database=storage.dialect, schema_revision=current, head_revision=head)


def _not_ready(database: str, reason: str, current: str | None = None, head: str | None = None):
    return problem(
        503,
        detail=reason,
        type="not-ready",
        instance="/api/ready",
        ready=False,
        database=database,
        schema_revision=current,
        head_revision=head,
        reason=reason,
    )


@router.get(
    "/operators",
    response_model=list[OperatorOut],
    dependencies=[Depends(require_read_token)],
    tags=["catalog"],
    summary="The operators a layout can use",
    responses=error_responses(401, 503),
)
def operators() -> list[OperatorOut]:
    """Every registered operator (token mixers and FFNs) with its short code, the layout dimensions it reads
    and the kind of decode cache it keeps."""
    return [
        OperatorOut(
            name=s.name,
            code=s.code,
            kind=s.kind,
            description=s.description,
            dims=list(s.dims),
            cache=s.cache,
            code_version=s.code_version,
        )
        for s in OPERATORS.values()
    ]


@cache
def search_config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the body POST /api/searches validates, self-contained (`$defs`)."""
    schema = SearchCreate.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


@router.get(
    "/schema/search-config",
    dependencies=[Depends(require_read_token)],
    tags=["catalog"],
    summary="The JSON Schema of a search config (the body of POST /api/searches)",
    response_description="A JSON Schema (draft 2020-12), self-contained: the sub-configs are in `$defs`",
    responses={
        200: {"content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}}},
        **error_responses(401, 503),
    },
)
def search_config_json_schema() -> dict[str, Any]:
    """For editors and tools: point a YAML or JSON language server at it to check and complete search config
    files (`hybridnas search run`, the dashboard's form, POST /api/searches and schedule templates all take
    the same config). Descriptions, defaults and limits are the server's own."""
    return search_config_schema()

"""/api/health (the process answers), /api/ready (database reachable, schema at head), /api/operators."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api.auth import require_read_token
from api.routes.deps import StorageDep
from api.schemas import Health, OperatorOut, Ready
from search.operators import OPERATORS

router = APIRouter(prefix="/api", tags=["service"])


@router.get("/health", response_model=Health)
def health() -> Health:
    return Health()


@router.get("/ready", response_model=Ready, responses={503: {"model": Ready}})
def ready(storage: StorageDep):
    try:
        current, head = storage.schema_revision(), storage.head_revision()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database means "not ready"
        body = Ready(
            ready=False, database=storage.dialect, reason=f"database unreachable: {type(exc).__name__}"
        )
        return JSONResponse(body.model_dump(), status_code=503)
    body = Ready(
        ready=current == head,
        database=storage.dialect,
        schema_revision=current,
        head_revision=head,
        reason=None if current == head else "database schema is not at head: run the migrations",
    )
    return body if body.ready else JSONResponse(body.model_dump(), status_code=503)


@router.get(
    "/operators",
    response_model=list[OperatorOut],
    dependencies=[Depends(require_read_token)],
    tags=["catalog"],
)
def operators() -> list[OperatorOut]:
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

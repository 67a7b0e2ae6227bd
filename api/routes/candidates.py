"""/api/candidates/{id}: one candidate in full, and its layout as a JSON file."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse

from api.auth import require_read_token
from api.routes.deps import StorageDep, candidate_or_404
from api.schemas import MAX_ID, CandidateDetail

router = APIRouter(prefix="/api/candidates", tags=["candidates"], dependencies=[Depends(require_read_token)])

CandidateId = Annotated[int, Path(ge=1, le=MAX_ID, description="the candidate's id")]


@router.get("/{candidate_id}", response_model=CandidateDetail)
def get_candidate(candidate_id: CandidateId, storage: StorageDep) -> CandidateDetail:
    c = candidate_or_404(storage, candidate_id)
    return CandidateDetail(**{name: getattr(c, name) for name in CandidateDetail.model_fields})


@router.get("/{candidate_id}/layout.json", summary="The candidate's layout (loadable by `hybridnas layouts`)")
def layout_json(candidate_id: CandidateId, storage: StorageDep) -> JSONResponse:
    c = candidate_or_404(storage, candidate_id)
    return JSONResponse(c.layout, headers={
        "Content-Disposition": f'attachment; filename="candidate-{c.id}-layout.json"'})

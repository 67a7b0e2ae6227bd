"""/api/candidates/{id}: one candidate in full, its layout as a JSON file, and the candidate as a Hugging Face
model folder (a .tar.gz download, made by models/export.py as `hybridnas export` makes it)."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path as FilePath
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from api.auth import require_read_token
from api.errors import error_responses
from api.routes.deps import StorageDep, candidate_or_404
from api.schemas import MAX_ID, CandidateDetail, CandidateSummary, LineageItem

router = APIRouter(
    prefix="/api/candidates",
    tags=["candidates"],
    dependencies=[Depends(require_read_token)],
    responses=error_responses(401, 404, 422, 500, 503),
)

CandidateId = Annotated[int, Path(ge=1, le=MAX_ID, description="the candidate's id")]


@router.get(
    "/{candidate_id}",
    response_model=CandidateDetail,
    summary="A candidate in full: layout, lineage, children, training and latency results",
)
def get_candidate(candidate_id: CandidateId, storage: StorageDep) -> CandidateDetail:
    """Everything about one candidate: its layout and how it was mutated, its ancestors (parent first) and
    children, the short training's metrics and curves with the worker's last log lines, the latency
    statistics and the device they were measured on, and for a failure its reason and traceback."""
    c = candidate_or_404(storage, candidate_id)
    base = {name: getattr(c, name) for name in CandidateSummary.model_fields}
    training = storage.get_training_result(c.training_key) if c.training_key else None
    latency = storage.get_latency_result(c.latency_key) if c.latency_key else None
    training_result = dict(training.result or {}) if training is not None else None
    log_tail = list((training_result or {}).pop("log_tail", None) or [])
    return CandidateDetail(
        **base,
        layout=c.layout,
        mutation=c.mutation,
        objectives=c.objectives,
        training_key=c.training_key,
        latency_key=c.latency_key,
        failure_reason=c.failure_reason,
        traceback=c.traceback,
        started_at=c.started_at,
        lineage=[
            LineageItem(
                id=a.id,
                generation=a.generation,
                mutation=a.mutation,
                val_bpb=a.val_bpb,
                decode_ms=a.decode_ms,
            )
            for a in storage.lineage(c.id)
        ],
        children=storage.child_ids(c.id),
        training=training_result,
        latency=latency.result if latency is not None else None,
        device_fingerprint=latency.device_fingerprint if latency is not None else None,
        log_tail=log_tail,
    )


@router.get(
    "/{candidate_id}/layout.json",
    summary="The candidate's layout (loadable by `hybridnas layouts`)",
    response_class=JSONResponse,
    responses={
        200: {
            "description": "The layout as a JSON file (a download: `Content-Disposition`)",
            "content": {
                "application/json": {
                    "schema": {"type": "object", "additionalProperties": True},
                    "example": {"operators": ["attention", "ffn", "mamba2", "ffn"], "d_model": 64},
                }
            },
        }
    },
)
def layout_json(candidate_id: CandidateId, storage: StorageDep) -> JSONResponse:
    """The layout object of `GET /api/candidates/{id}` alone, as a file: operators, d_model and the
    dimensions the operators read."""
    c = candidate_or_404(storage, candidate_id)
    return JSONResponse(
        c.layout, headers={"Content-Disposition": f'attachment; filename="candidate-{c.id}-layout.json"'}
    )


@router.get(
    "/{candidate_id}/export.tar.gz",
    summary="The candidate as a Hugging Face model folder (transformers, trust_remote_code), as a .tar.gz",
    response_class=FileResponse,
    responses={
        200: {
            "description": "A gzip'd tar of one folder `candidate-{id}/`: config.json, model.safetensors, "
            "tokenizer.json, tokenizer_config.json, the remote code and README.md (a download)",
            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(
            409, _409="The candidate has no such weights (it failed, or its artifacts were pruned)"
        ),
    },
)
def export_archive(
    request: Request,
    candidate_id: CandidateId,
    storage: StorageDep,
    weights: Annotated[
        Literal["proxy", "trained", "init"],
        Query(description="proxy: its short-training's weights; trained: its longer checkpoint; init: fresh"),
    ] = "proxy",
    d_model: Annotated[
        int | None, Query(ge=1, le=16384, description="the width of fresh weights (init)")
    ] = None,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1, description="the seed of fresh weights")] = 0,
) -> FileResponse:
    """`hybridnas export ID --out DIR` as a download: the same folder, made in a temporary folder that is
    removed once sent."""
    from models.export import ExportError, export_source, write_export

    candidate_or_404(storage, candidate_id)
    work = FilePath(tempfile.mkdtemp(prefix="hybridnas-export-"))
    name = f"candidate-{candidate_id}"
    try:
        source = export_source(storage, candidate_id, request.app.state.settings.resolved_data_dir())
        write_export(source, work / name, weights, d_model, seed)
        with tarfile.open(work / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(work / name, arcname=name)
    except ExportError as exc:
        shutil.rmtree(work, ignore_errors=True)
        if exc.status == 422:
            raise RequestValidationError(
                [{"loc": ("query", exc.field), "type": "value_error", "msg": exc.reason}]
            ) from None
        raise HTTPException(exc.status, detail=f"{exc.field}: {exc.reason}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return FileResponse(
        work / f"{name}.tar.gz",
        media_type="application/gzip",
        filename=f"{name}-{weights}.tar.gz",
        headers={"Cache-Control": "no-store"},
        background=BackgroundTask(shutil.rmtree, work, ignore_errors=True),
    )

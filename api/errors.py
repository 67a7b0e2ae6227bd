"""Errors, in one shape for every entry point.

Validation errors (REST 422s, `search run`, schedules, the dashboard's forms) are a list of
`{"loc", "field", "msg", "type"}` (`validation_errors`), where `field` is the dotted path of the input at
fault (`proxy.lr`, `space.widths`, `body`) and `msg` says why.

Every 4xx and 5xx of the REST API is an RFC 9457 problem details object (`problem`), served as
`application/problem+json`:

    {"type": "https://hybridnas.dev/problems/not-found", "title": "Not found", "status": 404,
     "detail": "no search 7", "instance": "/api/searches/7"}

`type` is a stable identifier of the kind of problem (`PROBLEM_BASE` + a slug of `PROBLEM_TYPES`); clients
branch on it (or on `status`), never on `detail`, which is for people. A 422 adds `errors`, one entry per
field at fault: `{"field", "message", "loc", "type"}`. The pydantic models below (`ProblemDetails`,
`ValidationProblem`) describe the shape in the OpenAPI document, and `error_responses` gives a route's
`responses=` for the statuses it can answer with.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

NAMED_FIELD = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.DOTALL)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://hybridnas.dev/problems/"
# slug: (status, title). The title is the same for every occurrence of a kind; `detail` says what happened.
PROBLEM_TYPES: dict[str, tuple[int, str]] = {
    "bad-request": (400, "Bad request"),
    "unauthorized": (401, "Authentication required"),
    "forbidden": (403, "Forbidden"),
    "not-found": (404, "Not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "conflict": (409, "Conflict"),
    "body-too-large": (413, "Request body too large"),
    "validation": (422, "Invalid request"),
    "internal": (500, "Internal server error"),
    "unavailable": (503, "Service unavailable"),
    "overloaded": (503, "Overloaded"),
    "not-ready": (503, "Not ready"),
}
_SLUG_OF_STATUS = {status: slug for slug, (status, _title) in reversed(PROBLEM_TYPES.items())}


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def _message(error: dict[str, Any]) -> str:
    msg = str(error.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


# A tagged union's member is named in pydantic's locations by its tag; the study kinds' tags start with this
# (api/schemas.py STUDY_TAG) and are left out, so that a field is named as the config names it.
UNION_TAG_PREFIX = "kind:"


def validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        loc = [p for p in e.get("loc", ()) if not (isinstance(p, str) and p.startswith(UNION_TAG_PREFIX))]
        if e.get("type") == "json_invalid":
            out.append(
                {
                    "loc": loc,
                    "field": "body",
                    "msg": f"malformed JSON: {e.get('ctx', {}).get('error', '')}".rstrip(": "),
                    "type": "json_invalid",
                }
            )
            continue
        field, msg = _field(loc), _message(e)
        named = NAMED_FIELD.match(msg)
        if named:  # a model-level check that names its field ("space.widths: ...", in `proxy`: "steps: ...")
            inner = named.group(1)
            field, msg = (f"{field}.{inner}" if field else inner), named.group(2)
            loc = [*loc, *inner.split(".")]
        out.append({"loc": loc, "field": field, "msg": msg, "type": e.get("type", "value_error")})
    return out


def summary(errors: list[dict[str, Any]]) -> str:
    """One line: `field: reason; field: reason`."""
    return "; ".join(f"{e['field'] or 'body'}: {e['msg']}" for e in errors)


# ---- problem details ------------------------------------------------------------------------------------


def problem_type(slug: str) -> str:
    return PROBLEM_BASE + slug


def _slug(status: int) -> str:
    if status in _SLUG_OF_STATUS:
        return _SLUG_OF_STATUS[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    return re.sub(r"[^a-z0-9]+", "-", phrase.lower()).strip("-")


def _title(slug: str, status: int) -> str:
    if slug in PROBLEM_TYPES:
        return PROBLEM_TYPES[slug][1]
    try:
        return HTTPStatus(status).phrase.capitalize()
    except ValueError:
        return "Error"


def field_problems(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`validation_errors` entries as a problem's `errors[]`: `{"field", "message", "loc", "type"}`."""
    return [
        {
            "field": str(e.get("field") or ""),
            "message": str(e.get("msg", "invalid value")),
            "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            "type": str(e.get("type", "value_error")),
        }
        for e in errors
    ]


def problem_body(
    status: int,
    title: str | None = None,
    detail: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    type: str | None = None,  # noqa: A002 - the RFC's member name
    *,
    instance: str | None = None,
    **extensions: Any,
) -> dict[str, Any]:
    """A problem details object. `type` is a slug of PROBLEM_TYPES or a full URI (default: the status's
    kind); `errors` are `validation_errors` entries; `extensions` are further members (RFC 9457 3.2)."""
    slug = type or _slug(status)
    body: dict[str, Any] = {
        "type": slug if ":" in slug else problem_type(slug),
        "title": title or _title(slug, status),
        "status": status,
        "detail": detail if detail is not None else (title or _title(slug, status)),
    }
    if instance is not None:
        body["instance"] = instance
    if errors is not None:
        body["errors"] = field_problems(errors)
    body.update(extensions)
    return body


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem(
    status: int,
    title: str | None = None,
    detail: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    type: str | None = None,  # noqa: A002 - the RFC's member name
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> ProblemResponse:
    """The response for a problem (`problem_body`), as `application/problem+json`. Errors are never cached
    by the read cache (it keeps 200s only)."""
    body = problem_body(status, title, detail, errors, type, instance=instance, **extensions)
    return ProblemResponse(body, status_code=status, headers=headers)


_SLUGS = ", ".join(f"`{slug}` ({status})" for slug, (status, _) in PROBLEM_TYPES.items())


class ProblemDetails(BaseModel):
    """An error: RFC 9457 problem details, served as `application/problem+json`. Every 4xx and 5xx of the
    API has this shape; clients branch on `type` or `status`, and show `detail` to people."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": problem_type("not-found"),
                    "title": "Not found",
                    "status": 404,
                    "detail": "no search 7",
                    "instance": "/api/searches/7",
                }
            ]
        },
    )

    type: str = Field(
        description=f"a URI that identifies the kind of problem: `{PROBLEM_BASE}<slug>`, one of {_SLUGS}; "
        "stable, for clients to branch on",
        examples=[problem_type("not-found")],
    )
    title: str = Field(description="a short summary of the kind of problem (the same for each occurrence)")
    status: int = Field(ge=400, le=599, description="the HTTP status code of the response")
    detail: str = Field(
        description="what went wrong in this occurrence, for people (a 422 lists `field: reason` pairs)"
    )
    instance: str | None = Field(None, description="the path of the request the problem occurred in")


class FieldProblem(BaseModel):
    """One input at fault in a 422."""

    field: str = Field(
        description="the dotted path of the input at fault: a body field (`proxy.lr`, `space.widths`, "
        "`template.budget`), `body` for the body as a whole (malformed JSON, invalid UTF-8, nested too "
        "deep), or a query, path or header parameter's name",
        examples=["proxy.lr"],
    )
    message: str = Field(description="why the value is refused", examples=["Input should be greater than 0"])
    loc: list[str | int] = Field(
        description="the same location as a path: where the input is (`body`, `query`, `path`, `header`), "
        "then the keys and list indexes"
    )
    type: str = Field(
        description="the kind of check that failed (pydantic's error type, e.g. `missing`, `greater_than`, "
        "`value_error`; `json_invalid`, `invalid_utf8` and `too_deep` for the body)"
    )


class ValidationProblem(ProblemDetails):
    """A 422: the request's input was refused; `errors` names each field at fault."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": problem_type("validation"),
                    "title": "Invalid request",
                    "status": 422,
                    "detail": "proxy.lr: Input should be greater than 0",
                    "instance": "/api/searches",
                    "errors": [
                        {
                            "field": "proxy.lr",
                            "message": "Input should be greater than 0",
                            "loc": ["body", "proxy", "lr"],
                            "type": "greater_than",
                        }
                    ],
                }
            ]
        },
    )

    errors: list[FieldProblem] = Field(description="every input at fault, in the order they were checked")


# ---- OpenAPI: the error responses a route documents -----------------------------------------------------

ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "No valid credentials: send `Authorization: Bearer <token>` (or use a dashboard session). Read "
    "routes answer 401 only when HYBRIDNAS_REQUIRE_TOKEN_FOR_READS is set",
    403: "A dashboard session without its CSRF token (`X-CSRF-Token`) for a state change",
    404: "No such resource: the id in the path names nothing",
    409: "The request conflicts with the resource's current state",
    413: "The request body is larger than the server accepts (HYBRIDNAS_MAX_BODY_BYTES)",
    422: "Invalid input: `errors[]` names each field at fault (also malformed JSON, a body that is not "
    "UTF-8 or nests too deeply)",
    500: "An unexpected server error (a generic detail; the server's log has the rest)",
    503: "Overloaded (too many requests in progress: retry after `Retry-After` seconds) or the database "
    "is unavailable",
}


def error_responses(*statuses: int, **described: str) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for the error statuses it can answer with, each an `application/problem+json`
    ProblemDetails (a 422: ValidationProblem). A description of one can be given as `_409="..."`."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description = described.get(f"_{status}") or ERROR_DESCRIPTIONS[status]
        model = ValidationProblem if status == 422 else ProblemDetails
        out[status] = {"model": model, "description": description}
    return out


PROBLEM_SCHEMAS = ("ProblemDetails", "ValidationProblem")


def problem_media_types(doc: dict[str, Any]) -> dict[str, Any]:
    """Rewrite an OpenAPI document (FastAPI's) in place so that every 4xx/5xx response is served as
    `application/problem+json` (FastAPI puts an extra response's model under the route's own media type),
    and FastAPI's default 422 (`HTTPValidationError`) is the ValidationProblem the API actually sends."""
    ref_prefix = "#/components/schemas/"
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            for code, response in operation.get("responses", {}).items():
                if not code.isdigit() or int(code) < 400:
                    continue
                content = response.get("content") or {}
                schema = next((c["schema"] for c in content.values() if c.get("schema")), None)
                if schema is None or schema.get("$ref") == ref_prefix + "HTTPValidationError":
                    model = "ValidationProblem" if code == "422" else "ProblemDetails"
                    schema = {"$ref": ref_prefix + model}
                response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": schema}}
    schemas = doc.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's own, if nothing refers to them now
        others = [doc.get("paths"), *(v for k, v in schemas.items() if k != unused)]
        if unused in schemas and f"'{ref_prefix}{unused}'" not in repr(others):
            del schemas[unused]
    for name, model in (
        ("ProblemDetails", ProblemDetails),
        ("ValidationProblem", ValidationProblem),
        ("FieldProblem", FieldProblem),
    ):
        if name not in schemas:
            schema = model.model_json_schema(ref_template=ref_prefix + "{model}")
            for sub, sub_schema in schema.pop("$defs", {}).items():
                schemas.setdefault(sub, sub_schema)
            schemas[name] = schema
    return doc

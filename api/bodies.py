"""Request bodies, guarded before a route parses them: at most `max_bytes` (declared or streamed in chunks:
413), and for JSON bodies valid UTF-8 nested at most `MAX_DEPTH` deep (422 in the standard error shape, naming
`body`); both as problem details (`api/errors.py`). The body is read once, checked, and handed to the app as
it came."""

from __future__ import annotations

import re
from typing import Any

from api.errors import problem

MAX_DEPTH = 32  # objects and arrays within each other; a search config needs about 5
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (strings skipped)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRINGS.sub(b"", body)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def body_problem(body: bytes, content_type: str) -> tuple[str, str] | None:
    """(error type, message) for a JSON body that must be refused before parsing, else None."""
    if "json" not in content_type and content_type:
        return None
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "invalid_utf8", f"the body is not valid UTF-8 (byte {exc.start})"
    # Cheap first: a body with few brackets cannot nest deeply.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and json_depth(body) > MAX_DEPTH:
        return "too_deep", f"the JSON nests deeper than {MAX_DEPTH} levels"
    return None


def _invalid(kind: str, message: str, path: str):
    """A 422 in the validation errors' shape, naming the body."""
    errors = [{"loc": ["body"], "field": "body", "msg": message, "type": kind}]
    return problem(422, detail=f"body: {message}", errors=errors, instance=path)


class BodyGuard:
    """ASGI middleware: buffer, check and replay request bodies."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        message = f"request body larger than {self.max_bytes} bytes"
        too_large = problem(413, detail=message, instance=scope.get("path"))
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        refused = (
            body_problem(body, headers.get(b"content-type", b"").decode("latin-1").lower()) if body else None
        )
        if refused is not None:
            await _invalid(*refused, scope.get("path"))(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replayed

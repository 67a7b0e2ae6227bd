"""Admission control: at most `limit` requests inside the app at once; the excess is refused at once with
503 and `Retry-After` (problem details of type `overloaded`), never queued into timeouts.

Why a small limit, not a large in-flight count: on one process the work is CPU-bound (the GIL), so the
latency of an admitted request grows with how many are admitted (about in-flight / capacity). A limit sized
to what the server finishes within its latency target keeps the admitted requests fast and the goodput at
capacity when twice as much is offered; a large limit (hundreds) lets every request in and collapses the
goodput, as each one then waits behind all the others (congestion collapse). Refusing costs a few hundred
microseconds on the event loop, so the refusal stays fast while the admitted work runs.

Exempt: the liveness and readiness probes (`/api/health`, `/api/ready`: a load balancer must see a live
process as live), live event streams (long-lived and mostly idle; they would hold slots for hours) and the
static documentation assets.
"""

from __future__ import annotations

import json
from typing import Any

from api.errors import PROBLEM_MEDIA_TYPE, problem_body

EXEMPT_PATHS = frozenset({"/api/health", "/api/ready"})
EXEMPT_SUFFIXES = ("/events",)


class Admission:
    """ASGI middleware. The count lives on the one event loop: no lock needed."""

    def __init__(self, app: Any, limit: int, retry_after_s: int = 1):
        self.app, self.limit, self.retry_after = app, int(limit), str(int(retry_after_s))
        self.in_flight = 0
        self.refused = 0
        body = json.dumps(
            problem_body(
                503,
                detail="too many requests in progress; retry after the Retry-After delay",
                type="overloaded",
            ),
            separators=(",", ":"),
        ).encode()
        self._refusal = body  # made once: a refusal must cost next to nothing
        self._headers = [
            (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", self.retry_after.encode()),
            (b"cache-control", b"no-store"),
        ]

    @staticmethod
    def exempt(path: str) -> bool:
        return path in EXEMPT_PATHS or path.endswith(EXEMPT_SUFFIXES) or not path.startswith("/api/")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.refused += 1
            await send({"type": "http.response.start", "status": 503, "headers": self._headers})
            await send({"type": "http.response.body", "body": self._refusal})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

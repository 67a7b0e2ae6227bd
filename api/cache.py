"""A short read cache in front of the API's GET routes, invalidated by every write this process makes, with
ETags so that a client polling a view (the dashboard) gets 304 while nothing changed.

A response is served from the cache when it was made at the storage's current write generation
(`Storage.generation`: every committed write of this process moves it on, and on SQLite every commit of any
process too) and is at most `ttl_s` old; the TTL bounds how long a write by another process on PostgreSQL (a
`hybridnas search run`, another coordinator, another API worker) can go unseen. Only complete 200
responses of plain (non-streaming) routes are kept; `/api/health`, `/api/ready`, event streams and streamed
exports (`.jsonl`) are never cached. When reads need the token, the Authorization and Cookie headers (the
dashboard's session) are part of the key, so a cached response is only ever served to a request that
presented the credentials it was made for.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

NEVER_CACHED = frozenset({"/api/health", "/api/ready"})
STREAMED = ("/events", ".jsonl", ".tar.gz")  # event streams, streamed exports, model archives: never buffered
MAX_BODY = 1 << 20


@dataclass(frozen=True)
class _Entry:
    generation: Hashable
    made_at: float
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    etag: bytes


class ReadCache:
    """ASGI middleware: a bounded LRU of GET responses."""

    def __init__(
        self,
        app: Any,
        generation: Callable[[], Hashable],
        ttl_s: float,
        key_on_auth: bool,
        max_entries: int = 4096,
    ):
        self.app, self.generation, self.ttl_s = app, generation, float(ttl_s)
        self.key_on_auth, self.max_entries = key_on_auth, max_entries
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.hits = self.misses = 0

    def cacheable(self, scope: dict) -> bool:
        if scope["type"] != "http" or self.ttl_s <= 0 or scope["method"] != "GET":
            return False  # (a lifespan scope has no path: it must pass straight through)
        path = scope["path"]
        return path.startswith("/api/") and path not in NEVER_CACHED and not path.endswith(STREAMED)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not self.cacheable(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        key = (
            scope["path"],
            scope.get("query_string", b""),
            (headers.get(b"authorization"), headers.get(b"cookie")) if self.key_on_auth else None,
        )
        generation, now = self.generation(), time.monotonic()
        entry = self.entries.get(key)
        if entry is not None and entry.generation == generation and now - entry.made_at <= self.ttl_s:
            self.entries.move_to_end(key)
            self.hits += 1
            await self._replay(entry, headers.get(b"if-none-match"), send)
            return
        self.misses += 1
        await self._make(scope, receive, send, key, generation, now, headers.get(b"if-none-match"))

    async def _make(self, scope, receive, send, key, generation: Hashable, now: float, if_none_match) -> None:
        """Run the route, buffering its (small, non-streaming) response to tag it with an ETag and keep it."""
        start: dict | None = None
        chunks: list[bytes] = []

        async def capture(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._finish(start, b"".join(chunks), key, generation, now, if_none_match, send)
            else:
                await send(message)

        await self.app(scope, receive, capture)

    async def _finish(self, start, body: bytes, key, generation, now, if_none_match, send) -> None:
        status = start["status"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"etag"]
        if status != 200 or len(body) > MAX_BODY:
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        etag = b'"' + hashlib.blake2b(body, digest_size=12).hexdigest().encode() + b'"'
        entry = _Entry(generation, now, status, [*headers, (b"etag", etag)], body, etag)
        if not any(k.lower() == b"cache-control" and b"no-store" in v.lower() for k, v in headers):
            self.entries[key] = entry
            self.entries.move_to_end(key)
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        await self._replay(entry, if_none_match, send)

    @staticmethod
    async def _replay(entry: _Entry, if_none_match: bytes | None, send: Any) -> None:
        if if_none_match is not None and entry.etag in (t.strip() for t in if_none_match.split(b",")):
            headers = [
                (k, v) for k, v in entry.headers if k.lower() not in (b"content-length", b"content-type")
            ]
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": entry.status, "headers": entry.headers})
        await send({"type": "http.response.body", "body": entry.body})

"""The errors the public API raises: one base class, and the problem details of a refused REST request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class HybridnasError(Exception):
    """Anything hybridnas refuses or fails at, as seen from user code."""


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class ConfigError(HybridnasError, ValueError):
    """A configuration (search config, schedule) is invalid: `errors` name each field and why."""

    def __init__(self, errors: list[FieldError], source: str = "config"):
        self.errors = errors
        self.source = source
        lines = "; ".join(f"{e.field or 'config'}: {e.message}" for e in errors)
        super().__init__(f"invalid {source}: {lines}")


@dataclass
class ApiError(HybridnasError):
    """A request the server refused or failed: its RFC 9457 problem details (`status`, `title`, `detail`,
    `errors` for a validation failure)."""

    status: int
    title: str
    detail: str | None = None
    errors: list[FieldError] = field(default_factory=list)
    body: Any = None

    def __str__(self) -> str:
        text = f"{self.status} {self.title}"
        if self.detail and self.detail != self.title:
            text += f": {self.detail}"
        if self.errors:
            text += " (" + "; ".join(f"{e.field or 'body'}: {e.message}" for e in self.errors) + ")"
        return text

    @classmethod
    def from_response(cls, status: int, reason: str, body: Any) -> ApiError:
        """From a problem-details body; a body of another shape (a proxy's page, say) keeps its text."""
        if not isinstance(body, dict):
            return cls(status, reason or "error", str(body)[:500] if body else None, body=body)
        errors = [
            FieldError(str(e.get("field") or ""), str(e.get("message") or e.get("msg") or ""))
            for e in body.get("errors") or []
            if isinstance(e, dict)
        ]
        detail = body.get("detail")
        if isinstance(
            detail, list
        ):  # FastAPI's default validation body, from a server without problem details
            errors = errors or [
                FieldError(".".join(str(p) for p in e.get("loc", ())[1:]), str(e.get("msg", "")))
                for e in detail
                if isinstance(e, dict)
            ]
            detail = None
        return cls(status, str(body.get("title") or reason or "error"), detail, errors, body)

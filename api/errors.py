"""The one shape of a validation error, for every entry point (REST 422s, `search run`, schedules): a list
of `{"loc", "field", "msg", "type"}`, where `field` is the dotted path of the input at fault (`proxy.lr`,
`space.widths`, `body`) and `msg` says why."""

from __future__ import annotations

import re
from typing import Any

NAMED_FIELD = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.DOTALL)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def _message(error: dict[str, Any]) -> str:
    msg = str(error.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


def validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        loc = list(e.get("loc", ()))
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

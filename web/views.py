"""What the dashboard's templates show, shaped from storage records (no SQL, no requests here)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from search.layout import Layout, LayoutError
from search.operators import OPERATORS

# Okabe-Ito: a palette that stays distinct under the common colour-vision deficiencies.
OPERATOR_COLOURS = {
    "attention": "#0072B2",
    "swa": "#56B4E9",
    "mamba2": "#009E73",
    "deltanet": "#E69F00",
    "gated_deltanet": "#D55E00",
    "ffn": "#999999",
}
FALLBACK_COLOUR = "#CC79A7"

AXIS_TITLES = {
    "val_bpb": "validation bits per byte (val_bpb)",
    "decode_ms": "decode latency (ms per token)",
    "n_params": "parameters (count)",
    "prefill_ms": "prefill latency (ms)",
    "throughput_tokens_per_s": "throughput (tokens per s, higher is better)",
    "cache_bytes_per_sequence": "cache per sequence (bytes)",
}


@dataclass(frozen=True)
class Block:
    """One operator of a layout strip."""

    index: int
    name: str
    code: str
    kind: str  # "mixer" or "ffn"
    colour: str
    stage: int  # 1 + the stage's index (as mutations name it, from 0) for the blocks of a stage; 0: none


def operator_colour(name: str) -> str:
    return OPERATOR_COLOURS.get(name, FALLBACK_COLOUR)


def layout_strip(
    layout_data: dict[str, Any], stage_sizes: list[int] | None = None
) -> tuple[list[Block], Layout | None]:
    """The layout as a strip of blocks, one per operator; `stage_sizes` (operators per stage, from the
    search space's reading of the layout) numbers the stages."""
    try:
        layout = Layout.from_dict(layout_data)
    except (LayoutError, ValueError, TypeError):
        return [], None
    stage_of = [0] * len(layout.operators)
    if stage_sizes and sum(stage_sizes) == len(layout.operators):
        position = 0
        for number, size in enumerate(stage_sizes, start=1):
            stage_of[position : position + size] = [number] * size
            position += size
    blocks = [
        Block(i, op, OPERATORS[op].code, OPERATORS[op].kind, operator_colour(op), stage_of[i])
        for i, op in enumerate(layout.operators)
    ]
    return blocks, layout


def legend() -> list[tuple[str, str, str]]:
    """(name, code, colour) of every operator, for a strip's legend."""
    return [(name, spec.code, operator_colour(name)) for name, spec in OPERATORS.items()]


def local_time(value: datetime | None, zone: str | None) -> str:
    if value is None:
        return "-"
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        return value.astimezone(ZoneInfo(zone or "UTC")).strftime("%Y-%m-%d %H:%M %Z")
    except (KeyError, ValueError):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def utc(value: datetime | None) -> str:
    return "-" if value is None else local_time(value, "UTC")


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def page_data(data: Any) -> str:
    """JSON for a `<script type="application/json">` block: `<`, `>` and `&` escaped, so no string in it can
    close the element."""
    text = json.dumps(data, separators=(",", ":"), default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def latency_metrics(latency: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(metric, median, spread) rows of a latency result (the profiler's statistics: median, IQR, repeats)."""
    if not latency:
        return []
    rows = []
    for key, value in latency.items():
        if isinstance(value, dict) and "median" in value:
            repeats = value.get("repeats", len(value.get("values") or []))
            rows.append(
                (key, number(value.get("median")), f"IQR {number(value.get('iqr'))}, {repeats} repeats")
            )
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((key, number(value), ""))
    return rows


def cli_commands(candidate_id: int, base_url: str) -> list[str]:
    """Copy-paste commands that fetch the layout and its search's evaluation settings and evaluate it
    again."""
    layout, settings = f"candidate-{candidate_id}-layout.json", f"candidate-{candidate_id}-evaluation.json"
    return [
        f"curl -o {layout} {base_url}/api/candidates/{candidate_id}/layout.json",
        f"curl -o {settings} {base_url}/candidates/{candidate_id}/evaluation.json",
        f"hybridnas layouts show {layout}",
        f"hybridnas proxy train {layout} --config {settings}",
    ]

"""The verdict (the paper's central claim): does the searched hybrid beat the best plain Transformer at equal
latency?

It reads a finished search and a finished depth–width study (of Llama layers, as a rule) run on the same
device with the same proxy, latency settings and corpus. At each latency budget (by default each decode
latency on the search's front) it sets the best searched layout that meets the budget against the best
depth–width point that meets it: measured where the grid point was trained, else the fitted law's prediction
(marked as such). The seed noise comes from training both chosen layouts again with other seeds (one grid run
per seed, with the search's own settings); the gain is the Llama's mean val_bpb minus the hybrid's, with its
standard error over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from search.config import SearchConfig
from search.db import MAX_ID
from search.evaluation import DataConfig, LatencyConfig, ProxyConfig
from search.layout import Layout
from search.studies.base import (
    EVALUATION_FIELDS,
    ExecutionSettings,
    Reference,
    Study,
    StudyError,
    StudyRun,
    by_layout,
    run_config,
)
from search.studies.depth_width import DepthWidthStudy
from search.studies.stats import mean_interval

FINISHED = ("completed", "reused")
_SETTINGS = {"proxy": ProxyConfig, "latency": LatencyConfig, "data": DataConfig}


@dataclass(frozen=True)
class Point:
    """One measured (or, for the Llama, law-predicted) layout: where it sits on the latency axis."""

    name: str
    layout_hash: str
    decode_ms: float
    val_bpb: float
    source: str  # "measured" | "law"


def best_under(points: list[Point], budget_ms: float) -> Point | None:
    """The lowest-val_bpb point whose decode latency meets the budget (measured before predicted on a tie)."""
    meeting = [p for p in points if p.decode_ms <= budget_ms]
    return min(meeting, key=lambda p: (p.val_bpb, p.source != "measured"), default=None)


def match_budgets(hybrids: list[Point], llamas: list[Point], budgets_ms: list[float]) -> list[dict[str, Any]]:
    """For each budget: the best hybrid and the best Llama that meet it (None where none does)."""
    return [
        {"budget_ms": b, "hybrid": best_under(hybrids, b), "llama": best_under(llamas, b)} for b in budgets_ms
    ]


def front_of(points: list[Point]) -> list[Point]:
    """The non-dominated points (lower decode ms and lower val_bpb), by latency."""
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p.decode_ms, p.val_bpb)):
        if p.val_bpb < best:
            front.append(p)
            best = p.val_bpb
    return front


class VerdictStudy(Study, ExecutionSettings):
    """A search against a depth–width study at equal decode latency; the seeds' runs use the search's proxy,
    latency and data settings."""

    kind: Literal["verdict"] = Field("verdict", description="the study's kind")
    columns: ClassVar = (
        "budget_ms",
        "hybrid",
        "hybrid_decode_ms",
        "hybrid_val_bpb",
        "hybrid_seeds",
        "llama",
        "llama_decode_ms",
        "llama_val_bpb",
        "llama_source",
        "llama_seeds",
        "gain",
        "gain_se",
        "outcome",
    )
    search_id: int = Field(ge=1, le=MAX_ID, description="the finished search whose front is judged")
    depth_width_id: int = Field(
        ge=1, le=MAX_ID, description="the finished depth-width study of the plain Transformer"
    )
    seeds: list[int] = Field(
        [1, 2],
        min_length=1,
        max_length=16,
        description="more training seeds for the compared layouts (the search's seed is sample one)",
    )
    budgets_ms: list[float] = Field(
        default_factory=list,
        max_length=64,
        description="decode latency budgets (ms per token); default: each latency on the search's front",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, values: list[int]) -> list[int]:
        if len(set(values)) != len(values) or any(v < 0 for v in values):
            raise ValueError("distinct non-negative seeds")
        return values

    @classmethod
    def table(cls, report: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for r in report.get("budgets", []):
            row = {k: r[k] for k in ("budget_ms", "gain", "gain_se", "outcome")}
            for side in ("hybrid", "llama"):
                point = r[side] or {}
                row[side] = point.get("name")
                row[f"{side}_decode_ms"] = point.get("decode_ms")
                row[f"{side}_val_bpb"] = (point.get("seeds") or {}).get("mean", point.get("val_bpb"))
                row[f"{side}_seeds"] = (point.get("seeds") or {}).get("n")
            row["llama_source"] = (r["llama"] or {}).get("source")
            rows.append(row)
        return rows

    def references(self) -> dict[str, int]:
        return {"search": self.search_id, "depth_width": self.depth_width_id}

    # -------------------------------------------------------------------------------------------- inputs

    def _inputs(self, references: dict[str, Reference]):
        search, grid = references.get("search"), references.get("depth_width")
        check_references(search, grid)
        study = DepthWidthStudy.model_validate(grid.job["config"])
        hybrids = [
            Point(
                c["layout"].get("name") or f"candidate {c['id']}",
                c["layout_hash"],
                c["decode_ms"],
                c["val_bpb"],
                "measured",
            )
            for c in search.candidates
            if c["status"] in FINISHED and c.get("val_bpb") is not None and c.get("decode_ms") is not None
        ]
        llamas, layouts = [], {}
        report = grid.job.get("result") or {}
        law = report.get("law")
        for p in report.get("points", []):
            layout = study.layout(p["depth"], p["width"])
            layouts[layout.content_hash] = layout
            if p.get("decode_ms") is None:
                continue
            if p.get("val_bpb") is not None:
                llamas.append(
                    Point(layout.name, layout.content_hash, p["decode_ms"], p["val_bpb"], "measured")
                )
            elif law and p.get("predicted_val_bpb") is not None:
                llamas.append(
                    Point(layout.name, layout.content_hash, p["decode_ms"], p["predicted_val_bpb"], "law")
                )
        for c in search.candidates:
            layouts[c["layout_hash"]] = Layout.from_dict(c["layout"])
        budgets = self.budgets_ms or sorted({p.decode_ms for p in front_of(hybrids)})
        return search, hybrids, llamas, layouts, budgets

    def _extra_seeds(self, search: Reference) -> list[int]:
        own = search.job["config"].get("proxy", {}).get("seed", 0)
        return [s for s in self.seeds if s != own]

    def plan(self, references: dict[str, Reference]) -> list[StudyRun]:
        search, hybrids, llamas, layouts, budgets = self._inputs(references)
        chosen: dict[str, Layout] = {}
        for match in match_budgets(hybrids, llamas, budgets):
            for side in ("hybrid", "llama"):
                point = match[side]
                if point is not None and point.source == "measured":
                    chosen[point.layout_hash] = layouts[point.layout_hash]
        if not chosen:
            raise StudyError("budgets_ms", "no budget is met by any measured layout of the search")
        evaluation = {name: search.job["config"][name] for name in EVALUATION_FIELDS}
        return [
            run_config(self, f"seed-{seed}", list(chosen.values()), evaluation, seed=seed)
            for seed in self._extra_seeds(search)
        ]

    # -------------------------------------------------------------------------------------------- report

    def analyse(self, runs: dict[str, list[dict]], references: dict[str, Reference]) -> dict[str, Any]:
        search, hybrids, llamas, _layouts, budgets = self._inputs(references)
        reseeded = [by_layout(candidates) for candidates in runs.values()]

        def samples(point: Point) -> list[float]:
            if point.source != "measured":
                return []
            again = [r[point.layout_hash]["val_bpb"] for r in reseeded if r.get(point.layout_hash)]
            return [point.val_bpb, *[v for v in again if v is not None]]

        rows = [_row(m, samples) for m in match_budgets(hybrids, llamas, budgets)]
        judged = [r for r in rows if r["gain"] is not None]
        return {
            "kind": self.kind,
            "search_id": self.search_id,
            "depth_width_id": self.depth_width_id,
            "budgets": rows,
            "hybrid_front": [p.__dict__ for p in front_of(hybrids)],
            "llama_front": [p.__dict__ for p in front_of(llamas)],
            "summary": {
                "budgets_judged": len(judged),
                "hybrid_better": sum(1 for r in judged if r["outcome"] == "hybrid better"),
                "llama_better": sum(1 for r in judged if r["outcome"] == "llama better"),
                "within_noise": sum(1 for r in judged if r["outcome"] == "within seed noise"),
                "no_llama_meets": sum(1 for r in rows if r["llama"] is None),
            },
        }


def _row(match: dict[str, Any], samples) -> dict[str, Any]:
    hybrid, llama = match["hybrid"], match["llama"]
    row: dict[str, Any] = {
        "budget_ms": match["budget_ms"],
        "hybrid": None if hybrid is None else {**hybrid.__dict__, "seeds": mean_interval(samples(hybrid))},
        "llama": None if llama is None else {**llama.__dict__, "seeds": mean_interval(samples(llama))},
        "gain": None,
        "gain_se": None,
        "outcome": "no hybrid meets it" if hybrid is None else "no llama meets it",
    }
    if hybrid is None or llama is None:
        return row
    h, lm = row["hybrid"]["seeds"], row["llama"]["seeds"]
    h_mean = h["mean"] if h["n"] else hybrid.val_bpb
    l_mean = lm["mean"] if lm["n"] else llama.val_bpb
    row["gain"] = l_mean - h_mean  # > 0: the hybrid's val_bpb is lower
    variances = [s["se"] ** 2 for s in (h, lm) if s["se"] is not None]
    row["gain_se"] = math.sqrt(sum(variances)) if variances else None
    if row["gain_se"] is None:
        row["outcome"] = "no seed noise measured"
    elif abs(row["gain"]) <= 2 * row["gain_se"]:
        row["outcome"] = "within seed noise"
    else:
        row["outcome"] = "hybrid better" if row["gain"] > 0 else "llama better"
    return row


def check_references(search: Reference | None, grid: Reference | None) -> None:
    """The search and the depth-width study exist, are finished, and share proxy, latency settings, data and
    device; else StudyError naming the field."""
    if search is None or search.job.get("kind") != "search":
        raise StudyError("search_id", "no such search")
    if grid is None or grid.job.get("kind") != "depth-width":
        raise StudyError("depth_width_id", "no such depth-width study")
    if search.job.get("status") != "completed":
        raise StudyError("search_id", f"the search is {search.job.get('status')}, not completed")
    if grid.job.get("status") != "completed" or not grid.job.get("result"):
        raise StudyError("depth_width_id", f"the study is {grid.job.get('status')}, not completed")
    defaults = SearchConfig().model_dump(mode="json")  # a section left out is a search's default
    for name, model in _SETTINGS.items():
        ours = model.from_dict(search.job["config"].get(name) or defaults[name]).to_dict()
        theirs = model.from_dict(grid.job["config"].get(name) or defaults[name]).to_dict()
        differing = sorted(k for k in ours if ours[k] != theirs.get(k))
        if differing:
            k = differing[0]
            raise StudyError(
                "depth_width_id",
                f"its {name}.{k} is {theirs.get(k)!r}, the search's is {ours[k]!r}: the two must share "
                "proxy, latency settings and data",
            )
    devices = [{_device(c) for c in ref.candidates if _device(c)} for ref in (search, grid)]
    if devices[0] and devices[1] and not devices[0] & devices[1]:
        raise StudyError("depth_width_id", "its latencies were measured on another device than the search's")


DEVICE_KEYS = ("device", "device_type", "dtype", "method")  # what makes latencies comparable


def _device(candidate: dict) -> tuple | None:
    fingerprint = candidate.get("device_fingerprint")
    return tuple(fingerprint.get(k) for k in DEVICE_KEYS) if fingerprint else None

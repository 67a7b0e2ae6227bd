"""The depth–width study (method.md section 2): a grid of depths x widths of one repeated layer, short-trained
and measured like search candidates, and the law `L(D, W) = L0 + a·D^-α + b·W^-β` fitted to their val_bpb
(`search/scaling.py`), with its extrapolation error and the (D, W) it recommends per latency budget."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from search.layout import Layout, LayoutError, expand_operators
from search.studies.base import Reference, RunSettings, Study, StudyRun, by_layout, run_config


class DepthWidthStudy(Study, RunSettings):
    """A grid of depths x widths of one repeated layer (default: a Llama layer, attention + FFN),
    short-trained and measured like search candidates; the law `L(D, W) = L0 + a·D^-α + b·W^-β` fitted to
    their val_bpb."""

    kind: Literal["depth-width"] = Field("depth-width", description="the study's kind")
    columns: ClassVar = (
        "depth",
        "width",
        "candidate_id",
        "status",
        "val_bpb",
        "predicted_val_bpb",
        "decode_ms",
        "n_params",
    )
    pattern: list[str] = Field(
        ["attention", "ffn"],
        min_length=1,
        max_length=16,
        description="one layer's operators (names or short codes); a model of depth D repeats it D times",
    )
    depths: list[int] = Field(
        [2, 4, 6, 8, 12], min_length=2, max_length=32, description="depths D (layers) of the grid"
    )
    widths: list[int] = Field(
        [32, 64, 96, 128], min_length=2, max_length=32, description="widths W (d_model) of the grid"
    )
    head_dim: int = Field(32, ge=8, le=256, description="attention head size: n_heads = W / head_dim")
    dims: dict[str, Any] = Field(
        default_factory=dict, max_length=32, description="other layout dims, the same at every grid point"
    )
    budgets_ms: list[float] = Field(
        default_factory=list,
        max_length=16,
        description="decode latency budgets (ms per token) to recommend the lowest-loss (D, W) for",
    )
    fit_max_depth: int | None = Field(
        None,
        ge=1,
        description="the extrapolation check fits on depths up to this (default: all but the largest)",
    )
    fit_max_width: int | None = Field(
        None, ge=1, description="and widths up to this (default: all but the largest)"
    )
    bootstrap: int = Field(200, ge=10, le=5000, description="resamples for the constants' intervals")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the bootstrap")

    @field_validator("depths", "widths")
    @classmethod
    def _grid(cls, values: list[int]) -> list[int]:
        if any(v < 1 or v > 4096 for v in values) or len(set(values)) != len(values):
            raise ValueError("distinct positive values, at most 4096")
        return sorted(values)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: list[str]) -> list[str]:
        try:
            return list(expand_operators(value, "pattern"))
        except LayoutError as exc:
            raise ValueError(exc.reason) from None

    @model_validator(mode="after")
    def _layouts_build(self):
        for width in self.widths:
            try:
                self.layout(self.depths[0], width)
            except LayoutError as exc:
                raise ValueError(f"widths: at width {width}: {exc}") from None
        return self

    def layout(self, depth: int, width: int) -> Layout:
        if width % self.head_dim:
            raise LayoutError("d_model", f"{width} is not a multiple of head_dim={self.head_dim}")
        n_heads = width // self.head_dim
        n_kv = max(k for k in range(1, n_heads + 1) if n_heads % k == 0 and k <= max(1, n_heads // 2))
        return Layout.from_dict(
            {
                "operators": list(self.pattern) * depth,
                "name": f"D{depth}-W{width}",
                "head_dim": self.head_dim,
                "n_heads": n_heads,
                "n_kv_heads": n_kv,
                **self.dims,
                "d_model": width,
            }
        )

    def grid(self) -> list[tuple[int, int]]:
        return [(d, w) for d in self.depths for w in self.widths]

    @classmethod
    def table(cls, report: dict[str, Any]) -> list[dict[str, Any]]:
        return report.get("points", [])

    def plan(self, references: dict[str, Reference]) -> list[StudyRun]:
        return [run_config(self, "grid", [self.layout(d, w) for d, w in self.grid()])]

    def analyse(self, runs: dict[str, list[dict]], references: dict[str, Reference]) -> dict[str, Any]:
        return analyse_depth_width(self, runs.get("grid", []))


def _points(study: DepthWidthStudy, candidates: list[dict]) -> list[dict]:
    """One row per grid point: depth, width, its candidate's status, val_bpb, decode ms and parameters."""
    by_hash = by_layout(candidates)
    rows = []
    for depth, width in study.grid():
        c = by_hash.get(study.layout(depth, width).content_hash, {})
        rows.append(
            {
                "depth": depth,
                "width": width,
                "candidate_id": c.get("id"),
                "status": c.get("status", "missing"),
                "val_bpb": c.get("val_bpb"),
                "decode_ms": c.get("decode_ms"),
                "n_params": c.get("n_params"),
            }
        )
    return rows


def analyse_depth_width(study: DepthWidthStudy, candidates: list[dict]) -> dict[str, Any]:
    """The report: the grid's points, the law fitted to them with bootstrap intervals, the extrapolation
    error, and for each latency budget the (D, W) with the lowest predicted loss beside the one from measured
    loss."""
    from search.scaling import best_under_budget, bootstrap_intervals, extrapolation_error, fit_law  # scipy

    rows = _points(study, candidates)
    done = [r for r in rows if r["val_bpb"] is not None]
    report: dict[str, Any] = {"kind": study.kind, "points": rows, "n_measured": len(done)}
    if len(done) < 5:
        report["fit_error"] = f"{len(done)} measured points: the law needs at least 5"
        return report
    depths, widths = [r["depth"] for r in done], [r["width"] for r in done]
    losses = [r["val_bpb"] for r in done]
    fit = fit_law(depths, widths, losses)
    report["law"] = {**fit.law.to_dict(), "rmse": fit.rmse, "n_points": fit.n_points}
    report["intervals"] = bootstrap_intervals(depths, widths, losses, n_boot=study.bootstrap, seed=study.seed)
    for r in rows:
        r["predicted_val_bpb"] = float(fit.law.predict(r["depth"], r["width"]))
    max_d = study.fit_max_depth or sorted(set(depths))[-2]
    max_w = study.fit_max_width or sorted(set(widths))[-2]
    try:
        ex = extrapolation_error(depths, widths, losses, max_fit_depth=max_d, max_fit_width=max_w)
        report["extrapolation"] = {
            "fit_max_depth": max_d,
            "fit_max_width": max_w,
            "max_relative_error": ex.max_relative_error,
            "mean_relative_error": ex.mean_relative_error,
            "held_out": [
                {"depth": d, "width": w, "measured": m, "predicted": p} for d, w, m, p in ex.held_out
            ],
        }
    except ValueError as exc:
        report["extrapolation_error"] = str(exc)
    configurations = [(r["depth"], r["width"], r["decode_ms"]) for r in done if r["decode_ms"] is not None]
    measured = {(r["depth"], r["width"]): r["val_bpb"] for r in done}
    report["budgets"] = []
    for budget in study.budgets_ms:
        by_law = best_under_budget(fit.law, configurations, budget)
        by_measure = best_under_budget(None, configurations, budget, measured=measured)
        report["budgets"].append(
            {
                "budget_ms": budget,
                "by_law": None if by_law is None else by_law.__dict__,
                "by_measured_loss": None if by_measure is None else by_measure.__dict__,
            }
        )
    return report

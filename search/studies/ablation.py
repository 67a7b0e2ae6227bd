"""The ablation study (method.md section 5): the same layouts trained with and without weight normalization,
and with and without meta tokens, over several seeds, paired by seed.

Runs: `baseline-s<seed>` (no weight norm, no meta tokens), `weight_norm-s<seed>` and
`meta_tokens-s<seed>`, each a grid of the layouts. The report, per arm: the mean difference in val_bpb (arm
minus baseline, over every (layout, seed) pair) with its t interval and what it says (improves, hurts, or no
effect distinguishable from seed noise), and the step-time overhead (the baseline's training throughput over
the arm's, minus one).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from search.layout import Layout, LayoutError
from search.presets import resolve_layout
from search.studies.base import Reference, RunSettings, Study, StudyRun, by_layout, run_config
from search.studies.stats import effect, mean_interval

BASELINE = {"weight_norm": False, "meta_tokens": 0}


class AblationStudy(Study, RunSettings):
    """Weight normalization and meta tokens, each against the same baseline, on the same seeds."""

    kind: Literal["ablation"] = Field("ablation", description="the study's kind")
    columns: ClassVar = (
        "arm",
        "layout",
        "seed",
        "baseline_val_bpb",
        "arm_val_bpb",
        "difference",
        "step_time_overhead",
    )
    layouts: list[str | dict[str, Any]] = Field(
        ["nemotron-flash-1b-mini"],
        min_length=1,
        max_length=32,
        description="the layouts ablated: preset names or layout objects",
    )
    seeds: list[int] = Field(
        [0, 1, 2],
        min_length=2,
        max_length=32,
        description="training seeds; each arm pairs with the baseline's",
    )
    arms: list[Literal["weight_norm", "meta_tokens"]] = Field(
        ["weight_norm", "meta_tokens"], min_length=1, description="what is switched on against the baseline"
    )
    meta_tokens: int = Field(
        16, ge=1, le=1024, description="how many meta tokens the meta_tokens arm prepends"
    )

    @field_validator("seeds", "arms")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError("values must be distinct")
        return values

    @model_validator(mode="after")
    def _layouts_resolve(self):
        for i, spec in enumerate(self.layouts):
            try:
                self._layout(spec)
            except (LayoutError, KeyError, ValueError) as exc:
                raise ValueError(f"layouts.{i}: {getattr(exc, 'reason', None) or exc}") from None
        return self

    @staticmethod
    def _layout(spec: str | dict[str, Any]) -> Layout:
        if isinstance(spec, dict):
            return Layout.from_dict(spec)
        if spec.endswith((".json", ".yaml", ".yml")):  # files are for the CLI: a study stores its layouts
            raise ValueError(f"{spec!r}: give a preset name or a layout object")
        return resolve_layout(spec)

    def resolved_layouts(self) -> list[Layout]:
        return [self._layout(spec) for spec in self.layouts]

    @classmethod
    def table(cls, report: dict[str, Any]) -> list[dict[str, Any]]:
        arms = report.get("arms", {})
        return [{"arm": arm, **pair} for arm, result in arms.items() for pair in result["pairs"]]

    def arm_proxy(self, arm: str) -> dict[str, Any]:
        return {**BASELINE, arm: True if arm == "weight_norm" else self.meta_tokens}

    def plan(self, references: dict[str, Reference]) -> list[StudyRun]:
        layouts = self.resolved_layouts()
        runs = []
        for seed in self.seeds:
            runs.append(run_config(self, f"baseline-s{seed}", layouts, seed=seed, **BASELINE))
            runs += [
                run_config(self, f"{arm}-s{seed}", layouts, seed=seed, **self.arm_proxy(arm))
                for arm in self.arms
            ]
        return runs

    def analyse(self, runs: dict[str, list[dict]], references: dict[str, Reference]) -> dict[str, Any]:
        layouts = self.resolved_layouts()
        pairs = {arm: [] for arm in self.arms}
        for seed in self.seeds:
            base = by_layout(runs.get(f"baseline-s{seed}", []))
            for arm in self.arms:
                other = by_layout(runs.get(f"{arm}-s{seed}", []))
                for layout in layouts:
                    a, b = base.get(layout.content_hash), other.get(layout.content_hash)
                    if a and b and a.get("val_bpb") is not None and b.get("val_bpb") is not None:
                        pairs[arm].append(_pair(layout, seed, a, b))
        return {
            "kind": self.kind,
            "seeds": self.seeds,
            "layouts": [layout.name or layout.content_hash[:12] for layout in layouts],
            "arms": {arm: _arm_report(pairs[arm]) for arm in self.arms},
            "meta_tokens": self.meta_tokens,
        }


def _pair(layout: Layout, seed: int, baseline: dict, arm: dict) -> dict[str, Any]:
    base_tps = (baseline.get("training") or {}).get("tokens_per_s")
    arm_tps = (arm.get("training") or {}).get("tokens_per_s")
    return {
        "layout": layout.name or layout.content_hash[:12],
        "seed": seed,
        "baseline_val_bpb": baseline["val_bpb"],
        "arm_val_bpb": arm["val_bpb"],
        "difference": arm["val_bpb"] - baseline["val_bpb"],
        "step_time_overhead": (base_tps / arm_tps - 1) if base_tps and arm_tps else None,
    }


def _arm_report(pairs: list[dict]) -> dict[str, Any]:
    difference = mean_interval([p["difference"] for p in pairs])
    overhead = mean_interval([p["step_time_overhead"] for p in pairs if p["step_time_overhead"] is not None])
    return {
        "val_bpb_difference": difference,
        "effect": effect(difference),
        "step_time_overhead": overhead,
        "pairs": pairs,
    }

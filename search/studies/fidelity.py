"""The proxy-fidelity study: does short training rank layouts the way longer training does?

N layouts (the presets re-expressed at the study's scale, then random layouts of the search space) are each
trained three ways, as three grid runs: the proxy (`short`), the proxy with another seed (`short_seed`: the
seed-noise ceiling) and the proxy K times longer (`long`). The report: Spearman and Kendall between short and
long val_bpb with bootstrap 95 % intervals, the same between the two seeds, and within a parameter-count band
(±25 % of the median size), stored with the proxy config's hash and the data settings so that a search with
the same proxy and corpus can show it (the search page's proxy-trust slot).
"""

from __future__ import annotations

import random
import statistics
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from search.evaluation import DataConfig, ProxyConfig
from search.layout import Layout
from search.space import cpu_space
from search.studies.base import Reference, RunSettings, Study, StudyRun, by_layout, run_config
from search.studies.stats import rank_correlation

RUNS = ("short", "short_seed", "long")


def fidelity_layouts(n_layouts: int, seed: int, max_operators: int, d_model: int) -> list[Layout]:
    """Presets re-expressed at this scale (those that fit in `max_operators`), then random layouts of the
    grammar, all distinct: the first `n_layouts`, a prefix of one seeded sequence."""
    space = cpu_space(max_operators=max_operators, widths=(d_model,))
    dims = space._dims_for(d_model)
    n_pairs = max_operators // 2
    presets = {
        "llama": f"[A F] x {n_pairs}",
        "mamba2": f"[M2 F] x {n_pairs}",
        "deltanet": f"[D F] x {n_pairs}",
        "nemotron-flash-pattern": "D F M2 F A F M2 F D F M2 F",
    }
    layouts: list[Layout] = []
    for name, ops in presets.items():
        layout = Layout.from_dict({"operators": ops, "name": name, **dims})
        if len(layout.operators) <= max_operators:
            layouts.append(layout)
    rng = random.Random(seed)
    seen = {lo.content_hash for lo in layouts}
    while len(layouts) < n_layouts:
        layout = space.sample_layout(rng)
        if layout.content_hash not in seen:
            seen.add(layout.content_hash)
            layouts.append(layout.replace(name=f"random-{len(layouts)}"))
    return layouts[:n_layouts]


Pair = tuple[str, float, float, int]  # (layout hash, val_bpb of run A, of run B, parameters)


def fidelity_statistics(
    short_long: list[Pair], short_seeds: list[Pair], bootstrap: int, seed: int = 0
) -> dict:
    """The three rank correlations and whether the target (Spearman >= 0.9, its interval's lower end >=
    0.75) is met."""
    overall = rank_correlation([p[1] for p in short_long], [p[2] for p in short_long], bootstrap, seed)
    ceiling = rank_correlation([p[1] for p in short_seeds], [p[2] for p in short_seeds], bootstrap, seed)
    band: dict[str, Any] = {"n": 0}
    if short_long:
        median = statistics.median(p[3] for p in short_long)
        inside = [p for p in short_long if abs(p[3] - median) <= 0.25 * median]
        band = rank_correlation([p[1] for p in inside], [p[2] for p in inside], bootstrap, seed)
        band["median_params"] = median
    target_met = None
    if overall.get("spearman") is not None and overall.get("spearman_ci95"):
        target_met = overall["spearman"] >= 0.9 and overall["spearman_ci95"][0] >= 0.75
    return {
        "short_vs_long": overall,
        "seed_noise_ceiling": ceiling,
        "within_param_band": band,
        "target_met": target_met,
    }


def trust_key(search_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What a fidelity report must share with a search to judge its proxy: the proxy config's hash and the
    data settings, defaults filled in."""
    proxy = ProxyConfig.from_dict(search_config.get("proxy") or {})
    data = DataConfig.from_dict(search_config.get("data") or {})
    return proxy.content_hash, data.to_dict()


def judges(report: dict[str, Any], key: tuple[str, dict[str, Any]]) -> bool:
    """Whether a fidelity report was made for the search whose `trust_key` this is."""
    return (report.get("proxy_config_hash"), report.get("data")) == key


class FidelityStudy(Study, RunSettings):
    """The proxy (`proxy`) against itself with another seed and against a K times longer training, on
    `n_layouts` layouts, for the corpus and tokenizer of `data`."""

    kind: Literal["fidelity"] = Field("fidelity", description="the study's kind")
    columns: ClassVar = ("layout_hash", "name", "operators", "n_params", *(f"{run}_val_bpb" for run in RUNS))
    n_layouts: int = Field(24, ge=3, le=512, description="layouts ranked (presets first, then random ones)")
    long_factor: int = Field(
        10, ge=2, le=1000, description="the long training is this many times the proxy's"
    )
    noise_seed: int = Field(1, ge=0, le=2**32 - 1, description="the second short training's seed")
    layout_seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the random layouts")
    max_operators: int = Field(12, ge=2, le=64, description="operators per layout at most")
    d_model: int = Field(64, ge=8, le=4096, description="the layouts' width")
    bootstrap: int = Field(2000, ge=10, le=20000, description="resamples for the correlations' intervals")

    @model_validator(mode="after")
    def _distinct_seed(self):
        if self.noise_seed == self.proxy.seed:
            raise ValueError("noise_seed: must differ from proxy.seed (it measures the seed noise)")
        return self

    @classmethod
    def table(cls, report: dict[str, Any]) -> list[dict[str, Any]]:
        return report.get("rows", [])

    def layouts(self) -> list[Layout]:
        return fidelity_layouts(self.n_layouts, self.layout_seed, self.max_operators, self.d_model)

    def long_proxy(self) -> dict[str, Any]:
        """The long run's proxy changes: K times the tokens when the proxy counts tokens, else the steps."""
        if self.proxy.tokens is not None:
            return {"tokens": self.proxy.tokens * self.long_factor}
        return {"steps": self.proxy.total_steps * self.long_factor}

    def plan(self, references: dict[str, Reference]) -> list[StudyRun]:
        layouts = self.layouts()
        return [
            run_config(self, "short", layouts),
            run_config(self, "short_seed", layouts, seed=self.noise_seed),
            run_config(self, "long", layouts, **self.long_proxy()),
        ]

    def analyse(self, runs: dict[str, list[dict]], references: dict[str, Reference]) -> dict[str, Any]:
        layouts = self.layouts()
        tables = {run: by_layout(runs.get(run, [])) for run in RUNS}
        rows = []
        for layout in layouts:
            row: dict[str, Any] = {"layout_hash": layout.content_hash, "name": layout.name}
            row["operators"] = " ".join(layout.operators)
            for run in RUNS:
                cand = tables[run].get(layout.content_hash, {})
                row[f"{run}_val_bpb"] = cand.get("val_bpb")
                row["n_params"] = row.get("n_params") or cand.get("n_params")
            rows.append(row)

        def pairs(a: str, b: str) -> list[Pair]:
            return [
                (r["layout_hash"], r[f"{a}_val_bpb"], r[f"{b}_val_bpb"], r["n_params"] or 0)
                for r in rows
                if r[f"{a}_val_bpb"] is not None and r[f"{b}_val_bpb"] is not None
            ]

        report = fidelity_statistics(pairs("short", "long"), pairs("short", "short_seed"), self.bootstrap)
        failed = sum(1 for run in RUNS for c in runs.get(run, []) if c.get("status") == "failed")
        return {
            "kind": self.kind,
            **report,
            "rows": rows,
            "failed_runs": failed,
            "proxy_config_hash": self.proxy.content_hash,
            "proxy": self.proxy.to_dict(),
            "long_proxy": self.long_proxy(),
            "data": self.data.to_dict(),
        }

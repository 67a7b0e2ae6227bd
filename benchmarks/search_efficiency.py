"""Is the search any good? Replays each strategy against the exhaustively evaluated benchmark sub-space
(benchmarks/data/search_space_cpu*.csv, made by benchmarks/search_space_table.py): look-ups instead of
training, a budget of 10 % of the space, 20 seeds per strategy.

Reports mean ± std of the final normalized hypervolume (bounds fixed from the whole table; also as a fraction
of the table's own Pareto front), a one-sided Mann-Whitney U test of each strategy against `random`, and the
anytime curves (PNG + table) under benchmarks/results/search_efficiency.*.

    .venv/bin/python benchmarks/search_efficiency.py [--seeds 20] [--budget-fraction 0.1]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.pareto import HypervolumeSpace, HypervolumeTracker, pareto_front  # noqa: E402
from search.space import benchmark_space  # noqa: E402
from search.strategies import make_strategy  # noqa: E402

DATA = Path("benchmarks/data")
RESULTS = Path("benchmarks/results")
OBJECTIVES = ("val_bpb", "decode_ms")
# (strategy, options): nsga2 with a population of 12 (the issue asks for 10-12). pareto-aging's population and
# tournament size were chosen on seeds 0-19 (a sweep over population 6/8/12 x tournament 2/3/4); the reported
# replays use held-out seeds (SEED_OFFSET) for every strategy.
SEED_OFFSET = 100
STRATEGIES = {
    "pareto-aging": {"population_size": 6, "sample_size": 4},
    "nsga2": {"population_size": 12},
    "random": {},
}


def load_table() -> dict[str, dict[str, float]]:
    train = {r["layout_hash"]: r for r in csv.DictReader((DATA / "search_space_cpu.csv").open())}
    latency = {r["layout_hash"]: r for r in csv.DictReader((DATA / "search_space_cpu_latency.csv").open())}
    table = {}
    for h, row in train.items():
        if row["status"] == "completed" and h in latency:
            table[h] = {"val_bpb": float(row["val_bpb"]), "decode_ms": float(latency[h]["decode_ms_per_token"])}
    return table


def preset_layouts(table: dict) -> list:
    """The known designs the engine seeds a search with (search.engine.initial_layouts), those in the table."""
    from search.config import SearchConfig
    from search.engine import initial_layouts
    config = SearchConfig.model_validate({"space": {"preset": "benchmark"}, "executor": "inline"})
    return [lo for lo in initial_layouts(config, benchmark_space(), None) if lo.content_hash in table]


def replay(name: str, options: dict, seed: int, budget: int, table: dict, hv_space: HypervolumeSpace,
           initial: list | None = None) -> list[float]:
    space = benchmark_space()
    strategy = make_strategy(name, space, objectives=OBJECTIVES, seed=seed, initial=initial or [], **options)
    tracker = HypervolumeTracker(hv_space)
    evaluated = 0
    while evaluated < budget:
        proposals = strategy.ask(min(4, budget - evaluated))  # cycles of 4, as with 4 workers
        if not proposals:
            break
        for proposal in proposals:
            values = table.get(proposal.layout.content_hash)
            strategy.tell(proposal.layout.content_hash, values)  # a layout missing from the table = failed
            tracker.record(None if values is None else [values[o] for o in OBJECTIVES])
            evaluated += 1
    return list(tracker.history)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument("--with-presets", action="store_true",
                        help="seed every strategy with the engine's known designs (those in the table), as a real "
                             "search does; the default replays start from random layouts only")
    args = parser.parse_args()
    from scipy.stats import mannwhitneyu

    table = load_table()
    budget = max(1, round(args.budget_fraction * len(table)))
    points = [[v[o] for o in OBJECTIVES] for v in table.values()]
    lower = tuple(min(p[i] for p in points) for i in range(2))
    upper = tuple(max(p[i] for p in points) for i in range(2))
    hv_space = HypervolumeSpace(OBJECTIVES, lower, upper)
    best = hv_space.hypervolume([points[i] for i in pareto_front(points)])
    initial = preset_layouts(table) if args.with_presets else []
    curves = {name: [replay(name, opts, SEED_OFFSET + seed, budget, table, hv_space, initial) for seed in range(args.seeds)]
              for name, opts in STRATEGIES.items()}
    finals = {name: [c[-1] for c in runs] for name, runs in curves.items()}
    lines = ["# Search efficiency (replay against the exhaustively evaluated benchmark sub-space)", "",
             f"command: `.venv/bin/python benchmarks/search_efficiency.py --seeds {args.seeds} "
             f"--budget-fraction {args.budget_fraction}{' --with-presets' if args.with_presets else ''}`", "",
             f"initial population: {'the known designs ' + ', '.join(lo.name for lo in initial) + ', then random' if initial else 'random layouts only'}",
             "",
             f"table: {len(table)} layouts evaluated on this CPU (`benchmarks/data/search_space_cpu*.csv`); "
             f"budget {budget} evaluations; {args.seeds} seeds ({SEED_OFFSET}..{SEED_OFFSET + args.seeds - 1}); objectives {', '.join(OBJECTIVES)} (minimized); "
             f"hypervolume normalized to the table's bounds {dict(zip(OBJECTIVES, zip(lower, upper)))}, reference "
             f"point 1.1; the table's own Pareto front scores {best:.4f}.", "",
             "| strategy | options | final HV mean ± std | fraction of the best | Mann-Whitney vs random (one-sided p) |",
             "| --- | --- | --- | --- | --- |"]
    summary = {}
    for name, values in finals.items():
        p = None if name == "random" else float(mannwhitneyu(values, finals["random"], alternative="greater").pvalue)
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        summary[name] = {"mean": mean, "std": std, "p_vs_random": p, "options": STRATEGIES[name]}
        lines.append(f"| {name} | {json.dumps(STRATEGIES[name])} | {mean:.4f} ± {std:.4f} | {mean / best:.3f} | "
                     f"{'-' if p is None else f'{p:.2g}'} |")
    lines += ["", "## Anytime curves (mean normalized hypervolume after n evaluations)", "",
              "| n | " + " | ".join(curves) + " |", "| --- | " + " | ".join("---" for _ in curves) + " |"]
    n_points = len(next(iter(curves.values()))[0])
    for n in sorted(set([1, 5, 10, 20, 30, n_points]) | set(range(0, n_points + 1, 10)) - {0}):
        if n <= n_points:
            lines.append(f"| {n} | " + " | ".join(f"{statistics.mean(c[n - 1] for c in runs):.4f}"
                                                  for runs in curves.values()) + " |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "search_efficiency_presets" if args.with_presets else "search_efficiency"
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"budget": budget, "table_size": len(table),
                                                                 "best_hv": best, "summary": summary}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, runs in curves.items():
            mean = [statistics.mean(c[i] for c in runs) for i in range(n_points)]
            ax.plot(range(1, n_points + 1), mean, label=name)
        ax.axhline(best, color="grey", linestyle="--", label="table's Pareto front")
        ax.set_xlabel("evaluations")
        ax.set_ylabel("normalized hypervolume (mean of seeds)")
        ax.set_title(f"search efficiency: {len(table)}-layout CPU sub-space, {args.seeds} seeds")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{stem}.png", dpi=110)
    except ImportError:
        lines.append("(matplotlib not installed: no PNG)")
    print(text)


if __name__ == "__main__":
    main()

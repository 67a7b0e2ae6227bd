"""Is the search any good? Replays each strategy against the exhaustively evaluated benchmark sub-space
(benchmarks/data/search_space_cpu*.csv, made by benchmarks/search_space_table.py): look-ups instead of
training, a budget of 10 % of the space, 20 seeds per strategy.

Reports mean ± std of the final normalized hypervolume (bounds fixed from the whole table; also as a fraction
of the table's own Pareto front), a one-sided Mann-Whitney U test of each strategy against `random` and of
`pareto-aging` against `nsga2`, and the anytime curves (PNG + table) under
benchmarks/results/search_efficiency.*.

Seeds. Strategy development used TUNING seeds only (0-99, 200-299, 400-499; `--tuning` reruns that study and
writes search_efficiency_tuning.*). The committed table uses the HELD-OUT seeds 300-319, which no tuning
touched; seeds 100-119 (the held-out set of earlier rounds, looked at many times since, so no longer held out)
are reported beside it for continuity.

    .venv/bin/python benchmarks/search_efficiency.py --tuning        # the tuning study (tuning seeds only)
    .venv/bin/python benchmarks/search_efficiency.py                 # held-out 300-319 (+ 100-119)
    .venv/bin/python benchmarks/search_efficiency.py --with-presets  # the same, seeded with the known designs
    .venv/bin/python benchmarks/search_efficiency.py --compute       # the compute axis (multi-fidelity)

The compute axis (`--compute`, search_efficiency_compute.*) replays on the rung table
(search_space_cpu_rungs.csv: val_bpb at 25 / 100 / 400 wsd steps) with one sequential worker and charges
every training run its optimizer steps (benchmarks/multifidelity_replay.py): hypervolume of the top-rung
(400-step) results against total training steps, for multi-fidelity pareto-aging and nsga2, the
single-fidelity strategies (400 steps per candidate) and Syne Tune's MOASHA (the optional extra `moasha`).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.pareto import HypervolumeSpace, HypervolumeTracker, pareto_front  # noqa: E402
from search.space import benchmark_space  # noqa: E402
from search.strategies import make_strategy  # noqa: E402

DATA = Path("benchmarks/data")
RESULTS = Path("benchmarks/results")
OBJECTIVES = ("val_bpb", "decode_ms")
HELD_OUT_OFFSET = 300  # seeds 300-319: evaluated once, after the strategy was settled on the tuning seeds
CONTINUITY_OFFSET = 100  # seeds 100-119: the earlier rounds' held-out set, reported for continuity
TUNING_OFFSETS = (0, 200, 400)  # 100 tuning seeds each; never overlaps HELD_OUT_OFFSET .. +19
TUNING_SEEDS = 100
# (strategy, options): nsga2 with a population of 12 (the issue asks for 10-12). pareto-aging's population and
# tournament size (6, 4) were chosen on seeds 0-19 in an earlier round and kept; its selection rule and
# mutation mix are the defaults (hypervolume contribution, adaptive mix), chosen on the tuning seeds
# (`--tuning`).
STRATEGIES = {
    "pareto-aging": {"population_size": 6, "sample_size": 4},
    "nsga2": {"population_size": 12},
    "random": {},
}
# The tuning study: pareto-aging's two changes, alone and together (a 2 x 2), against the baselines.
TUNING_VARIANTS = {
    "pareto-aging: crowding, uniform mix (before)": (
        "pareto-aging",
        {"population_size": 6, "sample_size": 4, "selection": "crowding", "adapt_mutations": False},
    ),
    "pareto-aging: hypervolume contribution, uniform mix": (
        "pareto-aging",
        {"population_size": 6, "sample_size": 4, "adapt_mutations": False},
    ),
    "pareto-aging: crowding, adaptive mix": (
        "pareto-aging",
        {"population_size": 6, "sample_size": 4, "selection": "crowding"},
    ),
    "pareto-aging: hypervolume contribution, adaptive mix (now the default)": (
        "pareto-aging",
        STRATEGIES["pareto-aging"],
    ),
    "nsga2": ("nsga2", STRATEGIES["nsga2"]),
    "random": ("random", {}),
}


def load_table() -> dict[str, dict[str, float]]:
    train = {r["layout_hash"]: r for r in csv.DictReader((DATA / "search_space_cpu.csv").open())}
    latency = {r["layout_hash"]: r for r in csv.DictReader((DATA / "search_space_cpu_latency.csv").open())}
    table = {}
    for h, row in train.items():
        if row["status"] == "completed" and h in latency:
            table[h] = {
                "val_bpb": float(row["val_bpb"]),
                "decode_ms": float(latency[h]["decode_ms_per_token"]),
            }
    return table


def preset_layouts(table: dict) -> list:
    """The known designs the engine seeds a search with (search.engine.initial_layouts), those in the
    table."""
    from search.config import SearchConfig
    from search.engine import initial_layouts

    config = SearchConfig.model_validate({"space": {"preset": "benchmark"}, "executor": "inline"})
    return [lo for lo in initial_layouts(config, benchmark_space(), None) if lo.content_hash in table]


def replay(
    name: str,
    options: dict,
    seed: int,
    budget: int,
    table: dict,
    hv_space: HypervolumeSpace,
    initial: list | None = None,
    on_cycle=None,
) -> list[float]:
    space = benchmark_space()
    strategy = make_strategy(name, space, objectives=OBJECTIVES, seed=seed, initial=initial or [], **options)
    tracker = HypervolumeTracker(hv_space)
    evaluated = 0
    while evaluated < budget:
        proposals = strategy.ask(min(4, budget - evaluated))  # cycles of 4, as with 4 workers
        if not proposals:
            break
        if on_cycle is not None:
            on_cycle(strategy, proposals)
        for proposal in proposals:
            values = table.get(proposal.layout.content_hash)
            strategy.tell(proposal.layout.content_hash, values)  # a layout missing from the table = failed
            tracker.record(None if values is None else [values[o] for o in OBJECTIVES])
            evaluated += 1
    return list(tracker.history)


def setup(budget_fraction: float):
    table = load_table()
    budget = max(1, round(budget_fraction * len(table)))
    points = [[v[o] for o in OBJECTIVES] for v in table.values()]
    lower = tuple(min(p[i] for p in points) for i in range(2))
    upper = tuple(max(p[i] for p in points) for i in range(2))
    hv_space = HypervolumeSpace(OBJECTIVES, lower, upper)
    best = hv_space.hypervolume([points[i] for i in pareto_front(points)])
    return table, budget, hv_space, best


def summarize(finals: dict[str, list[float]]) -> dict[str, dict]:
    from scipy.stats import mannwhitneyu

    out = {}
    for name, values in finals.items():
        entry = {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "finals": values,
        }
        if name != "random" and "random" in finals:
            entry["p_vs_random"] = float(mannwhitneyu(values, finals["random"], alternative="greater").pvalue)
        out[name] = entry
    if "pareto-aging" in finals and "nsga2" in finals:
        a, n = finals["pareto-aging"], finals["nsga2"]
        out["pareto-aging"]["p_vs_nsga2_greater"] = float(mannwhitneyu(a, n, alternative="greater").pvalue)
        out["pareto-aging"]["p_vs_nsga2_two_sided"] = float(
            mannwhitneyu(a, n, alternative="two-sided").pvalue
        )
    return out


def fmt_p(p) -> str:
    return "-" if p is None else f"{p:.2g}"


def result_table(summary: dict, best: float, options: dict) -> list[str]:
    lines = [
        "| strategy | options | final HV mean ± std | fraction of the best | Mann-Whitney vs random "
        "(one-sided p) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {json.dumps(options[name])} | {s['mean']:.4f} ± {s['std']:.4f} | "
            f"{s['mean'] / best:.3f} | {fmt_p(s.get('p_vs_random'))} |"
        )
    a = summary["pareto-aging"]
    lines += [
        "",
        f"pareto-aging vs nsga2 (Mann-Whitney): one-sided p (aging greater) = "
        f"{fmt_p(a['p_vs_nsga2_greater'])}, two-sided p = {fmt_p(a['p_vs_nsga2_two_sided'])}; "
        f"difference of means {a['mean'] - summary['nsga2']['mean']:+.4f}.",
    ]
    return lines


# ---- the tuning study (tuning seeds only) ------------------------------------------------------------------


def tuning(args) -> None:
    table, budget, hv_space, best = setup(args.budget_fraction)
    held_out = set(range(HELD_OUT_OFFSET, HELD_OUT_OFFSET + 20))
    sets = {f"{o}-{o + TUNING_SEEDS - 1}": list(range(o, o + TUNING_SEEDS)) for o in TUNING_OFFSETS}
    assert not held_out & {s for seeds in sets.values() for s in seeds}, (
        "tuning must not touch held-out seeds"
    )
    start = time.time()
    results: dict[str, dict[str, list[float]]] = {}
    for label, (name, options) in TUNING_VARIANTS.items():
        results[label] = {
            key: [replay(name, options, s, budget, table, hv_space)[-1] for s in seeds]
            for key, seeds in sets.items()
        }
        print(label, {k: round(statistics.mean(v), 4) for k, v in results[label].items()}, flush=True)

    # Which members become parents: an end of the population's front, an interior front member, or off it.
    def positions(selection: str) -> dict[str, int]:
        counts = {"front end": 0, "front interior": 0, "off the front": 0}

        def on_cycle(strategy, proposals):
            values = [strategy.objective_values(h) for h in strategy.population]
            front = [values[i] for i in pareto_front(values)]
            if not front:  # the initial population is still out for evaluation
                return
            ends = {min(front), min(front, key=lambda v: v[1])}
            for p in proposals:
                if p.parent_hash is None:
                    continue
                v = strategy.objective_values(p.parent_hash)
                counts[
                    "off the front"
                    if v not in front
                    else "front end"
                    if v in ends or len(front) <= 2
                    else "front interior"
                ] += 1

        for seed in sets[f"{TUNING_OFFSETS[1]}-{TUNING_OFFSETS[1] + TUNING_SEEDS - 1}"][:40]:
            replay(
                "pareto-aging",
                {**STRATEGIES["pareto-aging"], "selection": selection, "adapt_mutations": False},
                seed,
                budget,
                table,
                hv_space,
                on_cycle=on_cycle,
            )
        return counts

    parents = {sel: positions(sel) for sel in ("crowding", "hypervolume")}
    wall = time.time() - start
    lines = [
        "# Search efficiency: the tuning study (tuning seeds only)",
        "",
        "command: `.venv/bin/python benchmarks/search_efficiency.py --tuning`",
        "",
        f"budget {budget} evaluations on the {len(table)}-layout table; {TUNING_SEEDS} seeds per set, sets "
        f"{', '.join(sets)} (never the held-out seeds {HELD_OUT_OFFSET}-{HELD_OUT_OFFSET + 19}); "
        f"final normalized hypervolume, mean ± std (the table's own front scores {best:.4f}); "
        f"wall time {wall:.0f} s.",
        "",
        "| variant | " + " | ".join(f"seeds {k}" for k in sets) + " | all 300 tuning seeds |",
        "| --- | " + " | ".join("---" for _ in sets) + " | --- |",
    ]
    for label, per_set in results.items():
        pooled = [v for vals in per_set.values() for v in vals]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}" for v in per_set.values())
            + f" | {statistics.mean(pooled):.4f} ± {statistics.stdev(pooled):.4f} |"
        )
    lines += [
        "",
        "Parents chosen by pareto-aging's tournament (uniform mix, seeds "
        f"{TUNING_OFFSETS[1]}-{TUNING_OFFSETS[1] + 39}), by their place in the population's front (an end: "
        "the "
        "member best in one objective; a front of one or two members is all ends):",
        "",
        "| tie-break within a front | front end | front interior | off the front |",
        "| --- | --- | --- | --- |",
    ]
    for sel, c in parents.items():
        total = sum(c.values())
        lines.append(f"| {sel} | " + " | ".join(f"{c[k]} ({c[k] / total:.0%})" for k in c) + " |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search_efficiency_tuning.md").write_text(text)
    (RESULTS / "search_efficiency_tuning.json").write_text(
        json.dumps(
            {
                "budget": budget,
                "best_hv": best,
                "sets": {k: [v[0], v[-1]] for k, v in sets.items()},
                "variants": {
                    label: {
                        "strategy": TUNING_VARIANTS[label][0],
                        "options": TUNING_VARIANTS[label][1],
                        "per_set": {
                            k: {"mean": statistics.mean(v), "std": statistics.stdev(v)}
                            for k, v in per_set.items()
                        },
                        "pooled_mean": statistics.mean([x for v in per_set.values() for x in v]),
                    }
                    for label, per_set in results.items()
                },
                "parents": parents,
                "wall_s": wall,
            },
            indent=1,
        )
    )
    print(text)


# ---- the held-out benchmark --------------------------------------------------------------------------------

CHANGES = """## What changed in pareto-aging, and why

Two changes, both defaults of `pareto-aging` (so `hybridnas search run` and the service get them), both chosen
on the tuning seeds only (`search_efficiency_tuning.md`); population 6 / tournament 4 (chosen in an earlier
round on seeds 0-19) was kept, not re-tuned.

1. **Parent selection by hypervolume contribution** (`selection="hypervolume"`; `"crowding"` restores the rule
   before). The tournament still prefers the lowest Pareto rank; ties within a front are now broken by the
   member's exclusive hypervolume contribution to its front (SMS-EMOA's criterion; `search.pareto.
   rank_and_contribution`, moocore's `hv_contributions` in the space normalized by the population's own
   ranges, reference point 1.1) instead of NSGA-II's crowding distance. Crowding gives both ends of a front
   infinite distance, so the tournament almost always picked the smallest or the largest model ({crowd_ends}
   of parents were a front end on seeds {pos_seeds}); the hypervolume, which the search is judged on, is won
   where the front bends, and the contribution is exactly the area only that member holds ({hv_ends} front
   ends, the rest interior members).
2. **Adaptive mutation mix** (`adapt_mutations=True`, window 100 children, exploration share 0.2). The kind
   of the one-factor mutation (operator, ratio, FFN count, block counts, width) is drawn with weights
   proportional to each kind's smoothed success rate (1 + successes) / (2 + trials) over the recent children
   (a success: the child is feasible and no feasible population member dominates or equals it on arrival),
   mixed 80/20 with the uniform mix so that no kind ever drops out. Its effect here is small (see the 2 x 2
   below); it mainly trims the tail of seeds that stall.

Tuning numbers (final normalized hypervolume, mean over the 300 tuning seeds 0-99, 200-299, 400-499):

{tuning_table}

Also tried in this round, with prototype code (not committed) on tuning seeds 200-299 only, and dropped: never
picking the same parent twice in one cycle (1.137 against 1.151 for the rule before: with a population of 6 it
forces weak parents), ranking last the parents whose 3+ children were all dominated (1.144), 10 random layouts
before evolution starts instead of 6 (1.152), and, with contribution-based selection (1.162), evicting the
lowest-contribution member instead of the oldest when the whole population is on its front (1.161) and
population x tournament 6-20 x 3-8 (6 x 6: 1.168, 8 x 5: 1.165, 10 x 8: 1.165, 6 x 3: 1.157, 12 x 4: 1.148,
20 x 5: 1.083; the small populations are within noise of each other, so 6 x 4 was kept).
At a larger budget than the issue's (100 evaluations, 25 % of the table; seeds 0-99) nsga2 leads: 1.181 vs
1.175 for pareto-aging (population 20, tournament 5: the defaults; the rules before and now alike).
"""


# ---- the compute axis: multi-fidelity against single-fidelity and MOASHA, at equal training steps ----------

# label -> (kind, strategy): "mf" climbs the rungs, "sf" trains every candidate at the top rung.
COMPUTE_METHODS = {
    "MF pareto-aging": ("mf", "pareto-aging"),
    "MF nsga2": ("mf", "nsga2"),
    "SF pareto-aging": ("sf", "pareto-aging"),
    "SF nsga2": ("sf", "nsga2"),
    "SF random": ("sf", "random"),
    "MOASHA": ("moasha", None),
    "MOASHA, ranks as places": ("moasha-places", None),
}
COMPARED_AT = (0.25, 0.5, 0.75, 1.0)  # shares of the budget where the Mann-Whitney tests are made
# Successive halving's eta for the multi-fidelity rule and MOASHA alike: the 3, kept after the tuning
# study (`--compute-tuning`, tuning seeds only) compared 2-5.
COMPUTE_ETA = 3
COMPUTE_TUNING_ETAS = (2, 3, 4, 5)
REPORTED_AT = tuple(k / 8 for k in range(1, 9))
_TABLE_CACHE: dict = {}


def _compute_replay(label: str, seed: int, rungs_csv: str, budget: int, eta: int = COMPUTE_ETA) -> dict:
    """One replay (in a worker process): the curve's steps and hypervolume after each training run."""
    import multifidelity_replay as mf

    if rungs_csv not in _TABLE_CACHE:
        table, _ = mf.load_rung_table(Path(rungs_csv), DATA / "search_space_cpu_latency.csv")
        _TABLE_CACHE[rungs_csv] = (table, table.hypervolume_space())
    table, hv_space = _TABLE_CACHE[rungs_csv]
    kind, name = COMPUTE_METHODS[label]
    if kind == "mf":
        curve = mf.replay_multifidelity(name, STRATEGIES[name], seed, table, hv_space, budget, eta)
    elif kind == "sf":
        curve = mf.replay_single_fidelity(name, STRATEGIES[name], seed, table, hv_space, budget)
    else:
        curve = mf.replay_moasha(seed, table, hv_space, budget, places=kind == "moasha-places", eta=eta)
    return {
        "steps": curve.steps,
        "hv": curve.tracker.history,
        "runs_per_rung": curve.runs_per_rung,
        "missing": curve.missing,
    }


def _hv_at(run: dict, steps: int) -> float:
    import bisect

    done = bisect.bisect_right(run["steps"], steps)
    return run["hv"][done - 1] if done else 0.0


def _first_reach(runs: list[dict], target: float, grid: list[int]) -> int | None:
    """The smallest compute on the grid where the seeds' mean hypervolume reaches `target`."""
    return next((c for c in grid if statistics.mean(_hv_at(r, c) for r in runs) >= target), None)


@dataclass
class ComputeSetup:
    """The rung table a compute-axis run replays on, its budget and its hypervolume bounds."""

    rungs_csv: Path
    table: object  # multifidelity_replay.RungTable
    in_table: int
    n_space: int
    budget: int
    hv_space: HypervolumeSpace
    best: float
    grid: list[int]


def _replay_module():
    """benchmarks/multifidelity_replay.py, imported from beside this script."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import multifidelity_replay

    return multifidelity_replay


def _path_options(args, rungs_csv: Path) -> str:
    """The --rungs-table and --out-dir options of a compute run's command, where they are not the defaults."""
    return (f" --rungs-table {rungs_csv}" if rungs_csv != DATA / "search_space_cpu_rungs.csv" else "") + (
        f" --out-dir {args.out_dir}" if Path(args.out_dir) != RESULTS else ""
    )


def compute_setup(args) -> ComputeSetup:
    mf = _replay_module()
    rungs_csv = Path(args.rungs_table)
    table, in_table = mf.load_rung_table(rungs_csv, DATA / "search_space_cpu_latency.csv")
    # 10 % of the layouts a search can find results for: the space, once the table is complete.
    budget = round(args.budget_fraction * len(table.values)) * mf.run_cost(mf.TOP, continued=False)
    hv_space = table.hypervolume_space()
    points = table.top_points()
    best = hv_space.hypervolume([points[i] for i in pareto_front(points)])
    grid = list(range(mf.FIDELITY.rungs[0], budget + 1, mf.FIDELITY.rungs[0]))
    setup = ComputeSetup(rungs_csv, table, in_table, len(mf.space_layouts()), budget, hv_space, best, grid)
    print(
        f"rung table {rungs_csv}: {len(table.values)} layouts with all {len(mf.FIDELITY.rungs)} rungs "
        f"(of {in_table} in the table, {setup.n_space} in the space); budget {budget} steps",
        flush=True,
    )
    return setup


def _replay_all(jobs: list[tuple], rungs_csv: Path, budget: int, workers: int) -> dict[tuple, dict]:
    """`_compute_replay` of each (label, seed, eta) job, in `workers` processes."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {
            job: pool.submit(_compute_replay, job[0], job[1], str(rungs_csv), budget, job[2]) for job in jobs
        }
        return {job: future.result() for job, future in futures.items()}


def compute_tuning(args) -> None:
    """The compute axis's tuning study (tuning seeds only): MF pareto-aging at each eta of
    COMPUTE_TUNING_ETAS against SF pareto-aging; writes search_efficiency_compute_tuning.*."""
    setup = compute_setup(args)
    seeds = list(range(args.seeds))  # tuning seeds from 0 (the committed study: --seeds 40)
    assert not set(seeds) & set(range(HELD_OUT_OFFSET, HELD_OUT_OFFSET + 20)), "tuning touches held-out seeds"
    jobs = [("SF pareto-aging", s, COMPUTE_ETA) for s in seeds]
    jobs += [("MF pareto-aging", s, eta) for eta in COMPUTE_TUNING_ETAS for s in seeds]
    start = time.time()
    done = _replay_all(jobs, setup.rungs_csv, setup.budget, args.workers)
    wall = time.time() - start
    budget = setup.budget
    sf = [done[("SF pareto-aging", s, COMPUTE_ETA)] for s in seeds]
    target = statistics.mean(_hv_at(r, budget) for r in sf)
    shares = (0.25, 0.5, 1.0)
    rows = {}
    for eta in COMPUTE_TUNING_ETAS:
        runs = [done[("MF pareto-aging", s, eta)] for s in seeds]
        reach = _first_reach(runs, target, setup.grid)
        rows[eta] = {
            "reach_steps": reach,
            "reach_share": None if reach is None else reach / budget,
            "hv_mean_at": {
                str(f): statistics.mean(_hv_at(r, round(f * budget)) for r in runs) for f in shares
            },
            "runs_per_rung_mean": [statistics.mean(r["runs_per_rung"][i] for r in runs) for i in range(3)],
        }
    command = (
        f".venv/bin/python benchmarks/search_efficiency.py --compute-tuning --seeds {args.seeds} --workers "
        f"{args.workers} --budget-fraction {args.budget_fraction}" + _path_options(args, setup.rungs_csv)
    )
    lines = [
        "# Search efficiency on the compute axis: the tuning study (tuning seeds only)",
        "",
        f"command: `{command}` (wall time {wall:.0f} s; machine: 2-core AMD EPYC VM, 24 GiB, no GPU)",
        "",
        f"seeds {seeds[0]}-{seeds[-1]} (never the held-out {HELD_OUT_OFFSET}-{HELD_OUT_OFFSET + 19}); "
        f"{len(setup.table.values)} layouts with all three rungs; budget {budget} steps. SF pareto-aging's "
        f"final mean hypervolume on these seeds: {target:.4f}. MF pareto-aging's reach = the least compute "
        "where its mean hypervolume is at least that.",
        "",
        "| eta | reach (steps) | reach (share of budget) | "
        + " | ".join(f"mean hv at {f:.0%}" for f in shares)
        + " | runs per rung (25 / 100 / 400) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in shares) + " | --- |",
    ]
    for eta, row in rows.items():
        share = row["reach_share"]
        lines.append(
            f"| {eta} | {row['reach_steps'] if row['reach_steps'] is not None else '-'} | "
            + (f"{share:.0%}" if share is not None else "not reached")
            + " | "
            + " | ".join(f"{v:.4f}" for v in row["hv_mean_at"].values())
            + " | "
            + " / ".join(f"{v:.1f}" for v in row["runs_per_rung_mean"])
            + " |"
        )
    lines += ["", f"Kept for the held-out run (`--compute`): eta = {COMPUTE_ETA}."]
    text = "\n".join(lines) + "\n"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_efficiency_compute_tuning.md").write_text(text)
    facts = {"command": command, "wall_s": wall, "seeds": [seeds[0], seeds[-1]], "budget_steps": budget}
    (out / "search_efficiency_compute_tuning.json").write_text(
        json.dumps({**facts, "sf_final_mean": target, "etas": rows}, indent=1)
    )
    print(text)


def compute_axis(args) -> None:
    mf = _replay_module()

    try:
        import syne_tune  # noqa: F401
    except ImportError:
        raise SystemExit(
            "--compute replays MOASHA: install the optional extra (pip install -e '.[moasha]')"
        ) from None
    setup = compute_setup(args)
    rungs_csv, table, budget, hv_space = setup.rungs_csv, setup.table, setup.budget, setup.hv_space
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    start = time.time()
    jobs = [(label, seed, COMPUTE_ETA) for label in COMPUTE_METHODS for seed in seeds]
    done = _replay_all(jobs, rungs_csv, budget, args.workers)
    runs = {label: [done[(label, s, COMPUTE_ETA)] for s in seeds] for label in COMPUTE_METHODS}
    wall = time.time() - start
    summary = compute_summary(runs, budget, setup.grid)
    command = (
        f".venv/bin/python benchmarks/search_efficiency.py --compute --seeds {args.seeds} --seed-offset "
        f"{args.seed_offset} --workers {args.workers} --budget-fraction {args.budget_fraction}"
        + _path_options(args, rungs_csv)
    )
    facts = {
        "command": command,
        "wall_s": wall,
        "workers": args.workers,
        "rungs_table": str(rungs_csv),
        "layouts_all_rungs": len(table.values),
        "layouts_in_table": setup.in_table,
        "layouts_in_space": setup.n_space,
        "budget_steps": budget,
        "eta": COMPUTE_ETA,
        "seeds": [seeds[0], seeds[-1]],
        "best_hv": setup.best,
        "hv_bounds": {o: [lo, hi] for o, lo, hi in zip(OBJECTIVES, hv_space.lower, hv_space.upper)},
        "costs": {f"rung {r}": mf.run_cost(r, continued=r > 0) for r in range(len(mf.FIDELITY.rungs))},
        "moasha_milestones": mf.moasha_milestones(COMPUTE_ETA),
        "moasha_stop_rates": {
            "default priority": mf.stop_rates(places=False),
            "places": mf.stop_rates(places=True),
        },
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = compute_report(facts, summary)
    (out / "search_efficiency_compute.md").write_text(text)
    (out / "search_efficiency_compute.json").write_text(json.dumps({**facts, **summary}, indent=1))
    compute_plot(runs, setup.grid, setup.best, facts, out / "search_efficiency_compute.png")
    print(text)


def compute_summary(runs: dict[str, list[dict]], budget: int, grid: list[int]) -> dict:
    from scipy.stats import mannwhitneyu

    def at(label: str, c: int) -> list[float]:
        return [_hv_at(r, c) for r in runs[label]]

    reported = sorted({round(f * budget) for f in REPORTED_AT})
    methods = {
        label: {
            "strategy": COMPUTE_METHODS[label][1],
            "options": STRATEGIES.get(COMPUTE_METHODS[label][1] or "", {}),
            "hv_at": {
                str(c): {"mean": statistics.mean(at(label, c)), "std": statistics.stdev(at(label, c))}
                for c in reported
            },
            "finals": at(label, budget),
            "runs_per_rung_mean": [
                statistics.mean(r["runs_per_rung"][i] for r in rs) for i in range(len(rs[0]["runs_per_rung"]))
            ],
            "missing_mean": statistics.mean(r["missing"] for r in rs),
        }
        for label, rs in runs.items()
    }
    reach = {}
    for strategy in ("pareto-aging", "nsga2"):
        target = statistics.mean(at(f"SF {strategy}", budget))
        steps = _first_reach(runs[f"MF {strategy}"], target, grid)
        reach[strategy] = {
            "sf_final_mean": target,
            "mf_steps": steps,
            "share_of_budget": None if steps is None else steps / budget,
        }
    tests = {}
    for other in ("MOASHA", "MOASHA, ranks as places", "SF pareto-aging"):
        tests[other] = {
            str(round(f * budget)): float(
                mannwhitneyu(
                    at("MF pareto-aging", round(f * budget)),
                    at(other, round(f * budget)),
                    alternative="greater",
                ).pvalue
            )
            for f in COMPARED_AT
        }
    return {"methods": methods, "reach": reach, "mf_pareto_aging_greater_p": tests}


def compute_report(facts: dict, summary: dict) -> str:
    methods, reach, tests = summary["methods"], summary["reach"], summary["mf_pareto_aging_greater_p"]
    budget = facts["budget_steps"]
    reported = list(next(iter(methods.values()))["hv_at"])
    seeds = f"{facts['seeds'][0]}-{facts['seeds'][1]}"
    costs = facts["costs"]
    lines = [
        "# Search efficiency on the compute axis (multi-fidelity replay against the rung table)",
        "",
        f"command: `{facts['command']}` (wall time {facts['wall_s']:.0f} s, {facts['workers']} worker "
        "process(es) for the replays; machine: 2-core AMD EPYC VM, 24 GiB, no GPU)",
        "",
        f"table: `{facts['rungs_table']}`, {facts['layouts_all_rungs']} layouts with a result at all three "
        f"rungs (25 / 100 / 400 wsd steps; {facts['layouts_in_table']} layouts in the table, "
        f"{facts['layouts_in_space']} in the space; a layout without all three is a failed evaluation that "
        "costs nothing). Decode latency: `search_space_cpu_latency.csv`, measured once per layout.",
        "",
        f"compute: optimizer steps, one sequential worker; a rung-0 run costs {costs['rung 0']}, a promotion "
        f"continued from the lower rung's stable-phase checkpoint {costs['rung 1']} (to 100) and "
        f"{costs['rung 2']} (to 400), a single-fidelity candidate 400 (fresh). Budget {budget} steps = 10 % "
        "of the table's layouts with all three rungs x 400. Hypervolume of the 400-step results only "
        f"(bounds fixed from the table's 400-step results {facts['hv_bounds']}, reference point 1.1; the "
        f"table's own 400-step front scores {facts['best_hv']:.4f}); at compute c a replay counts only the "
        "runs finished within c steps.",
        "",
        f"seeds: {'held-out ' if facts['seeds'][0] == HELD_OUT_OFFSET else 'NOT the held-out set: '}{seeds} "
        f"({len(next(iter(methods.values()))['finals'])} per method). The strategies' options are the "
        "single-fidelity ones (chosen on the tuning seeds, see search_efficiency.md); the rungs are the "
        f"issue's; eta = {facts['eta']} (the multi-fidelity rule's and MOASHA's reduction factor alike) was "
        "chosen among 2-5 by the tuning study on seeds 0-39 (`--compute-tuning`, "
        "search_efficiency_compute_tuning.md); the harness was developed on tuning seeds 0-19 only.",
        "",
        "methods: MF = the engine's multi-fidelity rule (RungLadder: promote the first qualified "
        "candidate, higher rungs first, else ask the strategy for a new candidate at rung 0; the strategy "
        "is told rung 0 and updated on each promotion). SF = every candidate at 400 steps. MOASHA = Syne "
        "Tune 0.16.0's scheduler (grace 25, reduction factor = eta, max_t 400, time attribute = steps, both "
        "objectives minimized, non-dominated priority) over a categorical of the space's layouts; its "
        "uniform draws are redrawn when they repeat a layout; results reported at 25, 100 and 400 steps "
        f"(its milestones at this eta: {', '.join(map(str, facts['moasha_milestones']))}; a result is ranked "
        "at each milestone it has passed and not yet been ranked at; 400 = max_t ends the trial).",
        "",
        "## Hypervolume (top rung) against training steps, mean ± std over the seeds",
        "",
        "| method | options | " + " | ".join(f"{int(c)} steps" for c in reported) + " | runs per rung "
        "(mean: 25 / 100 / 400) |",
        "| --- | --- | " + " | ".join("---" for _ in reported) + " | --- |",
    ]
    for label, m in methods.items():
        lines.append(
            f"| {label} | {json.dumps(m['options']) if m['strategy'] else '-'} | "
            + " | ".join(f"{m['hv_at'][c]['mean']:.4f} ± {m['hv_at'][c]['std']:.4f}" for c in reported)
            + " | "
            + " / ".join(f"{v:.1f}" for v in m["runs_per_rung_mean"])
            + " |"
        )
    aging = reach["pareto-aging"]
    share = aging["share_of_budget"]
    lines += [
        "",
        f"## Targets (seeds {seeds})",
        "",
        f"- MF pareto-aging's mean hypervolume first reaches SF pareto-aging's final mean "
        f"({aging['sf_final_mean']:.4f}) at "
        + (
            f"{aging['mf_steps']} steps = {share:.0%} of the SF budget: "
            f"**{'met' if share <= 0.5 else 'not met'}** (goal <= 50 %)."
            if share is not None
            else "no compute within the budget: **not met**."
        ),
    ]
    for other in ("MOASHA", "MOASHA, ranks as places"):
        lines.append(
            f"- MF pareto-aging > {other} at equal compute (Mann-Whitney, one-sided p): "
            + ", ".join(f"{c} steps: p = {fmt_p(p)}" for c, p in tests[other].items())
            + f": **{'met' if tests[other][str(budget)] < 0.05 else 'not met'}** at the full budget "
            "(goal p < 0.05)."
        )
    rates = facts["moasha_stop_rates"]
    lines += [
        "",
        "MOASHA's rung ranking: Syne Tune 0.16.0's MOASHA reads `NonDominatedPriority(objectives)` as one "
        "priority per trial, but it returns the non-dominated sort's order (trial indices, best first), so "
        "a new result is judged by the index of whichever trial sorts last. Measured "
        "(`multifidelity_replay.stop_rates`, 200 random rungs of 3-29 results): a new result that dominates "
        f"every recorded one is stopped {rates['default priority'][0]:.0%} of the time (one dominated by "
        f"all: {rates['default priority'][1]:.0%}); with the sort's places as the priority (the same sort, "
        f"read per trial: `position_priority`) {rates['places'][0]:.0%} and {rates['places'][1]:.0%}. Both "
        "are reported: `MOASHA` as shipped, `MOASHA, ranks as places` as the scheduler is meant to work.",
        "",
        "Also measured: MF nsga2 first reaches SF nsga2's final mean "
        f"({reach['nsga2']['sf_final_mean']:.4f}) at "
        + (
            f"{reach['nsga2']['mf_steps']} steps ({reach['nsga2']['share_of_budget']:.0%})"
            if reach["nsga2"]["mf_steps"] is not None
            else "no compute within the budget"
        )
        + "; MF pareto-aging > SF pareto-aging (one-sided p): "
        + ", ".join(f"{c} steps: {fmt_p(p)}" for c, p in tests["SF pareto-aging"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def compute_plot(runs: dict[str, list[dict]], grid: list[int], best: float, facts: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG)")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, rs in runs.items():
        values = [[_hv_at(r, c) for r in rs] for c in grid]
        mean = [statistics.mean(v) for v in values]
        std = [statistics.stdev(v) for v in values]
        (line,) = ax.plot(grid, mean, label=label, linestyle="-" if label.startswith("MF") else "--")
        ax.fill_between(
            grid,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            alpha=0.12,
            color=line.get_color(),
        )
    ax.axhline(best, color="grey", linestyle=":", label="table's 400-step front")
    ax.set_xlabel("training steps spent (one worker)")
    ax.set_ylabel("normalized hypervolume at 400 steps (mean ± std)")
    ax.set_title(
        f"compute axis: {facts['layouts_all_rungs']} layouts, seeds {facts['seeds'][0]}-{facts['seeds'][1]}"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument(
        "--with-presets",
        action="store_true",
        help="seed every strategy with the engine's known designs (those in the table), as a real "
        "search does; the default replays start from random layouts only",
    )
    parser.add_argument(
        "--tuning",
        action="store_true",
        help="run the tuning study on the tuning seeds (0-99, 200-299, 400-499) instead",
    )
    parser.add_argument(
        "--compute",
        action="store_true",
        help="the compute axis: hypervolume at the top rung against training steps, multi-fidelity vs "
        "single-fidelity vs MOASHA, on the rung table (writes search_efficiency_compute.*)",
    )
    parser.add_argument(
        "--compute-tuning",
        action="store_true",
        help="the compute axis's tuning study: MF pareto-aging's eta on tuning seeds 0..SEEDS-1 "
        "(writes search_efficiency_compute_tuning.*)",
    )
    parser.add_argument("--rungs-table", default=str(DATA / "search_space_cpu_rungs.csv"), help="--compute")
    parser.add_argument("--seed-offset", type=int, default=HELD_OUT_OFFSET, help="--compute: first seed")
    parser.add_argument("--workers", type=int, default=2, help="--compute: replay processes")
    parser.add_argument("--out-dir", default=str(RESULTS), help="--compute: where the results go")
    args = parser.parse_args()
    if args.tuning:
        tuning(args)
        return
    if args.compute:
        compute_axis(args)
        return
    if args.compute_tuning:
        compute_tuning(args)
        return

    start = time.time()
    table, budget, hv_space, best = setup(args.budget_fraction)
    initial = preset_layouts(table) if args.with_presets else []
    runs = {}
    for offset in (HELD_OUT_OFFSET, CONTINUITY_OFFSET):
        curves = {
            name: [
                replay(name, opts, offset + seed, budget, table, hv_space, initial)
                for seed in range(args.seeds)
            ]
            for name, opts in STRATEGIES.items()
        }
        runs[offset] = (curves, summarize({name: [c[-1] for c in r] for name, r in curves.items()}))
    wall = time.time() - start
    curves, summary = runs[HELD_OUT_OFFSET]
    _, continuity = runs[CONTINUITY_OFFSET]
    seeds = lambda o: f"{o}..{o + args.seeds - 1}"  # noqa: E731
    command = (
        f".venv/bin/python benchmarks/search_efficiency.py --seeds {args.seeds} --budget-fraction "
        f"{args.budget_fraction}{' --with-presets' if args.with_presets else ''}"
    )
    lines = [
        "# Search efficiency (replay against the exhaustively evaluated benchmark sub-space)",
        "",
        f"command: `{command}` (wall time {wall:.0f} s for both seed sets, 2-core VM)",
        "",
        "initial population: "
        + (
            "the known designs " + ", ".join(lo.name for lo in initial) + ", then random"
            if initial
            else "random layouts only"
        ),
        "",
        f"table: {len(table)} layouts evaluated on this CPU (`benchmarks/data/search_space_cpu*.csv`); "
        f"budget {budget} evaluations; objectives {', '.join(OBJECTIVES)} (minimized); hypervolume "
        f"normalized to the table's bounds {dict(zip(OBJECTIVES, zip(hv_space.lower, hv_space.upper)))}, "
        "reference "
        f"point 1.1; the table's own Pareto front scores {best:.4f}. pareto-aging runs with its defaults "
        "(hypervolume-contribution selection, adaptive mutation mix) at the options shown.",
        "",
        f"## Held-out seeds {seeds(HELD_OUT_OFFSET)} ({args.seeds} per strategy, all measured in this run; "
        "never used for tuning)",
        "",
    ]
    lines += result_table(summary, best, STRATEGIES)
    lines += [
        "",
        f"## Seeds {seeds(CONTINUITY_OFFSET)} (the earlier rounds' held-out set, looked at many times "
        "since: for continuity only)",
        "",
    ]
    lines += result_table(continuity, best, STRATEGIES)
    lines += [
        "",
        "## Anytime curves, held-out seeds (mean normalized hypervolume after n evaluations)",
        "",
        "| n | " + " | ".join(curves) + " |",
        "| --- | " + " | ".join("---" for _ in curves) + " |",
    ]
    n_points = len(next(iter(curves.values()))[0])
    for n in sorted(set([1, 5, 10, 20, 30, n_points]) | set(range(0, n_points + 1, 10)) - {0}):
        if n <= n_points:
            lines.append(
                f"| {n} | "
                + " | ".join(f"{statistics.mean(c[n - 1] for c in runs_):.4f}" for runs_ in curves.values())
                + " |"
            )
    a, n2 = summary["pareto-aging"], summary["nsga2"]
    beats_random = a["p_vs_random"] < 0.05
    at_least_nsga2 = a["mean"] >= n2["mean"]
    lines += [
        "",
        "## Targets (held-out seeds)",
        "",
        f"- pareto-aging beats random (one-sided Mann-Whitney p = {fmt_p(a['p_vs_random'])}): "
        f"**{'met' if beats_random else 'not met'}**.",
        f"- pareto-aging's mean is >= nsga2's ({a['mean']:.4f} vs {n2['mean']:.4f}): "
        f"**{'met' if at_least_nsga2 else 'not met'}** (Mann-Whitney aging > nsga2: one-sided p = "
        f"{fmt_p(a['p_vs_nsga2_greater'])}; the target is on the means, the test says how sure the ordering "
        "is).",
    ]
    stall = 1.10  # a run that ends below this never reached the fast end of the front (see the note below)

    def reading(label: str, sm: dict) -> str:
        med = {k: statistics.median(v["finals"]) for k, v in sm.items()}
        stalls = {k: sum(f < stall for f in v["finals"]) for k, v in sm.items()}
        return (
            f"{label}: means {sm['pareto-aging']['mean']:.4f} (pareto-aging) vs {sm['nsga2']['mean']:.4f} "
            f"(nsga2), medians {med['pareto-aging']:.4f} vs {med['nsga2']:.4f}; runs ending below {stall}: "
            + ", ".join(f"{k} {n}/{len(sm[k]['finals'])}" for k, n in stalls.items())
            + f" (pareto-aging's worst {min(sm['pareto-aging']['finals']):.3f}, nsga2's "
            f"{min(sm['nsga2']['finals']):.3f})."
        )

    p2 = a["p_vs_nsga2_two_sided"]
    verdict = (
        f"pareto-aging is ahead of nsga2 beyond chance (two-sided p = {fmt_p(p2)})"
        if p2 < 0.05 and a["mean"] > n2["mean"]
        else f"with {args.seeds} seeds per strategy pareto-aging and nsga2 are a "
        f"statistical tie (two-sided p = {fmt_p(p2)})"
    )
    lines += [
        "",
        f"Reading (held-out seeds): {verdict}; the means are decided by the few runs that stall. (Over "
        "the 300 tuning seeds, random initial populations, pareto-aging leads by +0.014: "
        "`search_efficiency_tuning.md`; those seeds chose the strategy.)",
        "",
        "- " + reading(f"held-out {seeds(HELD_OUT_OFFSET)}", summary),
        "- "
        + reading(f"continuity {seeds(CONTINUITY_OFFSET)}", continuity)
        + (
            " The mean target is not met on these seeds."
            if continuity["pareto-aging"]["mean"] < continuity["nsga2"]["mean"]
            else ""
        ),
    ]
    if not args.with_presets:
        lines += [
            "- A stalled run never reaches the fastest layouts (4 operators, 0.287-0.298 ms/token), which "
            "hold the largest share of the hypervolume: the two stalled pareto-aging runs of seeds 100-119 "
            "(seeds 100 and 117) never evaluated anything faster than 0.43 ms/token."
        ]
    tuning_file = RESULTS / "search_efficiency_tuning.json"
    if tuning_file.exists() and not args.with_presets:
        study = json.loads(tuning_file.read_text())
        rows = [
            "| variant | " + " | ".join(f"seeds {k}" for k in study["sets"]) + " | pooled |",
            "| --- | " + " | ".join("---" for _ in study["sets"]) + " | --- |",
        ]
        for label, v in study["variants"].items():
            rows.append(
                f"| {label} | "
                + " | ".join(f"{s['mean']:.4f} ± {s['std']:.4f}" for s in v["per_set"].values())
                + f" | {v['pooled_mean']:.4f} |"
            )
        share = {sel: c["front end"] / sum(c.values()) for sel, c in study["parents"].items()}
        first = TUNING_OFFSETS[1]
        lines += [
            "",
            CHANGES.format(
                crowd_ends=f"{share['crowding']:.0%}",
                hv_ends=f"{share['hypervolume']:.0%}",
                pos_seeds=f"{first}-{first + 39}",
                tuning_table="\n".join(rows),
            ).rstrip(),
        ]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "search_efficiency_presets" if args.with_presets else "search_efficiency"
    (RESULTS / f"{stem}.md").write_text(text)
    strip = lambda s: {k: {**v, "options": STRATEGIES[k]} for k, v in s.items()}  # noqa: E731
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(
            {
                "budget": budget,
                "table_size": len(table),
                "best_hv": best,
                "command": command,
                "wall_s": wall,
                "held_out_seeds": [HELD_OUT_OFFSET, HELD_OUT_OFFSET + args.seeds - 1],
                "summary": strip(summary),
                "continuity_seeds": [CONTINUITY_OFFSET, CONTINUITY_OFFSET + args.seeds - 1],
                "continuity_summary": strip(continuity),
            },
            indent=1,
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, runs_ in curves.items():
            mean = [statistics.mean(c[i] for c in runs_) for i in range(n_points)]
            ax.plot(range(1, n_points + 1), mean, label=name)
        ax.axhline(best, color="grey", linestyle="--", label="table's Pareto front")
        ax.set_xlabel("evaluations")
        ax.set_ylabel("normalized hypervolume (mean of seeds)")
        ax.set_title(
            f"search efficiency: {len(table)}-layout CPU sub-space, held-out seeds {seeds(HELD_OUT_OFFSET)}"
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{stem}.png", dpi=110)
    except ImportError:
        print("(matplotlib not installed: no PNG)")
    print(text)


if __name__ == "__main__":
    main()

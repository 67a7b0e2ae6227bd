"""A study's report (the JSON `hybridnas study ... --json` prints, the API's StudyDetail) as Markdown tables
and a plot, for committing under benchmarks/results/studies/. Every kind: depth-width (the law, the
extrapolation, the budget choices, the points; loss and latency against depth), fidelity (the rank
correlations; short against long), ablation (each arm's paired differences) and verdict (each budget; both
fronts on one latency axis).

    python benchmarks/studies/report.py STUDY.json --out benchmarks/results/studies/depth_width_cpu \\
        --command "hybridnas study depth-width benchmarks/studies/depth_width_cpu.yaml --json" --machine "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONSTANTS = ("l0", "a", "alpha", "b", "beta")


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _ci(ci, digits: int = 4) -> str:
    return "-" if not ci else f"{ci[0]:.{digits}g} – {ci[1]:.{digits}g}"


def markdown(detail: dict, command: str, machine: str) -> str:
    config = detail["config"]
    lines = [
        f"# {detail.get('name') or detail['kind']} (study {detail['id']}, {detail['status']})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Ran {detail.get('started_at')} to {detail.get('finished_at')} (UTC), {detail['n_evaluations']} "
        f"evaluations in {len(detail.get('runs', []))} runs  ",
    ]
    if "proxy" in config:
        lines.append(f"Proxy: {json.dumps(config['proxy'])}  ")
    body = {
        "depth-width": _depth_width_md,
        "fidelity": _fidelity_md,
        "ablation": _ablation_md,
        "verdict": _verdict_md,
    }[detail["kind"]](detail)
    return "\n".join(lines + [""] + body) + "\n"


def _depth_width_md(detail: dict) -> list[str]:
    result = detail.get("result") or {}
    lines = [
        f"Grid: depths {detail['config']['depths']}, widths {detail['config']['widths']}, pattern "
        f"{' '.join(detail['config']['pattern'])}",
        "",
    ]
    law = result.get("law")
    if law:
        intervals = result.get("intervals", {})
        lines += ["## The fitted law: L(D, W) = L0 + a·D^-α + b·W^-β (val_bpb)", ""]
        lines += ["| constant | value | 95 % bootstrap interval |", "| --- | --- | --- |"]
        for name in CONSTANTS:
            lo, hi = intervals.get(name, (None, None))
            lines.append(f"| {name} | {_num(law[name])} | {_num(lo)} – {_num(hi)} |")
        lines += ["", f"Fit rmse {_num(law['rmse'])} over {law['n_points']} points.", ""]
    ex = result.get("extrapolation")
    if ex:
        lines += [
            f"## Extrapolation: fit on D <= {ex['fit_max_depth']} and W <= {ex['fit_max_width']}, "
            "predict the rest",
            "",
            f"Max relative error **{100 * ex['max_relative_error']:.2f} %**, mean "
            f"{100 * ex['mean_relative_error']:.2f} % over {len(ex['held_out'])} held-out points (the paper: "
            "within 5.3 %, on perplexity at 1B scale).",
            "",
            "| depth | width | measured | predicted | error |",
            "| --- | --- | --- | --- | --- |",
        ]
        for h in ex["held_out"]:
            error = abs(h["predicted"] - h["measured"]) / h["measured"]
            lines.append(
                f"| {h['depth']:g} | {h['width']:g} | {h['measured']:.4f} | {h['predicted']:.4f} | "
                f"{100 * error:.2f} % |"
            )
        lines.append("")
    if result.get("budgets"):
        lines += ["## Recommended (D, W) per decode budget", ""]
        lines += ["| budget (ms/token) | by the law | by measured loss |", "| --- | --- | --- |"]
        for b in result["budgets"]:
            cells = []
            for pick in (b["by_law"], b["by_measured_loss"]):
                cells.append(
                    "none meets it"
                    if pick is None
                    else f"D{pick['depth']:g} W{pick['width']:g}: {pick['loss']:.4f} "
                    f"({pick['latency_ms']:.3f} ms)"
                )
            lines.append(f"| {b['budget_ms']} | {cells[0]} | {cells[1]} |")
        lines.append("")
    lines += ["## Points", "", "| depth | width | status | val_bpb | law | decode ms/token | parameters |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for p in result.get("points", []):
        lines.append(
            f"| {p['depth']} | {p['width']} | {p['status']} | {_num(p['val_bpb'])} | "
            f"{_num(p.get('predicted_val_bpb'))} | {_num(p['decode_ms'])} | {p['n_params'] or '-'} |"
        )
    return lines


def _fidelity_md(detail: dict) -> list[str]:
    result = detail.get("result") or {}
    config = detail["config"]
    lines = [
        f"Corpus `{config['data']['corpus']}`, tokenizer `{config['data']['tokenizer']}`; "
        f"{config['n_layouts']} layouts; the long training is {config['long_factor']}× the proxy.",
        "",
        "| comparison | layouts | Spearman | 95 % interval | Kendall | 95 % interval |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, key in (
        ("short against long", "short_vs_long"),
        ("seed-noise ceiling (two seeds of the short)", "seed_noise_ceiling"),
        ("within ±25 % of the median size", "within_param_band"),
    ):
        st = result.get(key) or {}
        lines.append(
            _row(
                label,
                st.get("n", 0),
                _num(st.get("spearman"), 3),
                _ci(st.get("spearman_ci95"), 3),
                _num(st.get("kendall"), 3),
                _ci(st.get("kendall_ci95"), 3),
            )
        )
    lines += ["", f"Target (Spearman >= 0.9, interval's lower end >= 0.75): {result.get('target_met')}.", ""]
    lines += [
        "| layout | operators | parameters | short | short, seed 2 | long |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result.get("rows", []):
        lines.append(
            f"| {r['name']} | {r['operators']} | {r['n_params'] or '-'} | {_num(r['short_val_bpb'])} | "
            f"{_num(r['short_seed_val_bpb'])} | {_num(r['long_val_bpb'])} |"
        )
    return lines


def _ablation_md(detail: dict) -> list[str]:
    result = detail.get("result") or {}
    lines = [
        f"Layouts {', '.join(result.get('layouts', []))}; seeds {result.get('seeds')}; the meta-tokens arm "
        f"prepends {result.get('meta_tokens')}. Differences are arm minus baseline (lower val_bpb is "
        "better), paired by (layout, seed); intervals are Student-t 95 %. The step-time overhead is the "
        "baseline's training throughput over the arm's, minus one.",
        "",
        "| arm | pairs | mean Δ val_bpb | 95 % interval | what it says | step-time overhead (95 % int.) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm, r in result.get("arms", {}).items():
        d, o = r["val_bpb_difference"], r["step_time_overhead"]
        overhead = "-" if o.get("mean") is None else f"{100 * o['mean']:+.1f} %"
        if o.get("ci95"):
            overhead += f" ({100 * o['ci95'][0]:+.1f} – {100 * o['ci95'][1]:+.1f} %)"
        lines.append(_row(arm, d["n"], _num(d.get("mean")), _ci(d.get("ci95")), r["effect"], overhead))
    lines += ["", "| arm | layout | seed | baseline val_bpb | arm val_bpb | Δ | step-time overhead |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for arm, r in result.get("arms", {}).items():
        for p in r["pairs"]:
            overhead = "-" if p["step_time_overhead"] is None else f"{100 * p['step_time_overhead']:+.1f} %"
            lines.append(
                _row(
                    arm,
                    p["layout"],
                    p["seed"],
                    f"{p['baseline_val_bpb']:.4f}",
                    f"{p['arm_val_bpb']:.4f}",
                    f"{p['difference']:+.4f}",
                    overhead,
                )
            )
    return lines


def _side(point: dict | None) -> tuple[str, str]:
    if point is None:
        return "none meets it", "-"
    seeds = point.get("seeds") or {}
    value = seeds["mean"] if seeds.get("n") else point["val_bpb"]
    sd = f" ± {seeds['sd']:.4f}" if seeds.get("sd") is not None else ""
    law = " *(law)*" if point.get("source") == "law" else ""
    return f"{point['name']}{law} ({point['decode_ms']:.3f} ms)", f"{value:.4f}{sd} (n={seeds.get('n', 0)})"


def _verdict_md(detail: dict) -> list[str]:
    result = detail.get("result") or {}
    s = result.get("summary", {})
    lines = [
        f"Search {result.get('search_id')} against depth-width study {result.get('depth_width_id')}: at each "
        "latency budget, the best searched layout that meets it against the best Llama grid point that meets "
        "it. Values are means over seeds (the first run plus the reruns; ± their sd); the gain is the "
        "Llama's mean minus the hybrid's (positive: the hybrid is better), ± its standard error; beyond 2 "
        "standard errors it is an outcome, else within seed noise.",
        "",
        f"**Hybrid better at {s.get('hybrid_better', 0)} of {s.get('budgets_judged', 0)} budgets judged, "
        f"Llama better at {s.get('llama_better', 0)}, within seed noise at {s.get('within_noise', 0)}; no "
        f"Llama meets {s.get('no_llama_meets', 0)}.**",
        "",
        "| budget (ms/token) | best hybrid | val_bpb | best Llama | val_bpb | gain | outcome |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result.get("budgets", []):
        gain = "-" if r["gain"] is None else f"{r['gain']:+.4f} ± {_num(r['gain_se'], 2)}"
        lines.append(
            f"| {r['budget_ms']:.3f} | {' | '.join(_side(r['hybrid']))} | {' | '.join(_side(r['llama']))} | "
            f"{gain} | {r['outcome']} |"
        )
    return lines


def plot(detail: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = {
        "depth-width": _plot_depth_width,
        "fidelity": _plot_fidelity,
        "ablation": _plot_ablation,
        "verdict": _plot_verdict,
    }[detail["kind"]](detail, plt)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_fidelity(detail: dict, plt):
    rows = [
        r
        for r in detail["result"]["rows"]
        if r["short_val_bpb"] is not None and r["long_val_bpb"] is not None
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot([r["short_val_bpb"] for r in rows], [r["long_val_bpb"] for r in rows], "o")
    left.set(xlabel="short proxy val_bpb", ylabel="long training val_bpb", title="short against long")
    seeded = [r for r in rows if r["short_seed_val_bpb"] is not None]
    right.plot([r["short_val_bpb"] for r in seeded], [r["short_seed_val_bpb"] for r in seeded], "o")
    right.set(xlabel="short proxy val_bpb", ylabel="another seed", title="the seed-noise ceiling")
    return fig


def _plot_ablation(detail: dict, plt):
    arms = detail["result"]["arms"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, r in enumerate(arms.values()):
        diffs = [p["difference"] for p in r["pairs"]]
        ax.plot([i] * len(diffs), diffs, "o", alpha=0.7)
        d = r["val_bpb_difference"]
        if d.get("ci95"):
            ax.errorbar(
                [i + 0.15],
                [d["mean"]],
                yerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]],
                fmt="s",
                color="black",
                capsize=4,
            )
    ax.axhline(0, linestyle="--", linewidth=0.8, color="grey")
    ax.set_xticks(range(len(arms)), [a.replace("_", " ") for a in arms])
    ax.set(ylabel="Δ val_bpb (arm − baseline)", title="paired by seed; mean with 95 % interval")
    return fig


def _plot_verdict(detail: dict, plt):
    result = detail["result"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("hybrid_front", "searched front"), ("llama_front", "depth–width Llamas (front)")):
        front = result.get(key, [])
        ax.step(
            [p["decode_ms"] for p in front], [p["val_bpb"] for p in front], "o-", where="post", label=label
        )
    ax.set(xlabel="decode ms/token", ylabel="val_bpb", title="both fronts on one latency axis")
    ax.legend()
    return fig


def _plot_depth_width(detail: dict, plt):
    import numpy as np

    result = detail["result"]
    points = [p for p in result["points"] if p["val_bpb"] is not None]
    law = result.get("law")
    widths = sorted({p["width"] for p in points})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for w in widths:
        mine = sorted((p for p in points if p["width"] == w), key=lambda p: p["depth"])
        depths = [p["depth"] for p in mine]
        (dots,) = left.plot(depths, [p["val_bpb"] for p in mine], "o", label=f"W {w}")
        if law:
            xs = np.linspace(min(depths), max(depths), 50)
            ys = law["l0"] + law["a"] * xs ** -law["alpha"] + law["b"] * w ** -law["beta"]
            left.plot(xs, ys, ":", color=dots.get_color())
        right.plot(depths, [p["decode_ms"] for p in mine], "o-", label=f"W {w}")
    for budget in detail["config"].get("budgets_ms", []):
        right.axhline(budget, linestyle="--", linewidth=0.8, color="grey")
    left.set(xlabel="depth (layers)", ylabel="val_bpb", title="loss and the fitted law (dotted)")
    right.set(xlabel="depth (layers)", ylabel="decode ms/token", title="decode latency; budgets dashed")
    left.legend(), right.legend()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_json", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path stem: writes .md, .json and .png")
    parser.add_argument("--command", required=True)
    parser.add_argument("--machine", required=True)
    args = parser.parse_args()
    detail = json.loads(args.study_json.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(detail, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(detail, args.command, args.machine))
    plot(detail, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

"""A study's report (the JSON `hybridnas study ... --json` prints, the API's StudyDetail) as Markdown tables
and a plot, for committing under benchmarks/results/studies/.

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


def markdown(detail: dict, command: str, machine: str) -> str:
    result = detail.get("result") or {}
    lines = [
        f"# {detail.get('name') or detail['kind']} (study {detail['id']}, {detail['status']})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Config: depths {detail['config']['depths']}, widths {detail['config']['widths']}, pattern "
        f"{' '.join(detail['config']['pattern'])}, proxy {json.dumps(detail['config']['proxy'])}",
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
    return "\n".join(lines) + "\n"


def plot(detail: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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

"""CPU latency: repeatability of the profiler and error of the look-up-table predictor (prints a markdown
table, writes benchmarks/results/latency_cpu.md).

(a) Repeatability: decode ms/token (batch 1, prompt 128, fp32 eager, 1 thread) of each scaled-down preset,
    measured in two passes over the presets (separate `profile` calls, minutes apart); target: within 5 %.
(b) Predictor: build a LUT (latency/lut.py) at the given widths and contexts, then predict and measure
held-out
    layouts — random layouts of `cpu_space(widths=...)` over the measured mixers plus the scaled-down presets,
    none of which is used to build the table — at the measured contexts, and a few at an interpolated context
    and (where a multiple of the head dim lies between two measured widths) an interpolated width;
    target: median |relative error| <= 10 %.

All measurements run with torch.set_num_threads(1) (LatencyConfig.threads = 1). The CPU share column is
process CPU time / wall time during a measurement: below ~0.95 the machine was busy and wall-clock latency is
inflated by waiting for the core (the profiler measures wall time, as a deployment would).

    .venv/bin/python benchmarks/latency_cpu.py                 # the full run (~3-6 min on an idle core)
    .venv/bin/python benchmarks/latency_cpu.py --quick         # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latency.lut import DEFAULT_CPU_DIMS, build_lut, confirm, save_lut  # noqa: E402
from latency.profiler import LatencyConfig, _cpu_name, profile  # noqa: E402
from models.hybrid import HybridLM  # noqa: E402
from search.layout import Layout  # noqa: E402
from search.operators import OPERATORS  # noqa: E402
from search.presets import CPU_PRESETS, get_preset  # noqa: E402
from search.space import cpu_space  # noqa: E402

ALL_OPERATORS = ("attention", "swa", "mamba2", "deltanet", "gated_deltanet", "ffn")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _timed(fn):
    """Run fn(); return (its result, CPU share = process CPU time / wall time)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)


def repeatability(args, config: LatencyConfig) -> list[dict]:
    models = {name: HybridLM(get_preset(name), config.vocab_size) for name in CPU_PRESETS}
    rows = {name: {"layout": name, "operators": len(get_preset(name).operators)} for name in CPU_PRESETS}
    for pass_no in (1, 2):
        for name, model in models.items():
            result, share = _timed(lambda model=model: profile(model, config, "cpu"))
            stat = result.decode_ms_per_token
            rows[name][f"ms{pass_no}"], rows[name][f"iqr{pass_no}"] = stat.median, stat.iqr
            rows[name][f"share{pass_no}"] = share
            print(
                f"  (a) pass {pass_no} {name}: {stat.median:.3f} ms/token (IQR {stat.iqr:.3f}, "
                f"CPU share {share:.2f})",
                flush=True,
            )
    for row in rows.values():
        row["rel_diff"] = abs(row["ms2"] - row["ms1"]) / min(row["ms1"], row["ms2"])
    return list(rows.values())


def held_out_layouts(args, mixers: tuple[str, ...]) -> list[tuple[str, Layout, int, bool]]:
    """(label, layout, context, interpolated?) for every held-out measurement."""
    contexts = args.contexts
    space = cpu_space(widths=args.widths, mixers=mixers, dims=dict(DEFAULT_CPU_DIMS))
    rng = random.Random(args.seed)
    seen, out = set(), []
    while len(out) < args.held_out:
        lo = space.sample_layout(rng)
        if lo in seen:
            continue
        seen.add(lo)
        out.append((f"random-{len(out)}", lo, contexts[len(out) % len(contexts)], False))
    for i, name in enumerate(CPU_PRESETS):
        lo = get_preset(name)
        if not set(lo.operators) <= set(args.operators) or not min(args.widths) <= lo.d_model <= max(
            args.widths
        ):
            print(f"  (b) skipping preset {name}: outside the table (operators or width)")
            continue
        out.append((name, lo, contexts[i % len(contexts)], False))
    if len(contexts) > 1:  # a few at a context between two measured ones
        mid = (contexts[0] + contexts[1]) // 2
        for j in range(args.interp):
            lo = space.sample_layout(rng)
            out.append((f"random-interp-ctx-{j}", lo, mid, True))
        if "nemotron-flash-1b-mini" in [label for label, *_ in out]:
            out.append(("nemotron-flash-1b-mini", get_preset("nemotron-flash-1b-mini"), mid, True))
    # a few at a width between two measured ones (a multiple of the head dim), where there is one
    head_dim = DEFAULT_CPU_DIMS["head_dim"]
    between = [
        w for w0, w1 in zip(args.widths, args.widths[1:]) for w in range(w0 + 1, w1) if w % head_dim == 0
    ]
    if between:
        wspace = cpu_space(widths=tuple(between), mixers=mixers, dims=dict(DEFAULT_CPU_DIMS))
        for j in range(args.interp):
            lo = wspace.sample_layout(rng)
            out.append((f"random-interp-width-{j}", lo, contexts[j % len(contexts)], True))
    return out


def predictor_error(args, config: LatencyConfig) -> tuple[dict, list[dict]]:
    """Each held-out layout is measured once before the LUT is built and once after (through `confirm`); its
    measured latency is the mean of the two, which cancels a linear drift of the machine over the build."""
    mixers = tuple(op for op in args.operators if OPERATORS[op].kind == "mixer")
    held_out = held_out_layouts(args, mixers)
    before = []
    for label, lo, context, _ in held_out:
        model = HybridLM(lo, config.vocab_size)
        result, share = _timed(
            lambda model=model, context=context: profile(model, config.replace(prompt_len=context), "cpu")
        )
        before.append((result.decode_ms_per_token.median, share))
        print(
            f"  (b) before the LUT: {label} d={lo.d_model} ctx={context}: "
            f"{result.decode_ms_per_token.median:.3f} ms/token (CPU share {share:.2f})",
            flush=True,
        )
    print(
        f"  (b) building the LUT: widths {args.widths}, contexts {args.contexts}, {len(args.operators)} "
        "operators",
        flush=True,
    )
    lut = build_lut(
        args.widths,
        args.contexts,
        args.operators,
        DEFAULT_CPU_DIMS,
        config,
        "cpu",
        copies=args.copies,
        rounds=args.rounds,
        progress=lambda m: print("     ", m, flush=True),
    )
    if args.lut_out:
        save_lut(lut, args.lut_out)
    rows = []
    for (label, lo, context, interp), (first, share1) in zip(held_out, before):
        cfg = {**lut["config"], "prompt_len": context}
        (pred, second, _), share2 = _timed(lambda lo=lo, cfg=cfg: confirm(lo, lut, cfg, "cpu"))
        measured = (first + second) / 2
        rel = (pred - measured) / measured
        rows.append(
            {
                "layout": label,
                "pattern": lo.compact(),
                "d_model": lo.d_model,
                "operators": len(lo.operators),
                "context": context,
                "interp": interp,
                "predicted": pred,
                "before": first,
                "after": second,
                "measured": measured,
                "rel": rel,
                "drift": (second - first) / first,
                "share": min(share1, share2),
            }
        )
        print(
            f"  (b) {label} d={lo.d_model} ctx={context}: predicted {pred:.3f}, measured {first:.3f} / "
            f"{second:.3f} "
            f"({rel:+.1%}, CPU share {min(share1, share2):.2f})",
            flush=True,
        )
    return lut, rows


def markdown(
    args,
    command: str,
    machine: str,
    load: tuple,
    rep: list[dict],
    lut: dict,
    rows: list[dict],
    seconds: float,
) -> str:
    lines = [
        "# CPU latency: profiler repeatability and LUT predictor error",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores; "
        f"total run {seconds:.0f} s  ",
        f"Date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        "",
        f"Settings: batch 1, fp32 eager, torch.set_num_threads(1), decode {args.decode_tokens} tokens x "
        f"{args.repeats} repeats (median), 1 warm-up; vocab 257. CPU share = process CPU time / wall time "
        "during the measurement (below ~0.95: the core was shared, wall-clock latency inflated).",
        "",
        "## (a) Repeatability (two separate `profile` calls per preset, prompt 128; target within 5 %)",
        "",
        "| preset | ops | pass 1 ms/token (IQR) | pass 2 ms/token (IQR) | rel. difference | CPU share 1 / 2 "
        "|",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rep:
        lines.append(
            f"| {r['layout']} | {r['operators']} | {r['ms1']:.3f} ({r['iqr1']:.3f}) | {r['ms2']:.3f} "
            f"({r['iqr2']:.3f}) | {r['rel_diff']:.1%} | {r['share1']:.2f} / {r['share2']:.2f} |"
        )
    if rep:
        worst = max(r["rel_diff"] for r in rep)
        lines += [
            "",
            f"Largest difference {worst:.1%}; {sum(r['rel_diff'] <= 0.05 for r in rep)}/{len(rep)} "
            f"within 5 %.",
        ]
    lines += [
        "",
        "## (b) LUT predictor on held-out layouts (target median |error| <= 10 %)",
        "",
        f"LUT: widths {list(lut['widths'])}, contexts {list(lut['contexts'])}, operators "
        f"{', '.join(lut['operators'])}; {lut['copies']} copies x {lut['rounds']} rounds per cell; built in "
        f"{lut['build_seconds']:.0f} s. Cost of a block = (model of `copies` blocks - model with no blocks) "
        "/ copies; overhead = the model with no blocks (embedding, final norm, LM head, argmax, loop).",
        "",
        "Each layout is measured before the LUT is built and again after it (via `latency.lut.confirm`); "
        "the error is against the mean of the two (drift = after / before - 1).",
        "",
        "| layout | d_model | ops | context | predicted ms/token | measured before / after | error | drift "
        "| CPU share |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ctx = f"{r['context']}{' (interp.)' if r['interp'] else ''}"
        lines.append(
            f"| {r['layout']} `{r['pattern']}` | {r['d_model']} | {r['operators']} | {ctx} | "
            f"{r['predicted']:.3f} | {r['before']:.3f} / {r['after']:.3f} | {r['rel']:+.1%} | "
            f"{r['drift']:+.1%} | {r['share']:.2f} |"
        )
    grid = [abs(r["rel"]) for r in rows if not r["interp"]]
    every = [abs(r["rel"]) for r in rows]
    if grid and every:
        lines += [
            "",
            "Rows marked (interp.) are at a context (`random-interp-ctx-*`, and the second "
            "nemotron-flash-1b-mini row) or a width (`random-interp-width-*`) between measured ones.",
            "",
            f"Median |error|: {statistics.median(grid):.1%} over {len(grid)} layouts at measured widths and "
            f"contexts; "
            f"{statistics.median(every):.1%} over all {len(every)} (max {max(every):.1%}; mean signed "
            f"{statistics.mean(r['rel'] for r in rows):+.1%}). Median |drift| before -> after: "
            f"{statistics.median(abs(r['drift']) for r in rows):.1%}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=_ints, default=(64, 96, 128))
    parser.add_argument("--contexts", type=_ints, default=(128, 512))
    parser.add_argument("--operators", type=lambda s: tuple(s.split(",")), default=ALL_OPERATORS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--held-out", type=int, default=10, help="random held-out layouts (presets are added)"
    )
    parser.add_argument(
        "--interp",
        type=int,
        default=2,
        help="random layouts at an interpolated context (and as "
        "many at an interpolated width, where one exists)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-repeatability", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="small smoke run (2 widths, 1 context, 8 layouts)"
    )
    parser.add_argument("--lut-out", type=Path, default=None, help="also save the LUT here")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "latency_cpu.md"
    )
    args = parser.parse_args()
    if args.quick:
        args.widths, args.contexts, args.repeats, args.decode_tokens = (64, 128), (128,), 3, 32
        args.rounds, args.held_out, args.interp = 2, 6, 0
        args.operators = ("attention", "mamba2", "deltanet", "ffn")
    torch.set_num_threads(1)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    machine = (
        f"{_cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, 1 thread"
    )
    config = LatencyConfig(
        prompt_len=128,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        warmup=1,
        threads=1,
        throughput=False,
    )
    load0, started = os.getloadavg()[0], time.perf_counter()
    print(f"{machine}; load average {load0:.2f}", flush=True)
    rep = [] if args.skip_repeatability else repeatability(args, config)
    lut, rows = predictor_error(args, config)
    text = markdown(
        args, command, machine, (load0, os.getloadavg()[0]), rep, lut, rows, time.perf_counter() - started
    )
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

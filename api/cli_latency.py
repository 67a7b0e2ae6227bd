"""`hybridnas latency ...`: build a latency look-up table on this device, predict a layout's decode latency.

    hybridnas latency build-lut --out lut.json --widths 64,96,128 --contexts 128,512 \
        --operators attention,swa,mamba2,deltanet,gated_deltanet,ffn --repeats 5 --threads 1
    hybridnas latency predict nemotron-flash-1b-mini --lut lut.json --context 512 [--target-ms 3 --widths
    64,96,128]

`predict` needs no torch (search.latency_model is pure Python); `build-lut` imports torch when it runs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from search.latency_model import LatencyTable
from search.layout import Layout, LayoutError
from search.presets import resolve_layout

latency_app = typer.Typer(
    help="Latency look-up tables: build one on this device, predict from one.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(width=max(120, Console().width))
err_console = Console(stderr=True, soft_wrap=True)  # messages stay one line each (greppable)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise typer.BadParameter(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise typer.BadParameter(f"{what}: give at least one positive integer")
    return values


# A LatencyConfig field -> the build-lut option that sets it (errors name the option).
_OPTION_OF = {
    "decode_tokens": "--decode-tokens",
    "repeats": "--repeats",
    "threads": "--threads",
    "dtype": "--dtype",
    "vocab_size": "--vocab-size",
}


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _fail(message: str) -> None:
    err_console.print(f"[red]error[/red] {message}")
    raise typer.Exit(1)


@latency_app.command("build-lut")
def build_lut_cmd(
    out: Path = typer.Option(..., "--out", help="where to write the table (JSON, written atomically)"),
    widths: str = typer.Option("64,96,128", help="d_model values, comma-separated"),
    contexts: str = typer.Option("128,512", help="prompt lengths before decoding, comma-separated"),
    operators: str = typer.Option(
        "attention,swa,mamba2,deltanet,gated_deltanet,ffn", help="operators to measure, comma-separated"
    ),
    repeats: int = typer.Option(5, help="timed decode repeats per measurement"),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="tokens decoded per repeat"),
    threads: int = typer.Option(1, help="CPU threads (ignored on GPU)"),
    copies: int = typer.Option(
        4, help="blocks of one operator per measured model (cost = difference / copies)"
    ),
    rounds: int = typer.Option(3, help="alternating rounds per (width, context); each cell is the median"),
    vocab_size: int = typer.Option(257, "--vocab-size", help="vocabulary of the LM head in the overhead"),
    head_dim: int = typer.Option(
        32, "--head-dim", help="attention/DeltaNet head dim (heads = d_model / head_dim)"
    ),
    kv_group: int = typer.Option(2, "--kv-group", help="query heads per KV head (at least)"),
    mamba_head_dim: int = typer.Option(32, "--mamba-head-dim"),
    mamba_d_state: int = typer.Option(32, "--mamba-d-state"),
    swa_window: int = typer.Option(64, "--swa-window"),
    ffn_ratio: float = typer.Option(3.0, "--ffn-ratio"),
    size_levels_mb: str = typer.Option(
        "auto",
        "--size-levels-mb",
        help="weight sizes (MB) of the memory-"
        "hierarchy size curve, comma-separated; 'auto' (8,16,32 on CPU, none on "
        "GPU) or 'none' (a plain sum of block costs)",
    ),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16"),
    device: str = typer.Option(None, help="cpu or cuda[:N] (default: cuda if available)"),
) -> None:
    """Measure per-operator decode ms/token at each width and context on this device; write the table.

    Each measured (width, context) cell is saved at once to OUT.cells.jsonl: after Ctrl-C (exit 130) or a
    crash, the same command measures only the missing cells (cells measured under other settings, device or
    dtype are never reused). Once the table is written its cells leave the file (removed when empty)."""
    from pydantic import ValidationError

    from api.progress import progress_bar
    from latency.lut import (  # torch is imported here, not for `predict`
        CellStore,
        build_lut,
        cells_path,
        save_lut,
    )
    from latency.profiler import LatencyConfig

    base_dims = {
        "head_dim": head_dim,
        "kv_group": kv_group,
        "mamba_head_dim": mamba_head_dim,
        "mamba_d_state": mamba_d_state,
        "swa_window": swa_window,
        "ffn_ratio": ffn_ratio,
    }
    ops = [op.strip() for op in operators.split(",") if op.strip()]
    levels = None
    if size_levels_mb.strip().lower() == "none":
        levels = ()
    elif size_levels_mb.strip().lower() != "auto":
        try:
            levels = tuple(float(x) for x in size_levels_mb.split(",") if x.strip())
        except ValueError:
            raise typer.BadParameter(
                f"--size-levels-mb: expected numbers, 'auto' or 'none', got {size_levels_mb!r}"
            ) from None
    try:
        config = LatencyConfig(
            decode_tokens=decode_tokens,
            repeats=repeats,
            threads=threads,
            dtype=dtype,
            vocab_size=vocab_size,
            throughput=False,
        )
    except ValidationError as exc:
        from api.errors import validation_errors

        for error in validation_errors(list(exc.errors())):
            err_console.print(
                f"[red]error[/red] {_OPTION_OF.get(error['field'], error['field'])}: {error['msg']}"
            )
        raise typer.Exit(2) from None
    width_list, context_list = _ints(widths, "widths"), _ints(contexts, "contexts")
    cells = cells_path(out)
    counts = {"done": 0, "total": 0}
    started = time.monotonic()
    fields = {"cell": "-"} if err_console.is_terminal else {"cell": "-", "eta": "-"}
    try:
        with progress_bar("measuring cells", total=None, fields=fields, console=err_console) as update:
            first = {"done": None}

            def on_cell(done: int, total: int, record: dict) -> None:
                counts.update(done=done, total=total)
                if first["done"] is None:
                    first["done"] = done
                    update(completed=done, total=total)
                    return
                measured = done - first["done"]
                left = (time.monotonic() - started) / measured * (total - done)
                changed = {"cell": f"d_model {record['d_model']} context {record['context']}"}
                if "eta" in fields:
                    changed["eta"] = _duration(left)
                update(completed=done, total=total, **changed)

            lut = build_lut(
                width_list,
                context_list,
                ops,
                base_dims,
                config,
                device,
                copies=copies,
                rounds=rounds,
                size_levels_mb=levels,
                progress=lambda m: err_console.print(f"[dim]{m}[/dim]", highlight=False),
                cells_file=cells,
                on_cell=on_cell,
            )
        save_lut(lut, out)
        CellStore(cells).discard(lut["cell_keys"])  # the table holds them now (other settings' cells stay)
    except (ValueError, LayoutError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        err_console.print(
            f"[yellow]interrupted[/yellow]: {counts['done']} of {counts['total'] or '?'} cells are kept in "
            f"{cells}; rerun the same command to measure only the rest",
            highlight=False,
        )
        raise typer.Exit(130) from None
    fp = lut["device_fingerprint"]
    table = Table(
        title=f"decode ms/token per block — {fp.get('device')} ({fp.get('dtype')}, {fp.get('method')}, "
        f"threads {fp.get('threads')})"
    )
    table.add_column("operator")
    table.add_column("d_model", justify="right")
    for context in lut["contexts"]:
        table.add_column(f"ctx {context}", justify="right")
    cells = {(e["operator"], e["d_model"], e["context"]): e["decode_ms"] for e in lut["entries"]}
    cells.update({("(overhead)", e["d_model"], e["context"]): e["decode_ms"] for e in lut["overhead"]})
    for op in ["(overhead)", *lut["operators"]]:
        for width in lut["widths"]:
            table.add_row(op, str(width), *(f"{cells[(op, width, c)]:.4f}" for c in lut["contexts"]))
    console.print(table)
    if lut["size_curve"]:
        curve = Table(title="size factor (multiplies the sum of block costs; by model weight bytes)")
        for col in ("d_model", "context", "blocks", "weight MB", "factor (fit)", "measured"):
            curve.add_column(col, justify="right")
        for row in lut["size_curve"]:
            curve.add_row(
                str(row["d_model"]),
                str(row["context"]),
                str(row["n_blocks"]),
                f"{row['weight_bytes'] / 1e6:.1f}",
                f"{row['factor']:.3f}",
                f"{row['factor_measured']:.3f}",
            )
        console.print(curve)
    console.print(
        f"wrote {out} ({len(lut['entries'])} entries, {lut['build_seconds']:.1f} s, "
        f"fingerprint {lut['fingerprint_hash'][:12]})"
    )


@latency_app.command("predict")
def predict_cmd(
    layout: str = typer.Argument(..., help="a preset name or a layout file"),
    lut: Path = typer.Option(..., "--lut", help="a table written by build-lut"),
    context: int = typer.Option(
        None, "--context", help="prompt length before decoding (default: the table's smallest context)"
    ),
    target_ms: float = typer.Option(
        None,
        "--target-ms",
        help="also report the largest width meeting this decode ms/token target (the paper's width rule)",
    ),
    widths: str = typer.Option(None, help="candidate widths for --target-ms (default: the table's widths)"),
    as_json: bool = typer.Option(False, "--json", help="print the breakdown as JSON"),
) -> None:
    """Predict a layout's decode ms/token from a latency table (sum of per-block costs + overhead)."""
    try:
        table = LatencyTable.load(lut)
        lo = resolve_layout(layout)
        ctx = context if context is not None else table.contexts()[0]
        breakdown = table.breakdown(lo, ctx)
        best = None
        if target_ms is not None:
            candidates = _ints(widths, "widths") if widths else table.widths()
            best = table.largest_width_meeting(lo, target_ms, candidates, ctx, _table_dims_fn(table, lo))
    except (ValueError, LayoutError) as exc:
        _fail(str(exc))
    if as_json:
        breakdown["largest_width_meeting"] = best if target_ms is not None else None
        sys.stdout.write(json.dumps(breakdown, indent=1) + "\n")
        return
    fp = table.device_fingerprint
    result = Table(
        title=f"{lo.name or layout}: d_model {lo.d_model}, context {ctx} — table from "
        f"{fp.get('device', '?')} ({fp.get('dtype', '?')}, {fp.get('method', '?')}, "
        f"threads {fp.get('threads', '?')})"
    )
    for col in ("operator", "count", "ms each", "ms total"):
        result.add_column(col, justify="left" if col == "operator" else "right")
    result.add_row("(overhead)", "1", f"{breakdown['overhead_ms']:.4f}", f"{breakdown['overhead_ms']:.4f}")
    for op, row in sorted(breakdown["operators"].items()):
        result.add_row(op, str(row["count"]), f"{row['each_ms']:.4f}", f"{row['total_ms']:.4f}")
    if breakdown["size_factor"] != 1.0:
        result.add_row(
            f"(size factor x{breakdown['size_factor']:.3f} at {breakdown['weight_bytes'] / 1e6:.1f} MB, "
            "in the totals)",
            "",
            "",
            "",
        )
    result.add_row(
        "[bold]total[/bold]", str(len(lo.operators)), "", f"[bold]{breakdown['total_ms']:.4f}[/bold]"
    )
    console.print(result)
    console.print(f"predicted decode: {breakdown['total_ms']:.4f} ms/token")
    if target_ms is not None:
        console.print(f"largest width meeting {target_ms} ms/token: {best if best is not None else 'none'}")


def _table_dims_fn(table: LatencyTable, layout: Layout):
    """Width -> dims as the table was built: heads follow the width (head_dim and KV grouping of the
    table's dims at its widths), everything else as measured."""
    from search.space import SearchSpace

    rows = table.to_dict()["dims"]
    if not rows:
        return None
    ref = rows[-1]
    kv_group = max(1, ref["n_heads"] // ref["n_kv_heads"])
    dims = {k: v for k, v in ref.items() if k not in ("d_model", "n_heads", "n_kv_heads", "tied_embeddings")}
    dims["kv_group"] = kv_group
    space = SearchSpace(mixers=tuple(sorted(set(layout.mixers))), widths=tuple(table.widths()), dims=dims)
    return space._dims_for

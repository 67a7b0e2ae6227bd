"""Build a latency look-up table (LUT) on this device: the decode ms/token of ONE block of each operator type
at each width and context, plus the per-model overhead, so that the search predicts a candidate's latency by a
sum (`search.latency_model.LatencyTable`) instead of measuring it (method.md section 4: "Latency comes from a
pre-measured look-up table").

How a cell is measured (every number comes from `latency.profiler.profile`, so it is the same metric, method
and dtype as a whole-model measurement — on GPU the whole decode step in one CUDA graph):

    empty(d, c)  = decode ms/token of a HybridLM at width d with NO blocks: embedding, final norm, LM head at
                   the config's vocabulary, greedy argmax and the decode loop = the per-model overhead
    k_copies     = the same model with `copies` pre-norm residual blocks of one operator
    cost(op,d,c) = (k_copies - empty) / copies

`rounds` rounds alternate the empty model and every operator at a (width, context); each cell is the median of
its per-round estimates, which keeps a burst of background load from landing on one operator only. Prefill ms
(of a `context`-token prompt) is recorded the same way.

Size curve (CPU default; `size_levels_mb=()` turns it off, the GPU default): a block's cost above is measured
in a model small enough for the CPU caches, but a deep model streams its weights from further out and each
block gets slower (measured on a 2-core EPYC: +25 % at 11 MB of weights, +60 % at 20 MB). So each round also
times a reference block — every measured mixer followed by an FFN — repeated n times, with n chosen to reach
each size level, and stores factor(bytes) = (ms(n blocks) - overhead) / (n * sum of the block's costs); the
predictor multiplies the sum of block costs by the factor at the layout's weight bytes
(search/latency_model.py).

Imports only the standard library, torch and project modules (a GPU machine may have nothing else).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from latency.profiler import (
    LatencyConfig,
    device_fingerprint,
    fingerprint_hash,
    profile,
    resolve_dtype,
    resolve_method,
)
from models.hybrid import Block, HybridLM
from models.registry import BUILDERS
from search.latency_model import LUT_VERSION, LatencyTable, model_weight_bytes
from search.layout import Layout
from search.operators import OPERATORS
from search.space import SearchSpace

# The scaled-down presets' dims (search/presets.py `_MINI_DIMS`): heads of 32 follow the width.
DEFAULT_CPU_DIMS: dict[str, Any] = {
    "head_dim": 32,
    "kv_group": 2,
    "mamba_head_dim": 32,
    "mamba_d_state": 32,
    "swa_window": 64,
}
# Weight-byte levels of the size curve on CPU (the reference model is always measured at 1 block too).
DEFAULT_CPU_SIZE_LEVELS_MB = (8, 16, 32)
_MAX_REFERENCE_OPERATORS = 128  # the layout limit; also bounds the time of the largest reference model
_ELEMENT_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
# Config keys that must agree between a table and a direct measurement for the two to be comparable.
_MATCHING_KEYS = ("decode_tokens", "warmup", "dtype", "method", "threads", "vocab_size")


def dims_for_widths(base_dims: dict, widths: Iterable[int]) -> Callable[[int], dict]:
    """Width -> layout dims, as the search space derives them (n_heads = d_model // head_dim, KV heads by
    `kv_group`); raises ValueError naming the width if one cannot form a valid layout."""
    space = SearchSpace(mixers=("attention",), widths=tuple(int(w) for w in widths), dims=dict(base_dims))
    return space._dims_for


def _as_config(config: Any) -> LatencyConfig:
    if config is None:
        return LatencyConfig(throughput=False)
    if isinstance(config, dict):
        config = LatencyConfig(**{k: v for k, v in config.items() if k in LatencyConfig.model_fields})
    if not isinstance(config, LatencyConfig):
        raise TypeError("config must be a LatencyConfig or a dict of its fields")
    return config.replace(throughput=False)


def _model(layout: Layout, operators: list[str], vocab_size: int, backend: str) -> HybridLM:
    """A HybridLM at `layout`'s dims whose blocks are exactly `operators` (possibly none)."""
    torch.manual_seed(0)
    model = HybridLM(layout, vocab_size, backend)
    model.blocks = nn.ModuleList(Block(op, layout, backend) for op in operators)
    model._init_weights(0.02)
    return model


def _layout_dims(layout: Layout) -> dict:
    data = layout.to_dict()
    for key in ("operators", "name", "vocab_size"):
        data.pop(key, None)
    return data


def build_lut(
    widths: Iterable[int],
    contexts: Iterable[int],
    operators: Iterable[str],
    base_dims: dict | None = None,
    config: Any = None,
    device: str | torch.device | None = None,
    *,
    copies: int = 4,
    rounds: int = 3,
    dims_fn: Callable[[int], dict] | None = None,
    backend: str = "auto",
    size_levels_mb: Iterable[float] | None = None,
    progress: Callable[[str], None] | None = None,
    cells_file: str | Path | None = None,
    on_cell: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Measure the LUT on `device` (default: cuda if available, else cpu). Returns the JSON-able table.

    widths: d_model values; contexts: prompt lengths before decoding; operators: names from search.operators;
    base_dims: dims other than the width (default DEFAULT_CPU_DIMS; heads follow the width unless `dims_fn`
    is given); config: a LatencyConfig (or dict) — its prompt_len is replaced by each context, throughput off.
    size_levels_mb: weight sizes of the size curve (None: DEFAULT_CPU_SIZE_LEVELS_MB on CPU, none on GPU;
    () for none: the predictor is then a plain sum).
    cells_file: resume from (and save each measured cell to) this JSON-lines file (`CellStore`): only the
    cells it lacks under these same settings are measured. on_cell(done, total, record): after each cell
    (and once at the start, with the resumed count and an empty record).
    """
    widths = sorted({int(w) for w in widths})
    contexts = sorted({int(c) for c in contexts})
    operators = list(dict.fromkeys(operators))
    if not widths or widths[0] <= 0:
        raise ValueError("widths: give at least one positive width")
    if not contexts or contexts[0] <= 0:
        raise ValueError("contexts: give at least one positive context")
    if not operators:
        raise ValueError("operators: give at least one operator")
    for op in operators:
        if op not in OPERATORS or op not in BUILDERS:
            raise ValueError(f"operators: unknown operator {op!r} (known: {', '.join(OPERATORS)})")
    if copies < 1 or rounds < 1:
        raise ValueError("copies and rounds must be at least 1")
    base_dims = dict(DEFAULT_CPU_DIMS if base_dims is None else base_dims)
    dims_fn = dims_fn or dims_for_widths(base_dims, widths)
    config = _as_config(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = progress or (lambda message: None)
    if size_levels_mb is None:
        size_levels_mb = DEFAULT_CPU_SIZE_LEVELS_MB if device.type == "cpu" else ()
    size_levels_mb = sorted({float(level) for level in size_levels_mb})

    # Hold the configured thread count for the whole build, so that the fingerprint (which the profiler takes
    # after restoring the caller's threads) records the threads the measurements ran with.
    previous_threads = torch.get_num_threads()
    if config.threads is not None and device.type == "cpu":
        torch.set_num_threads(config.threads)
    try:
        return _build(
            widths,
            contexts,
            operators,
            base_dims,
            config,
            device,
            copies,
            rounds,
            dims_fn,
            backend,
            size_levels_mb,
            say,
            CellStore(cells_file) if cells_file is not None else None,
            on_cell,
        )
    finally:
        torch.set_num_threads(previous_threads)


@dataclass
class _Cell:
    """One (width, context) cell's measurements over every round: the empty model's decode and prefill ms,
    each operator's per-block (decode, prefill) estimates, and the size factors by reference-block count."""

    base_decode: list[float] = field(default_factory=list)
    base_prefill: list[float] = field(default_factory=list)
    per_block: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    factors: dict[int, list[float]] = field(default_factory=dict)
    fingerprint: dict | None = None


def _measure_cell(
    empty, models: dict, ref_models: dict, operators, reference, cfg, device, rounds: int, copies: int
) -> _Cell:
    cell = _Cell(per_block={op: ([], []) for op in operators}, factors={n: [] for n in ref_models})
    for rnd in range(rounds):
        result = profile(empty, cfg, device)
        cell.fingerprint = cell.fingerprint or result.fingerprint
        t0, p0 = result.decode_ms_per_token.median, result.prefill_ms.median
        cell.base_decode.append(t0)
        cell.base_prefill.append(p0)
        shift = rnd % len(operators)  # rotate the order: no operator always right after the baseline
        for op in operators[shift:] + operators[:shift]:
            result = profile(models[op], cfg, device)
            cell.per_block[op][0].append((result.decode_ms_per_token.median - t0) / copies)
            cell.per_block[op][1].append((result.prefill_ms.median - p0) / copies)
        block_ms = sum(cell.per_block[op][0][-1] for op in reference)
        for n, model in ref_models.items():
            result = profile(model, cfg, device)
            if block_ms > 0:
                cell.factors[n].append((result.decode_ms_per_token.median - t0) / (n * block_ms))
    return cell


def _size_rows(cell: _Cell, width: int, context: int, levels: dict[int, int]) -> list[dict]:
    measured = [(n, statistics.median(values)) for n, values in cell.factors.items() if values]
    # A bigger working set is never faster: the stored curve is the non-decreasing fit (pool adjacent
    # violators) of the measured factors, which also damps the noise of a busy machine.
    return [
        {
            "d_model": width,
            "context": context,
            "n_blocks": n,
            "weight_bytes": levels[n],
            "factor": round(max(fit, 1e-3), 6),
            "factor_measured": round(raw, 6),
        }
        for (n, raw), fit in zip(measured, _non_decreasing([f for _, f in measured]))
    ]


def _entry_rows(cell: _Cell, width: int, context: int, say) -> list[dict]:
    rows = []
    for op, (decode, prefill) in cell.per_block.items():
        value = statistics.median(decode)
        rows.append(
            {
                "operator": op,
                "d_model": width,
                "context": context,
                "decode_ms": round(max(value, 0.0), 6),
                "prefill_ms": round(max(statistics.median(prefill), 0.0), 6),
                "spread_ms": round(max(decode) - min(decode), 6),
            }
        )
        if value <= 0:
            say(
                f"warning: {op} at d_model={width}, context={context} measured {value:.4f} ms "
                f"(noise above its cost); stored as 0"
            )
    return rows


def _say_cell(cell: _Cell, width: int, context: int, levels: dict[int, int], say) -> None:
    costs = ", ".join(f"{op} {statistics.median(d):.4f}" for op, (d, _) in cell.per_block.items())
    sizes = ", ".join(
        f"{levels[n] / 1e6:.1f} MB x{statistics.median(v):.2f}" for n, v in cell.factors.items() if v
    )
    say(
        f"d_model={width} context={context}: overhead {statistics.median(cell.base_decode):.4f} ms, {costs}"
        + (f"; size factor {sizes}" if levels else "")
    )


# The format of a cells file's records: bump when what a stored cell means changes (older cells are then
# never reused).
CELL_FORMAT = 1


class CellStore:
    """Measured (width, context) cells, one JSON line each, appended (flushed and synced) as soon as a cell
    is measured: an interrupted build keeps every finished cell and a rerun measures only the missing ones.
    A cell is reused only under the same key (`cell_key`: every setting and the device fingerprint), so cells
    measured under other settings are never reused (they stay in the file, ignored). A torn last line (a
    kill in the middle of a write) is skipped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        """Key -> record, of every complete line."""
        cells: dict[str, dict] = {}
        if not self.path.exists():
            return cells
        with self.path.open() as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("format") == CELL_FORMAT and "key" in record:
                    cells[record["key"]] = record
        return cells

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as fh:
            if fh.tell() > 0:  # end a torn last line first, so this record is a line of its own
                with self.path.open("rb") as check:
                    check.seek(-1, os.SEEK_END)
                    if check.read(1) != b"\n":
                        fh.write(b"\n")
            fh.write((json.dumps({"format": CELL_FORMAT, **record}, sort_keys=True) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())

    def discard(self, keys: Iterable[str]) -> None:
        """Drop these cells (a finished table holds them), keeping the cells of other settings; the file is
        removed when none are left. Rewritten atomically."""
        drop = set(keys)
        if not self.path.exists():
            return
        with self.path.open() as fh:
            kept = [line for line in fh if _line_key(line) not in (None, *drop)]
        if not kept:
            self.path.unlink(missing_ok=True)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _line_key(line: str) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a torn line: dropped with the cells of the finished table
    return record.get("key") if isinstance(record, dict) else None


def cells_path(out: str | Path) -> Path:
    """The cells file beside a table being built (`lut.json` -> `lut.json.cells.jsonl`)."""
    out = Path(out)
    return out.with_name(out.name + ".cells.jsonl")


def cell_key(settings: dict, width: int, context: int, dims: dict) -> str:
    """The content hash of what one cell's numbers depend on: the build's settings (config, operators,
    copies, rounds, size levels, backend, device and its fingerprint, dtype), the width's layout dims and
    the context (not the other widths and contexts: a cell measured in a smaller grid is the same cell)."""
    payload = {"format": CELL_FORMAT, **settings, "d_model": width, "context": context, "dims": dims}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _build(
    widths,
    contexts,
    operators,
    base_dims,
    config,
    device,
    copies,
    rounds,
    dims_fn,
    backend,
    size_levels_mb,
    say,
    store: CellStore | None = None,
    on_cell: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Measure every (width, context) cell not in `store` under the same key, saving each as it is measured,
    and assemble the table (in width, then context order: the same table whichever cells were resumed)."""
    dtype = resolve_dtype(config, device)
    element_bytes = _ELEMENT_BYTES[dtype]
    started = time.perf_counter()
    config_dict = config.to_dict()
    config_dict.pop("prompt_len")
    # taken while the configured threads are held (build_lut), as each measurement's own fingerprint is
    planned_fingerprint = device_fingerprint(device, dtype, resolve_method(config, device))
    settings = {
        "version": LUT_VERSION,
        "config": config_dict,
        "operators": operators,
        "copies": copies,
        "rounds": rounds,
        "backend": backend,
        "size_levels_mb": size_levels_mb,
        "device": str(device),
        "element_bytes": element_bytes,
        "fingerprint_hash": fingerprint_hash(planned_fingerprint),
    }
    stored = store.load() if store is not None else {}
    shell_ops = list(
        dict.fromkeys(["deltanet", *operators])
    )  # a mixer, so the dims carrier is a valid layout
    reference = _reference_block(operators)
    grid = []  # (width, layout, dims row, [(context, key)])
    for width in widths:
        layout = Layout.from_dict({"operators": shell_ops, **dims_fn(width), "d_model": width})
        dims_row = {"d_model": width, **{k: v for k, v in _layout_dims(layout).items() if k != "d_model"}}
        grid.append(
            (width, layout, dims_row, [(c, cell_key(settings, width, c, dims_row)) for c in contexts])
        )
    records = {key: stored[key] for *_, cells in grid for _, key in cells if key in stored}
    total, reused_seconds = len(widths) * len(contexts), sum(r["seconds"] for r in records.values())
    resumed = len(records)
    if resumed:
        say(f"resuming: {resumed} of {total} cells already measured")
    if on_cell is not None:
        on_cell(len(records), total, {})
    for width, layout, _, cells in grid:
        pending = [(c, key) for c, key in cells if key not in records]
        if not pending:
            continue  # every context of this width resumed: its models are not even built
        empty = _model(layout, [], config.vocab_size, backend)
        models = {op: _model(layout, [op] * copies, config.vocab_size, backend) for op in operators}
        levels = _reference_levels(layout, reference, size_levels_mb, config.vocab_size, element_bytes)
        ref_models = {n: _model(layout, reference * n, config.vocab_size, backend) for n in levels}
        for context, key in pending:
            cell_started = time.perf_counter()
            cell = _measure_cell(
                empty,
                models,
                ref_models,
                operators,
                reference,
                config.replace(prompt_len=context),
                device,
                rounds,
                copies,
            )
            record = {
                "key": key,
                "d_model": width,
                "context": context,
                "fingerprint": cell.fingerprint,
                "seconds": round(time.perf_counter() - cell_started, 3),
                "overhead": {
                    "d_model": width,
                    "context": context,
                    "vocab_size": config.vocab_size,
                    "decode_ms": round(statistics.median(cell.base_decode), 6),
                    "prefill_ms": round(statistics.median(cell.base_prefill), 6),
                },
                "entries": _entry_rows(cell, width, context, say),
                "size_curve": _size_rows(cell, width, context, levels),
            }
            if store is not None:
                store.append(record)
            records[key] = record
            _say_cell(cell, width, context, levels, say)
            if on_cell is not None:
                on_cell(len(records), total, record)
        del models, empty, ref_models
    ordered = [records[key] for *_, cells in grid for _, key in cells]
    fingerprint = next((r["fingerprint"] for r in ordered if r.get("fingerprint")), None)
    return {
        "version": LUT_VERSION,
        "device_fingerprint": fingerprint,
        "fingerprint_hash": fingerprint_hash(fingerprint),
        "config": config_dict,
        "widths": widths,
        "contexts": contexts,
        "operators": operators,
        "copies": copies,
        "rounds": rounds,
        "base_dims": base_dims,
        "dims": [dims_row for _, _, dims_row, _ in grid],
        "element_bytes": element_bytes,
        "size_reference_block": reference,
        "size_levels_mb": size_levels_mb,
        "method_note": "cost = (decode ms of a model of `copies` blocks of the operator - decode ms of the "
        "same model with no blocks) / copies; overhead = the model with no blocks",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - started + reused_seconds, 2),
        "resumed_cells": resumed,
        "cell_keys": [r["key"] for r in ordered],
        "entries": [e for r in ordered for e in r["entries"]],
        "overhead": [r["overhead"] for r in ordered],
        "size_curve": [row for r in ordered for row in r["size_curve"]],
    }


def _non_decreasing(values: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]
    return [mean for mean, count in blocks for _ in range(int(count))]


def _reference_block(operators: list[str]) -> list[str]:
    """Every measured mixer, each followed by an FFN when the FFN is measured (the shape of real layouts)."""
    mixers = [op for op in operators if OPERATORS[op].kind == "mixer"]
    ffn = [op for op in operators if OPERATORS[op].kind != "mixer"]
    if not mixers:
        return list(operators)
    return [op for mixer in mixers for op in [mixer, *ffn]]


def _reference_levels(
    layout: Layout, block: list[str], levels_mb: list[float], vocab: int, element_bytes: int
) -> dict[int, int]:
    """Block counts n reaching each weight-size level (n = 1 always) -> the model's weight bytes."""
    if not levels_mb or not any(OPERATORS[op].kind == "mixer" for op in block):
        return {}

    def nbytes(n: int) -> int:
        return model_weight_bytes(layout.replace(operators=block * n), vocab, element_bytes)

    one = nbytes(1)
    per_block = max(1, nbytes(2) - one) if 2 * len(block) <= _MAX_REFERENCE_OPERATORS else one
    max_n = max(1, _MAX_REFERENCE_OPERATORS // len(block))
    counts = {1} | {min(max_n, max(1, round((level * 1e6 - one) / per_block) + 1)) for level in levels_mb}
    return {n: nbytes(n) for n in sorted(counts)}


def save_lut(lut: dict, path: str | Path) -> Path:
    """Write the table as JSON atomically (a temporary file in the same folder, then a rename)."""
    LatencyTable.from_dict(lut)  # refuse to write a malformed table
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(lut, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_lut(path: str | Path) -> dict:
    """Read a table written by `save_lut` (ValueError if missing or malformed)."""
    data = LatencyTable.read_json(path)
    LatencyTable.from_dict(data)  # validates
    return data


def confirm(
    layout: Layout,
    lut: dict | LatencyTable,
    config: Any = None,
    device: str | torch.device | None = None,
    *,
    strict: bool = True,
    backend: str = "auto",
) -> tuple[float, float, float]:
    """Measure `layout` directly and compare with the table's prediction at context = config.prompt_len.

    Returns (predicted ms/token, measured ms/token, signed relative error (predicted - measured) / measured).
    config None: the table's own settings at its smallest context. strict: refuse a config, or a measured
    device fingerprint, that differs from the table's (the numbers would not be comparable)."""
    table = lut if isinstance(lut, LatencyTable) else LatencyTable.from_dict(lut)
    if config is None:
        config = {**table.config, "prompt_len": table.contexts()[0]}
    config = _as_config(config)
    if strict:
        for key in _MATCHING_KEYS:
            if key in table.config and table.config[key] != getattr(config, key):
                raise ValueError(
                    f"config.{key}={getattr(config, key)!r} differs from the table's "
                    f"{table.config[key]!r}: the measurement would not be comparable"
                )
    predicted = table.predict_decode_ms(
        layout, config.prompt_len
    )  # fails fast if the table does not cover it
    torch.manual_seed(0)
    model = HybridLM(layout, config.vocab_size, backend)
    previous_threads = torch.get_num_threads()
    if config.threads is not None and (device is None or torch.device(device).type == "cpu"):
        torch.set_num_threads(config.threads)  # see build_lut: the fingerprint records these threads
    try:
        result = profile(model, config, device)
    finally:
        torch.set_num_threads(previous_threads)
    if strict and table.fingerprint_hash and fingerprint_hash(result.fingerprint) != table.fingerprint_hash:
        raise ValueError(
            "the measurement's device fingerprint differs from the table's "
            f"({result.fingerprint.get('device')!r}, threads {result.fingerprint.get('threads')} vs "
            f"{table.device_fingerprint.get('device')!r}, threads "
            f"{table.device_fingerprint.get('threads')}): rebuild the table on this device"
        )
    measured = result.decode_ms_per_token.median
    return predicted, measured, (predicted - measured) / measured

"""Latency predictor from a pre-measured look-up table (LUT), as the paper's search does (method.md section
4).

Pure Python (no torch, no numpy): the search loop and the service predict a candidate's decode latency
without touching a device. The table is measured by `latency/lut.py` on one device (its fingerprint is kept
with it) and holds, for each operator type, width (d_model) and context (prompt length before decoding):

    decode ms/token of ONE pre-norm residual block of that operator   (norm + op.step + residual add)

plus, per width and context, the per-model overhead: the decode ms/token of the same model with NO blocks
(embedding lookup, final norm, LM head at the table's vocabulary, greedy argmax, the decode loop itself).

    predict_decode_ms(layout, context) = overhead(d, c) + size_factor(d, c, B) * sum over the layout's
                                         operators of cost(op, d, c)

`size_factor` corrects for the memory hierarchy: a block's cost is measured in a small model whose weights sit
in the CPU's caches, while a deep model streams its B weight bytes (non-embedding weights + the LM head, read
once per token) from further out. The table measures it on a reference block (one of each operator, each mixer
followed by an FFN) repeated n times: factor(B_n) = (decode ms of n blocks - overhead) / (n * sum of the
block's costs), interpolated linearly in B and held constant beyond the measured sizes. A table without a size
curve (e.g. a GPU table, where decode streams every weight from HBM in any case) has factor 1: a plain sum.

Between measured points the costs are interpolated linearly in context, then linearly in width. Beyond the
measured widths the table refuses (ValueError naming the operator and width). Beyond the measured contexts
it refuses for operators whose decode cost grows with the context (cache kind "kv": full attention) and
holds the nearest measured value for the others (state, window and FFN costs and the overhead do not depend
on the context).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from search.layout import Layout
from search.operators import OPERATORS
from search.params import count_parameters

LUT_VERSION = 1
OVERHEAD = "__overhead__"  # internal key of the per-model overhead in the grid
SIZE = "__size__"  # internal key of the size-factor curve
METRICS = ("decode_ms", "prefill_ms")
# Dims that never change latency (rope_base: the same work) or follow the width (heads: checked only at a
# measured width, since the table interpolates between widths whose head counts differ).
_IGNORED_DIMS = ("rope_base",)
_WIDTH_DIMS = ("n_heads", "n_kv_heads")
_MODEL_DIMS = ("meta_tokens",)  # meta tokens lengthen every cache


class LatencyTable:
    """A measured LUT, queried by layout. Build with `from_dict` (the JSON of `latency.lut.build_lut`) or
    `load(path)`; a synthetic table for tests can be given as plain entry lists."""

    def __init__(
        self,
        entries: Iterable[dict],
        overhead: Iterable[dict],
        *,
        dims: Iterable[dict] = (),
        device_fingerprint: dict | None = None,
        fingerprint_hash: str | None = None,
        config: dict | None = None,
        version: int = LUT_VERSION,
        size_curve: Iterable[dict] = (),
        element_bytes: int = 4,
    ):
        self.device_fingerprint = device_fingerprint or {}
        self.element_bytes = int(element_bytes)
        self.fingerprint_hash = fingerprint_hash
        self.config = dict(config or {})
        self.version = version
        # grid[key][metric][d_model][context] = ms
        self._grid: dict[str, dict[str, dict[int, dict[int, float]]]] = {}
        for index, entry in enumerate(entries):
            op = entry.get("operator")
            if op not in OPERATORS:
                raise ValueError(f"entries[{index}]: unknown operator {op!r}")
            self._add(op, entry, f"entries[{index}]")
        for index, entry in enumerate(overhead):
            self._add(OVERHEAD, entry, f"overhead[{index}]")
        if not self._grid.get(OVERHEAD):
            raise ValueError("the table has no per-model overhead entries")
        self._dims = {int(d["d_model"]): dict(d) for d in dims}
        # size[d_model][context] = sorted [(weight_bytes, factor)]
        self._size: dict[int, dict[int, list[tuple[int, float]]]] = {}
        self._size_rows = [dict(row) for row in size_curve]
        for index, row in enumerate(self._size_rows):
            try:
                width, context = int(row["d_model"]), int(row["context"])
                nbytes, factor = int(row["weight_bytes"]), float(row["factor"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"size_curve[{index}]: needs d_model, context, weight_bytes and factor"
                ) from None
            if not factor > 0:
                raise ValueError(f"size_curve[{index}]: factor must be positive, not {factor!r}")
            self._size.setdefault(width, {}).setdefault(context, []).append((nbytes, factor))
        for by_context in self._size.values():
            for points in by_context.values():
                points.sort()

    def _add(self, key: str, entry: dict, where: str) -> None:
        try:
            width, context = int(entry["d_model"]), int(entry["context"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: needs integer 'd_model' and 'context'") from None
        if width <= 0 or context < 0:
            raise ValueError(f"{where}: d_model must be positive and context non-negative")
        found = False
        for metric in METRICS:
            value = entry.get(metric)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or value != value or value < 0:
                raise ValueError(f"{where}: {metric} must be a non-negative number, not {value!r}")
            self._grid.setdefault(key, {}).setdefault(metric, {}).setdefault(width, {})[context] = float(
                value
            )
            found = True
        if not found:
            raise ValueError(f"{where}: has neither decode_ms nor prefill_ms")

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> LatencyTable:
        if not isinstance(data, dict):
            raise ValueError(f"a latency table must be a JSON object, not {type(data).__name__}")
        version = data.get("version", LUT_VERSION)
        if version != LUT_VERSION:
            raise ValueError(f"latency table version {version!r} is not supported (expected {LUT_VERSION})")
        for key in ("entries", "overhead"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"a latency table needs a list {key!r}")
        return cls(
            data["entries"],
            data["overhead"],
            dims=data.get("dims") or (),
            device_fingerprint=data.get("device_fingerprint"),
            fingerprint_hash=data.get("fingerprint_hash"),
            config=data.get("config"),
            version=version,
            size_curve=data.get("size_curve") or (),
            element_bytes=data.get("element_bytes", 4),
        )

    @staticmethod
    def read_json(path: str | Path) -> dict:
        """The raw table data of a file (ValueError if missing or unreadable)."""
        path = Path(path)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: latency table not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the latency table: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        return cls.from_dict(cls.read_json(path))

    # ---- what the table covers ---------------------------------------------------------------------------
    @property
    def operators(self) -> list[str]:
        return sorted(k for k in self._grid if k != OVERHEAD)

    def widths(self, operator: str | None = None, metric: str = "decode_ms") -> list[int]:
        return sorted(self._grid.get(operator or OVERHEAD, {}).get(metric, {}))

    def contexts(self, operator: str | None = None, metric: str = "decode_ms") -> list[int]:
        by_width = self._grid.get(operator or OVERHEAD, {}).get(metric, {})
        return sorted({c for points in by_width.values() for c in points})

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size")

    # ---- lookups -----------------------------------------------------------------------------------------
    def op_cost(self, operator: str, d_model: int, context: int, metric: str = "decode_ms") -> float:
        """ms of one `operator` block at this width and context (interpolated), or ValueError."""
        if operator not in OPERATORS:
            raise ValueError(f"unknown operator {operator!r}")
        return self._lookup(
            operator, d_model, context, metric, context_dependent=OPERATORS[operator].cache == "kv"
        )

    def overhead_cost(self, d_model: int, context: int, metric: str = "decode_ms") -> float:
        """ms of the per-model overhead (embedding, final norm, LM head, decode loop) at this width."""
        return self._lookup(OVERHEAD, d_model, context, metric, context_dependent=False)

    def weight_bytes(self, layout: Layout) -> int:
        """Bytes a decode step reads from the weights: non-embedding weights + the LM head (vocab x
        d_model)."""
        return model_weight_bytes(layout, self.vocab_size or 1, self.element_bytes)

    def size_factor(self, layout: Layout, context: int) -> float:
        """The memory-hierarchy factor for this layout's weight bytes (1.0 for a table without a size
        curve)."""
        if not self._size:
            return 1.0
        nbytes = self.weight_bytes(layout)
        by_width = {
            w: {c: _interp_bytes(points, nbytes) for c, points in by_context.items()}
            for w, by_context in self._size.items()
        }
        width = layout.d_model
        if width in by_width:
            return self._at_width(by_width[width], context, False, "the size factor", width)
        widths = sorted(by_width)
        if not widths[0] < width < widths[-1]:
            raise ValueError(
                f"the size factor: d_model={width} is outside the measured widths "
                f"{widths[0]}..{widths[-1]} (the table interpolates but does not extrapolate)"
            )
        hi = bisect.bisect_right(widths, width)
        w0, w1 = widths[hi - 1], widths[hi]
        v0 = self._at_width(by_width[w0], context, False, "the size factor", w0)
        v1 = self._at_width(by_width[w1], context, False, "the size factor", w1)
        return v0 + (v1 - v0) * (width - w0) / (w1 - w0)

    def _lookup(self, key: str, d_model: int, context: int, metric: str, context_dependent: bool) -> float:
        label = "the per-model overhead" if key == OVERHEAD else f"operator {key!r}"
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
        by_width = self._grid.get(key, {}).get(metric)
        if not by_width:
            raise ValueError(
                f"{label}: the latency table has no {metric} entries for it "
                f"(measured operators: {', '.join(self.operators) or 'none'})"
            )
        widths = sorted(by_width)
        if d_model in by_width:
            return self._at_width(by_width[d_model], context, context_dependent, label, d_model)
        if not widths[0] < d_model < widths[-1]:
            raise ValueError(
                f"{label}: d_model={d_model} is outside the measured widths "
                f"{widths[0]}..{widths[-1]} (the table interpolates but does not extrapolate)"
            )
        hi = bisect.bisect_right(widths, d_model)
        w0, w1 = widths[hi - 1], widths[hi]
        v0 = self._at_width(by_width[w0], context, context_dependent, label, w0)
        v1 = self._at_width(by_width[w1], context, context_dependent, label, w1)
        return v0 + (v1 - v0) * (d_model - w0) / (w1 - w0)

    @staticmethod
    def _at_width(
        points: dict[int, float], context: int, context_dependent: bool, label: str, width: int
    ) -> float:
        if context in points:
            return points[context]
        contexts = sorted(points)
        if context < contexts[0] or context > contexts[-1]:
            if context_dependent:
                raise ValueError(
                    f"{label} at d_model={width}: context {context} is outside the measured "
                    f"contexts {contexts[0]}..{contexts[-1]} (its decode cost grows with the "
                    f"context; the table does not extrapolate)"
                )
            return points[contexts[0] if context < contexts[0] else contexts[-1]]
        hi = bisect.bisect_right(contexts, context)
        c0, c1 = contexts[hi - 1], contexts[hi]
        return points[c0] + (points[c1] - points[c0]) * (context - c0) / (c1 - c0)

    # ---- layouts -----------------------------------------------------------------------------------------
    def check_layout(self, layout: Layout) -> None:
        """ValueError if the layout's operators use dims other than those the table was measured with
        (e.g. head_dim 128 against a table of head_dim 32). Skipped for tables without dims."""
        if not self._dims:
            return
        width = layout.d_model
        if width in self._dims:
            reference, exact = self._dims[width], True
        else:
            nearest = min(self._dims, key=lambda w: (abs(w - width), w))
            reference, exact = self._dims[nearest], False
        for op in sorted(set(layout.operators)):
            dims = [d for d in (*OPERATORS[op].dims, *_MODEL_DIMS) if d not in _WIDTH_DIMS]
            dims += [d for d in OPERATORS[op].dims if d in _WIDTH_DIMS and exact]  # width-bound dims last
            for dim in dims:
                if dim in _IGNORED_DIMS or dim not in reference:
                    continue
                value, measured = getattr(layout, dim), reference[dim]
                if value != measured:
                    raise ValueError(
                        f"operator {op!r} at d_model={width}: the layout has {dim}={value} but the "
                        f"latency table was measured with {dim}={measured}"
                    )

    def breakdown(self, layout: Layout, context: int, metric: str = "decode_ms") -> dict[str, Any]:
        """{'overhead': ms, 'operators': {op: {'count', 'each_ms', 'total_ms'}}, 'total_ms'}."""
        self.check_layout(layout)
        counts: dict[str, int] = {}
        for op in layout.operators:
            counts[op] = counts.get(op, 0) + 1
        costs = {op: self.op_cost(op, layout.d_model, context, metric) for op in counts}
        overhead = self.overhead_cost(layout.d_model, context, metric)
        factor = self.size_factor(layout, context) if metric == "decode_ms" else 1.0
        ops, blocks = {}, 0.0
        for op, count in counts.items():
            ops[op] = {"count": count, "each_ms": costs[op], "total_ms": costs[op] * count * factor}
            blocks += costs[op] * count
        return {
            "d_model": layout.d_model,
            "context": context,
            "metric": metric,
            "overhead_ms": overhead,
            "operators": ops,
            "blocks_ms": blocks,
            "size_factor": factor,
            "weight_bytes": self.weight_bytes(layout),
            "total_ms": overhead + factor * blocks,
        }

    def predict_decode_ms(self, layout: Layout, context: int) -> float:
        """Predicted decode ms/token of `layout` at batch 1 after a `context`-token prompt, on the table's
        device."""
        return self.breakdown(layout, context, "decode_ms")["total_ms"]

    def predict_prefill_ms(self, layout: Layout, context: int) -> float:
        """Predicted prefill ms of a `context`-token prompt (only where the table measured prefill)."""
        return self.breakdown(layout, context, "prefill_ms")["total_ms"]

    def largest_width_meeting(
        self,
        pattern_layout: Layout,
        target_ms: float,
        widths: Iterable[int],
        context: int,
        space_or_dims_fn: Any = None,
    ) -> int | None:
        """The paper's width rule: the largest width in `widths` at which `pattern_layout`'s operator sequence
        is predicted to decode within `target_ms` per token (None if no width does). `space_or_dims_fn` gives
        the dims for a width: a SearchSpace (its `_dims_for`), a callable width -> dict, or None (only
        d_model changes). A width the table does not cover raises ValueError."""
        dims_fn = _dims_fn(space_or_dims_fn)
        for width in sorted(set(int(w) for w in widths), reverse=True):
            layout = pattern_layout.replace(**dims_fn(width))
            if self.predict_decode_ms(layout, context) <= target_ms:
                return width
        return None

    def to_dict(self) -> dict:
        """The table as the JSON structure of `latency.lut` (entries, overhead, dims, provenance)."""
        entries, overhead = [], []
        for key, metrics in sorted(self._grid.items()):
            cells: dict[tuple[int, int], dict] = {}
            for metric, by_width in metrics.items():
                for width, points in by_width.items():
                    for context, value in points.items():
                        cells.setdefault((width, context), {"d_model": width, "context": context})[metric] = (
                            value
                        )
            rows = [cells[k] for k in sorted(cells)]
            if key == OVERHEAD:
                overhead.extend(rows)
            else:
                entries.extend({"operator": key, **row} for row in rows)
        return {
            "version": self.version,
            "device_fingerprint": self.device_fingerprint,
            "fingerprint_hash": self.fingerprint_hash,
            "config": self.config,
            "element_bytes": self.element_bytes,
            "dims": [self._dims[w] for w in sorted(self._dims)],
            "entries": entries,
            "overhead": overhead,
            "size_curve": self._size_rows,
        }


def model_weight_bytes(layout: Layout, vocab_size: int, element_bytes: int = 4) -> int:
    """Weight bytes one decode step reads: every non-embedding parameter (operators with their pre-norms,
    final norm, meta tokens) and the LM head (vocab x d_model; the embedding lookup reads one row only)."""
    count = count_parameters(layout, vocab_size)
    return (count.non_embedding + vocab_size * layout.d_model) * element_bytes


def _interp_bytes(points: list[tuple[int, float]], nbytes: int) -> float:
    """Factor at `nbytes`: linear between measured sizes, the nearest measured factor beyond them."""
    if nbytes <= points[0][0]:
        return points[0][1]
    if nbytes >= points[-1][0]:
        return points[-1][1]
    hi = bisect.bisect_right([b for b, _ in points], nbytes)
    (b0, f0), (b1, f1) = points[hi - 1], points[hi]
    return f0 + (f1 - f0) * (nbytes - b0) / (b1 - b0)


def _dims_fn(space_or_dims_fn: Any) -> Callable[[int], dict]:
    if space_or_dims_fn is None:
        return lambda width: {"d_model": width}
    fn = getattr(space_or_dims_fn, "_dims_for", space_or_dims_fn)
    if callable(fn):
        return lambda width: {**fn(width), "d_model": width}
    raise TypeError("space_or_dims_fn must be a SearchSpace, a callable width -> dims, or None")


def largest_width_meeting(
    table: LatencyTable,
    pattern_layout: Layout,
    target_ms: float,
    widths: Iterable[int],
    context: int,
    space_or_dims_fn: Any = None,
) -> int | None:
    """Module-level form of `LatencyTable.largest_width_meeting`."""
    return table.largest_width_meeting(pattern_layout, target_ms, widths, context, space_or_dims_fn)

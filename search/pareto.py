"""Pareto utilities for the search: non-dominated sorting, crowding distance, hypervolume and hypervolume
contributions (the parent-selection criterion of `pareto-aging`).

Every objective is MINIMIZED; to maximize one, negate it before it reaches these functions.

Hypervolume is computed by the maintained `moocore` library in a NORMALIZED space: each objective is mapped
by (x - lower) / (upper - lower), so the bounds (fixed per search space, from its config or its presets) make
the objectives commensurable, and the reference point is given in normalized units (1.1 per objective by
default: a point at the upper bound still contributes). The bounds travel with a search's history
(`HypervolumeSpace.to_dict`), and two searches' hypervolumes are comparable only when `same_bounds` holds.
Points outside the reference box (worse than the reference in any objective) contribute nothing; a point
below a lower bound normalizes to a negative coordinate and contributes its whole box (bounds are not clips).

Pure Python + numpy + moocore (imported when a hypervolume is first computed); no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Point = Sequence[float]


# ---- dominance, sorting, crowding --------------------------------------------------------------------------


def _as_points(points: Iterable[Point]) -> list[tuple[float, ...]]:
    rows = [tuple(float(v) for v in p) for p in points]
    if rows:
        width = len(rows[0])
        if width == 0:
            raise ValueError("points need at least one objective")
        for index, row in enumerate(rows):
            if len(row) != width:
                raise ValueError(f"points[{index}] has {len(row)} objectives, expected {width}")
            if any(math.isnan(v) for v in row):
                raise ValueError(f"points[{index}] contains NaN")
    return rows


def dominates(a: Point, b: Point) -> bool:
    """True when `a` is no worse than `b` in every objective and strictly better in one (minimization)."""
    better = False
    for x, y in zip(a, b):
        if x > y:
            return False
        if x < y:
            better = True
    return better


def non_dominated_sort(points: Iterable[Point]) -> list[int]:
    """Pareto rank of every point (0 = the non-dominated front, 1 = the front once rank 0 is removed, ...).
    Deb's fast non-dominated sort, O(M N^2). Equal points share a rank."""
    rows = _as_points(points)
    n = len(rows)
    dominated_by_me: list[list[int]] = [[] for _ in range(n)]
    count = [0] * n  # how many points dominate i
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(rows[i], rows[j]):
                dominated_by_me[i].append(j)
                count[j] += 1
            elif dominates(rows[j], rows[i]):
                dominated_by_me[j].append(i)
                count[i] += 1
    ranks = [0] * n
    current = [i for i in range(n) if count[i] == 0]
    rank = 0
    while current:
        nxt = []
        for i in current:
            ranks[i] = rank
            for j in dominated_by_me[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        current, rank = nxt, rank + 1
    return ranks


def pareto_front(points: Iterable[Point]) -> list[int]:
    """Indices of the non-dominated points, in input order."""
    return [i for i, r in enumerate(non_dominated_sort(points)) if r == 0]


def crowding_distance(points: Sequence[Point], indices: Sequence[int] | None = None) -> list[float]:
    """NSGA-II crowding distance of `points[i]` for i in `indices` (all points when None), computed within
    that subset (usually one front); returned in the order of `indices`. The extreme points of every objective
    get infinity; an objective whose values are all equal adds nothing. Ties are ordered by index."""
    rows = _as_points(points)
    idx = list(range(len(rows))) if indices is None else list(indices)
    k = len(idx)
    if k == 0:
        return []
    if k <= 2:
        return [math.inf] * k
    dist = [0.0] * k
    for m in range(len(rows[idx[0]])):
        order = sorted(range(k), key=lambda p: (rows[idx[p]][m], idx[p]))
        lo, hi = rows[idx[order[0]]][m], rows[idx[order[-1]]][m]
        dist[order[0]] = dist[order[-1]] = math.inf
        span = hi - lo
        if not span > 0 or math.isinf(span):
            continue
        for pos in range(1, k - 1):
            p = order[pos]
            if dist[p] != math.inf:
                dist[p] += (rows[idx[order[pos + 1]]][m] - rows[idx[order[pos - 1]]][m]) / span
    return dist


def rank_and_crowding(points: Sequence[Point]) -> tuple[list[int], list[float]]:
    """Pareto rank and crowding distance (within the point's front) of every point."""
    ranks = non_dominated_sort(points)
    crowd = [0.0] * len(ranks)
    for rank in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == rank]
        for i, d in zip(members, crowding_distance(points, members)):
            crowd[i] = d
    return ranks, crowd


def hypervolume_contributions(points: Sequence[Point], reference: Sequence[float]) -> list[float]:
    """Exclusive hypervolume contribution of every point: hv(points) - hv(points without it), up to
    `reference` (same units as the points, minimization), by `moocore.hv_contributions`. Dominated points,
    duplicated points (removing one copy loses nothing) and points not strictly better than the reference in
    every objective contribute 0 and do not reduce the others' contributions."""
    rows = _as_points(points)
    ref = tuple(float(v) for v in reference)
    if rows and len(ref) != len(rows[0]):
        raise ValueError(f"reference has {len(ref)} values for {len(rows[0])} objectives")
    if not all(math.isfinite(v) for v in ref):
        raise ValueError(f"reference must be finite, got {ref}")
    inside = [i for i, row in enumerate(rows) if all(math.isfinite(v) and v < r for v, r in zip(row, ref))]
    out = [0.0] * len(rows)
    if not inside:
        return out
    if len(ref) == 1:  # moocore needs two objectives or more: the best value owns the segment to the next one
        values = sorted(rows[i][0] for i in inside)
        best = values[0]
        if len(values) == 1 or values[1] > best:
            nxt = values[1] if len(values) > 1 else ref[0]
            out[next(i for i in inside if rows[i][0] == best)] = nxt - best
        return out
    import moocore
    import numpy as np

    contributions = moocore.hv_contributions(
        np.asarray([rows[i] for i in inside], dtype=float), ref=np.asarray(ref, dtype=float)
    )
    for i, c in zip(inside, contributions):
        out[i] = max(0.0, float(c))
    return out


def rank_and_contribution(points: Sequence[Point], reference: float = 1.1) -> tuple[list[int], list[float]]:
    """Pareto rank and hypervolume contribution (within the point's own front) of every point: the
    hypervolume counterpart of `rank_and_crowding`, as SMS-EMOA ranks its population. Contributions are
    computed in the space normalized by the points' own per-objective min and max (an objective whose values
    are all equal normalizes to 0), with the reference point at `reference` normalized units per objective
    (1.1: the worst value of each objective still contributes a thin slab)."""
    rows = _as_points(points)
    ranks = non_dominated_sort(rows)
    if not rows:
        return ranks, []
    n_obj = len(rows[0])
    lower = [min(r[m] for r in rows) for m in range(n_obj)]
    span = [max(r[m] for r in rows) - lower[m] for m in range(n_obj)]
    normalized = [
        tuple(
            (r[m] - lower[m]) / span[m] if span[m] > 0 and math.isfinite(span[m]) else 0.0
            for m in range(n_obj)
        )
        for r in rows
    ]
    contribution = [0.0] * len(rows)
    for rank in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == rank]
        values = hypervolume_contributions([normalized[i] for i in members], (float(reference),) * n_obj)
        for i, c in zip(members, values):
            contribution[i] = c
    return ranks, contribution


# ---- hypervolume -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HypervolumeSpace:
    """Normalized objective space for hypervolume: bounds per objective and a reference point (normalized)."""

    objectives: tuple[str, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    reference: tuple[float, ...] | None = None  # normalized units; None = 1.1 per objective

    def __post_init__(self) -> None:
        objectives = tuple(str(o) for o in self.objectives)
        lower = tuple(float(v) for v in self.lower)
        upper = tuple(float(v) for v in self.upper)
        n = len(objectives)
        if n == 0:
            raise ValueError("HypervolumeSpace needs at least one objective")
        if len(set(objectives)) != n:
            raise ValueError(f"objectives contain duplicates: {objectives}")
        reference = (1.1,) * n if self.reference is None else tuple(float(v) for v in self.reference)
        for label, values in (("lower", lower), ("upper", upper), ("reference", reference)):
            if len(values) != n:
                raise ValueError(f"{label} has {len(values)} values for {n} objectives {objectives}")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{label} must be finite, got {values}")
        for name, lo, hi in zip(objectives, lower, upper):
            if not hi > lo:
                raise ValueError(f"objective {name!r}: upper bound {hi} must exceed lower bound {lo}")
        object.__setattr__(self, "objectives", objectives)
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        object.__setattr__(self, "reference", reference)

    @classmethod
    def from_points(
        cls,
        objectives: Sequence[str],
        points: Iterable[Point | Mapping[str, float]],
        reference: Sequence[float] | None = None,
    ) -> HypervolumeSpace:
        """Bounds = the per-objective min and max of `points` (e.g. the presets, or an exhaustive table)."""
        rows = [_row(p, tuple(objectives)) for p in points]
        rows = [r for r in rows if all(math.isfinite(v) for v in r)]
        if not rows:
            raise ValueError("no finite points to take bounds from")
        lower = tuple(min(r[m] for r in rows) for m in range(len(objectives)))
        upper = tuple(max(r[m] for r in rows) for m in range(len(objectives)))
        upper = tuple(
            hi if hi > lo else lo + max(abs(lo), 1.0) * 1e-9 + 1e-12 for lo, hi in zip(lower, upper)
        )
        return cls(tuple(objectives), lower, upper, None if reference is None else tuple(reference))

    def normalize(self, point: Point | Mapping[str, float]) -> tuple[float, ...]:
        row = _row(point, self.objectives)
        return tuple((v - lo) / (hi - lo) for v, lo, hi in zip(row, self.lower, self.upper))

    def hypervolume(self, points: Iterable[Point | Mapping[str, float]]) -> float:
        """Hypervolume (normalized units) dominated by `points` up to the reference point. Points may be
        sequences in `objectives` order or dicts keyed by objective name; non-finite or NaN points and points
        outside the reference box contribute nothing."""
        ref = self.reference
        rows = []
        for p in points:
            q = self.normalize(p)
            if all(math.isfinite(v) for v in q) and all(v < r for v, r in zip(q, ref)):
                rows.append(q)
        if not rows:
            return 0.0
        if len(ref) == 1:
            return float(ref[0] - min(r[0] for r in rows))
        import moocore  # maintained WFG/HV implementations (no torch)
        import numpy as np

        return float(moocore.hypervolume(np.asarray(rows, dtype=float), ref=np.asarray(ref, dtype=float)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "objectives": list(self.objectives),
            "lower": list(self.lower),
            "upper": list(self.upper),
            "reference": list(self.reference),
            "normalization": "(x - lower) / (upper - lower)",
            "minimize": True,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HypervolumeSpace:
        try:
            return cls(
                tuple(data["objectives"]),
                tuple(data["lower"]),
                tuple(data["upper"]),
                tuple(data["reference"]) if data.get("reference") is not None else None,
            )
        except KeyError as exc:
            raise ValueError(f"a hypervolume space needs {exc.args[0]!r}") from None


def same_bounds(a: HypervolumeSpace | Mapping[str, Any], b: HypervolumeSpace | Mapping[str, Any]) -> bool:
    """True when two hypervolume spaces have the same objectives, bounds and reference point (so their
    hypervolumes are comparable)."""
    a = a if isinstance(a, HypervolumeSpace) else HypervolumeSpace.from_dict(a)
    b = b if isinstance(b, HypervolumeSpace) else HypervolumeSpace.from_dict(b)

    def close(x: tuple[float, ...], y: tuple[float, ...]) -> bool:
        return len(x) == len(y) and all(
            math.isclose(u, v, rel_tol=1e-12, abs_tol=1e-15) for u, v in zip(x, y)
        )

    return (
        a.objectives == b.objectives
        and close(a.lower, b.lower)
        and close(a.upper, b.upper)
        and close(a.reference, b.reference)
    )


def _row(point: Point | Mapping[str, float], objectives: tuple[str, ...]) -> tuple[float, ...]:
    if isinstance(point, Mapping):
        try:
            return tuple(float(point[name]) for name in objectives)
        except KeyError as exc:
            raise ValueError(
                f"point lacks objective {exc.args[0]!r} (objectives: {', '.join(objectives)})"
            ) from None
    row = tuple(float(v) for v in point)
    if len(row) != len(objectives):
        raise ValueError(f"point has {len(row)} values for {len(objectives)} objectives {objectives}")
    return row


@dataclass
class HypervolumeTracker:
    """The anytime hypervolume curve of one search: `record` after every evaluation (None = a failed one,
    which repeats the previous value), so `history[i]` is the hypervolume of the first i+1 evaluations'
    results. Keeps only the current non-dominated set; the curve is monotone non-decreasing."""

    space: HypervolumeSpace
    history: list[float] = field(default_factory=list)
    front: list[tuple[float, ...]] = field(default_factory=list)

    def record(self, point: Point | Mapping[str, float] | None) -> float:
        previous = self.history[-1] if self.history else 0.0
        value = previous
        if point is not None:
            row = _row(point, self.space.objectives)
            if all(math.isfinite(v) for v in row) and not any(
                dominates(f, row) or f == row for f in self.front
            ):
                self.front = [f for f in self.front if not dominates(row, f)] + [row]
                value = max(previous, self.space.hypervolume(self.front))
        self.history.append(value)
        return value

    @property
    def current(self) -> float:
        return self.history[-1] if self.history else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.space.to_dict(),
            "history": list(self.history),
            "front": [list(f) for f in self.front],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HypervolumeTracker:
        return cls(
            HypervolumeSpace.from_dict(data["space"]),
            [float(v) for v in data.get("history", [])],
            [tuple(float(v) for v in f) for f in data.get("front", [])],
        )

"""What a search's scatter sends to a browser: every front point (and the preset baselines), plus a sample of
the dominated ones stratified by generation, at most `max_points` in all (a page never receives all points of
a large search).

The sample is deterministic (evenly spaced in id order within each generation, each generation keeping its
share), so a refresh shows the same points and only new ones appear.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

from search.storage import PointRecord

MAX_POINTS = 5000


def picked(rank: int, budget: int, others: int) -> bool:
    """The sampling rule (the storage applies the same one in SQL): with the others ordered by (generation,
    id), the one ranked `rank` (1-based) is kept when rank * budget / others crosses an integer. Exactly
    `budget` are kept, evenly spaced, so each generation keeps its share of the budget (within one)."""
    return (rank * budget) // others > ((rank - 1) * budget) // others


def sample_points(
    points: Sequence[PointRecord], max_points: int = MAX_POINTS, keep: Collection[int] = ()
) -> list[PointRecord]:
    """Every point on the front (its `on_front` flag) and every id in `keep` (the preset baselines) and, in
    the room left, an even sample of the others stratified by generation; in id order."""
    kept = [p for p in points if p.on_front or p.id in keep]
    others = sorted(
        (p for p in points if not (p.on_front or p.id in keep)), key=lambda p: (p.generation, p.id)
    )
    budget = max(0, max_points - len(kept))
    chosen = kept + [
        p for rank, p in enumerate(others, start=1) if budget and picked(rank, budget, len(others))
    ]
    return sorted(chosen, key=lambda p: p.id)


def front_flags(
    points: Sequence[PointRecord], maximize: tuple[bool, bool] = (False, False)
) -> list[PointRecord]:
    """The points with `on_front` recomputed for their (x, y), each minimized unless `maximize` says so: a
    sweep in x order keeping the best y so far (equal points are all on the front). For a pair the search did
    not store a front for."""
    sx, sy = (-1.0 if m else 1.0 for m in maximize)
    keys = [(sx * p.x, sy * p.y) for p in points]
    order = sorted(range(len(points)), key=lambda i: (*keys[i], points[i].id))
    on_front = [False] * len(points)
    best_y, last = float("inf"), None
    for i in order:
        x, y = keys[i]
        if y < best_y or (x, y) == last:
            on_front[i] = True
            best_y, last = min(best_y, y), (x, y)
    return [replace(p, on_front=flag) for p, flag in zip(points, on_front)]

"""Pareto utilities: sorting and crowding against brute force, hypervolume against hand and exact-grid
computations, the normalized space's serialization, and the monotone anytime tracker."""

import itertools
import json
import math
import random

import pytest

from search.pareto import (
    HypervolumeSpace,
    HypervolumeTracker,
    crowding_distance,
    dominates,
    hypervolume_contributions,
    non_dominated_sort,
    pareto_front,
    rank_and_contribution,
    rank_and_crowding,
    same_bounds,
)


def brute_dominates(a, b):
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def brute_ranks(points):
    ranks, remaining, rank = {}, set(range(len(points))), 0
    while remaining:
        front = {i for i in remaining if not any(brute_dominates(points[j], points[i]) for j in remaining)}
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return [ranks[i] for i in range(len(points))]


def brute_crowding(points, indices):
    out = []
    for i in indices:
        d = 0.0
        for m in range(len(points[i])):
            values = [points[j][m] for j in indices]
            lo, hi = min(values), max(values)
            below = [v for v in values if v < points[i][m]]
            above = [v for v in values if v > points[i][m]]
            if not below or not above:
                d = math.inf
                break
            d += (min(above) - max(below)) / (hi - lo)
        out.append(d)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_sort_and_front_match_brute_force(seed):
    rng = random.Random(seed)
    dims = rng.choice((2, 3, 4))
    # small integer grid: many ties and equal points
    points = [tuple(rng.randint(0, 5) for _ in range(dims)) for _ in range(rng.randint(1, 40))]
    assert non_dominated_sort(points) == brute_ranks(points)
    assert pareto_front(points) == [
        i for i in range(len(points)) if not any(brute_dominates(q, points[i]) for q in points)
    ]
    assert all(dominates(a, b) == brute_dominates(a, b) for a in points[:10] for b in points[:10])


@pytest.mark.parametrize("seed", range(8))
def test_crowding_matches_brute_force(seed):
    rng = random.Random(100 + seed)
    dims = rng.choice((2, 3))
    points = [tuple(rng.random() for _ in range(dims)) for _ in range(30)]
    ranks, crowd = rank_and_crowding(points)
    for rank in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == rank]
        expected = brute_crowding(points, members)
        got = crowding_distance(points, members)
        assert got == pytest.approx(expected)
        assert [crowd[i] for i in members] == pytest.approx(expected)
    assert crowding_distance(points, [3, 7]) == [math.inf, math.inf]
    assert crowding_distance(points, []) == []


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        non_dominated_sort([(1.0, float("nan"))])
    with pytest.raises(ValueError, match="objectives"):
        non_dominated_sort([(1.0, 2.0), (1.0,)])
    assert non_dominated_sort([]) == [] and pareto_front([]) == []


def test_hypervolume_2d_by_hand():
    space = HypervolumeSpace(("val_bpb", "decode_ms"), lower=(10.0, 100.0), upper=(20.0, 200.0))
    assert space.reference == (1.1, 1.1)
    a, b = (12.0, 160.0), (15.0, 130.0)  # normalized (0.2, 0.6) and (0.5, 0.3)
    assert space.normalize(a) == pytest.approx((0.2, 0.6))
    expected = (1.1 - 0.2) * (1.1 - 0.6) + (1.1 - 0.5) * (0.6 - 0.3)
    assert space.hypervolume([a, b]) == pytest.approx(expected)
    # dicts keyed by objective name; a dominated point and points outside the reference box add nothing
    points = [
        {"val_bpb": 12.0, "decode_ms": 160.0},
        {"decode_ms": 130.0, "val_bpb": 15.0},
        (16.0, 170.0),
        (22.0, 101.0),
        (10.5, 215.0),
        (21.0, 211.0),
    ]
    assert space.hypervolume(points) == pytest.approx(expected)
    assert space.hypervolume([]) == 0.0
    assert space.hypervolume([(21.0, 100.0)]) == 0.0  # exactly on the reference boundary: zero volume
    assert space.hypervolume([(float("inf"), 0.0)]) == 0.0
    assert HypervolumeSpace(("x",), (0.0,), (2.0,)).hypervolume([(1.0,), (1.5,)]) == pytest.approx(0.6)


def test_hypervolume_3d_matches_exact_grid():
    rng = random.Random(7)
    space = HypervolumeSpace(("a", "b", "c"), lower=(0, 0, 0), upper=(10, 10, 10), reference=(1.0, 1.0, 1.0))
    for _ in range(5):
        points = [tuple(rng.randint(0, 9) for _ in range(3)) for _ in range(rng.randint(1, 8))]
        cells = sum(
            1
            for cell in itertools.product(range(10), repeat=3)
            if any(all(p[m] <= cell[m] for m in range(3)) for p in points)
        )
        assert space.hypervolume(points) == pytest.approx(cells / 1000)


def test_hypervolume_contributions_by_hand_and_by_removal():
    ref = (1.1, 1.1)
    # the knee holds most of the area; the extremes only thin slabs along the reference point
    points = [(0.0, 1.0), (0.1, 0.1), (1.0, 0.0)]
    assert hypervolume_contributions(points, ref) == pytest.approx([0.1 * 0.1, 0.9 * 0.9, 0.1 * 0.1])
    # dominated, duplicated and outside-the-reference points contribute 0 and leave the others unchanged
    more = points + [(0.5, 0.5), (0.1, 0.1), (1.2, 0.05), (float("inf"), 0.0)]
    got = hypervolume_contributions(more, ref)
    assert got[0] == pytest.approx(0.01) and got[2] == pytest.approx(0.01)
    assert got[1] == got[3] == got[4] == got[5] == got[6] == 0.0  # the knee is duplicated: no exclusive area
    # = hv(front) - hv(front without the point) for front members, 0 for dominated points (which do not stand
    # in for a removed member), on random point sets in 2 and 3 objectives
    rng = random.Random(11)
    for dims in (2, 3):
        space = HypervolumeSpace(tuple("abc"[:dims]), (0.0,) * dims, (1.0,) * dims)
        for _ in range(5):
            pts = [tuple(rng.random() for _ in range(dims)) for _ in range(rng.randint(1, 9))]
            front = [pts[i] for i in pareto_front(pts)]
            whole = space.hypervolume(front)
            expected = [
                whole - space.hypervolume([q for q in front if q != p]) if p in front else 0.0 for p in pts
            ]
            assert hypervolume_contributions(pts, (1.1,) * dims) == pytest.approx(expected, abs=1e-12)
    # one objective: the best value owns the segment up to the next value (or the reference)
    assert hypervolume_contributions([(0.5,), (0.2,), (0.9,)], (1.0,)) == pytest.approx([0.0, 0.3, 0.0])
    assert hypervolume_contributions([(0.2,), (0.2,)], (1.0,)) == [0.0, 0.0]
    assert hypervolume_contributions([], ref) == []
    with pytest.raises(ValueError, match="reference"):
        hypervolume_contributions(points, (1.1,))


def test_rank_and_contribution_normalizes_by_the_points_own_range():
    # the same shape as the hand example, in raw units: (bpb, ms) with very different scales
    points = [(3.0, 30.0), (3.1, 12.0), (4.0, 10.0), (3.6, 25.0), (4.2, 40.0)]
    ranks, contribution = rank_and_contribution(points)
    assert ranks == non_dominated_sort(points) == [0, 0, 0, 1, 2]
    lo, span = (3.0, 10.0), (1.2, 30.0)
    norm = [((b - lo[0]) / span[0], (m - lo[1]) / span[1]) for b, m in points]
    assert contribution[:3] == pytest.approx(hypervolume_contributions(norm[:3], (1.1, 1.1)))
    assert contribution[3] == pytest.approx((1.1 - norm[3][0]) * (1.1 - norm[3][1]))  # alone in its front
    assert max(range(3), key=lambda i: contribution[i]) == 1  # the knee, where crowding favours the extremes
    crowd = rank_and_crowding(points)[1]
    assert crowd[0] == crowd[2] == math.inf and crowd[1] < math.inf
    # an objective whose values are all equal normalizes to 0; no points, no contributions
    assert rank_and_contribution([(1.0, 5.0), (2.0, 5.0)]) == (
        [0, 1],
        [pytest.approx(1.1 * 1.1), pytest.approx(0.1 * 1.1)],
    )
    assert rank_and_contribution([]) == ([], [])


def test_space_serializes_and_compares_bounds():
    space = HypervolumeSpace(("val_bpb", "decode_ms"), (1.0, 2.0), (3.0, 5.0), reference=(1.2, 1.2))
    again = HypervolumeSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again == space and same_bounds(space, again) and same_bounds(space.to_dict(), again)
    assert not same_bounds(space, HypervolumeSpace(("val_bpb", "decode_ms"), (1.0, 2.0), (3.0, 5.0)))
    assert not same_bounds(space, HypervolumeSpace(("val_bpb", "params"), (1.0, 2.0), (3.0, 5.0), (1.2, 1.2)))
    assert not same_bounds(
        space, HypervolumeSpace(("val_bpb", "decode_ms"), (1.0, 2.5), (3.0, 5.0), (1.2, 1.2))
    )
    fitted = HypervolumeSpace.from_points(("x", "y"), [(1, 5), (3, 2), {"x": 2, "y": 9}])
    assert fitted.lower == (1.0, 2.0) and fitted.upper == (3.0, 9.0)
    with pytest.raises(ValueError, match="upper bound"):
        HypervolumeSpace(("x",), (1.0,), (1.0,))
    with pytest.raises(ValueError, match="values for 2 objectives"):
        HypervolumeSpace(("x", "y"), (0.0,), (1.0, 1.0))
    with pytest.raises(ValueError, match="lacks objective"):
        space.hypervolume([{"val_bpb": 1.0}])


def test_tracker_is_monotone_and_matches_the_full_set():
    rng = random.Random(3)
    space = HypervolumeSpace(("a", "b"), (0.0, 0.0), (1.0, 1.0))
    tracker = HypervolumeTracker(space)
    told = []
    for i in range(80):
        point = None if i % 7 == 3 else (rng.uniform(-0.1, 1.3), rng.uniform(-0.1, 1.3))
        tracker.record(point)
        if point is not None:
            told.append(point)
    assert len(tracker.history) == 80
    assert all(b >= a for a, b in zip(tracker.history, tracker.history[1:]))
    assert tracker.current == pytest.approx(space.hypervolume(told))
    assert sorted(tracker.front) == sorted(told[i] for i in pareto_front(told))
    again = HypervolumeTracker.from_dict(json.loads(json.dumps(tracker.to_dict())))
    assert again.history == tracker.history and same_bounds(again.space, space)
    assert again.record((0.0, 0.0)) >= tracker.current

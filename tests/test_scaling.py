"""The depth–width scaling law (search/scaling.py) against data drawn from known laws: the fit recovers the
constants, the bootstrap intervals cover them, the extrapolation error is what the truth implies, and the
budget choice is the brute-force answer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from search.scaling import (
    PARAMETERS,
    ScalingLaw,
    best_under_budget,
    bootstrap_intervals,
    extrapolation_error,
    fit_law,
)

TRUE = ScalingLaw(l0=1.8, a=2.5, alpha=0.7, b=40.0, beta=0.9)
DEPTHS = (2, 4, 6, 8, 12)
WIDTHS = (32, 48, 64, 96, 128)


def grid(law=TRUE, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    points = list(itertools.product(DEPTHS, WIDTHS))
    d = np.array([p[0] for p in points], dtype=float)
    w = np.array([p[1] for p in points], dtype=float)
    y = law.predict(d, w) * (1 + noise * rng.standard_normal(len(points)))
    return d, w, y


def test_the_fit_recovers_a_known_law():
    d, w, y = grid()
    fit = fit_law(d, w, y)
    assert fit.rmse < 1e-6 and fit.n_points == 25
    for name in PARAMETERS:
        assert getattr(fit.law, name) == pytest.approx(getattr(TRUE, name), rel=1e-3), name


def test_a_noisy_fit_predicts_within_the_noise_and_its_intervals_cover_the_truth():
    d, w, y = grid(noise=0.005, seed=3)
    fit = fit_law(d, w, y)
    assert fit.rmse < 2 * 0.005 * y.mean()  # residuals of the order of the noise put in
    dense_d, dense_w = np.meshgrid(np.linspace(2, 12, 11), np.linspace(32, 128, 13))
    relative = np.abs(fit.law.predict(dense_d, dense_w) / TRUE.predict(dense_d, dense_w) - 1)
    assert relative.max() < 0.02
    intervals = bootstrap_intervals(d, w, y, n_boot=60, seed=1)
    covered = [lo <= getattr(TRUE, name) <= hi for name, (lo, hi) in intervals.items()]
    assert sum(covered) >= 4, intervals  # 95 % intervals: all but (rarely) one hold the true constant
    assert all(lo < hi for lo, hi in intervals.values())


def test_the_extrapolation_error_of_an_exact_law_is_nil_and_of_a_wrong_one_is_measured():
    d, w, y = grid()
    exact = extrapolation_error(d, w, y, max_fit_depth=8, max_fit_width=96)
    assert len(exact.held_out) == 9 and exact.max_relative_error < 1e-4
    # the larger models gain more than the law allows: a fit on the small ones misses them by about that
    bent = y * np.where((d > 8) | (w > 96), 0.95, 1.0)
    missed = extrapolation_error(d, w, bent, max_fit_depth=8, max_fit_width=96)
    assert 0.03 < missed.max_relative_error < 0.08
    with pytest.raises(ValueError, match="nothing to extrapolate"):
        extrapolation_error(d, w, y, max_fit_depth=12, max_fit_width=128)


def test_the_budget_choice_is_the_lowest_predicted_loss_that_meets_it():
    configurations = [(dd, ww, 0.1 * dd + 0.002 * ww * dd) for dd in DEPTHS for ww in WIDTHS]
    for budget in (0.5, 1.0, 2.0):
        choice = best_under_budget(TRUE, configurations, budget)
        allowed = [(TRUE.predict(dd, ww), dd, ww) for dd, ww, lat in configurations if lat <= budget]
        loss, depth, width = min(allowed)
        assert (choice.depth, choice.width) == (depth, width) and choice.loss == pytest.approx(loss)
        assert choice.predicted and choice.latency_ms <= budget
    measured = {(dd, ww): float(TRUE.predict(dd, ww)) for dd, ww, _ in configurations[::2]}
    by_measure = best_under_budget(None, configurations, 1.0, measured=measured)
    assert not by_measure.predicted and (by_measure.depth, by_measure.width) in measured
    assert best_under_budget(TRUE, configurations, 0.01) is None


def test_bad_grids_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_law([2, 4], [32, 64], [3.0, 2.5])
    with pytest.raises(ValueError, match="positive"):
        fit_law([0, 2, 4, 6, 8], [32] * 5, [3.0] * 5)
    with pytest.raises(ValueError, match="one length"):
        fit_law([2, 4, 6, 8, 10], [32] * 4, [3.0] * 5)

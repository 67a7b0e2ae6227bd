"""The depth–width scaling law of method.md section 2, `L(D, W) = L0 + a·D^-α + b·W^-β` (the data term dropped
at a fixed training budget): its fit by bounded nonlinear least squares from several starts, the constants'
bootstrap intervals over grid points, the extrapolation error (fit on the smaller configurations, predict the
larger ones) and the (D, W) a latency budget allows with the lowest predicted loss.

Shapes: every function takes grid points as parallel sequences `depths[i]`, `widths[i]`, `losses[i]` (one
point per trained configuration; the loss is `val_bpb` in this project, perplexity in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

PARAMETERS = ("l0", "a", "alpha", "b", "beta")
EXPONENT_BOUNDS = (0.01, 4.0)
MIN_POINTS = len(PARAMETERS)  # as many points as constants, at least


@dataclass(frozen=True)
class ScalingLaw:
    l0: float
    a: float
    alpha: float
    b: float
    beta: float

    def predict(self, depth, width):
        depth, width = np.asarray(depth, dtype=float), np.asarray(width, dtype=float)
        return self.l0 + self.a * depth**-self.alpha + self.b * width**-self.beta

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in PARAMETERS}


@dataclass(frozen=True)
class LawFit:
    law: ScalingLaw
    rmse: float  # root-mean-square residual over the points fitted
    n_points: int


def _points(depths: Sequence[float], widths: Sequence[float], losses: Sequence[float]):
    d, w, y = (np.asarray(v, dtype=float) for v in (depths, widths, losses))
    if not (d.shape == w.shape == y.shape) or d.ndim != 1:
        raise ValueError("depths, widths and losses must be sequences of one length")
    if len(d) < MIN_POINTS:
        raise ValueError(
            f"the law has {MIN_POINTS} constants: fit it on at least {MIN_POINTS} points, not {len(d)}"
        )
    if (d <= 0).any() or (w <= 0).any() or not np.isfinite(y).all():
        raise ValueError("depths and widths must be positive and losses finite")
    return d, w, y


def _bounds(y: np.ndarray, d: np.ndarray, w: np.ndarray):
    """L0 lies below every loss (it is what infinite depth and width leave); a and b are non-negative and
    large enough to reach the largest loss from L0 at the smallest depth or width."""
    lo_exp, hi_exp = EXPONENT_BOUNDS
    reach = float(y.max() - 0.0) * float(max(d.max(), w.max())) ** hi_exp + 1.0
    lower = np.array([0.0, 0.0, lo_exp, 0.0, lo_exp])
    upper = np.array([float(y.min()), reach, hi_exp, reach, hi_exp])
    return lower, upper


def fit_law(
    depths: Sequence[float], widths: Sequence[float], losses: Sequence[float], starts: int = 12, seed: int = 0
) -> LawFit:
    """The least-squares law within bounds, the best of `starts` starting points (the first one a fixed
    guess, the others drawn in the bounds; the exponents and amplitudes trade off, so one start can stall)."""
    d, w, y = _points(depths, widths, losses)
    lower, upper = _bounds(y, d, w)
    rng = np.random.default_rng(seed)

    def residuals(p):
        return ScalingLaw(*p).predict(d, w) - y

    guess = np.array([0.9 * y.min(), (y.max() - y.min()) * d.min(), 0.5, (y.max() - y.min()) * w.min(), 0.5])
    best = None
    for k in range(starts):
        x0 = guess if k == 0 else lower + rng.random(len(PARAMETERS)) * (upper - lower)
        x0 = np.clip(x0, lower + 1e-9, upper - 1e-9)
        result = least_squares(residuals, x0, bounds=(lower, upper), method="trf", x_scale="jac")
        if best is None or result.cost < best.cost:
            best = result
    rmse = float(np.sqrt(np.mean(best.fun**2)))
    return LawFit(ScalingLaw(*map(float, best.x)), rmse, len(y))


def bootstrap_intervals(
    depths: Sequence[float],
    widths: Sequence[float],
    losses: Sequence[float],
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each constant over fits to grid points resampled with replacement (a resample
    with fewer distinct points than constants is drawn again)."""
    d, w, y = _points(depths, widths, losses)
    rng = np.random.default_rng(seed)
    fitted = []
    while len(fitted) < n_boot:
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(idx)) < MIN_POINTS:
            continue
        law = fit_law(d[idx], w[idx], y[idx], starts=4, seed=int(rng.integers(1 << 31))).law
        fitted.append([getattr(law, name) for name in PARAMETERS])
    values = np.array(fitted)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail], axis=0)
    return {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(PARAMETERS)}


@dataclass(frozen=True)
class Extrapolation:
    law: ScalingLaw  # fitted on the smaller configurations only
    held_out: list[
        tuple[float, float, float, float]
    ]  # (depth, width, measured, predicted) of the larger ones
    max_relative_error: float
    mean_relative_error: float


def extrapolation_error(
    depths: Sequence[float],
    widths: Sequence[float],
    losses: Sequence[float],
    max_fit_depth: float,
    max_fit_width: float,
) -> Extrapolation:
    """Fit on the points with depth <= `max_fit_depth` and width <= `max_fit_width`; predict the others and
    compare with their measured loss (the paper: within 5.3 %)."""
    d, w, y = _points(depths, widths, losses)
    inside = (d <= max_fit_depth) & (w <= max_fit_width)
    if (~inside).sum() == 0:
        raise ValueError("no point lies beyond the fitted range: nothing to extrapolate to")
    law = fit_law(d[inside], w[inside], y[inside]).law
    predicted = law.predict(d[~inside], w[~inside])
    relative = np.abs(predicted - y[~inside]) / np.abs(y[~inside])
    held = [
        (float(a), float(b), float(c), float(e))
        for a, b, c, e in zip(d[~inside], w[~inside], y[~inside], predicted)
    ]
    return Extrapolation(law, held, float(relative.max()), float(relative.mean()))


@dataclass(frozen=True)
class BudgetChoice:
    depth: float
    width: float
    latency_ms: float
    loss: float  # predicted by the law, or measured
    predicted: bool


def best_under_budget(
    law: ScalingLaw | None,
    configurations: Sequence[tuple[float, float, float]],
    budget_ms: float,
    measured: dict[tuple[float, float], float] | None = None,
) -> BudgetChoice | None:
    """Among `configurations` of (depth, width, latency ms) that meet the budget, the one with the lowest
    loss: predicted by `law`, or (with `law` None) measured, from `measured[(depth, width)]`, among those
    measured. None when nothing meets the budget."""
    best = None
    for depth, width, latency in configurations:
        if latency > budget_ms:
            continue
        if law is not None:
            loss, predicted = float(law.predict(depth, width)), True
        elif measured is not None and (depth, width) in measured:
            loss, predicted = float(measured[(depth, width)]), False
        else:
            continue
        if best is None or loss < best.loss:
            best = BudgetChoice(float(depth), float(width), float(latency), loss, predicted)
    return best

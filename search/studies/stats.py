"""The studies' statistics (scipy, imported when a report is computed): rank correlation with a bootstrap
interval, and the mean of paired differences with its t interval."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def _percentile_interval(values: list[float]) -> list[float] | None:
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return None
    return [values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]]


def rank_correlation(xs: Sequence[float], ys: Sequence[float], bootstrap: int = 2000, seed: int = 0) -> dict:
    """Spearman and Kendall between paired values, each with a 95 % bootstrap interval (resampling pairs)."""
    from scipy import stats

    n = len(xs)
    if n < 3:
        return {"n": n, "spearman": None, "kendall": None, "spearman_ci95": None, "kendall_ci95": None}
    spearman = float(stats.spearmanr(xs, ys).statistic)
    kendall = float(stats.kendalltau(xs, ys).statistic)
    rng = random.Random(seed)
    boot_s, boot_k = [], []
    for _ in range(bootstrap):
        idx = [rng.randrange(n) for _ in range(n)]
        bx, by = [xs[i] for i in idx], [ys[i] for i in idx]
        if len(set(bx)) < 2 or len(set(by)) < 2:
            continue
        boot_s.append(float(stats.spearmanr(bx, by).statistic))
        boot_k.append(float(stats.kendalltau(bx, by).statistic))
    return {
        "n": n,
        "spearman": spearman,
        "kendall": kendall,
        "spearman_ci95": _percentile_interval(boot_s),
        "kendall_ci95": _percentile_interval(boot_k),
    }


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """The mean of `values` (e.g. paired differences) with its Student-t interval and standard error; the
    interval is None below two values."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "se": None, "ci95": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "se": None, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return {"n": n, "mean": mean, "sd": sd, "se": se, "ci95": [mean - half, mean + half]}


def effect(interval: dict, lower_is_better: bool = True) -> str:
    """What an interval of differences (variant minus baseline) says: `improves`, `hurts`, or `no effect
    distinguishable from seed noise` (the interval covers 0, or there are too few values)."""
    ci = interval.get("ci95")
    if not ci or ci[0] <= 0 <= ci[1]:
        return "no effect distinguishable from seed noise"
    below = ci[1] < 0
    return "improves" if below == lower_is_better else "hurts"

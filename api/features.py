"""Which layout features go with which objectives: Spearman rank correlations between simple features of
each completed candidate's layout (depth, width, the count and share of each operator) and its objectives.
A correlation, not a cause; computed over at most `MAX_CANDIDATES` of the newest candidates."""

from __future__ import annotations

import math
from collections.abc import Sequence

from search.layout import Layout
from search.operators import OPERATORS

MAX_CANDIDATES = 2000


def layout_features(layout: Layout) -> dict[str, float]:
    mixers = layout.mixers
    out = {
        "depth": float(layout.depth),
        "d_model": float(layout.d_model),
        "operators": float(len(layout.operators)),
    }
    for name, spec in OPERATORS.items():
        if spec.kind == "mixer":
            count = mixers.count(name)
            out[f"{name} count"] = float(count)
            out[f"{name} share"] = count / len(mixers) if mixers else 0.0
    return out


def feature_correlations(
    layouts: Sequence[Layout], objectives: dict[str, Sequence[float | None]]
) -> list[tuple[str, dict[str, float | None]]]:
    """[(feature, {objective: Spearman rho})], features that vary only, strongest first (by the largest
    |rho|). An objective with under 3 values, or a constant one, gives None."""
    from scipy.stats import spearmanr

    rows = [layout_features(lo) for lo in layouts]
    if not rows:
        return []
    out = []
    for feature in rows[0]:
        values = [r[feature] for r in rows]
        if len(set(values)) < 2:
            continue
        rhos: dict[str, float | None] = {}
        for name, ys in objectives.items():
            pairs = [(v, y) for v, y in zip(values, ys) if y is not None and math.isfinite(y)]
            rho = None
            if len(pairs) >= 3 and len({y for _, y in pairs}) > 1 and len({v for v, _ in pairs}) > 1:
                rho = float(spearmanr([v for v, _ in pairs], [y for _, y in pairs]).statistic)
            rhos[name] = round(rho, 4) if rho is not None and math.isfinite(rho) else None
        out.append((feature, rhos))
    return sorted(out, key=lambda item: -max((abs(v) for v in item[1].values() if v is not None), default=0))

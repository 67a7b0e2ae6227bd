"""Results as pandas DataFrames (pandas is the optional `[pandas]` extra), one row per candidate, like
Optuna's `trials_dataframe()`: the candidate's columns, with its layout flattened into `layout.*`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("DataFrames need pandas: pip install 'hybridnas[pandas]'") from None
    return pandas


def _row(item: Any) -> dict[str, Any]:
    if hasattr(item, "model_dump"):
        return item.model_dump(mode="json")
    if hasattr(item, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(item)
    return dict(item)


def to_dataframe(items: Iterable[Any]):
    """Candidates (API schemas, storage records or dicts) as a DataFrame indexed by candidate id."""
    pandas = _pandas()
    rows = [_row(item) for item in items]
    frame = pandas.json_normalize(rows, max_level=1) if rows else pandas.DataFrame()
    for key in ("id", "candidate_id"):  # API schemas and records say `id`; the export rows `candidate_id`
        if key in frame.columns:
            return frame.set_index(key).sort_index()
    return frame

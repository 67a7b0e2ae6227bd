"""A finished search for the tests that take a candidate further (train, tune, export): run here with the
inline executor, its data dir and data root under a test folder."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import hybridnas


@contextlib.contextmanager
def searched_here(
    root: Path, config: dict, database_url: str | None = None
) -> Iterator[tuple[hybridnas.SearchResult, pytest.MonkeyPatch]]:
    """(the completed search, the monkeypatch) with HYBRIDNAS_DATA_DIR = root/data and root the data root,
    set while the block runs (what runs later in it reads the same settings); the database: `database_url`,
    else the settings' own under the data dir."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYBRIDNAS_DATA_DIR", str(root / "data"))
        mp.setenv("HYBRIDNAS_DATA_ROOTS", json.dumps([str(root)]))
        mp.delenv("HYBRIDNAS_DATABASE_URL", raising=False)
        result = hybridnas.run_search(config, database_url, executor="inline")
        assert result.search.status == "completed"
        yield result, mp

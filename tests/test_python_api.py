"""The public Python API in-process: `hybridnas.run_search` (a real search on the inline executor, read back
through the API's schemas), its DataFrame, and the service's checks on its config (a `ConfigError` naming the
field, and nothing created)."""

from __future__ import annotations

import json
import os

import pytest

import hybridnas
from search.pareto import dominates
from search.storage import Storage
from tests.test_engine import TINY


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDNAS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HYBRIDNAS_DATA_ROOTS", json.dumps([str(tmp_path)]))
    return tmp_path / "data"


def test_run_search_returns_its_front_candidates_and_hypervolume(data_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'mine.db'}"
    result = hybridnas.run_search(
        {**TINY, "budget": 4, "name": "notebook"}, database_url=url, executor="inline"
    )
    assert result.search.status == "completed" and result.search.name == "notebook"
    assert result.database_url == url and (tmp_path / "mine.db").is_file()
    assert len(result.candidates) == 4 and all(c.status == "completed" for c in result.candidates)
    points = {c.id: (c.val_bpb, c.decode_ms) for c in result.candidates}
    expected = {i for i, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != i)}
    assert {c.id for c in result.front} == expected  # the front is the non-dominated set
    assert result.hypervolume_history and result.hypervolume_history[-1][0] == 4
    with Storage(url) as storage:
        stored = {c.id: c for c in storage.candidates(result.id)}
    for c in result.candidates:
        assert result.layout(c.id).content_hash == stored[c.id].layout_hash
    frame = result.to_dataframe()
    assert sorted(frame.index) == sorted(points)
    assert frame.loc[result.front[0].id, "val_bpb"] == pytest.approx(result.front[0].val_bpb)
    assert set(frame["operators"]) == {result.layout(i).compact() for i in points}


def test_a_bad_config_names_the_field_and_creates_nothing(data_dir):
    with pytest.raises(hybridnas.ConfigError) as refused:
        hybridnas.run_search({**TINY, "budget": 2, "proxy": {"steps": 2.5}}, executor="inline")
    assert [e.field for e in refused.value.errors] == ["proxy.steps"]
    with pytest.raises(hybridnas.ConfigError) as outside:
        hybridnas.run_search({**TINY, "budget": 2, "data": {"corpus": "/etc"}}, executor="inline")
    assert outside.value.errors[0].field == "data.corpus"
    assert "outside the configured data roots" in str(outside.value)
    assert not data_dir.exists()


def test_the_package_re_exports_what_user_code_needs():
    for name in hybridnas.__all__:
        assert getattr(hybridnas, name) is not None, name
    assert hybridnas.__version__ and hybridnas.Layout is hybridnas.get_preset("llama").__class__


def test_an_inline_search_leaves_the_callers_environment_alone(data_dir, monkeypatch):
    """The inline worker is a thread of this process: it must not strip the caller's credentials (a Ray
    worker process strips them from its own environment; test_reliability checks that)."""
    monkeypatch.setenv("HYBRIDNAS_TOKEN", "caller-token")
    monkeypatch.setenv("PGPASSWORD", "caller-password")
    hybridnas.run_search({**TINY, "budget": 1}, executor="inline")
    assert os.environ.get("HYBRIDNAS_TOKEN") == "caller-token"
    assert os.environ.get("PGPASSWORD") == "caller-password"

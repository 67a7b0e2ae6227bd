"""Chaos on the real parts (issue 9): a search through `hybridnas serve` on local Ray while a seeded harness
kill -9s a random Ray worker or the coordinator three times (tests/chaos.py), on SQLite and PostgreSQL. After
the run: the budget is met, no result key has two results, no completed result was lost or changed, every
failed candidate has a reason, and no process of the run is left. The longer run (at least 10 kills and a
PostgreSQL restart) is `benchmarks/chaos.py`."""

import pytest

from tests import pg
from tests.chaos import run_chaos


@pytest.mark.parametrize("backend", pg.BACKENDS)
def test_a_search_survives_three_random_kills(tmp_path, backend):
    with pg.migrated_url(backend, tmp_path) as url:
        report = run_chaos(
            url,
            backend,
            tmp_path,
            seed=7 if backend == "sqlite" else 8,
            kills=3,
            budget=8,
            coordinator_share=0.34,
            # Gaps of up to 2 s: a quiet machine evaluates the 8 candidates in about 10 s, and the 8 s gaps of
            # the longer run let it finish before its third kill (seed 8 drew a 6.5 s gap).
            max_gap_s=2.0,
        )
    assert sum(report.kills.values()) == 3, report
    assert report.problems == [], report
    assert report.status == "completed" and report.evaluations == 8

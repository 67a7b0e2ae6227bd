"""The `hybridnas` command line as a user runs it (a real process, a real SQLite database in a temporary data
dir): searches run, listed, shown, exported, cancelled and deleted on the local database with `--json`; the
exit codes (0 done, 1 the work failed, 2 usage or validation, 130 interrupted is in test_reliability); plain
progress lines when stderr is not a terminal; logging levels and JSON logs; no warnings on a normal run (Ray
included); `db upgrade` / `db current` and `alembic upgrade head` on the service's settings."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from tests.test_engine import TINY

HYBRIDNAS = str(Path(sys.executable).with_name("hybridnas"))
ALEMBIC = str(Path(sys.executable).with_name("alembic"))
ROOT = Path(__file__).resolve().parent.parent


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDNAS_")}
    env.update(
        HYBRIDNAS_DATA_DIR=str(tmp_path / "data"),
        HYBRIDNAS_DATA_ROOTS=json.dumps([str(tmp_path)]),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def cli(tmp_path: Path, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HYBRIDNAS, *args],
        cwd=tmp_path,
        env=env_for(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({**TINY, "name": "tiny", "budget": 3, **overrides}))
    return path


def log_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not progress lines (`search N: done/total ...`)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("search ")]


def test_version_is_the_installed_one(tmp_path):
    done = cli(tmp_path, "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"hybridnas {version('hybridnas')}", done


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One finished local search (inline executor, 3 evaluations), run as `search run --json`."""
    tmp_path = tmp_path_factory.mktemp("cli")
    done = cli(tmp_path, "search", "run", str(write_config(tmp_path)), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path, done


def test_search_run_prints_the_final_search_as_json_and_plain_progress(ran):
    tmp_path, done = ran
    search = json.loads(done.stdout)  # stdout holds the JSON only (no table)
    assert search["status"] == "completed" and search["n_evaluations"] == 3 and search["name"] == "tiny"
    progress = [line for line in done.stderr.splitlines() if line.startswith(f"search {search['id']}: ")]
    assert progress and progress[-1].startswith(f"search {search['id']}: 3/3"), done.stderr
    assert "\x1b[" not in done.stderr  # not a terminal: no control sequences
    assert "WARNING" not in done.stderr and "lease lost" not in done.stderr, done.stderr


def test_list_show_candidates_and_export_agree(ran):
    tmp_path, _ = ran
    listed = json.loads(cli(tmp_path, "search", "list", "--json").stdout)
    assert [(s["name"], s["status"]) for s in listed] == [("tiny", "completed")]
    search_id = listed[0]["id"]
    shown = json.loads(cli(tmp_path, "search", "show", "tiny", "--json").stdout)  # by name
    assert shown["id"] == search_id and sum(shown["counts"].values()) == 3
    candidates = json.loads(cli(tmp_path, "search", "candidates", str(search_id), "--json").stdout)
    assert len(candidates) == 3 and all(c["job_id"] == search_id for c in candidates)
    front_ids = {c["id"] for c in candidates if c["on_front"]}
    assert front_ids and {c["id"] for c in shown["front"]} == front_ids
    rows = list(csv.DictReader(io.StringIO(cli(tmp_path, "search", "export", str(search_id)).stdout)))
    assert sorted(int(r["candidate_id"]) for r in rows) == sorted(c["id"] for c in candidates)
    out = tmp_path / "all.jsonl"
    assert cli(tmp_path, "search", "export", "tiny", "--format", "jsonl", "-o", str(out)).returncode == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["candidate_id"]: r["val_bpb"] for r in lines} == {c["id"]: c["val_bpb"] for c in candidates}
    table = cli(tmp_path, "search", "list")  # human output: a table naming it
    assert table.returncode == 0 and "tiny" in table.stdout and "completed" in table.stdout


def test_exit_codes_of_refused_work_and_bad_usage(ran):
    tmp_path, _ = ran
    cancel = cli(tmp_path, "search", "cancel", "tiny")
    assert cancel.returncode == 1 and "409" in cancel.stderr and "completed" in cancel.stderr, cancel.stderr
    missing = cli(tmp_path, "search", "show", "999")
    assert missing.returncode == 1 and "no search 999" in missing.stderr, missing.stderr
    unnamed = cli(tmp_path, "search", "show", "no-such-name")
    assert unnamed.returncode == 1 and "no search named 'no-such-name'" in unnamed.stderr
    bad_format = cli(tmp_path, "search", "export", "tiny", "--format", "xml")
    assert bad_format.returncode == 2 and "--format" in bad_format.stderr
    bad_level = cli(tmp_path, "search", "list", HYBRIDNAS_LOG_LEVEL="loud")
    assert bad_level.returncode == 2 and "HYBRIDNAS_LOG_LEVEL" in bad_level.stderr


def test_delete_and_ids_are_never_reused(tmp_path):
    config = write_config(tmp_path, budget=1)
    first = json.loads(cli(tmp_path, "search", "run", str(config), "--json").stdout)
    assert cli(tmp_path, "search", "delete", str(first["id"]), "--yes").returncode == 0
    assert json.loads(cli(tmp_path, "search", "list", "--json").stdout) == []
    second = json.loads(cli(tmp_path, "search", "run", str(config), "--json").stdout)
    assert second["id"] > first["id"]


def test_log_levels_and_json_logs(tmp_path):
    config = write_config(tmp_path, budget=1)
    quiet = cli(tmp_path, "-q", "search", "run", str(config))
    assert quiet.returncode == 0 and not [line for line in log_lines(quiet.stderr) if " INFO " in line]
    # another training budget: evaluated again (not reused), so the worker logs
    config = write_config(tmp_path, budget=1, proxy={**TINY["proxy"], "steps": 3})
    logged = cli(tmp_path, "search", "run", str(config), HYBRIDNAS_LOG_FORMAT="json")
    assert logged.returncode == 0, logged.stderr
    records = [json.loads(line) for line in log_lines(logged.stderr) if not line.startswith("search ")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"].startswith("hybridnas.") for r in records), records
    verbose = cli(tmp_path, "-v", "search", "list")
    assert verbose.returncode == 0 and " DEBUG " in verbose.stderr


def test_a_ray_search_prints_no_warning(tmp_path):
    """The local Ray's token-auth warning and the heartbeat's 'lease lost' at a normal end are gone."""
    config = write_config(tmp_path, budget=2, executor="ray", workers=1)
    done = cli(tmp_path, "search", "run", str(config), HYBRIDNAS_RAY_NUM_CPUS="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr and "Token authentication" not in done.stderr, done.stderr
    assert "lease lost" not in done.stderr


def test_db_upgrade_current_and_alembic_read_the_service_settings(tmp_path):
    before = cli(tmp_path, "db", "current", "--json")
    assert before.returncode == 1 and "no database at" in before.stderr
    assert not (tmp_path / "data").exists()  # a read never creates anything
    assert cli(tmp_path, "db", "upgrade").returncode == 0
    state = json.loads(cli(tmp_path, "db", "current", "--json").stdout)
    assert state["current"] and state["revision"] == state["head"]
    assert str(tmp_path / "data" / "hybridnas.db") in state["database"]
    # alembic, from the project's alembic.ini, migrates the database HYBRIDNAS_DATABASE_URL names
    other = tmp_path / "other.db"
    done = subprocess.run(
        [ALEMBIC, "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=tmp_path,
        env=env_for(tmp_path, HYBRIDNAS_DATABASE_URL=f"sqlite:///{other}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    state = json.loads(cli(tmp_path, "db", "current", "--json", "--db", f"sqlite:///{other}").stdout)
    assert state["current"], state


def test_layouts_list_and_show_as_json_with_counts(tmp_path):
    from search.params import count_parameters
    from search.presets import get_preset, preset_names

    listed = json.loads(cli(tmp_path, "layouts", "list", "--json").stdout)
    assert [p["name"] for p in listed] == list(preset_names())
    for preset in listed:
        layout = get_preset(preset["name"])
        count = count_parameters(layout, layout.vocab_size or 256)
        assert preset["parameters"]["total"] == count.total and preset["d_model"] == layout.d_model
    shown = json.loads(cli(tmp_path, "layouts", "show", "llama", "--json", "--vocab-size", "257").stdout)
    llama = get_preset("llama")
    assert shown["hash"] == llama.content_hash and shown["compact"] == llama.compact()
    assert shown["parameters"]["embedding"] == count_parameters(llama, 257).embedding
    layout_file = tmp_path / "llama.json"
    layout_file.write_text(cli(tmp_path, "layouts", "show", "llama", "--layout-only").stdout)
    checked = cli(tmp_path, "layouts", "validate", str(layout_file))
    assert checked.returncode == 0 and llama.content_hash in checked.stdout

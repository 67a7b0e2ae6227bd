"""`hybridnas.Client` and the CLI's `--url` against a real `hybridnas serve` (a child process on loopback,
SQLite, one runner, searches on the inline executor), with its log in JSON lines; the client's retries
against a real uvicorn (tests/live.py) whose admission control refuses, and against a port that starts
listening late."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

import hybridnas
from api.admission import Admission
from tests.live import Live, free_port
from tests.test_engine import TINY

HYBRIDNAS = str(Path(sys.executable).with_name("hybridnas"))
TOKEN = "client-test-token-0123456789"
pytestmark = pytest.mark.timeout(600)


def tiny(name: str, budget: int = 3, **overrides) -> dict:
    return {**TINY, "name": name, "budget": budget, **overrides}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`hybridnas serve` in a child process; yields (base URL, its stderr log path)."""
    tmp_path = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDNAS_")}
    env.update(
        HYBRIDNAS_DATA_DIR=str(tmp_path / "data"),
        HYBRIDNAS_DATA_ROOTS=json.dumps([str(tmp_path)]),
        HYBRIDNAS_TOKEN=TOKEN,
        HYBRIDNAS_LOG_FORMAT="json",
        HYBRIDNAS_SCHEDULER="false",
    )
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [HYBRIDNAS, "serve", "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/api/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)
    yield base, log_path, env
    proc.terminate()
    assert proc.wait(60) == 0, log_path.read_text()[-3000:]


@pytest.fixture
def client(server):
    with hybridnas.Client(server[0], TOKEN) as c:
        yield c


def test_submit_wait_and_read_back(client, capfd):
    created = client.submit(tiny("first"), idempotency_key="first-1")
    assert isinstance(created, hybridnas.SearchCreated) and not created.replayed
    again = client.submit(tiny("first"), idempotency_key="first-1")  # a retried submission: the same search
    assert again.id == created.id and again.replayed
    final = client.wait(created.id, progress=True)
    assert final.status == "completed" and final.n_evaluations == 3
    assert f"search {created.id}: 3/3" in capfd.readouterr().err  # plain progress lines off a terminal
    candidates = client.candidates(created.id)
    assert len(candidates) == 3 and all(isinstance(c, hybridnas.CandidateSummary) for c in candidates)
    front = client.pareto(created.id).items
    assert front and {c.id for c in front} == {c.id for c in candidates if c.on_front}
    best = min(front, key=lambda c: c.val_bpb)
    detail = client.candidate(best.id)
    assert detail.val_bpb == best.val_bpb and client.layout(best.id).content_hash == best.layout_hash
    assert client.search("first").id == created.id  # by name
    frame = client.candidates_dataframe(created.id)
    assert sorted(frame.index) == sorted(c.id for c in candidates)
    assert frame.loc[best.id, "val_bpb"] == pytest.approx(best.val_bpb)
    assert created.id in [s.id for s in client.searches(status="completed")]


def test_configs_from_a_yaml_file_and_a_search_config(client, tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(tiny("from-yaml", budget=1)))
    from_file = client.submit(path)
    from_model = client.submit(hybridnas.SearchConfig.model_validate(tiny("from-model", budget=1)))
    for created in (from_file, from_model):
        assert client.wait(created.id, progress=False).status == "completed"
    assert client.search(from_model.id).name == "from-model"


def test_refusals_are_problem_details_naming_the_field(client):
    with pytest.raises(hybridnas.ApiError) as refused:
        client.submit({**tiny("bad"), "budget": 0, "proxy": {"lr": -1}})
    assert refused.value.status == 422
    assert {e.field for e in refused.value.errors} == {"budget", "proxy.lr"}
    with pytest.raises(hybridnas.ApiError) as missing:
        client.search(999_999)
    assert missing.value.status == 404 and "no search 999999" in str(missing.value)
    with pytest.raises(hybridnas.HybridnasError, match="no search named"):
        client.search("never-submitted")


def test_cancel_resume_and_delete(client):
    created = client.submit(tiny("long", budget=200, proxy={**TINY["proxy"], "steps": 30}))
    assert client.cancel(created.id).status == "cancelled"
    with pytest.raises(hybridnas.ApiError) as conflict:
        client.archive(created.id + 10_000)
    assert conflict.value.status == 404
    assert client.resume(created.id).status in ("queued", "running")
    client.cancel(created.id)
    deadline = time.monotonic() + 60  # the runner lets go of it (its evaluations in flight stop)
    while client.search(created.id).status != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    client.delete(created.id)
    with pytest.raises(hybridnas.ApiError) as gone:
        client.search(created.id)
    assert gone.value.status == 404


def test_a_study_through_the_client(client):
    """A tiny depth-width study submitted to the service, run by its runner, its report read back."""
    config = {
        "depths": [1, 2, 3],
        "widths": [32, 64],
        "proxy": TINY["proxy"],
        "latency": TINY["latency"],
        "executor": "inline",
        "workers": 1,
        "bootstrap": 10,
    }
    created = client.submit_study(config, kind="depth-width")
    assert isinstance(created, hybridnas.StudyDetail) and created.status == "queued"
    final = client.wait_study(created.id, poll_s=0.5, progress=False)
    assert final.status == "completed", final.error
    assert final.result["n_measured"] == 6 and "law" in final.result
    assert [r.kind for r in final.runs] == ["study-run"]
    assert created.id in [s.id for s in client.studies(kind="depth-width")]


def test_schedules(client):
    schedule = client.create_schedule("nightly", "0 2 * * *", tiny("nightly"), enabled=False)
    assert isinstance(schedule, hybridnas.ScheduleOut) and not schedule.enabled
    assert schedule.id in [s.id for s in client.schedules()]
    assert client.update_schedule(schedule.id, timezone="Europe/Paris").timezone == "Europe/Paris"
    assert client.fires(schedule.id) == []
    client.delete_schedule(schedule.id)
    with pytest.raises(hybridnas.ApiError) as gone:
        client.schedule(schedule.id)
    assert gone.value.status == 404


def test_the_cli_works_on_the_server_with_url(server, tmp_path):
    base, _, env = server
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(tiny("cli-remote", budget=2)))
    cli_env = {**env, "HYBRIDNAS_URL": base, "HYBRIDNAS_DATA_DIR": str(tmp_path / "elsewhere")}

    def run(*args):
        return subprocess.run([HYBRIDNAS, *args], env=cli_env, capture_output=True, text=True, timeout=300)

    done = run("search", "run", str(config), "--json")
    assert done.returncode == 0, done.stderr
    search = json.loads(done.stdout)
    assert search["status"] == "completed" and search["name"] == "cli-remote"
    listed = json.loads(run("search", "list", "--json").stdout)
    assert search["id"] in [s["id"] for s in listed]
    shown = json.loads(run("search", "show", "cli-remote", "--json").stdout)
    assert shown["id"] == search["id"] and shown["front"]
    bad = run("search", "cancel", str(search["id"]))
    assert bad.returncode == 1 and "409" in bad.stderr
    assert not (tmp_path / "elsewhere").exists()  # nothing local was touched


def test_the_service_logs_in_one_json_format(server, client):
    """uvicorn's, the runner's and the worker's records all come out as JSON objects, one per line."""
    client.wait(client.submit(tiny("logged", budget=1, seed=11)).id, progress=False)
    lines = [line for line in server[1].read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line: a JSON object
    loggers = {r["logger"] for r in records}
    assert {"hybridnas.serve", "uvicorn.error"} <= loggers, loggers
    assert any(name.startswith("hybridnas.") and name != "hybridnas.serve" for name in loggers), loggers
    assert not [r for r in records if r["level"] == "warning"], [
        r for r in records if r["level"] == "warning"
    ]


# ----------------------------------------------------------------------------------------------- retries


def test_retries_ride_out_overload(tmp_path):
    """A real uvicorn whose admission control is full: a client without retries sees the 503 as an
    ApiError; one with retries waits the Retry-After and gets the answer once a slot frees."""
    live = Live(tmp_path, TOKEN)
    try:
        admission = live.middleware(Admission)
        admission.in_flight = admission.limit  # every slot taken
        with hybridnas.Client(live.base, TOKEN, retries=0) as impatient:
            with pytest.raises(hybridnas.ApiError) as refused:
                impatient.searches()
        assert refused.value.status == 503
        threading.Timer(0.8, lambda: setattr(admission, "in_flight", 0)).start()
        refused_before = admission.refused
        with hybridnas.Client(live.base, TOKEN, retries=4) as patient:
            assert patient.searches() == []
        assert admission.refused > refused_before  # it was refused first, then served
    finally:
        live.close()


def test_retries_reach_a_server_that_starts_late(tmp_path):
    port = free_port()
    with hybridnas.Client(f"http://127.0.0.1:{port}", TOKEN, retries=1, backoff_s=0.05) as client:
        with pytest.raises(hybridnas.HybridnasError, match="cannot reach the coordinator"):
            client.searches()
    import uvicorn

    from api.app import create_app
    from api.auth import Auth
    from api.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", runners=0, scheduler=False)
    settings.ensure_data_dir()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, auth=Auth(TOKEN)), port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    threading.Timer(1.0, thread.start).start()  # listening about a second from now
    try:
        with hybridnas.Client(f"http://127.0.0.1:{port}", TOKEN, retries=8, backoff_s=0.1) as client:
            assert client.searches() == []
    finally:
        server.should_exit = True
        thread.join(30)

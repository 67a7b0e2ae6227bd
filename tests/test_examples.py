"""examples/quickstart.py as a new user runs it: in this process with `hybridnas.run_search`, then, with
HYBRIDNAS_URL set, against a real `hybridnas serve` on loopback through `hybridnas.Client`."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.live import free_port

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.py"
HYBRIDNAS = str(Path(sys.executable).with_name("hybridnas"))
TOKEN = "examples-test-token"
FRONT_LINE = re.compile(r"^  candidate (\d+): val_bpb (\d+\.\d+), decode (\d+\.\d+) ms/token")


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment without any HYBRIDNAS_* of the caller's (URL, token, database), data in tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDNAS_")}
    return {**env, "HYBRIDNAS_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1", **extra}


def run_quickstart(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(QUICKSTART), "--budget", "2"],
        cwd=tmp_path,
        env=clean_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=600,
    )


def succeeded(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def fronts(output: str) -> dict[str, list[tuple[int, float]]]:
    """The printed fronts by title ("local", "remote"): (candidate id, val_bpb) per line."""
    found: dict[str, list[tuple[int, float]]] = {}
    current = None
    for line in output.splitlines():
        header = re.match(r"^(\w+): \d+ candidate\(s\) on the Pareto front", line)
        if header:
            current = found.setdefault(header.group(1), [])
        elif current is not None and (m := FRONT_LINE.match(line)):
            current.append((int(m.group(1)), float(m.group(2))))
        else:
            current = None
    return found


def test_quickstart_runs_a_search_in_process(tmp_path):
    out = succeeded(run_quickstart(tmp_path))
    assert re.search(r"^local search \d+: completed, 2 evaluations$", out, re.M), out
    front = fronts(out)
    assert front.get("local"), out
    assert all(bpb > 0 for _, bpb in front["local"])
    assert "remote" not in front and "remote search" not in out
    assert (tmp_path / "data" / "hybridnas.db").is_file()  # HYBRIDNAS_DATA_DIR's SQLite, not ./.hybridnas


def test_quickstart_submits_to_a_coordinator_when_hybridnas_url_is_set(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve_env = clean_env(
        tmp_path, HYBRIDNAS_TOKEN=TOKEN, HYBRIDNAS_SCHEDULER="false", HYBRIDNAS_POLL_S="0.2"
    )
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [HYBRIDNAS, "serve", "--port", str(port), "--data-dir", str(tmp_path / "serve-data")],
            cwd=tmp_path,
            env=serve_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the coordinator did not become ready"
            try:
                if httpx.get(f"{base}/api/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)

        proc = run_quickstart(tmp_path, HYBRIDNAS_URL=base, HYBRIDNAS_TOKEN=TOKEN)
        out = succeeded(proc)
        front = fronts(out)
        assert front.get("local") and front.get("remote"), out
        submitted = re.search(rf"^remote search (\d+) submitted to {re.escape(base)}$", out, re.M)
        assert submitted, out
        remote_id = int(submitted.group(1))
        assert re.search(rf"^remote search {remote_id}: completed, 2 evaluations$", out, re.M), out
        # The coordinator ran it: its own database has the search and the front the example printed.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        search = httpx.get(f"{base}/api/searches/{remote_id}", headers=auth, timeout=10).json()
        assert search["status"] == "completed" and search["name"] == "quickstart"
        pareto = httpx.get(f"{base}/api/searches/{remote_id}/pareto", headers=auth, timeout=10).json()
        assert sorted(c["id"] for c in pareto["items"]) == sorted(cid for cid, _ in front["remote"])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(30)

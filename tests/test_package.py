"""The package as a user installs it: the wheel built from this tree, installed into a fresh virtual
environment (its dependencies resolved by pip's own configuration and cache; torch from the local CPU build
that constraints/cpu.txt pins), then run from an empty folder with no source tree in reach: `--version`,
the demo on a tiny budget, `search list --json`, `db current --json`, and the imports.

Slow (a venv of torch, Ray and the rest: minutes), so it prints its timings for the CI log. Outside CI it
is skipped where pip cannot install torch without downloading it; under CI=true it always runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.live import free_port

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints" / "cpu.txt"
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
# The environment's own settings that could point the installed package back at this tree or its data.
DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")


def run(cmd: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def local_torch_install_possible() -> bool:
    """pip can install the pinned torch without a download (a local find-links wheel, as on CI)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--no-deps",
            "--ignore-installed",
            "-q",
            "-c",
            str(CONSTRAINTS),
            "torch",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode == 0


def tree_files() -> list[str]:
    """The working tree's files as a clean checkout plus local edits has them (tracked and untracked, not
    ignored: no .venv, build/, *.egg-info or data dirs)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    return [f for f in listing.split("\0") if f and (ROOT / f).is_file()]


def user_env(venv: Path) -> dict[str, str]:
    """The caller's environment without HYBRIDNAS_* settings, PYTHONPATH and this tree on PATH; the venv's
    bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYBRIDNAS_") and k not in DROPPED_ENV}
    path = [
        p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(ROOT)
    ]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env.update(PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1")
    return env


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_of(venv: Path) -> list[int]:
    """Live processes whose command line names the venv (its python, the coordinator, Ray's daemons)."""
    marker = str(venv).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.mark.timeout(1500)
def test_the_wheel_installs_into_a_fresh_venv_and_runs_from_an_empty_folder(tmp_path, capsys):
    if not IN_CI:
        if shutil.which("git") is None or not (ROOT / ".git").exists():
            pytest.skip("not a git checkout: the wheel is built from the tracked tree")
        if not local_torch_install_possible():
            pytest.skip(f"pip cannot install the torch of {CONSTRAINTS.name} without downloading it")
    timings: dict[str, float] = {}

    def report(step: str, started: float) -> None:
        timings[step] = time.monotonic() - started
        with capsys.disabled():
            print(f"\n[test_package] {step}: {timings[step]:.1f} s", flush=True)

    # 1. The wheel, built from a copy of the tree (its build/ and *.egg-info stay out of the checkout).
    src, dist = tmp_path / "src", tmp_path / "dist"
    for name in tree_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    started = time.monotonic()
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src],
        timeout=600,
        cwd=tmp_path,
    )
    report("wheel build", started)
    (wheel,) = dist.glob("hybridnas-*.whl")
    version = wheel.name.split("-")[1]

    # Every file of the packages that the tree tracks is in the wheel (templates, static files, migrations).
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    packages = {name.split("/", 1)[0] for name in shipped if "/" in name and ".dist-info/" not in name}
    assert {"hybridnas", "api", "search", "models", "proxies", "latency", "web", "migrations"} <= packages
    assert "tests" not in packages
    missing = sorted(
        name
        for name in tree_files()
        if name.split("/", 1)[0] in packages and "__pycache__" not in name and name not in shipped
    )
    assert not missing, f"tracked package files missing from {wheel.name}: {missing}"

    # 2. A fresh venv with the wheel and its dependencies (no system site-packages: a missing dependency
    # fails here).
    venv = tmp_path / "venv"
    home = tmp_path / "user"  # the empty folder the user runs from
    home.mkdir()
    env = user_env(venv)
    demo = None
    try:
        started = time.monotonic()
        run([sys.executable, "-m", "venv", venv], timeout=300, cwd=home, env=env)
        py = venv / "bin" / "python"
        run([py, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, wheel], timeout=1200, cwd=home, env=env)
        report("venv + install", started)
        hybridnas = venv / "bin" / "hybridnas"
        assert hybridnas.is_file()
        assert not any(home.iterdir())

        # 3. From the empty folder: the version, and the imports come from the venv's site-packages.
        out = run([hybridnas, "--version"], timeout=120, cwd=home, env=env).stdout.strip()
        assert out == f"hybridnas {version}"
        probe = (
            "import json, sys, hybridnas, search\n"
            "from search.storage import MIGRATIONS_DIR\n"
            "print(json.dumps({'version': hybridnas.__version__, 'hybridnas': hybridnas.__file__,\n"
            "    'search': search.__file__, 'migrations': str(MIGRATIONS_DIR), 'path': sys.path}))\n"
        )
        found = json.loads(
            run([py, "-c", probe], timeout=300, cwd=home, env=env).stdout.strip().splitlines()[-1]
        )
        venv_root = venv.resolve()
        assert found["version"] == version
        for key in ("hybridnas", "search", "migrations"):
            assert Path(found[key]).resolve().is_relative_to(venv_root), (key, found[key])
        assert not any(p and Path(p).resolve().is_relative_to(ROOT) for p in found["path"]), found["path"]
        migrations = Path(found["migrations"])
        assert (migrations / "env.py").is_file() and (migrations / "script.py.mako").is_file()
        assert {p.name for p in (migrations / "versions").glob("*.py")} == {
            p.name for p in (ROOT / "migrations" / "versions").glob("*.py")
        }

        # 4. The demo on a tiny budget: its own coordinator on a free loopback port, stopped when done.
        port = free_port()
        log_path = tmp_path / "demo.log"
        started = time.monotonic()
        with open(log_path, "wb") as log:
            demo = subprocess.Popen(
                [str(hybridnas), "demo", "--exit-when-done", "--budget", "1", "--port", str(port)],
                cwd=home,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            rc = demo.wait(900)
        report("demo --budget 1", started)
        text = log_path.read_text(errors="replace")
        assert rc == 0, text[-4000:]
        assert "Pareto front" in text and "search 1 (completed)" in text, text[-4000:]
        assert (home / ".hybridnas" / "hybridnas.db").is_file()  # the default data dir, under the cwd
        # The coordinator and its Ray are gone: nothing listens, no process of the venv is left.
        assert wait_until(lambda: not listening(port), 30), f"port {port} still listening after the demo"
        assert wait_until(lambda: not processes_of(venv), 60), f"left running: {processes_of(venv)}"

        # 5. The CLI reads what the demo left in ./.hybridnas.
        searches = json.loads(
            run([hybridnas, "search", "list", "--json"], timeout=300, cwd=home, env=env).stdout
        )
        assert len(searches) == 1, searches
        assert searches[0]["status"] == "completed" and searches[0]["n_evaluations"] == 1, searches
        state = json.loads(run([hybridnas, "db", "current", "--json"], timeout=300, cwd=home, env=env).stdout)
        assert state["current"] is True, state
        assert str(home / ".hybridnas" / "hybridnas.db") in state["database"], state
        with capsys.disabled():
            print(
                "[test_package] " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in timings.items()),
                flush=True,
            )
    finally:
        if demo is not None and demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(30)
        for pid in processes_of(venv):  # only processes started from this test's venv
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(venv, ignore_errors=True)  # about 1.5 GB

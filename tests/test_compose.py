"""The compose stack's files as docker-compose itself resolves them: the base file, both profiles, and the
local-image override (deploy/compose.local.yml). Without docker-compose these tests skip, except under
CI=true, where a missing docker-compose fails them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ["-f", "docker-compose.yml"]
LOCAL = [*BASE, "-f", "deploy/compose.local.yml"]


@pytest.fixture(scope="module")
def compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("docker-compose is missing (apt-get install docker-compose; .ci/run installs it)")
        pytest.skip("docker-compose is not installed")
    return found


def run(compose: str, *args: str) -> str:
    done = subprocess.run(
        [compose, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ}
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def resolved(compose: str, *files: str, profile: str | None = None) -> dict:
    profiles = ["--profile", profile] if profile else []
    return yaml.safe_load(run(compose, *files, *profiles, "config"))


@pytest.mark.parametrize("files", [BASE, LOCAL], ids=["base", "local-override"])
@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_config_is_valid(compose, files, profile):
    profiles = ["--profile", profile] if profile else []
    assert run(compose, *files, *profiles, "config", "-q") == ""


def test_services_per_profile(compose):
    services = resolved(compose, *BASE)["services"]
    always = {name for name, service in services.items() if not service.get("profiles")}
    assert always == {"postgres", "coordinator", "ray-head"}
    assert services["ray-worker-cpu"]["profiles"] == ["cpu"]
    assert services["ray-worker"]["profiles"] == ["gpu"]


def test_gpu_worker_reserves_an_nvidia_device_and_scales(compose):
    worker = resolved(compose, *BASE, profile="gpu")["services"]["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "container_name" not in worker and "ports" not in worker
    assert "--address=ray-head:6379" in worker["command"]


def test_coordinator_env_ports_and_health(compose, monkeypatch):
    for name in ("HYBRIDNAS_DATABASE_URL", "RAY_ADDRESS", "HYBRIDNAS_PORT"):
        monkeypatch.delenv(name, raising=False)
    services = resolved(compose, *BASE)["services"]
    env = services["coordinator"]["environment"]
    assert env["HYBRIDNAS_DATABASE_URL"].endswith("@postgres:5432/hybridnas")
    assert env["RAY_ADDRESS"] == "ray-head:6379"
    assert services["coordinator"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["coordinator"]["ports"] == ["127.0.0.1:8000:8000/tcp"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "--num-cpus=0" in services["ray-head"]["command"]


def test_environment_overrides_the_defaults(compose, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://cluster:10001")
    monkeypatch.setenv("HYBRIDNAS_PORT", "18123")
    coordinator = resolved(compose, *BASE)["services"]["coordinator"]
    assert coordinator["environment"]["RAY_ADDRESS"] == "ray://cluster:10001"
    assert coordinator["ports"] == ["127.0.0.1:18123:8000/tcp"]


def test_workers_share_the_coordinators_data_volume(compose):
    services = resolved(compose, *BASE, profile="cpu")["services"]
    for name in ("coordinator", "ray-worker-cpu", "ray-worker"):
        assert "data:/data:rw" in services[name]["volumes"], name
    assert "triton-cache:/cache/triton:rw" in services["ray-worker"]["volumes"]


def test_local_override_swaps_the_images(compose):
    services = resolved(compose, *LOCAL, profile="cpu")["services"]
    assert services["postgres"]["image"] == "hybridnas-postgres:15"
    assert services["coordinator"]["build"]["args"]["BASE"] == "hybridnas-base:bookworm"

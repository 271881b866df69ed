"""``docker-compose.yml``: etcd + coordinator + three workers, driven through testcontainers.

Runs only where a Docker engine answers (``docker info`` succeeds) and the
``docker compose`` plugin is installed; otherwise it is skipped and the skip
reason says which of the two is missing and why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotfleet.etcd_server import free_ports

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ("worker-1", "worker-2", "worker-3")

pytestmark = pytest.mark.integration


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def docker_unavailable() -> str | None:
    """Why the compose test cannot run here, None when it can."""
    docker = shutil.which("docker")
    if docker is None:
        return "no Docker engine: the `docker` CLI is not installed"
    try:
        info = subprocess.run(
            [docker, "info"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine: `docker info` did not complete ({exc})"
    if info.returncode != 0:
        return (
            f"no Docker engine: `docker info` failed (exit {info.returncode}): "
            f"{_first_line(info.stderr or info.stdout)}"
        )
    try:
        compose = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the Docker engine answers but `docker compose version` did not complete ({exc})"
    if compose.returncode != 0:
        return (
            "the Docker engine answers but the compose plugin is missing: `docker compose "
            f"version` failed: {_first_line(compose.stderr or compose.stdout)}"
        )
    return None


_WHY = docker_unavailable()


def coordctl(address: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTFLEET_")}
    env.update(PYTHONPATH=str(ROOT), NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "--dev", "--coordinator", address, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        value = json.loads(resp.read())
    assert isinstance(value, dict)
    return value


@pytest.fixture(scope="module")
def compose(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    from testcontainers.compose import DockerCompose

    # Published on free ports, so a dev cluster on this machine does not collide.
    ports = free_ports("127.0.0.1", 4)
    names = ["HOTFLEET_COORDINATOR_PORT"] + [f"HOTFLEET_WORKER_{i}_PORT" for i in (1, 2, 3)]
    for name, port in zip(names, ports, strict=True):
        monkeypatch_module.setenv(name, str(port))
    stack = DockerCompose(ROOT, compose_file_name="docker-compose.yml", build=True, wait=True)
    with stack:
        yield {
            "coordinator": f"127.0.0.1:{ports[0]}",
            **{w: f"127.0.0.1:{p}" for w, p in zip(WORKERS, ports[1:], strict=True)},
        }


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.skipif(_WHY is not None, reason=_WHY or "")
@pytest.mark.timeout(900)
def test_compose_fleet_registers_serves_and_upgrades(compose: dict[str, str]) -> None:
    coordinator = compose["coordinator"]
    deadline = time.monotonic() + 120
    nodes: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = coordctl(coordinator, "nodes", "-o", "json")
        if result.returncode == 0:
            nodes = json.loads(result.stdout)["items"]
            if {n["node_id"] for n in nodes} == set(WORKERS):
                break
        time.sleep(1)
    assert {n["node_id"] for n in nodes} == set(WORKERS), nodes
    assert {n["labels"]["zone"] for n in nodes} == {"eu-west", "us-east", "ap-south"}
    assert all(n["address"].startswith(n["node_id"] + ":") for n in nodes)  # service names

    for worker in WORKERS:
        assert get_json(f"http://{compose[worker]}/versions")["versions"]["shop.app"] == "1"

    upgrade = coordctl(
        coordinator,
        "upgrade",
        "--all",
        "--release",
        str(ROOT / "examples" / "releases" / "shop-2.0.0"),
        "--window",
        "0",
        "--wait",
        timeout=300,
    )
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    for worker in WORKERS:
        assert get_json(f"http://{compose[worker]}/versions")["versions"]["shop.app"] == "2"

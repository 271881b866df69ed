"""Strict flags and secrets (hotfleet.config) and how the entry points use them.

``HOTFLEET_DEV=False`` once started an agent insecure, and the coordinator
read the same variable differently; these tests hold every reader to one
meaning and make garbage an error naming the variable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hotfleet.config import ConfigError, env_flag, etcd_options, etcd_password, parse_flag, secret
from node_agent.embed import Settings

FALSE_SPELLINGS = ["", "0", "false", "False", "FALSE", "off", "Off", "no", "No", " no ", "n"]
TRUE_SPELLINGS = ["1", "true", "True", "yes", "YES", "on", "On", " 1\n", "y"]


@pytest.mark.parametrize("value", FALSE_SPELLINGS)
def test_false_spellings_mean_false(value: str) -> None:
    assert parse_flag("HOTFLEET_DEV", value) is False


@pytest.mark.parametrize("value", TRUE_SPELLINGS)
def test_true_spellings_mean_true(value: str) -> None:
    assert parse_flag("HOTFLEET_DEV", value) is True


@pytest.mark.parametrize("value", ["2", "maybe", "enable", "-1", "truee", "nein", "0x1"])
def test_garbage_is_an_error_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match=r"HOTFLEET_DEV=.*is not a boolean"):
        parse_flag("HOTFLEET_DEV", value)


def test_unset_flag_takes_the_default() -> None:
    assert env_flag("HOTFLEET_X", environ={}) is False
    assert env_flag("HOTFLEET_X", default=True, environ={}) is True
    assert env_flag("HOTFLEET_X", default=True, environ={"HOTFLEET_X": "off"}) is False


def _run(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HOTFLEET_")}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("value", ["False", "off", "No"])
def test_agent_with_a_false_dev_flag_refuses_to_start_insecure(value: str) -> None:
    """The finding: ``HOTFLEET_DEV=False`` started an agent without TLS."""
    run = _run(
        "node_agent.cli",
        "--node-id", "n1", "--code-path", ".", "--app", "x:y", "--etcd", "http://127.0.0.1:1",
        env={"HOTFLEET_DEV": value},
    )  # fmt: skip
    assert run.returncode == 2
    assert "refusing to start without mutual TLS" in run.stderr


@pytest.mark.parametrize("module", ["node_agent.cli", "coordinator.daemon"])
def test_entry_points_refuse_a_garbage_dev_flag_naming_it(module: str) -> None:
    args = ["--node-id", "n1", "--code-path", ".", "--app", "x:y"] if "agent" in module else []
    run = _run(module, *args, "--etcd", "http://127.0.0.1:1", env={"HOTFLEET_DEV": "maybe"})
    assert run.returncode == 2
    assert "HOTFLEET_DEV='maybe' is not a boolean" in run.stderr


def test_coordinator_with_a_false_dev_flag_refuses_to_run_without_tls() -> None:
    """The coordinator used to read only ``1`` as true; now both read the same words."""
    run = _run("coordinator.daemon", "--etcd", "http://127.0.0.1:1", env={"HOTFLEET_DEV": "off"})
    assert run.returncode == 2
    assert "refusing to run without TLS" in run.stderr


def test_coordctl_refuses_a_garbage_debug_flag() -> None:
    run = _run("coordinator.cli", "nodes", env={"HOTFLEET_DEV": "sure"})
    assert run.returncode == 2
    assert "HOTFLEET_DEV='sure' is not a boolean" in run.stderr


def _secret_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "pw"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secret_from_environment_or_file(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, "s3cret\n")
    assert secret("PW", {"PW": "inline"}) == "inline"
    assert secret("PW", {"PW_FILE": str(path)}) == "s3cret"
    assert secret("PW", {}, file=str(path)) == "s3cret"
    assert secret("PW", {}) is None


def test_secret_set_twice_or_unreadable_is_refused(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, "s3cret")
    with pytest.raises(ConfigError, match="PW is set both inline and as a file"):
        secret("PW", {"PW": "a", "PW_FILE": str(path)})
    with pytest.raises(ConfigError, match="PW: cannot read secret file"):
        secret("PW", {"PW_FILE": str(tmp_path / "absent")})
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable or writable by others"):
        secret("PW", {"PW_FILE": str(path)})
    empty = _secret_file(tmp_path, "\n")
    with pytest.raises(ConfigError, match="is empty"):
        secret("PW", {"PW_FILE": str(empty)})


def test_etcd_password_is_refused_over_plain_http(tmp_path: Path) -> None:
    env = {"HOTFLEET_ETCD_PASSWORD": "pw"}
    with pytest.raises(ConfigError, match=r"http://e2:2379 is not https://"):
        etcd_password("https://e1:2379,http://e2:2379", environ=env)
    assert etcd_password("https://e1:2379", environ=env) == "pw"
    assert etcd_password("http://e1:2379", environ={}) is None  # no password, no auth
    path = _secret_file(tmp_path, "from-file")
    assert etcd_password("https://e1:2379", file=str(path), environ={}) == "from-file"
    with pytest.raises(ConfigError, match="both set"):
        etcd_password("https://e1:2379", "pw", str(path), environ={})


def test_agent_refuses_an_etcd_password_over_http() -> None:
    run = _run(
        "node_agent.cli",
        "--node-id", "n1", "--code-path", ".", "--app", "x:y", "--dev",
        "--etcd", "http://127.0.0.1:1",
        env={"HOTFLEET_ETCD_PASSWORD": "pw"},
    )  # fmt: skip
    assert run.returncode == 2
    assert "the etcd password" in run.stderr and "not https://" in run.stderr


def test_etcd_auth_needs_a_user_and_a_password_together() -> None:
    """Half an auth is refused at start-up, in every entry point (etcd would refuse every call
    later, far from the cause)."""
    tls = "https://e1:2379"
    with pytest.raises(ConfigError, match="needs both --etcd-user"):
        etcd_options(tls, user="coordinator", environ={})
    with pytest.raises(ConfigError, match="needs both --etcd-user"):
        etcd_options(tls, environ={"HOTFLEET_ETCD_PASSWORD": "pw"})
    given = etcd_options(tls, ca_cert="ca.pem", user="u", environ={"HOTFLEET_ETCD_PASSWORD": "pw"})
    assert given == {"ca_cert": "ca.pem", "user": "u", "password": "pw"}  # unset ones left out
    with pytest.raises(ConfigError, match="needs both --etcd-user"):  # gunicorn/uvicorn workers
        Settings.from_env({"HOTFLEET_ETCD": tls, "HOTFLEET_ETCD_USER": "u"})


def test_compose_publishes_ports_on_loopback_only() -> None:
    """The dev cluster in docker-compose.yml is insecure: nothing may reach it from outside."""
    lines = (Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text().splitlines()
    published: list[str] = []
    for i, line in enumerate(lines):
        if line.strip() == "ports:":
            indent = len(line) - len(line.lstrip())
            for item in lines[i + 1 :]:
                if not item.strip() or len(item) - len(item.lstrip()) <= indent:
                    break
                published.append(item.strip().removeprefix("-").strip().strip("\"'"))
    assert len(published) == 4  # the coordinator and three workers
    for mapping in published:
        assert mapping.startswith("127.0.0.1:"), f"{mapping} is published on every interface"

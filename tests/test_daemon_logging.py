"""``hotfleet-coordinator`` logging flags: any-case levels, JSON lines, clean usage errors.

The daemon runs as a real subprocess against the session's real etcd; its
stderr (the log) is read back and parsed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.launch import child_environment
from hotfleet.logsetup import level_arg
from tests.agents import ROOT, Agents, wait_for
from tests.coordinators import CoordinatorProcess
from tests.processes import spawn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_log_level_debug_and_json_lines(
    tmp_path: Path, etcd_endpoint: str, etcd_prefix: str
) -> None:
    """``--log-level debug`` used to crash (``Unknown level: 'debug'``)."""
    log_path = tmp_path / "coordinator.log"
    cmd = [sys.executable, "-m", "coordinator.daemon", "--dev", "--etcd", etcd_endpoint]
    cmd += ["--prefix", etcd_prefix, "--listen", "127.0.0.1:0", "--lease-ttl", "2"]
    cmd += ["--log-level", "debug", "--log-format", "json"]
    daemon = CoordinatorProcess(
        "json", spawn(cmd, log_path, child_environment(), tmp_path), log_path
    )
    try:
        daemon.wait_ready()
        daemon.wait_leader()

        def records() -> list[dict[str, object]]:
            lines = [line for line in log_path.read_text().splitlines() if line.strip()]
            return [json.loads(line) for line in lines]  # every line is one JSON object

        found = wait_for(
            lambda: [r for r in records() if str(r["message"]).startswith("leading with epoch")],
            timeout=10,
        )
        assert found[0]["level"] == "info" and found[0]["logger"] == "hotfleet.coordinator"
        assert {"ts", "pid"} <= set(found[0])
        debug = [r for r in records() if r["level"] == "debug"]
        assert any(str(r["message"]).startswith("starting: etcd=") for r in debug), daemon.log()
    finally:
        daemon.close()


def test_a_bad_log_level_is_a_usage_error_naming_the_levels() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.daemon", "--dev", "--log-level", "chatty"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_environment(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "unknown log level 'chatty'" in done.stderr and "debug, info" in done.stderr
    assert "Traceback" not in done.stderr
    assert [level_arg(x) for x in ("debug", "Info", "warn")] == ["DEBUG", "INFO", "WARNING"]


def test_node_agent_logs_json_lines_naming_its_node(agents: Agents) -> None:
    agent = agents.start(
        "n-json", env={"HOTFLEET_LOG_FORMAT": "json", "HOTFLEET_LOG_LEVEL": "info"}
    )
    records = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    assert records, agent.log()
    assert {r["node"] for r in records} == {"n-json"}
    assert any("gRPC NodeAgent on" in r["message"] for r in records)
    assert {r["level"] for r in records} <= {"info", "warning", "error"}

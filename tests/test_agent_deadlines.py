"""A stuck release never makes a stuck node (real agent processes, real etcd).

The release below never returns from its module body.  Its code runs only in
the agent's staging process, so the node keeps serving, answers Status and
Health at once, reports ``preparing`` (not ``idle``), takes an Abort that
kills the staging process, loads the next good release, and stops on SIGTERM
without leaving the staging process behind.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from hotfleet._proto.hotfleet.v1 import agent_pb2
from hotfleet.etcd_client import EtcdClient
from hotfleet.release import Release
from tests.agents import AgentProcess, Agents, publish, release, wait_for

pytestmark = pytest.mark.integration

SPIN = Release.from_sources("shop", "9.9.9", {"shop.spin": "while True:\n    pass\n"})


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that ended meanwhile (e.g. the page take-back)
            continue
        out.update(int(c) for c in text)
    return out


def _stuck_prepare(agent: AgentProcess, manifest: object, rid: str) -> dict[str, object]:
    """Send a Prepare that will not return by itself; its reply lands in the dict."""
    box: dict[str, object] = {}

    def call() -> None:
        try:
            box["reply"] = agent.stub.Prepare(
                agent_pb2.PrepareRequest(rollout_id=rid, epoch=1, release=manifest), timeout=60
            )
        except Exception as exc:  # the agent may be stopped under it
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    box["thread"] = thread
    wait_for(lambda: agent.status().state == "preparing", timeout=10)
    return box


def test_abort_answers_while_a_prepare_is_stuck_and_the_next_release_loads(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    agent = agents.start("n-stuck")
    spin = publish(etcd_client, etcd_prefix, SPIN)
    box = _stuck_prepare(agent, spin, "r-spin")

    started = time.monotonic()
    assert agent.status().state == "preparing"  # a stuck node says so
    agent.stub.Health(agent_pb2.HealthRequest(), timeout=2)
    assert agent.http("/versions")[0] == 200  # the app keeps serving
    reply = agent.stub.Abort(agent_pb2.AbortRequest(rollout_id="r-spin", epoch=1), timeout=5)
    assert reply.ok
    assert time.monotonic() - started < 5
    thread = box["thread"]
    assert isinstance(thread, threading.Thread)
    thread.join(10)
    prepared = box["reply"]
    assert isinstance(prepared, agent_pb2.PrepareReply)
    assert not prepared.ok and prepared.errors[0].reason == "timeout"
    assert "cancelled" in prepared.errors[0].detail
    assert not _children(agent.proc.pid)  # the staging process is gone

    good = publish(etcd_client, etcd_prefix, release("shop-2.0.0"))
    ok = agent.stub.Prepare(
        agent_pb2.PrepareRequest(rollout_id="r-good", epoch=1, release=good), timeout=30
    )
    assert ok.ok, ok.errors
    done = agent.stub.Finish(agent_pb2.FinishRequest(rollout_id="r-good", epoch=1), timeout=30)
    assert done.ok and done.release == "shop@2.0.0"


def test_sigterm_stops_an_agent_stuck_in_prepare(
    agents: Agents, etcd_client: EtcdClient, etcd_prefix: str
) -> None:
    agent = agents.start("n-term")
    spin = publish(etcd_client, etcd_prefix, SPIN)
    _stuck_prepare(agent, spin, "r-term")
    staging = wait_for(lambda: _children(agent.proc.pid), timeout=5)
    agent.term()
    for pid in staging:
        wait_for(lambda pid=pid: not _alive(pid), timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (dead) parent's reaper is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False

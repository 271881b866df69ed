"""With etcd frozen, ``coordctl`` hears "etcd timed out" from the coordinator, not its own timeout.

A private etcd (the ``etcd_server`` fixture) is SIGSTOPped under a real
coordinator daemon: every etcd call the coordinator makes now times out.
The coordinator rides that out for its request budget only (shorter than
coordctl's deadline) and answers with the cause; once etcd runs again, the
same command works.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from coordinator.cli import EXIT_OK, EXIT_UNREACHABLE, RPC_TIMEOUT_S
from hotfleet.etcd_server import EtcdServer
from tests.coordinators import Coordinators, coordctl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_frozen_etcd_is_named_as_the_cause(tmp_path: Path, etcd_server: EtcdServer) -> None:
    owner = Coordinators(tmp_path, etcd_server.endpoint, "/hotfleet-causes/")
    try:
        daemon = owner.start("a")
        daemon.wait_leader()
        assert coordctl(daemon, "nodes").code == EXIT_OK
        assert etcd_server.pid is not None
        os.kill(etcd_server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            frozen = coordctl(daemon, "-o", "json", "nodes")
            took = time.monotonic() - started
        finally:
            os.kill(etcd_server.pid, signal.SIGCONT)
        assert frozen.code == EXIT_UNREACHABLE, frozen
        assert "etcd timed out" in frozen.err, frozen  # the cause, from the coordinator
        assert "did not answer" not in frozen.err, frozen  # not coordctl's own deadline
        assert frozen.json()["error"]["code"] == "unavailable"
        # the coordinator answered before coordctl's own deadline (else "did not answer");
        # how long the whole command took also counts its start-up on a busy host
        print(f"coordctl against a frozen etcd took {took:.1f}s (deadline {RPC_TIMEOUT_S:g}s)")
        # etcd is back: the same command works again
        assert coordctl(daemon, "nodes").code == EXIT_OK
    finally:
        owner.close()

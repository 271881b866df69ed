"""Simulated node agents for the scale benchmark: everything but the loader, many per process.

A :class:`SimAgent` is what a node agent is to the control plane:

* a real gRPC server speaking ``hotfleet.v1.NodeAgent`` on its own port, served by
  the real agent's servicer (:class:`node_agent.agent._Servicer`: fence, then act),
* the real fence (:class:`hotfleet.fencing.LeaderEpochs`: the claimed epoch is
  checked against the leader key in etcd, cached for a second),
* the real participant state machine (:class:`node_agent.participant.Participant`)
  behind the real wire translation (:class:`node_agent.participant_wire.WireParticipant`),
* the real decision watch (:class:`node_agent.decision_watch.DecisionWatches`),
* the real membership (:class:`node_agent.membership.Membership`: a lease, its
  keepalive, the record rewritten when the state changes),

with :class:`SimCode` (from ``tests/simfleet.py``, shared with the protocol
tests) in place of the loader, wrapped by :class:`DelayedCode` for a
configurable prepare/finish time and prepare failure rate.  Nothing here
re-implements protocol behaviour, so the simulation cannot drift from the
agent.

Per process: one etcd client (one HTTP/2 channel) shared by every node's
membership, fence and decision watch (as N processes on one host would each
have their own; the number of etcd *requests* is the same), and one thread
pool shared by every node's gRPC server, sized so that every node can hold a
Finish until the commit instant.

Run as a worker process (``python benchmarks/_simagent.py --endpoint ...``);
it prints ``ready <node_id> <address>`` per node and ``ready-all`` when every
node is serving, then runs until stdin closes (or SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # tests.simfleet (SimCode) lives beside the test suite
    sys.path.insert(0, str(REPO_ROOT))

from coordinator.transport import empty_health  # noqa: E402
from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402
from hotfleet.errors import ModuleError, Reason  # noqa: E402
from hotfleet.etcd_client import EtcdClient, connect  # noqa: E402
from hotfleet.fencing import LeaderEpochs  # noqa: E402
from hotfleet.keys import Keys  # noqa: E402
from hotfleet.stopsignals import StopSignals  # noqa: E402
from node_agent.agent import _Servicer  # noqa: E402
from node_agent.decision_watch import DecisionWatches  # noqa: E402
from node_agent.errors import PrepareError  # noqa: E402
from node_agent.loader import FinishReport, ReleaseInfo  # noqa: E402
from node_agent.membership import Membership  # noqa: E402
from node_agent.participant import Participant, label  # noqa: E402
from node_agent.participant_wire import WireParticipant  # noqa: E402
from tests.simfleet import SimCode, _declared, _until  # noqa: E402

log = logging.getLogger("hotfleet.simagent")

__all__ = ["DelayedCode", "SimAgent", "main"]


class DelayedCode:
    """A :class:`SimCode` whose prepare and finish take time and whose prepare may fail."""

    def __init__(
        self, code: SimCode, prepare_s: float, finish_s: float, fail_rate: float, seed: int
    ) -> None:
        self.code = code
        self.prepare_s = prepare_s
        self.finish_s = finish_s
        self.fail_rate = fail_rate
        self._random = random.Random(seed)

    @property
    def current_release(self) -> ReleaseInfo | None:
        return self.code.current_release

    @property
    def previous_release(self) -> ReleaseInfo | None:
        return self.code.previous_release

    @property
    def permanent_release(self) -> ReleaseInfo | None:
        return self.code.permanent_release

    @property
    def can_rollback(self) -> bool:
        return self.code.can_rollback

    def prepare(self, release: Any, *, force: bool = False) -> Any:
        time.sleep(self.prepare_s)
        if self.fail_rate and self._random.random() < self.fail_rate:
            raise PrepareError([ModuleError("sim", Reason.IMPORT_ERROR, "simulated failure")])
        return self.code.prepare(release, force=force)

    def finish(self, prepared: Any, *, at: float = 0.0) -> FinishReport:
        _until(at)  # the simulated switch takes its time after the instant
        if self.finish_s:
            time.sleep(self.finish_s)
        return self.code.finish(prepared)

    def abort(self, prepared: Any) -> None:
        self.code.abort(prepared)

    def rollback(self, *, at: float = 0.0) -> FinishReport:
        return self.code.rollback(at=at)

    def make_permanent(self) -> None:
        self.code.make_permanent()

    def cancel_prepare(self) -> None:
        self.code.cancel_prepare()


class _SharedClient:
    """The process's etcd client, handed to a :class:`Membership` that may try to close it."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def close(self) -> None:
        pass  # shared by every node of the process: closed once, by the process


class SimAgent:
    """One simulated node (see the module docstring); the duck type ``_Servicer`` serves."""

    def __init__(
        self,
        node_id: str,
        client: EtcdClient,
        keys: Keys,
        executor: ThreadPoolExecutor,
        *,
        host: str = "127.0.0.1",
        prepare_s: float = 0.010,
        finish_s: float = 0.0,
        fail_rate: float = 0.0,
        lease_ttl: int = 10,
        seed: int = 0,
    ) -> None:
        self.node_id = node_id
        self.keys = keys
        self.code = DelayedCode(SimCode(), prepare_s, finish_s, fail_rate, seed)
        self._epoch = 0
        self._epoch_lock = threading.Lock()
        self._leader_epochs = LeaderEpochs(lambda: client, keys)
        self.watches = DecisionWatches(keys, lambda: client, self._apply)
        self.membership = Membership(
            keys.node(node_id),
            self._record,
            lambda: _SharedClient(client),
            ttl=lease_ttl,
        )
        self.participant = Participant(
            self.code, node_id=node_id, watch=self.watches, on_state=self.membership.publish
        )
        self.wire = WireParticipant(self.participant, node_id, _declared, lambda: self._epoch)
        self.server = grpc.server(executor)
        agent_pb2_grpc.add_NodeAgentServicer_to_server(_Servicer(self), self.server)  # type: ignore[arg-type]
        port = self.server.add_insecure_port(f"{host}:0")
        self.address = f"{host}:{port}"
        self.started_at = time.time()

    def start(self) -> None:
        self.server.start()
        self.participant.settle()
        self.membership.start()

    def stop(self) -> None:
        self.participant.stop()
        self.membership.stop(revoke=True)
        self.server.stop(0.5)
        self.watches.stop(2.0)

    # ----------------------------------------------------- what _Servicer calls
    def fence(self, epoch: int) -> str | None:
        """As the agent's: only the epoch etcd says leads, never lower than the last one."""
        with self._epoch_lock:
            try:
                leader = self._leader_epochs.current(epoch)
            except Exception as exc:
                if epoch == self._epoch and epoch > 0:
                    return None
                return f"node {self.node_id}: cannot verify epoch {epoch}: {exc}"
            if leader is None or epoch != leader or epoch < self._epoch:
                return f"node {self.node_id}: epoch {epoch} refused (leader epoch {leader})"
            self._epoch = epoch
            return None

    def prepare(self, request: Any) -> Any:
        return self.wire.prepare(request)

    def finish(self, request: Any) -> Any:
        return self.wire.finish(request)

    def abort(self, request: Any) -> Any:
        return self.wire.abort(request)

    def rollback(self, request: Any) -> Any:
        return self.wire.rollback(request)

    def make_permanent(self, request: Any) -> Any:
        return self.wire.make_permanent(request)

    def status(self) -> Any:
        return agent_pb2.StatusReply(
            node_id=self.node_id,
            state=str(self.participant.state),
            current_release=label(self.code.current_release),
            previous_release=label(self.code.previous_release),
            permanent_release=label(self.code.permanent_release),
            epoch_seen=self._epoch,
            prepared_rollout=self.participant.prepared_rollout,
        )

    def module_status(self, modules: list[str]) -> Any:
        return agent_pb2.ModuleStatusReply()

    def health(self) -> Any:
        return empty_health()

    # ----------------------------------------------------- etcd
    def _record(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "address": self.address,
            "http_address": "",
            "labels": {},
            "current_release": label(self.code.current_release),
            "previous_release": label(self.code.previous_release),
            "permanent_release": label(self.code.permanent_release),
            "state": str(self.participant.state),
            "prepared_rollout": self.participant.prepared_rollout,
            "switch_at": self.participant.switch_at,
            "epoch_seen": self._epoch,
            "started_at": self.started_at,
            "secure": False,
        }

    def _apply(self, rollout_id: str, decision: str, watch: Any, participants: Any) -> bool:
        included = participants is None or self.node_id in participants
        return self.participant.apply_decision(rollout_id, decision, watch, included=included)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first node")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--prepare-ms", type=float, default=10.0)
    parser.add_argument("--finish-ms", type=float, default=0.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--lease-ttl", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    client = connect(args.endpoint)
    keys = Keys(args.prefix)
    # Every node may hold a Finish until the commit instant: a thread per node, plus room.
    executor = ThreadPoolExecutor(max_workers=2 * args.count + 8, thread_name_prefix="sim-rpc")
    agents = [
        SimAgent(
            f"sim-{i:04d}",
            client,
            keys,
            executor,
            prepare_s=args.prepare_ms / 1000,
            finish_s=args.finish_ms / 1000,
            fail_rate=args.fail_rate,
            lease_ttl=args.lease_ttl,
            seed=i,
        )
        for i in range(args.first, args.first + args.count)
    ]
    for agent in agents:
        agent.start()
        print(f"ready {agent.node_id} {agent.address}", flush=True)
    print("ready-all", flush=True)
    done = threading.Event()
    stops = StopSignals((signal.SIGTERM,))

    def until_stdin_closes() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    stops.wait(until=done)
    for agent in agents:
        agent.participant.stop()
    for agent in agents:
        agent.membership.stop(revoke=True)
        agent.server.stop(0)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

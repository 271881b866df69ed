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

This module is the parser and the entry point; what each command does is
:mod:`coordinator.cli_commands`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from coordinator import completion, demo, devcommands, devstate, output, render
from coordinator.cli_commands import (
    Ctx,
    cmd_abort,
    cmd_modules,
    cmd_nodes,
    cmd_promote,
    cmd_release_list,
    cmd_release_push,
    cmd_release_rm,
    cmd_release_show,
    cmd_release_unpack,
    cmd_rollback,
    cmd_rollouts,
    cmd_status,
    cmd_upgrade,
    duration_arg,
    health_arg,
    nodes_arg,
    selector_arg,
    strict_env_flag,
)
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
    RPC_TIMEOUT_S,
    Client,
    CoordctlError,
    Security,
)
from coordinator.render import Style

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
    "POLL_INTERVAL_S",
    "RPC_TIMEOUT_S",
    "build_parser",
    "main",
]


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
        default=default(strict_env_flag("HOTFLEET_DEV")),
        help="allow plaintext to a non-loopback coordinator (insecure; also HOTFLEET_DEV=1)",
    )


def _add_target(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--all", action="store_true", help="every registered node")
    group.add_argument("--nodes", type=nodes_arg, metavar="ID[,ID...]", help="named nodes")
    group.add_argument(
        "-l",
        "--selector",
        type=selector_arg,
        metavar="k=v[,k=v...]",
        help="nodes with these labels",
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
        "-l",
        "--selector",
        type=selector_arg,
        metavar="k=v[,k=v...]",
        help="only nodes with these labels",
    )

    release = commands.add_parser("release", help="push, list, show and remove releases")
    releases = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    p = command(
        "push", "push a release bundle (directory, .tar.gz or .zip)", cmd_release_push, releases
    )
    p.add_argument("path", metavar="PATH")
    _add_sign_key(p)
    p.add_argument(
        "--no-unpack",
        dest="unpack",
        action="store_false",
        help="do not have the nodes unpack it now (fetch, verify, compile and plan it into "
        "each host's code cache, so its rollout prepares faster and a release they would "
        "refuse shows here)",
    )
    command("list", "list pushed releases", cmd_release_list, releases)
    p = command("show", "show one release and its modules", cmd_release_show, releases)
    p.add_argument("ref", metavar="NAME@VERSION")
    p = command(
        "unpack",
        "have every node unpack a pushed release now (push does it; again after the fleet "
        "moved to another release)",
        cmd_release_unpack,
        releases,
    )
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
        "--health", type=health_arg, action="append", metavar="KEY=VALUE",
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

    devcommands.add_commands(commands, command)
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
    return devstate.default_security()


def _dev_coordinator() -> str | None:
    """The address `coordctl dev up` recorded (``./.hotfleet-dev`` or ``$HOTFLEET_DEV_DIR``)."""
    return devstate.default_coordinator()


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
        if strict_env_flag("HOTFLEET_DEBUG"):
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

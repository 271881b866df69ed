"""gunicorn's own graceful reload (HUP) against a hotfleet upgrade, same app, same load.

``python benchmarks/run.py reload-vs-restart``.  One gunicorn master with
``--workers`` sync workers serves a small WSGI app (``benchapp.app``: it
answers its version, its pid and a per-process request counter, the
in-memory state a restart loses).  The recorded paced load of
``_fleet.LoadProcess`` (``record``: every request's send time, latency,
status, version, pid and counter) runs through both changes:

* **HUP**: the new ``app.py`` is written to the code directory and the
  master gets SIGHUP (new workers start, the old ones drain and exit);
* **hotfleet**: the same master started with ``-c python:node_agent.gunicorn``
  (one participant per worker, an embedded etcd, an elected coordinator
  engine, which drives one warm-up rollout first, as a running coordinator
  has driven rollouts before); the new code is pushed as a release (and
  unpacked by the workers, as ``coordctl release push`` has them do;
  ``--no-unpack`` skips it) and upgraded on every worker (``window_s=0``: permanent at once), the disk is
  not touched.

Measured for each, from the instant the change starts: failed requests,
p99 latency of requests sent during the change (start until every worker answers
with the new code) against the quiet p99 before it, the capacity dip
(responses in the worst 100 ms bucket from the change start to 1 s after it
ended, as requests/s, against the quiet median), the time until every
worker serves the new code (the same span), and the state kept
(every worker serving the new code continues the counter it had).

The p99 target is judged on the requests of every hotfleet change of the
run pooled (``--changes`` more rollouts per round) against *matched* quiet
windows (as long as each change, ending 50 ms before it: as many requests,
in the same seconds), with a bootstrap 90% interval; ``HF_RVR_NULL=1`` is
the control (the same schedule, no rollout).  The load generator runs at
``--client-nice`` where that is permitted: it shares the harness CPU with
etcd and the coordinator, whose work at a change's start was otherwise
counted as the server's latency.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common
import _fleet

from coordinator.engine import RolloutOptions, Target
from coordinator.launch import stop_group
from hotfleet.etcd_server import EtcdServer, free_ports
from hotfleet.release import Release

APP = """\
import itertools
import json
import os
import time

time.sleep({boot_s})  # what importing a real app's dependencies costs a fresh worker
VERSION = "{version}"
_hits = itertools.count(1)  # in-memory state: a restart starts it again


def work():
    return sum(i * i for i in range({n}))


def application(environ, start_response):
    body = json.dumps(
        {{
            "version": VERSION,
            "versions": {{"benchapp.app": VERSION}},
            "pid": os.getpid(),
            "count": next(_hits),
            "work": work(),
        }}
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
"""


def _app(version: str, args: argparse.Namespace) -> str:
    """The app's source at ``version`` (an integer): each version's loop is one step
    longer, so every release changes a function's body."""
    n = args.request_work + int(version) - 1
    return APP.format(version=version, n=n, boot_s=repr(args.boot_s))


PREFIX = "/hotfleet-bench-rvr/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8, help="paced client threads")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s per client")
    parser.add_argument("--quiet-s", type=float, default=4.0, help="load before the change")
    parser.add_argument("--after-s", type=float, default=3.0, help="load after all serve new code")
    parser.add_argument(
        "--boot-s",
        type=float,
        default=0.0,
        help="seconds the app's import takes in a fresh worker (a real app's dependencies)",
    )
    parser.add_argument(
        "--request-work",
        type=int,
        default=2000,
        help="steps of the app's per-request loop (2000: ~0.1 ms of CPU, 20000: ~1 ms; a request that "
        "renders a page or waits on a query takes milliseconds)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="HUP and hotfleet alternated this many times (5)"
    )
    parser.add_argument(
        "--host-cpus",
        default="auto",
        help="CPUs of the serving host (gunicorn, its workers and their staging processes), "
        "comma-separated; the harness (load generator, etcd, coordinator) runs on the others. "
        "'auto': CPU 0 when there are at least 2, 'none': no pinning",
    )
    parser.add_argument(
        "--changes",
        type=int,
        default=30,
        help="hotfleet rollouts per round after the measured one, ~0.7 s apart, whose "
        "requests are pooled for the p99 during a change (30: ~2500 requests over 5 rounds, "
        "a 90%% interval of about +-10%% on the ratio)",
    )
    parser.add_argument(
        "--client-nice",
        type=int,
        default=-15,
        help="niceness of the load generator's threads, where raising their priority is "
        "permitted (root, CAP_SYS_NICE; else 0, recorded): the measuring clients share the "
        "harness CPU with etcd and the coordinator, whose work at a change's start would "
        "otherwise be counted as the server's latency (-15; 0: leave them)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter; results not recorded")
    parser.add_argument(
        "--no-unpack",
        dest="unpack",
        action="store_false",
        help="push the release without having the workers unpack it ahead of the rollout",
    )
    _common.add_output_arguments(parser)


def _cpu_split(spec: str) -> tuple[set[int], set[int]] | None:
    """(host CPUs, harness CPUs): a host's workers do not share cores with the clients
    measuring them, nor with etcd and the coordinator, which live elsewhere in production."""
    mine = sorted(os.sched_getaffinity(0))
    if spec == "none" or (spec == "auto" and len(mine) < 2):
        return None
    host = {mine[0]} if spec == "auto" else {int(c) for c in spec.split(",")}
    rest = set(mine) - host
    if not host or not rest or not host <= set(mine):
        raise SystemExit(f"--host-cpus {spec}: needs some of {mine} and leaves the rest")
    return host, rest


@contextlib.contextmanager
def _on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """Processes started in the block run on ``cpus`` (affinity is per thread, inherited)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _gunicorn_flags() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True, check=False
    ).stdout
    return ["--no-control-socket"] if "--no-control-socket" in out else []


class Gunicorn:
    def __init__(
        self,
        code: Path,
        workers: int,
        env: dict[str, str],
        hooks: bool,
        cpus: set[int] | None = None,
    ) -> None:
        self.port = free_ports("127.0.0.1", 1)[0]
        self.log_path = code.parent / f"{code.name}.log"
        cmd = [sys.executable, "-m", "gunicorn"]
        if hooks:
            cmd += ["-c", "python:node_agent.gunicorn"]
        cmd += ["-w", str(workers), "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "10"]
        cmd += [*_gunicorn_flags(), "benchapp.app:application"]
        with open(self.log_path, "wb") as log, _on_cpus(cpus):
            self.proc = subprocess.Popen(
                cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 60.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.log_path.read_text()[-3000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://{self.address}/", timeout=2),
            ):
                return
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn not serving:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_group(self.proc)  # the master, then what is left of its workers

    def cpu_s(self) -> float:
        """CPU seconds of the serving host so far: the master, its workers (and the
        workers it reaped: a HUP's old ones) and theirs (staging processes)."""
        pid = self.proc.pid
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            workers = [int(c) for c in fh.read().split()]
        alive = []
        for w in workers:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                alive.append(_common.cpu_s([w], children=True))
        return _common.cpu_s([pid], children=True) + sum(alive)


def _code_dir(root: Path, name: str, args: argparse.Namespace) -> Path:
    code = root / name
    (code / "benchapp").mkdir(parents=True)
    (code / "benchapp" / "__init__.py").write_text("")
    (code / "benchapp" / "app.py").write_text(_app("1", args))
    return code


def _load(server: Gunicorn, args: argparse.Namespace) -> _fleet.LoadProcess:
    targets = [(f"c{i}", server.address) for i in range(args.clients)]
    load = _fleet.LoadProcess(targets, args.rate, "/", record=True)
    args.client_nice_applied = _renice(load.proc.pid, args.client_nice)
    return load


def _renice(pid: int, nice: int) -> int:
    """Set every thread of ``pid`` (its clients exist once it is ready) to ``nice``; the
    niceness applied: 0 where raising priority is not permitted (CAP_SYS_NICE)."""
    if not nice:
        return 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    except (PermissionError, FileNotFoundError, ProcessLookupError):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), 0)
        return 0
    return nice


def _samples(summary: dict[str, Any]) -> list[list[Any]]:
    out = [s for node in summary.get("nodes", {}).values() for s in node.get("samples", [])]
    return sorted(out, key=lambda s: s[0])


def _wait_all_new(server: Gunicorn, settle_s: float, limit_s: float) -> None:
    """Until every answer for ``settle_s`` comes from the new code (our own probes)."""
    import json
    import urllib.request

    deadline = time.monotonic() + limit_s
    good_since = None
    while time.monotonic() < deadline:
        version = None
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(f"http://{server.address}/", timeout=5) as resp,
        ):
            version = json.loads(resp.read())["version"]
        now = time.monotonic()
        if version != "2":
            good_since = None
        elif good_since is None:
            good_since = now
        elif now - good_since >= settle_s:
            return
        time.sleep(0.02)
    raise RuntimeError("the server does not serve only the new code")


def _debug(samples: list[list[Any]], t_change: float, out: dict[str, Any], done: Any) -> None:
    """Where the change's slow requests fell (``HF_RVR_DEBUG=1``): ms from the change start."""
    slow = 1.3 * out["quiet_window_p99_s"]
    print(
        f"  commit lead {done.commit_lead_s * 1e3:.1f} ms, created "
        f"+{(done.created_at - t_change) * 1e3:.1f} decided "
        f"+{(done.decided_at - t_change) * 1e3:.1f} nodes: "
        + ", ".join(
            f"{n}: prepare {r.prepare_s * 1e3:.1f} ms, finished +"
            f"{(r.finished_at - t_change) * 1e3:.1f}, ready "
            f"{(r.armed_ahead_s or 0) * 1e3:.1f} ms ahead"
            for n, r in sorted(done.nodes.items())
        )
    )
    for s in samples:
        if t_change - 0.05 <= s[0] <= t_change + 0.5 and s[1] > slow:
            print(
                f"  slow: sent +{(s[0] - t_change) * 1e3:.1f} ms, {s[1] * 1e3:.2f} ms, pid {s[4]}"
            )


def _all_new_at(samples: list[list[Any]], old: str, new: str, t_change: float) -> float:
    """When every worker serves ``new``: no ``old`` answer any more, and each worker that
    serves after the change (a HUP's new processes too) has answered with ``new``."""
    old_after = [s[0] + s[1] for s in samples if s[3] == old and s[0] >= t_change - 1]
    first_new: dict[int, float] = {}
    for s in samples:
        if s[3] == new and s[4] not in first_new and s[0] >= t_change - 1:
            first_new[s[4]] = s[0] + s[1]
    return max([t_change, *old_after, *first_new.values()])


# A change's matched quiet window ends this long before the change starts: after the
# release was unpacked (0.3 s before) and the previous change's bookkeeping, before it.
MATCH_GAP_S = 0.05
NULL_SPAN_S = 0.06  # the control's "change" (HF_RVR_NULL): no new code to wait for


def pooled(
    samples: list[list[Any]], t_started: float, changes: list[tuple[float, str, str]]
) -> dict[str, Any]:
    """The p99 of every request sent during any of ``changes`` (start, old, new), pooled.

    One change spans ~20 requests, too few for a p99 of its own, so the
    changes of a round are judged together, against two quiet references:
    the *matched* one (for each change, the window as long that ends
    ``MATCH_GAP_S`` before it: as many requests, taken in the same seconds,
    so that a host whose speed drifts over minutes compares like with like)
    and the whole quiet phase before the first change.
    """
    quiet = [s[1] for s in samples if t_started + 1.0 <= s[0] < changes[0][0]]
    during: list[float] = []
    matched: list[float] = []
    spans = []
    for t_change, old, new in changes:
        if old == new:
            t_all_new = t_change + NULL_SPAN_S
        else:
            t_all_new = _all_new_at(samples, old, new, t_change)
        span = t_all_new - t_change
        spans.append(span)
        during += [s[1] for s in samples if t_change <= s[0] <= t_all_new]
        lo = t_change - MATCH_GAP_S - span
        matched += [s[1] for s in samples if lo <= s[0] < t_change - MATCH_GAP_S]
    summary = _p99_against(during, quiet, matched)
    q99 = summary["quiet_p99_s"]
    if os.environ.get("HF_RVR_DEBUG"):  # where in a change the slow requests are
        bins: dict[int, list[int]] = {}
        for t_change, _old, _new in changes:
            for s in samples:
                if t_change - 0.02 <= s[0] < t_change + 0.2:
                    b = bins.setdefault(math.floor((s[0] - t_change) * 100), [0, 0])
                    b[0] += 1
                    b[1] += s[1] > 1.5 * q99
        print(
            "  requests sent per 10 ms after a change's start (slow: > 1.5x quiet p99): "
            + ", ".join(f"+{k * 10}: {n}/{slow}" for k, (n, slow) in sorted(bins.items()))
        )
    return {
        "_during": during,  # pooled again over the rounds by main(), then dropped
        "_quiet": quiet,
        "_matched": matched,
        "changes": len(changes),
        **summary,
        "all_new_s": statistics.median(spans),
    }


def _bootstrap(during: list[float], quiet: list[float], n: int = 1000) -> tuple[float, float]:
    """The 5th and 95th percentiles of p99(during) / p99(quiet) over resamplings of both:
    how far the ratio itself moves by chance with this many requests."""
    rng = random.Random(13)
    ratios = []
    for _ in range(n):
        d = _common.percentile(rng.choices(during, k=len(during)), 99)
        q = _common.percentile(rng.choices(quiet, k=len(quiet)), 99)
        ratios.append(d / q if q else float("nan"))
    return _common.percentile(ratios, 5), _common.percentile(ratios, 95)


def _p99_against(
    during: list[float], quiet: list[float], matched: list[float] | None = None
) -> dict[str, Any]:
    q99 = _common.percentile(quiet, 99)
    d99 = _common.percentile(during, 99) if during else float("nan")
    out = {
        "requests": len(during),
        "p99_s": d99,
        "quiet_p99_s": q99,
        "p99_ratio": d99 / q99 if q99 else float("nan"),
    }
    if matched:
        m99 = _common.percentile(matched, 99)
        out["matched_requests"] = len(matched)
        out["matched_p99_s"] = m99
        out["p99_ratio_matched"] = d99 / m99 if m99 else float("nan")
        if during:
            out["p99_ratio_matched_90ci"] = _bootstrap(during, matched)
    return out


def measure(samples: list[list[Any]], t_change: float, t_started: float) -> dict[str, Any]:
    quiet = [s for s in samples if t_started + 1.0 <= s[0] < t_change]
    t_all_new = _all_new_at(samples, "1", "2", t_change)
    during = [s for s in samples if t_change <= s[0] <= t_all_new]
    failed = [s for s in samples if s[2] != 200]

    # responses per 100 ms bucket, by arrival
    def buckets(lo: float, hi: float) -> list[int]:
        n = max(1, int((hi - lo) / 0.1))
        counts = [0] * n
        for s in samples:
            i = int((s[0] + s[1] - lo) / 0.1)
            if 0 <= i < n:
                counts[i] += 1
        return counts

    quiet_b = buckets(t_started + 1.0, t_change)
    change_b = buckets(t_change, t_all_new + 1.0)
    quiet_rate = _common.percentile([float(c) for c in quiet_b], 50) * 10
    worst_rate = min(change_b) * 10 if change_b else float("nan")
    # state: every pid serving v2 had served v1 and its counter went on
    last_old: dict[int, int] = {}
    first_new: dict[int, int] = {}
    for s in samples:
        if s[2] != 200:
            continue
        if s[3] == "1":
            last_old[s[4]] = max(last_old.get(s[4], 0), s[5])
        elif s[3] == "2" and s[4] not in first_new:
            first_new[s[4]] = s[5]
    kept = bool(first_new) and all(
        pid in last_old and count > last_old[pid] for pid, count in first_new.items()
    )
    q99 = _common.percentile([s[1] for s in quiet], 99)
    d99 = _common.percentile([s[1] for s in during], 99) if during else float("nan")
    # The change's p99 is taken over ~50 requests (it is nearly their maximum); the
    # quiet p99 over thousands.  The fair control is the same measure over quiet
    # windows as long as the change: their median p99 (what "unchanged" looks like).
    span = max(0.1, t_all_new - t_change)
    windows = []
    lo = t_started + 1.0
    while lo + span <= t_change:
        window = [s[1] for s in quiet if lo <= s[0] < lo + span]
        if len(window) >= 5:
            windows.append(_common.percentile(window, 99))
        lo += span
    w99 = statistics.median(windows) if windows else float("nan")
    return {
        "requests": len(samples),
        "failed": len(failed),
        "failures": sorted({str(s[2]) for s in failed}),
        "quiet_p99_s": q99,
        "change_p99_s": d99,
        "change_requests": len(during),
        "p99_ratio": d99 / q99 if q99 else float("nan"),
        "quiet_window_p99_s": w99,
        "quiet_windows": len(windows),
        "p99_ratio_matched": d99 / w99 if w99 else float("nan"),
        "quiet_rps": quiet_rate,
        "worst_100ms_rps": worst_rate,
        "all_new_s": t_all_new - t_change,
        "workers_before": sorted(last_old),
        "workers_after": sorted(first_new),
        "state_kept": kept,
    }


def run_hup(root: Path, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    code = _code_dir(root, "hup", args)
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONDONTWRITEBYTECODE": "1"}
    server = Gunicorn(
        code, args.workers, env, hooks=False, cpus=args.cpus[0] if args.cpus else None
    )
    try:
        server.wait_serving()
        load = _load(server, args)
        try:
            t_started = time.time()
            time.sleep(args.quiet_s)
            (code / "benchapp" / "app.py").write_text(_app("2", args))
            t_change = time.time()
            say("HUP: new app.py written, SIGHUP to the master")
            server.proc.send_signal(signal.SIGHUP)
            _wait_all_new(server, 1.5, 60)
            time.sleep(args.after_s)
            summary = load.stop()
        finally:
            load.close()
    finally:
        server.stop()
    return measure(_samples(summary), t_change, t_started)


def _release(version: str, args: argparse.Namespace) -> Release:
    return Release.from_sources(
        "benchapp",
        version,
        {"benchapp": "", "benchapp.app": _app(version, args)},
        packages=["benchapp"],
    )


def _more_changes(
    leader: _fleet.Leader, releases: list[Release], args: argparse.Namespace
) -> list[tuple[float, str, str]]:
    """One rollout after another under the same load: (start, old, new) of each."""
    out = []
    old = "2"
    for release in releases:
        if args.unpack:
            leader.engine.unpack_release(release.label)
        time.sleep(0.3)
        t_change = time.time()
        if os.environ.get("HF_RVR_NULL"):  # the control: the same schedule, no rollout
            out.append((t_change, old, old))
            time.sleep(0.3)
            continue
        done = leader.wait(
            leader.engine.upgrade(release.label, Target(all=True), RolloutOptions(window_s=0)).id,
            timeout=60,
        )
        if done.phase.value != "permanent":
            raise RuntimeError(
                f"rollout of {release.label} ended {done.phase.value}: {done.reason}"
            )
        out.append((t_change, old, release.version))
        old = release.version
        time.sleep(0.3)
    return out


def run_hotfleet(root: Path, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    code = _code_dir(root, "hotfleet", args)
    etcd = EtcdServer(root / "etcd")
    etcd.start()
    leader = server = None
    try:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("HOTFLEET_")},
            "PYTHONPATH": os.pathsep.join([str(code), str(_common.REPO_ROOT)]),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOTFLEET_DEV": "1",
            "HOTFLEET_ETCD": etcd.endpoint,
            "HOTFLEET_PREFIX": PREFIX,
            "HOTFLEET_CODE_PATH": str(code),
            "HOTFLEET_HOST": "h",
            "HOTFLEET_CACHE_DIR": str(root / "cache"),
            "HOTFLEET_SLOT_DIR": str(root / "slots"),
            # a host code cache of this run's own: what an earlier run compiled is not here
            "HOTFLEET_CODE_CACHE": str(root / "code-cache"),
            "HOTFLEET_LOG_LEVEL": "INFO" if os.environ.get("HF_RVR_DEBUG") else "WARNING",
        }
        server = Gunicorn(
            code, args.workers, env, hooks=True, cpus=args.cpus[0] if args.cpus else None
        )
        server.wait_serving()
        leader = _fleet.Leader(etcd.endpoint, PREFIX)
        deadline = time.monotonic() + 60
        while len(leader.engine.nodes()) < args.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"workers not registered:\n{server.log_path.read_text()[-3000:]}"
                )
            time.sleep(0.1)
        release = Release.from_sources(
            "benchapp",
            "2",
            {"benchapp": "", "benchapp.app": _app("2", args)},
            packages=["benchapp"],
        )
        leader.engine.push_release(release)
        # A running coordinator has driven rollouts before: one warm-up rollout (the
        # boot code again, a release of its own) opens its channels to the workers and
        # lets it learn the commit lead this host needs (coordinator.commitlead),
        # before the load and the measured change start.
        warm = Release.from_sources(
            "benchapp",
            "1.1",
            {"benchapp": "", "benchapp.app": _app("1", args) + "# warm-up\n"},
            packages=["benchapp"],
        )
        leader.engine.push_release(warm)
        warmed = leader.wait(
            leader.engine.upgrade(warm.label, Target(all=True), RolloutOptions(window_s=0)).id,
            timeout=60,
        )
        if warmed.phase.value != "permanent":
            raise RuntimeError(f"the warm-up rollout ended {warmed.phase.value}: {warmed.reason}")
        extra = [_release(str(v), args) for v in range(3, 3 + args.changes)]
        for more in extra:
            leader.engine.push_release(more)
        if args.unpack:  # as `coordctl release push` does: the workers unpack it ahead
            answers = leader.engine.unpack_release(release.label)
            say("hotfleet: unpacked: " + "; ".join(sorted({a.detail for a in answers})))
        load = _load(server, args)
        try:
            t_started = time.time()
            time.sleep(1.0)
            cpu_quiet0, t_quiet0 = server.cpu_s(), time.perf_counter()
            time.sleep(max(0.0, args.quiet_s - 1.0))
            cpu_change0, t_change0 = server.cpu_s(), time.perf_counter()
            marks: dict[str, float] = {}  # the driver's steps (HF_RVR_DEBUG)
            for point in ("before_prepare", "before_decision", "after_decision", "after_finish"):
                leader.engine.hooks[point] = lambda _r, p=point: marks.setdefault(p, time.time())
            t_change = time.time()
            say("hotfleet: upgrade benchapp@2 on every worker")
            started = leader.engine.upgrade(
                release.label, Target(all=True), RolloutOptions(window_s=0)
            )
            done = leader.wait(started.id, timeout=60)
            cpu_change1, t_change1 = server.cpu_s(), time.perf_counter()
            say(f"hotfleet: rollout {done.phase.value} {done.reason}")
            _wait_all_new(server, 1.5, 60)
            time.sleep(args.after_s)
            changes = _more_changes(leader, extra, args)
            if not os.environ.get("HF_RVR_NULL"):  # the control pools only rollout-free spans
                changes.insert(0, (t_change, "1", "2"))
            summary = load.stop()
        finally:
            load.close()
        out = measure(_samples(summary), t_change, t_started)
        out["pooled"] = pooled(_samples(summary), t_started, changes)
        out["rollout"] = done.phase.value
        # what the rollout cost the serving host beyond serving: its CPU from the change
        # until the rollout was permanent, less the quiet rate over as long, per worker
        quiet_rate = (cpu_change0 - cpu_quiet0) / (t_change0 - t_quiet0)
        extra = (cpu_change1 - cpu_change0) - quiet_rate * (t_change1 - t_change0)
        out["serving_cpu_quiet_s_per_s"] = quiet_rate
        out["rollout_cpu_per_worker_s"] = extra / args.workers
        if os.environ.get("HF_RVR_DEBUG"):
            print("  " + ", ".join(f"{k} +{(v - t_change) * 1e3:.1f}" for k, v in marks.items()))
            _debug(_samples(summary), t_change, out, done)
            for line in server.log_path.read_text().splitlines():
                if "prepared" in line or "finish" in line:
                    print("  " + line[-400:])
        return out
    finally:
        if leader is not None:
            leader.close()
        if server is not None:
            server.stop()
        etcd.stop()


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.quiet_s, args.after_s, args.changes = 2.0, 1.0, min(args.changes, 10)
    date = _common.now_utc()
    load_before = _common.warn_if_busy()
    say = _fleet.progress_clock()
    args.cpus = _cpu_split(args.host_cpus)
    rounds: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="hotfleet-bench-rvr-"))
    try:
        with _on_cpus(args.cpus[1] if args.cpus else None):
            for i in range(1 if args.quick else args.rounds):
                say(f"round {i + 1}")
                hup = run_hup(root / f"r{i}", args, say)
                hot = run_hotfleet(root / f"r{i}", args, say)
                rounds.append({"hup": hup, "hotfleet": hot})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    hup, hot = (_median_round([r[way] for r in rounds]) for way in ("hup", "hotfleet"))
    during = [x for r in rounds for x in r["hotfleet"]["pooled"].pop("_during")]
    quiet = [x for r in rounds for x in r["hotfleet"]["pooled"].pop("_quiet")]
    matched = [x for r in rounds for x in r["hotfleet"]["pooled"].pop("_matched")]
    hot["pooled"] = {
        "changes": sum(r["hotfleet"]["pooled"]["changes"] for r in rounds),
        **_p99_against(during, quiet, matched),
        "all_new_s": statistics.median(r["hotfleet"]["pooled"]["all_new_s"] for r in rounds),
    }
    ratio = hup["all_new_s"] / hot["all_new_s"] if hot["all_new_s"] else float("inf")
    res = {
        **_common.result_header("reload-vs-restart", date),
        "load_average": load_before,
        "params": {
            "workers": args.workers,
            "clients": args.clients,
            "rate_per_client": args.rate,
            "offered_rps": args.clients * args.rate,
            "boot_s": args.boot_s,
            "request_work": args.request_work,
            "unpack": bool(args.unpack),
            "rounds": len(rounds),
            "host_cpus": sorted(args.cpus[0]) if args.cpus else None,
            "harness_cpus": sorted(args.cpus[1]) if args.cpus else None,
            "changes_per_round": args.changes,
            "client_nice": getattr(args, "client_nice_applied", 0),
        },
        "rounds": rounds,
        "hup": hup,
        "hotfleet": hot,
        "new_code_sooner_ratio": ratio,
        "targets": {
            "zero_failed": hot["failed"] == 0,
            "state_kept": hot["state_kept"],
            "p99_within_1_2x": hot["pooled"]["p99_ratio_matched"] <= 1.2,
            "sooner_3x": ratio >= 3,
        },
    }
    rows = [["", "HUP", "hotfleet"]]
    fmts: list[tuple[str, Callable[[Any], str]]] = [
        ("failed", str),
        ("quiet_p99_s", _common.fmt_ms),
        ("change_p99_s", _common.fmt_ms),
        ("p99_ratio", lambda v: f"{v:.2f}x"),
        ("quiet_window_p99_s", _common.fmt_ms),
        ("p99_ratio_matched", lambda v: f"{v:.2f}x"),
        ("change_requests", str),
        ("quiet_rps", lambda v: f"{v:.0f}"),
        ("worst_100ms_rps", lambda v: f"{v:.0f}"),
        ("all_new_s", _common.fmt_ms),
        ("state_kept", str),
    ]
    for key, fmt in fmts:
        rows.append([key + (" (ms)" if key.endswith("_s") else ""), fmt(hup[key]), fmt(hot[key])])
    rows.append(
        ["rollout CPU per worker (ms)", "-", _common.fmt_ms(hot["rollout_cpu_per_worker_s"])]
    )
    rows.append(
        [
            "serving host CPU quiet (cores)",
            "-",
            f"{hot['serving_cpu_quiet_s_per_s']:.2f}",
        ]
    )
    p = hot["pooled"]
    lo, hi = p["p99_ratio_matched_90ci"]
    rows.append(
        [
            f"p99 of {p['requests']} requests in {p['changes']} changes (ms)",
            "-",
            f"{_common.fmt_ms(p['p99_s'])} ({p['p99_ratio']:.2f}x quiet phase)",
        ]
    )
    rows.append(
        [
            f"  against {p['matched_requests']} of matched quiet windows (ms)",
            "-",
            f"{_common.fmt_ms(p['matched_p99_s'])} ({p['p99_ratio_matched']:.2f}x, "
            f"90% {lo:.2f}-{hi:.2f}x)",
        ]
    )
    print()
    _common.print_table(rows)
    print(f"\nnew code on every worker {ratio:.1f}x sooner with hotfleet; targets {res['targets']}")
    _common.save_results(
        args,
        res,
        date,
        _markdown_rows,
        [
            "date",
            "rev",
            "load",
            "app boot s",
            "way",
            "failed",
            "quiet p99 ms",
            "change p99 ms (ratio)",
            "worst 100 ms rps / quiet",
            "all workers new ms",
            "state kept",
        ],
        "Same app (`benchapp`, per-worker counter), same paced recorded load "
        "(`_fleet.LoadProcess`, new connection per request), one gunicorn master with sync "
        "workers: gunicorn's HUP reload against a hotfleet upgrade (`node_agent.gunicorn` "
        "hooks, coordinator engine, window 0). 'change' = from the change start until every worker "
        "answers with the new code (no old answer after it, each serving worker's first new one); 'all workers new' is that span; the ratio HUP/hotfleet is "
        "the last column of the hotfleet row. From 2026-12-01T04Z on: HUP and hotfleet alternate "
        "over --rounds (median per column, failures summed), and the serving host (gunicorn, its "
        "workers, their staging processes) runs on its own CPU while the harness (load generator, "
        "etcd, coordinator: elsewhere in production) runs on the other. One change spans ~20 "
        "requests, too few for a p99 (it is nearly their maximum): shown against quiet windows "
        "as long (their median p99), and from 2026-12-02T05Z on the p99 target is judged on "
        "the requests of every hotfleet change of the run pooled (--changes more rollouts per "
        "round, ~0.6 s apart) against the quiet p99.",
    )
    return 0


def _median_round(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number the median over the rounds; failures summed; state kept in every round."""
    out = dict(results[-1])
    for key, value in results[-1].items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[key] = statistics.median(r[key] for r in results)
    out["failed"] = sum(r["failed"] for r in results)
    out["state_kept"] = all(r["state_kept"] for r in results)
    return out


def _markdown_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for way in ("hup", "hotfleet"):
        r = res[way]
        extra = f" ({res['new_code_sooner_ratio']:.1f}x sooner)" if way == "hotfleet" else ""
        rows.append(
            [
                res["date"][:16],
                res["revision"][:8],
                f"{res['load_average']:.2f}",
                f"{res['params']['boot_s']:g}",
                way,
                str(r["failed"]),
                _common.fmt_ms(r["quiet_p99_s"]),
                f"{_common.fmt_ms(r['change_p99_s'])} ({r['p99_ratio']:.2f}x; "
                f"{r.get('p99_ratio_matched', float('nan')):.2f}x of quiet windows as long"
                + (
                    f"; {r['pooled']['requests']} requests of {r['pooled']['changes']} changes "
                    f"pooled: {_common.fmt_ms(r['pooled']['p99_s'])}, "
                    f"{r['pooled']['p99_ratio']:.2f}x; "
                    f"{r['pooled']['p99_ratio_matched']:.2f}x of matched quiet windows, 90% "
                    + "-".join(f"{x:.2f}" for x in r["pooled"]["p99_ratio_matched_90ci"])
                    + "x)"
                    if "pooled" in r
                    else ")"
                ),
                f"{r['worst_100ms_rps']:.0f} / {r['quiet_rps']:.0f}",
                _common.fmt_ms(r["all_new_s"]) + extra,
                str(r["state_kept"]),
            ]
        )
    return rows

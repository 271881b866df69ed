"""Why hotfleet's threads in a serving process keep the normal CPU priority.

``python benchmarks/run.py priority``.  The reload-vs-restart benchmark shows
that the p99 excess during a change is hotfleet's own work in the workers
(gRPC, prepare, the decision watch, membership) taking the CPU their
siblings serve on: with every hotfleet thread of the workers at
``SCHED_IDLE`` the pooled ratio fell from ~2.2x to ~1.25x.  This benchmark
measures what that would cost when the CPU is busy, in one process that
stands for a worker: a *serving* thread woken every 2 ms for a little Python
work (a request), and an *agent* thread doing 3 ms of Python CPU every 50 ms
(a prepare), at ``normal``, ``nice19`` or ``idle`` (``SCHED_IDLE``) priority,
beside 0, 1 or 2 CPU-bound processes on the same CPU.  Reported: how late
the serving thread's ticks are (p50, p99, max).

The agent thread holds the GIL while it runs; at a low priority the kernel
preempts it in favour of the busy processes and it keeps the GIL while it
waits, so the serving thread waits behind it (priority inversion through
the GIL).  Each configuration runs in a fresh process: an unprivileged
thread cannot take its priority back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import _common

from coordinator.launch import stop_group

POLICIES = ("normal", "nice19", "idle")

_CHILD = r"""
import json, os, subprocess, sys, threading, time
policy, hogs, seconds, cpu = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
os.sched_setaffinity(0, {cpu})
sys.setswitchinterval(0.0005)  # what hotfleet's prepare sets (node_agent._courtesy)
# CPU-bound neighbours that end with this process, however it ends
hog = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile os.getppid() == {os.getpid()}: pass"
busy = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(hogs)]
stop = threading.Event()

def agent():
    tid = threading.get_native_id()
    if policy == "idle":
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    elif policy == "nice19":
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    while not stop.is_set():
        t = time.thread_time()
        while time.thread_time() - t < 0.003:
            sum(range(100))
        stop.wait(0.05)

try:
    thread = threading.Thread(target=agent)
    thread.start()
    late = []
    due = time.perf_counter()
    end = due + seconds
    while due < end:
        due += 0.002
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        sum(range(200))  # the request's Python work
        late.append(time.perf_counter() - due)
    stop.set()
    thread.join()
finally:
    for p in busy:
        p.kill()
        p.wait()
late.sort()
print(json.dumps({"n": len(late), "p50": late[len(late) // 2], "p99": late[int(len(late) * 0.99)], "max": late[-1]}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=5.0, help="per configuration (5)")
    parser.add_argument("--hogs", default="0,1,2", help="CPU-bound neighbours to try (0,1,2)")
    parser.add_argument("--quick", action="store_true", help="2 s each; results not recorded")
    _common.add_output_arguments(parser)


def _run(policy: str, hogs: int, seconds: float, cpu: int) -> dict[str, Any]:
    """One configuration in a process group of its own: whatever happens to it (a
    timeout, an interrupt), its CPU-bound neighbours are killed with it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, policy, str(hogs), str(seconds), str(cpu)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=seconds * 10 + 30)
    finally:
        stop_group(proc, grace=1.0)
    if proc.returncode != 0:
        raise RuntimeError(f"{policy} beside {hogs} neighbour(s) exited {proc.returncode}")
    return dict(json.loads(out))


def main(args: argparse.Namespace) -> int:
    if not hasattr(os, "sched_setaffinity") or not hasattr(os, "SCHED_IDLE"):
        print("needs Linux (sched_setaffinity, SCHED_IDLE)")
        return 1
    seconds = 2.0 if args.quick else args.seconds
    date = _common.now_utc()
    load = _common.warn_if_busy()
    cpu = sorted(os.sched_getaffinity(0))[-1]
    runs = []
    rows = [["neighbours", "agent thread", "ticks", "late p50 ms", "late p99 ms", "max ms"]]
    for hogs in (int(h) for h in args.hogs.split(",")):
        for policy in POLICIES:
            r = {"policy": policy, "hogs": hogs, **_run(policy, hogs, seconds, cpu)}
            runs.append(r)
            rows.append(
                [
                    str(hogs),
                    policy,
                    str(r["n"]),
                    _common.fmt_ms(r["p50"]),
                    _common.fmt_ms(r["p99"]),
                    _common.fmt_ms(r["max"]),
                ]
            )
            time.sleep(0.2)
    _common.print_table(rows)
    res = {
        **_common.result_header("priority", date),
        "load_average": load,
        "params": {"seconds": seconds, "cpu": cpu},
        "runs": runs,
    }

    def markdown(res: dict[str, Any]) -> list[list[str]]:
        return [
            [
                res["date"][:16],
                res["revision"][:8],
                f"{res['load_average']:.2f}",
                str(r["hogs"]),
                r["policy"],
                _common.fmt_ms(r["p50"]),
                _common.fmt_ms(r["p99"]),
                _common.fmt_ms(r["max"]),
            ]
            for r in res["runs"]
        ]

    _common.save_results(
        args,
        res,
        date,
        markdown,
        [
            "date",
            "rev",
            "load",
            "CPU-bound neighbours",
            "agent thread",
            "late p50 ms",
            "p99 ms",
            "max ms",
        ],
        "One process standing for a worker, on one CPU: a serving thread woken every 2 ms "
        "for a little Python work, an agent thread doing 3 ms of Python CPU every 50 ms at "
        "the given priority, beside CPU-bound processes on the same CPU; how late the "
        "serving thread's ticks are.  Why hotfleet's threads keep the normal priority: at a "
        "low one they keep the GIL while preempted (benchmarks/bench_priority.py).",
    )
    return 0

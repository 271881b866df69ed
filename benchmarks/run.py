"""Run one benchmark: ``python benchmarks/run.py <name> [options]``.

Each benchmark is a module ``benchmarks/bench_<name>.py`` exposing
``add_arguments(parser)`` and ``main(args) -> int``; add it to ``BENCHMARKS``
to make it a subcommand.  Modules are imported only when their subcommand
runs, so a slow or heavy benchmark costs nothing to the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# name -> (module, one-line description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "loader": (
        "bench_loader",
        "finish/rollback pause under guarded request threads vs importlib.reload; "
        "prepare time; backup memory",
    ),
    "fleet": (
        "bench_fleet",
        "2PC of a 20-module release on N agent processes: end to end, commit skew; "
        "baseline node by node",
    ),
    "faults": (
        "bench_faults",
        "fault campaign: rollouts under SIGKILL/SIGSTOP of agents, leader kills and etcd "
        "restarts, checked for atomicity, convergence, lost commits and bounded time",
    ),
    "isolation": (
        "bench_isolation",
        "prepare CPU and wall time with the staging process vs the in-process prepare of a "
        "baseline revision, in one run; finish pause",
    ),
    "rollback": (
        "bench_rollback",
        "automatic fleet rollback under HTTP load: first bad request to all nodes on the "
        "old code; false rollbacks over good upgrades",
    ),
    "reload-vs-restart": (
        "bench_reload_vs_restart",
        "gunicorn's graceful reload (HUP) vs a hotfleet upgrade of the same app under the same "
        "recorded load: failures, p99 during the change, capacity dip, time to new code, state",
    ),
    "priority": (
        "bench_priority",
        "a worker's serving thread beside a hotfleet-like thread at normal, nice 19 or "
        "SCHED_IDLE priority and CPU-bound neighbours: why hotfleet keeps the normal priority",
    ),
    "scale": (
        "bench_scale",
        "the control plane driving 100-1000 simulated agents: e2e, commit skew, coordinator "
        "CPU, etcd requests/bytes/largest value, RSS; node-by-node extrapolated",
    ),
}


def main(argv: list[str] | None = None) -> int:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="hotfleet benchmarks. Results go to benchmarks/results/*.json "
        "and a row in benchmarks/RESULTS.md.",
    )
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(BENCHMARKS[args.benchmark][0])
    return int(module.main(args))


if __name__ == "__main__":
    sys.exit(main())

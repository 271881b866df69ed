"""Helpers shared by the benchmarks: statistics, machine description, recording results."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SCRATCH_DIR = BENCH_DIR / ".work"  # git-ignored: smoke-run output
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median_ratio_interval(
    numerator: Sequence[float], denominator: Sequence[float], rounds: int = 2000, seed: int = 1
) -> tuple[float, float]:
    """95 % bootstrap interval of median(numerator) / median(denominator).

    Why: two sides whose medians are equal within noise give a ratio above 1
    half the time; "unchanged" is a statement about that interval, not about
    one draw of the ratio.
    """
    rng = random.Random(seed)
    ratios = []
    for _ in range(rounds):
        a = statistics.median(rng.choices(numerator, k=len(numerator)))
        b = statistics.median(rng.choices(denominator, k=len(denominator)))
        ratios.append(a / b if b else float("inf"))
    ratios.sort()
    return ratios[int(0.025 * rounds)], ratios[int(0.975 * rounds) - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max / mean / n of a sample, as JSON-ready floats."""
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
        "mean": sum(values) / len(values) if values else math.nan,
        "n": len(values),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def load_average() -> float:
    """1-minute load average (0.0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


class ForeignCpu:
    """CPU used by *other* processes while a benchmark runs, in cores (Linux /proc/stat).

    The load average lags by a minute; this is exact over the measured span:
    all busy CPU time of the machine minus this process's own.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks  # minus idle, iowait
        own = sum(os.times()[:4])  # user + system, self and children
        return time.monotonic(), busy, own

    def cores(self) -> float | None:
        """Average number of cores other processes kept busy since construction."""
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        wall = end[0] - self._start[0]
        return max(0.0, ((end[1] - self._start[1]) - (end[2] - self._start[2])) / wall)


def warn_if_busy(stream: Any = None) -> float:
    """Print a warning when other processes compete for the CPUs; return the load."""
    load = load_average()
    cores = os.cpu_count() or 1
    if load > cores / 2:
        print(
            f"warning: load average {load:.2f} on {cores} cores: other processes compete "
            "for the CPUs and the timings will be noisy",
            file=stream or sys.stderr,
        )
    return load


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def git_revision() -> str:
    """Short HEAD hash, with ``+dirty`` when the work tree has changes."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) with None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(_finite(data), indent=2, sort_keys=False, default=_json_default) + "\n",
        encoding="utf-8",
    )
    return path


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json PATH`` and ``--record`` / ``--no-record``: where :func:`save_results` writes."""
    parser.add_argument("--json", type=Path, help="write the JSON results to this path")
    record = parser.add_mutually_exclusive_group()
    record.add_argument(
        "--record", action="store_true", help="append to benchmarks/RESULTS.md even with --quick"
    )
    record.add_argument(
        "--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md"
    )


def result_header(benchmark: str, date: dt.datetime) -> dict[str, Any]:
    """The first keys of every benchmark's results: name, date, revision, machine."""
    return {
        "benchmark": benchmark,
        "date": date.isoformat().replace("+00:00", "Z"),
        "revision": git_revision(),
        "machine": machine(),
    }


def save_results(
    args: argparse.Namespace,
    res: dict[str, Any],
    date: dt.datetime,
    markdown_rows: Callable[[dict[str, Any]], Sequence[Sequence[str]]],
    header: Sequence[str],
    preamble: str,
) -> Path:
    """Write ``res`` as JSON and, when recording, its rows to RESULTS.md; the JSON path.

    The JSON goes to ``--json``, else ``results/<benchmark>-<date>.json`` (the
    git-ignored scratch dir with ``--quick``).  Rows (``markdown_rows(res)``)
    are appended under ``## <benchmark>`` unless ``--quick`` or ``--no-record``;
    ``--record`` appends even with ``--quick``.
    """
    name = res["benchmark"]
    stamp = date.strftime("%Y%m%dT%H%M%SZ")
    if args.json is not None:
        json_path = args.json
    elif args.quick:
        json_path = SCRATCH_DIR / f"{name}-{stamp}.json"
    else:
        json_path = RESULTS_DIR / f"{name}-{stamp}.json"
    write_json(json_path, res)
    print(f"\nJSON: {json_path}")
    if args.record or not (args.quick or args.no_record):
        rows = markdown_rows(res)
        for row in rows:
            append_markdown_row(RESULTS_MD, name, header, row, preamble)
        print(f"{'row' if len(rows) == 1 else 'rows'} appended to {RESULTS_MD}")
    return json_path


def append_markdown_row(
    path: Path, title: str, header: Sequence[str], row: Iterable[str], preamble: str = ""
) -> None:
    """Append ``row`` to the table under ``## title`` in ``path`` (created if missing).

    Each benchmark owns one section; its table header is written the first
    time.  Rows are only ever appended, so the file is a history; when a
    benchmark's columns or method change (another header or preamble), a new
    table starts under the old one instead of misaligning rows.
    """
    cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
    line = "| " + " | ".join(cells) + " |\n"
    head = "| " + " | ".join(header) + " |\n" + "|" + "|".join("---" for _ in header) + "|\n"
    intro = preamble.rstrip() + "\n\n" if preamble else ""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    marker = f"## {title}\n"
    if marker not in text:
        if not text.endswith("\n"):
            text += "\n"
        text += "\n" + marker + "\n" + intro + head + line
    else:
        start = text.index(marker)
        nxt = text.find("\n## ", start + len(marker))
        end = len(text) if nxt == -1 else nxt + 1
        section = text[start:end].rstrip("\n") + "\n"
        table = intro + head
        pos = section.rfind(table)
        if pos == -1 or section.find("|---", pos + len(table)) != -1:
            section += "\n" + table  # the latest table is another: method or columns changed
        section += line
        text = text[:start] + section + ("\n" if nxt != -1 else "") + text[end:]
    path.write_text(text, encoding="utf-8")


def fmt_ms(seconds: float, digits: int = 2) -> str:
    if seconds is None or (isinstance(seconds, float) and not math.isfinite(seconds)):
        return "n/a"
    return f"{seconds * 1e3:.{digits}f}"


def print_table(rows: Sequence[Sequence[str]], file: Any = None) -> None:
    """A plain fixed-width table; the first row is the header."""
    out = file or sys.stdout
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ),
            file=out,
        )
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def cpu_s(pids: list[int], children: bool = False) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far (Linux /proc);
    ``children``: with the children each has reaped (an agent's staging processes)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if children:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")

"""Human output for ``coordctl``: tables, rollout reports, live progress, module drift.

Plain text with no dependency: tables are aligned columns (kubectl style),
colour only when the stream is a terminal and ``NO_COLOR`` is unset, and live
progress prints one line per event, so logs of a CI job read the same as a
terminal (a terminal also gets a one-line summary redrawn in place).
Everything here works on the JSON records the coordinator serves, so the
CLI can render records from a newer coordinator that has extra keys.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from coordinator.render_analysis import analysis_extras, paused_line, shown_phase

__all__ = [
    "Progress",
    "Style",
    "age",
    "drift",
    "duration",
    "errors_table",
    "modules_table",
    "nodes_table",
    "release_detail",
    "releases_table",
    "rollout_detail",
    "rollouts_table",
    "table",
]

TERMINAL_PHASES = frozenset({"permanent", "aborted", "rolled_back", "dry_run"})


class Style:
    """ANSI styling, a no-op unless enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: TextIO) -> Style:
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty and isatty())
        return cls(tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb")

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and text else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def phase(self, phase: str) -> str:
        if phase in ("permanent", "provisional", "dry_run", "pass"):
            return self.green(phase)
        if phase in ("aborted", "rolled_back", "aborting", "fail"):
            return self.red(phase)
        return self.yellow(phase)


PLAIN = Style(False)


def _visible_len(text: str) -> int:
    out, i = 0, 0
    while i < len(text):
        if text[i] == "\x1b":
            end = text.find("m", i)
            i = end + 1 if end != -1 else len(text)
            continue
        out += 1
        i += 1
    return out


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    empty: str = "",
    no_headers: bool = False,
) -> str:
    """Aligned columns; the last column is never padded (it may be long, e.g. a detail).

    ``no_headers`` drops the header line (kubectl's ``--no-headers``) so a
    script can pipe rows into ``awk``/``cut``; an empty list then prints
    nothing rather than the human ``empty`` sentence.
    """
    body = [["" if c is None else str(c) for c in row] for row in rows]
    if not body and (empty or no_headers):
        return "" if no_headers else empty
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row[: len(headers)]):
            first = cell.split("\n", 1)[0]
            widths[i] = max(widths[i], _visible_len(first))
    lines = []
    for row in body if no_headers else [list(headers), *body]:
        cells = row + [""] * (len(headers) - len(row))
        parts = []
        continuation: list[str] = []
        for i, cell in enumerate(cells):
            first, *rest = cell.split("\n")
            if i == len(cells) - 1:
                parts.append(first)
                continuation = rest
            else:
                parts.append(first + " " * (widths[i] - _visible_len(first)))
        lines.append("  ".join(parts).rstrip())
        indent = " " * (sum(widths[:-1]) + 2 * (len(widths) - 1))
        lines.extend((indent + extra).rstrip() for extra in continuation)
    return "\n".join(lines)


# ------------------------------------------------------------------ helpers
def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    if seconds < 120:
        return f"{seconds:.2f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def age(timestamp: float | None, now: float | None = None) -> str:
    if not timestamp:
        return "-"
    delta = max(0.0, (now or time.time()) - timestamp)
    if delta < 120:
        return f"{delta:.0f}s"
    if delta < 7200:
        return f"{delta / 60:.0f}m"
    if delta < 172800:
        return f"{delta / 3600:.0f}h"
    return f"{delta / 86400:.0f}d"


def short(digest: str | None, n: int = 12) -> str:
    return (digest or "")[:n] or "-"


def _labels(labels: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "-"


def _nodes_list(nodes: Sequence[str], limit: int = 6) -> str:
    nodes = sorted(nodes)
    if len(nodes) <= limit:
        return ",".join(nodes)
    return ",".join(nodes[:limit]) + f",… (+{len(nodes) - limit})"


# ------------------------------------------------------------------ tables
def nodes_table(
    nodes: Sequence[Mapping[str, Any]],
    style: Style = PLAIN,
    *,
    wide: bool = False,
    no_headers: bool = False,
) -> str:
    """One row per node; ``wide`` adds the HTTP address, pid and the epoch it has seen.

    SYNC says whether the node runs what the fleet wants of it (the leader's
    convergence loop): ``ok``, ``catching up``, or the release it should run.
    When nodes carry a ``host`` label (several workers per host, e.g. under
    gunicorn: :mod:`node_agent.gunicorn`), a HOST column comes first and the
    rows are grouped by host.
    """
    by_host = any(_host(n) for n in nodes)
    if by_host:
        nodes = sorted(nodes, key=lambda n: (_host(n), str(n.get("node_id", ""))))
    rows = []
    for n in nodes:
        state = str(n.get("state", ""))
        row = [
            n.get("node_id", ""),
            style.yellow(state) if state not in ("ready", "idle") else state,
            n.get("current_release") or "-",
            _sync(n, style),
            n.get("permanent_release") or "-",
            n.get("previous_release") or "-",
            n.get("address") or "-",
        ]
        if wide:
            row += [n.get("http_address") or "-", n.get("pid") or "-", n.get("epoch_seen") or 0]
        row = [*row, age(n.get("started_at")), _labels(n.get("labels"))]
        rows.append([_host(n) or "-", *row] if by_host else row)
    headers = ["NODE", "STATE", "RELEASE", "SYNC", "PERMANENT", "PREVIOUS", "ADDRESS"]
    if wide:
        headers += ["HTTP", "PID", "EPOCH"]
    if by_host:
        headers = ["HOST", *headers]
    return table(
        [*headers, "UP", "LABELS"], rows, empty="no nodes registered", no_headers=no_headers
    )


def _host(node: Mapping[str, Any]) -> str:
    labels = node.get("labels")
    return str(labels.get("host") or "") if isinstance(labels, Mapping) else ""


def _sync(node: Mapping[str, Any], style: Style) -> str:
    convergence = node.get("convergence") or ""
    if convergence == "converged":
        return "ok"
    if convergence == "catching_up":
        return style.yellow("catching up")
    if convergence == "drifting":
        return style.yellow(f"wants {node.get('desired_release') or 'boot code'}")
    return "-"


def releases_table(releases: Sequence[Mapping[str, Any]], *, no_headers: bool = False) -> str:
    rows = [
        [
            r.get("name", ""),
            r.get("version", ""),
            short(r.get("digest")),
            r.get("modules", ""),
            "yes" if r.get("signed") else "no",
            age(r.get("pushed_at")),
        ]
        for r in sorted(releases, key=lambda r: (r.get("name", ""), r.get("pushed_at") or 0))
    ]
    return table(
        ["NAME", "VERSION", "DIGEST", "MODULES", "SIGNED", "PUSHED"],
        rows,
        empty="no releases pushed",
        no_headers=no_headers,
    )


def release_detail(entry: Mapping[str, Any]) -> str:
    manifest = entry.get("manifest") or {}
    signer = entry.get("signer") or ""
    lines = [
        f"Release:  {entry.get('label') or entry.get('name', '') + '@' + entry.get('version', '')}",
        f"Digest:   {entry.get('digest', '')}",
        f"Signed:   {'yes' + (f' by {signer}' if signer else '') if entry.get('signed') else 'no'}",
        f"Pushed:   {age(entry.get('pushed_at'))} ago",
        "",
    ]
    modules = manifest.get("modules") or []
    lines.append(
        table(
            ["MODULE", "PATH", "DIGEST", "INSTRUCTION", "DEPENDS"],
            (
                [
                    m.get("name", ""),
                    m.get("path", ""),
                    short(m.get("digest")),
                    m.get("instruction") or "update",
                    ",".join(m.get("depends") or ()) or "-",
                ]
                for m in modules
            ),
            empty="(manifest not available)",
        )
    )
    for check in manifest.get("smoke") or []:
        lines.append(f"smoke check: {check}")
    if manifest.get("health"):
        lines.append(f"health policy: {manifest['health']}")
    return "\n".join(lines)


def rollouts_table(
    rollouts: Sequence[Mapping[str, Any]],
    style: Style = PLAIN,
    *,
    wide: bool = False,
    no_headers: bool = False,
) -> str:
    """Rollout history; ``wide`` adds waves, the worst commit skew, leader and epoch."""
    rows = []
    for r in rollouts:
        row = [
            r.get("id", ""),
            r.get("kind", ""),
            r.get("release", ""),
            style.phase(shown_phase(r)),
            len(r.get("targets") or ()),
            age(r.get("created_at")),
            duration(r.get("duration_s")),
        ]
        if wide:
            row += [
                r.get("waves") or 1,
                duration(max_wave_skew(r)) if max_wave_skew(r) else "-",
                r.get("leader") or "-",
                r.get("epoch") or 0,
            ]
        rows.append([*row, paused_line(r) or _one_line(r.get("reason") or "")])
    headers = ["ROLLOUT", "KIND", "RELEASE", "PHASE", "NODES", "AGE", "DURATION"]
    if wide:
        headers += ["WAVES", "SKEW", "LEADER", "EPOCH"]
    return table([*headers, "REASON"], rows, empty="no rollouts yet", no_headers=no_headers)


def wave_skews(rollout: Mapping[str, Any]) -> dict[int, float]:
    """Commit skew per wave: latest minus earliest finish instant among that wave's nodes.

    Waves are separate commits separated by an analysis window, so the gap
    between two waves is not skew; only nodes that switched at the same
    scheduled instant are compared.
    """
    by_wave: dict[int, list[float]] = {}
    for result in (rollout.get("nodes") or {}).values():
        if result.get("finished") and result.get("finished_at"):
            by_wave.setdefault(int(result.get("wave") or 0), []).append(
                float(result["finished_at"])
            )
    return {w: max(t) - min(t) for w, t in sorted(by_wave.items()) if len(t) > 1}


def max_wave_skew(rollout: Mapping[str, Any]) -> float:
    return max(wave_skews(rollout).values(), default=0.0)


def _one_line(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def errors_table(errors: Sequence[Mapping[str, Any]], style: Style = PLAIN) -> str:
    """Every refusal: which node, which module, which reason, and the detail in full."""
    rows = [
        [
            e.get("node") or "-",
            e.get("module") or "-",
            style.red(str(e.get("reason") or "-")),
            str(e.get("detail") or "").rstrip(),
        ]
        for e in errors
    ]
    return table(["NODE", "MODULE", "REASON", "DETAIL"], rows)


def _vote(result: Mapping[str, Any], style: Style) -> str:
    vote = result.get("vote") or ""
    if vote == "yes":
        return style.green("yes")
    if vote in ("no", "unreachable"):
        return style.red(vote)
    return style.dim("pending")


def _node_outcome(result: Mapping[str, Any], phase: str) -> str:
    if result.get("finished"):
        return "finished"
    if result.get("aborted"):
        return "aborted"
    if phase in ("committed",):
        return "finishing"
    if phase in ("aborting",):
        return "aborting"
    return "-"


def collect_errors(rollout: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rollout's errors plus any node error not already listed, each naming its node."""
    seen: set[tuple[str, str, str, str]] = set()
    out: list[dict[str, Any]] = []

    def add(e: Mapping[str, Any], node: str = "") -> None:
        entry = {
            "node": e.get("node") or node,
            "module": e.get("module", ""),
            "reason": e.get("reason", ""),
            "detail": e.get("detail", ""),
        }
        key = (entry["node"], entry["module"], entry["reason"], entry["detail"])
        if key not in seen:
            seen.add(key)
            out.append(entry)

    for e in rollout.get("errors") or ():
        add(e)
    for node, result in sorted((rollout.get("nodes") or {}).items()):
        for e in result.get("errors") or ():
            add(e, node)
    return out


def rollout_detail(rollout: Mapping[str, Any], style: Style = PLAIN) -> str:
    phase = str(rollout.get("phase", ""))
    options = rollout.get("options") or {}
    flags = [k for k in ("dry_run", "allow_missing", "force") if options.get(k)]
    lines = [
        f"Rollout:  {style.bold(str(rollout.get('id', '')))}  ({rollout.get('kind', '')})",
        f"Release:  {rollout.get('release', '')}  {style.dim(short(rollout.get('release_digest')))}",
        f"Phase:    {style.phase(phase)}" + (f"  [{', '.join(flags)}]" if flags else ""),
    ]
    errors = collect_errors(rollout)
    if rollout.get("reason"):
        reason = str(rollout["reason"])
        lines.append(f"Reason:   {_one_line(reason, 240) if errors else reason}")
    timing = f"Duration: {duration(rollout.get('duration_s'))}"
    skews = wave_skews(rollout)
    if len(skews) == 1:
        timing += f"   commit skew: {duration(next(iter(skews.values())))}"
    elif skews:
        timing += "   commit skew per wave: " + ", ".join(
            f"{w + 1}: {duration(s)}" for w, s in skews.items()
        )
    lines.append(timing)
    if rollout.get("leader"):
        lines.append(f"Leader:   {rollout['leader']} (epoch {rollout.get('epoch', 0)})")
    nodes = rollout.get("nodes") or {}
    previous = rollout.get("previous") or {}
    rows = []
    for node in sorted(set(nodes) | set(rollout.get("targets") or ())):
        r = nodes.get(node) or {}
        rows.append(
            [
                node,
                _vote(r, style),
                duration(r.get("prepare_s")) if r.get("prepare_s") else "-",
                _node_outcome(r, phase),
                duration(r.get("pause_s")) if r.get("finished") else "-",
                previous.get(node) or "-",
                _one_line(r.get("detail") or "", 80) or "",
            ]
        )
    lines += ["", table(["NODE", "VOTE", "PREPARE", "OUTCOME", "PAUSE", "WAS", "DETAIL"], rows)]
    if int(rollout.get("waves") or 1) > 1:
        lines.insert(3, f"Waves:    {int(rollout.get('wave') or 0) + 1} of {rollout['waves']}")
    analysis = rollout.get("analysis") or {}
    if analysis:
        lines += ["", analysis_table(analysis, style), *analysis_extras(analysis)]
    notes = node_notes(nodes)
    if notes:
        lines += ["", style.bold("Notes:"), *(f"  {style.yellow(n)}" for n in notes)]
    if errors:
        lines += ["", style.bold(f"{len(errors)} error(s):"), errors_table(errors, style)]
    return "\n".join(lines)


def drain_note(result: Mapping[str, Any]) -> str:
    """Empty when the node's finish drained guarded work (or it did not finish)."""
    if result.get("drained", True):
        return ""
    return (
        f"drain timed out: {int(result.get('still_in_flight') or 0)} request(s) still in "
        "flight finished on the old code"
    )


def node_notes(nodes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What each node said beyond its vote and outcome: a timed-out drain, its warnings."""
    out = []
    for node, r in sorted(nodes.items()):
        drain = drain_note(r)
        if drain:
            out.append(f"{node}: {drain}")
        for phase in ("prepare", "finish"):
            out += [f"{node}: {phase}: {w}" for w in r.get(f"{phase}_warnings") or ()]
    return out


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def analysis_table(analysis: Mapping[str, Any], style: Style = PLAIN) -> str:
    """The live verdict of the rollback window: per node and metric, with the evidence."""
    head = (
        f"Analysis: {style.phase(str(analysis.get('overall', '')))} after "
        f"{duration(analysis.get('elapsed_s'))} of a {duration(analysis.get('window_s'))} window"
        f" -> {analysis.get('action', '')}"
    )
    rows = [
        [
            f.get("node") or "-",
            f.get("metric", ""),
            _num(f.get("observed")),
            _num(f.get("baseline")),
            _num(f.get("bound")),
            f.get("test", ""),
            _num(f.get("p_value")),
            style.phase(str(f.get("verdict", ""))),
        ]
        for f in analysis.get("findings") or ()
    ]
    body = table(["NODE", "METRIC", "OBSERVED", "BASELINE", "BOUND", "TEST", "P", "VERDICT"], rows)
    return f"{head}\n{_one_line(str(analysis.get('reason', '')), 240)}\n{body}"


# ------------------------------------------------------------------ modules
def drift(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """Modules whose loaded digest differs across nodes: ``{module: {digest: [nodes]}}``."""
    by_module: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        digest = row.get("loaded_digest") or ""
        by_module.setdefault(row.get("module", ""), {}).setdefault(digest, []).append(
            row.get("node", "")
        )
    return {
        module: {d: sorted(n) for d, n in digests.items()}
        for module, digests in sorted(by_module.items())
        if len(digests) > 1
    }


def modules_table(
    rows: Sequence[Mapping[str, Any]], *, per_node: bool = False, style: Style = PLAIN
) -> str:
    if not rows:
        return "no modules reported"
    drifting = drift(rows)
    if per_node:
        body = [
            [
                r.get("node", ""),
                r.get("module", ""),
                _module_state(r, style),
                r.get("release") or "-",
                short(r.get("loaded_digest")),
                short(r.get("disk_digest")),
            ]
            for r in sorted(rows, key=lambda r: (r.get("node", ""), r.get("module", "")))
        ]
        return table(["NODE", "MODULE", "STATE", "RELEASE", "LOADED", "ON DISK"], body)
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for r in rows:
        key = (
            r.get("module", ""),
            r.get("loaded_digest") or "",
            r.get("state", ""),
            r.get("release") or "",
        )
        groups.setdefault(key, []).append(r.get("node", ""))
    body = []
    last_module = None
    for (module, digest, state, release), nodes in sorted(groups.items()):
        marker = style.red("DRIFT") if module in drifting else ""
        body.append(
            [
                module if module != last_module else "",
                short(digest),
                _module_state({"state": state}, style),
                release or "-",
                len(nodes),
                (marker + " " if marker and module != last_module else "") + _nodes_list(nodes),
            ]
        )
        last_module = module
    text = table(["MODULE", "LOADED", "STATE", "RELEASE", "COUNT", "NODES"], body)
    if drifting:
        text += "\n\n" + style.yellow(
            f"{len(drifting)} module(s) run different code on different nodes: "
            + ", ".join(drifting)
        )
    return text


def _module_state(row: Mapping[str, Any], style: Style) -> str:
    state = str(row.get("state", ""))
    return state if state in ("loaded", "not_loaded") else style.yellow(state)


# ------------------------------------------------------------------ progress
class Progress:
    """Turns successive snapshots of one rollout into event lines.

    Each call to :meth:`update` prints what changed since the previous
    snapshot: the phase, every node's vote (with its errors) and every
    node's finish or abort.  On a terminal a summary line is redrawn in place
    below the events; elsewhere only the event lines are printed.
    """

    def __init__(self, out: TextIO = sys.stdout, *, style: Style | None = None) -> None:
        self.out = out
        self.style = style or Style.for_stream(out)
        isatty = getattr(out, "isatty", None)
        self.live = bool(isatty and isatty())
        self._phase = ""
        self._seen: dict[str, tuple[str, bool, bool]] = {}
        self._verdict: tuple[Any, Any] = (None, None)
        self._wave = 0
        self._status_shown = False
        self.started = time.monotonic()

    def _emit(self, line: str) -> None:
        self._clear_status()
        print(line, file=self.out, flush=True)

    def _clear_status(self) -> None:
        if self._status_shown:
            self.out.write("\r\x1b[2K")
            self._status_shown = False

    def update(self, rollout: Mapping[str, Any]) -> None:
        s = self.style
        phase = str(rollout.get("phase", ""))
        stamp = f"[{time.monotonic() - self.started:6.2f}s]"
        if not self._phase:
            targets = rollout.get("targets") or ()
            self._emit(
                f"{stamp} rollout {rollout.get('id')}: {rollout.get('kind')} to "
                f"{rollout.get('release')} on {len(targets)} node(s): {_nodes_list(targets)}"
            )
            self._emit(f"{stamp} phase {s.phase(phase)}")
            self._phase = phase
        for node, r in sorted((rollout.get("nodes") or {}).items()):
            vote = r.get("vote") or ""
            state = (vote, bool(r.get("finished")), bool(r.get("aborted")))
            before = self._seen.get(node, ("", False, False))
            if vote and vote != before[0]:
                took = f" in {duration(r.get('prepare_s'))}" if r.get("prepare_s") else ""
                self._emit(f"{stamp}   {node}: prepare {_vote(r, s)}{took}")
                for e in r.get("errors") or ():
                    self._emit(
                        f"{stamp}     {e.get('module', '-')}: {s.red(str(e.get('reason', '')))}: "
                        f"{_one_line(str(e.get('detail', '')), 200)}"
                    )
                if vote == "unreachable" and r.get("detail"):
                    self._emit(f"{stamp}     {_one_line(str(r['detail']), 200)}")
                for w in r.get("prepare_warnings") or ():
                    self._emit(f"{stamp}     {s.yellow('warning')}: {_one_line(str(w), 200)}")
            if state[1] and not before[1]:
                drain = drain_note(r)
                self._emit(
                    f"{stamp}   {node}: finished (paused {duration(r.get('pause_s'))}"
                    + (f"; {s.yellow(drain)})" if drain else ")")
                )
                for w in r.get("finish_warnings") or ():
                    self._emit(f"{stamp}     {s.yellow('warning')}: {_one_line(str(w), 200)}")
            if state[2] and not before[2]:
                self._emit(f"{stamp}   {node}: aborted")
            self._seen[node] = state
        wave, waves = int(rollout.get("wave") or 0), int(rollout.get("waves") or 1)
        if waves > 1 and wave != self._wave:
            self._emit(f"{stamp} wave {wave + 1} of {waves}")
            self._wave = wave
        analysis = rollout.get("analysis") or {}
        verdict = (analysis.get("overall"), analysis.get("action"))
        if analysis and verdict != self._verdict:
            self._emit(
                f"{stamp} analysis {s.phase(str(verdict[0]))} "
                f"({duration(analysis.get('elapsed_s'))} of {duration(analysis.get('window_s'))}): "
                f"{_one_line(str(analysis.get('reason', '')), 200)}"
            )
            if verdict[1] == "pause":
                self._emit(
                    f"{stamp} {s.yellow('paused')}: waiting for `coordctl promote` "
                    "or `coordctl rollback`"
                )
            self._verdict = verdict
        # Node events first: a snapshot that shows a new phase also shows the
        # votes and finishes that led to it.
        if phase != self._phase:
            self._emit(f"{stamp} phase {s.phase(phase)}")
            self._phase = phase
        if self.live and phase not in TERMINAL_PHASES:
            self._clear_status()
            self.out.write(s.dim(f"{stamp} {summary(rollout)}"))
            self.out.flush()
            self._status_shown = True

    def close(self) -> None:
        self._clear_status()
        self.out.flush()


def summary(rollout: Mapping[str, Any]) -> str:
    nodes = rollout.get("nodes") or {}
    total = len(rollout.get("targets") or nodes)
    votes = [r.get("vote") or "" for r in nodes.values()]
    finished = sum(1 for r in nodes.values() if r.get("finished"))
    text = (
        f"{rollout.get('phase')}: {votes.count('yes')}/{total} prepared, "
        f"{votes.count('no') + votes.count('unreachable')} refused, "
        f"{finished}/{total} finished"
    )
    waves = int(rollout.get("waves") or 1)
    if waves > 1:
        text += f", wave {int(rollout.get('wave') or 0) + 1} of {waves}"
    analysis = rollout.get("analysis") or {}
    if rollout.get("phase") == "provisional" and analysis:
        if analysis.get("action") == "pause":
            text += f", {paused_line(rollout)}"
        else:
            left = float(analysis.get("window_s") or 0) - float(analysis.get("elapsed_s") or 0)
            text += f", analysis: {duration(max(left, 0.0))} left"
    return text

"""Human text for rollout records: the rollouts table, one rollout's report, errors.

Works on the JSON records the coordinator serves (extra keys of a newer
coordinator are ignored): :func:`rollouts_table` lists them,
:func:`rollout_detail` reports one (per-node vote and outcome, drain notes,
wave skew, the analysis findings, :mod:`coordinator.render_analysis` for
what the analysis knows beyond them) and :func:`errors_table` shows the
per-module errors a refusal carries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from coordinator.render_analysis import analysis_extras, paused_line, shown_phase
from coordinator.text import PLAIN, Style, age, duration, short, table

TERMINAL_PHASES = frozenset({"permanent", "aborted", "rolled_back", "dry_run"})


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
        rows.append([*row, paused_line(r) or one_line(r.get("reason") or "")])
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


def commit_lead_text(rollout: Mapping[str, Any]) -> str:
    """The (last) wave's commit lead and how ready its slowest node was at the instant."""
    lead = rollout.get("commit_lead_s") or 0.0
    if not lead:
        return ""
    text = f"   commit lead: {duration(lead)}"
    ahead = {
        node: r["armed_ahead_s"]
        for node, r in (rollout.get("nodes") or {}).items()
        if r.get("armed_ahead_s") is not None and r.get("wave", 0) == rollout.get("wave", 0)
    }
    if ahead:
        node, value = min(ahead.items(), key=lambda kv: kv[1])
        when = "before" if value >= 0 else "after"
        text += f" (slowest: {node}, ready {duration(abs(value))} {when} the instant)"
    return text


def max_wave_skew(rollout: Mapping[str, Any]) -> float:
    return max(wave_skews(rollout).values(), default=0.0)


def one_line(text: str, limit: int = 100) -> str:
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


def vote_text(result: Mapping[str, Any], style: Style) -> str:
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
        lines.append(f"Reason:   {one_line(reason, 240) if errors else reason}")
    timing = f"Duration: {duration(rollout.get('duration_s'))}"
    skews = wave_skews(rollout)
    if len(skews) == 1:
        timing += f"   commit skew: {duration(next(iter(skews.values())))}"
    elif skews:
        timing += "   commit skew per wave: " + ", ".join(
            f"{w + 1}: {duration(s)}" for w, s in skews.items()
        )
    lines.append(timing + commit_lead_text(rollout))
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
                vote_text(r, style),
                duration(r.get("prepare_s")) if r.get("prepare_s") else "-",
                _node_outcome(r, phase),
                duration(r.get("pause_s")) if r.get("finished") else "-",
                previous.get(node) or "-",
                one_line(r.get("detail") or "", 80) or "",
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
    return f"{head}\n{one_line(str(analysis.get('reason', '')), 240)}\n{body}"

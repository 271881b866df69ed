"""Human text for what the analysis knows beyond the findings table.

Two things an operator asks of a provisional rollout that the per-metric
table does not answer at a glance: *did the new code run at all, and did it
fail?* (changed-code coverage: the functions that never ran and those that
raised) and, for a paused rollout, *why is it waiting and what moves it on?*
Kept apart from :mod:`coordinator.render` (tables and verbs) so each can
change without the other.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

__all__ = ["analysis_extras", "is_paused", "paused_line", "shown_phase"]

_LIST_LIMIT = 8


def is_paused(rollout: Mapping[str, Any]) -> bool:
    """A provisional rollout whose window ended inconclusive and waits (still guarded)."""
    analysis = rollout.get("analysis") or {}
    return rollout.get("phase") == "provisional" and analysis.get("action") == "pause"


def shown_phase(rollout: Mapping[str, Any]) -> str:
    """The phase column: ``paused`` for a paused provisional rollout, else the phase."""
    return "paused" if is_paused(rollout) else str(rollout.get("phase", ""))


def paused_line(rollout: Mapping[str, Any], limit: int = 160) -> str:
    """One line for tables: why it is paused and what resumes it ("" if not paused)."""
    if not is_paused(rollout):
        return ""
    paused = (rollout.get("analysis") or {}).get("paused") or {}
    waiting = paused.get("waiting_on") or []
    why = (
        f"waiting on {', '.join(waiting[:3])}{' ...' if len(waiting) > 3 else ''}"
        if waiting
        else (
            str(
                paused.get("reason")
                or (rollout.get("analysis") or {}).get("reason")
                or "inconclusive"
            )
        )
    )
    text = f"paused: {why}; resume: promote | rollback | by itself when conclusive"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(names: list[str]) -> str:
    more = len(names) - _LIST_LIMIT
    return ", ".join(names[:_LIST_LIMIT]) + (f" (+{more} more)" if more > 0 else "")


def analysis_extras(analysis: Mapping[str, Any], now: float | None = None) -> list[str]:
    """Lines after the findings table: the pause (why, since, what resumes it), changed code."""
    lines: list[str] = []
    paused = analysis.get("paused") if analysis.get("action") == "pause" else None
    if paused:
        since = float(paused.get("since") or 0.0)
        ago = max(0.0, (now if now is not None else time.time()) - since) if since else 0.0
        lines += [
            "",
            f"Paused {ago:.0f}s ago (still sampled and judged): {paused.get('reason', '')}",
        ]
        if paused.get("waiting_on"):
            lines.append(f"  waiting on: {_names(list(paused['waiting_on']))}")
        lines.append(f"  resumes: {paused.get('resumes', '')}")
    if analysis.get("resumed"):
        lines += ["", f"Resumed: {analysis['resumed']}"]
    changed = analysis.get("changed_code")
    if changed:
        calls, raised = int(changed.get("calls") or 0), int(changed.get("raised") or 0)
        ratio = f", error ratio {raised / calls:.2g}" if calls else ""
        lines += [
            "",
            f"Changed code ({changed.get('release') or 'this release'}): "
            f"{changed.get('ran', 0)} of {changed.get('functions', 0)} functions ran, "
            f"{'~' if changed.get('calls_estimated') else ''}{calls} calls, {raised} raised{ratio}",
        ]
        if changed.get("calls_estimated"):
            lines.append(
                "  calls estimated (sampled past their first exact calls): "
                + _names(list(changed["calls_estimated"]))
            )
        raising = changed.get("raising") or []
        if raising:
            lines.append(
                "  raised:    "
                + _names([f"{r['name']} ({r['raised']}/{r['calls']})" for r in raising])
            )
        never = list(changed.get("never_ran") or [])
        if never:
            lines.append(f"  never ran: {_names(never)}")
    return lines

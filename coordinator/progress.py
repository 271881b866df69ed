"""Live progress of a watched rollout: one line per event, a summary redrawn in place.

:class:`Progress` is fed successive rollout records (``coordctl upgrade
--wait``, ``status --watch``) and prints what changed since the last one,
so a CI log reads the same as a terminal; a terminal also gets a one-line
:func:`summary` redrawn in place.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from coordinator.render_analysis import paused_line
from coordinator.render_rollout import TERMINAL_PHASES, drain_note, one_line, vote_text
from coordinator.text import Style, duration, nodes_list


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
                f"{rollout.get('release')} on {len(targets)} node(s): {nodes_list(targets)}"
            )
            self._emit(f"{stamp} phase {s.phase(phase)}")
            self._phase = phase
        for node, r in sorted((rollout.get("nodes") or {}).items()):
            vote = r.get("vote") or ""
            state = (vote, bool(r.get("finished")), bool(r.get("aborted")))
            before = self._seen.get(node, ("", False, False))
            if vote and vote != before[0]:
                took = f" in {duration(r.get('prepare_s'))}" if r.get("prepare_s") else ""
                self._emit(f"{stamp}   {node}: prepare {vote_text(r, s)}{took}")
                for e in r.get("errors") or ():
                    self._emit(
                        f"{stamp}     {e.get('module', '-')}: {s.red(str(e.get('reason', '')))}: "
                        f"{one_line(str(e.get('detail', '')), 200)}"
                    )
                if vote == "unreachable" and r.get("detail"):
                    self._emit(f"{stamp}     {one_line(str(r['detail']), 200)}")
                for w in r.get("prepare_warnings") or ():
                    self._emit(f"{stamp}     {s.yellow('warning')}: {one_line(str(w), 200)}")
            if state[1] and not before[1]:
                drain = drain_note(r)
                self._emit(
                    f"{stamp}   {node}: finished (paused {duration(r.get('pause_s'))}"
                    + (f"; {s.yellow(drain)})" if drain else ")")
                )
                for w in r.get("finish_warnings") or ():
                    self._emit(f"{stamp}     {s.yellow('warning')}: {one_line(str(w), 200)}")
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
                f"{one_line(str(analysis.get('reason', '')), 200)}"
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

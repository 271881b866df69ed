"""How far ahead of its decision a wave's commit instant is set, learned from the fleet.

A commit names an instant at which every participant switches by itself
(:mod:`hotfleet.decisions`); the lead, from the decision to that instant, must
cover writing the decision, etcd pushing it to every participant's watch, each
verifying it and getting its switch ready.  Too short, and the nodes that are
not ready switch when they are (late: the commit skew grows); too long, and
every rollout waits for nothing.  What a fleet needs depends on it: a few
workers on idle hosts are ready in ~10 ms, 1000 packed nodes on 2 cores need
most of a second, and an overloaded host needs more than either.

So each participant reports, with its finish, how long before the instant it
was ready (``armed_ahead_s``; negative when the commit reached it that late),
and the lead of the next wave is what the slowest participant of the recent
waves needed, with headroom: :meth:`CommitLead.observe` keeps the need as a
fraction of the default lead (:func:`default_lead`, which scales with the
number of nodes: a wave of another size reuses it), and :meth:`CommitLead.lead`
scales the default by the largest recent fraction times :data:`HEADROOM`,
within [:data:`MIN_SCALE`, :data:`MAX_SCALE`].  A late node raises the next
lead at once; a fast fleet lowers it over a few waves, as the late
observations leave the window.  Nothing is persisted: a new leader starts
from the default, which is what every rollout used before.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

__all__ = [
    "HEADROOM",
    "MAX_SCALE",
    "MIN_SCALE",
    "WINDOW",
    "CommitLead",
    "default_lead",
]

# The default: long enough for etcd to push the decision to every participant's watch
# and for each to verify it (one etcd read) and get ready to switch, which grows with
# the wave: 100 simulated nodes packed in a process on a shared core take ~0.2 s, 1000
# on 2 cores ~0.8 s once their membership writes stay out of the lead (issue 17: with
# 0.8 ms/node the commit skew of 1000 packed nodes stayed at 45-94 ms over 18 runs,
# 46-81 ms at 1.0); a fleet of hosts does it in parallel, and a few workers in ~10 ms.
# The Finish fan-out is not in it: it starts at the instant (a node without a live
# watch switches when its Finish comes, late but correct).
DEFAULT_BASE_S = 0.05
DEFAULT_PER_NODE_S = 0.0008

HEADROOM = 1.5  # the lead is this many times what the slowest recent node needed
MIN_SCALE = 0.25  # never below a quarter of the default (12.5 ms + 0.2 ms/node)
MAX_SCALE = 4.0  # never above four times it (an overloaded fleet: 200 ms + 3.2 ms/node)
WINDOW = 5  # waves remembered: one slow wave keeps the lead up for the next four


def default_lead(nodes: int) -> float:
    """The lead before anything was learned, for a wave of ``nodes``."""
    return DEFAULT_BASE_S + DEFAULT_PER_NODE_S * nodes


class CommitLead:
    """The commit lead of the next wave, from what the recent waves' nodes reported.

    Thread-safe: the engine's driver asks for a lead and observes the wave's
    finish outcomes from whichever thread drives the rollout.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._needs: deque[float] = deque(maxlen=WINDOW)  # needed / default lead, per wave

    def lead(self, nodes: int) -> float:
        """Seconds from the decision to the commit instant for a wave of ``nodes``."""
        return default_lead(nodes) * self.scale()

    def scale(self) -> float:
        """The learned factor on :func:`default_lead` (1.0 until a wave was observed)."""
        with self._lock:
            if not self._needs:
                return 1.0
            return min(MAX_SCALE, max(MIN_SCALE, max(self._needs) * HEADROOM))

    def observe(self, nodes: int, lead_s: float, ahead: Iterable[float]) -> float | None:
        """A wave of ``nodes`` had ``lead_s`` and its nodes were ready ``ahead`` s before
        the instant: remember what the slowest needed.  Returns that need in seconds
        (``None`` when no node reported, and nothing is learned)."""
        values = list(ahead)
        if not values or lead_s <= 0:
            return None
        needed = max(0.0, lead_s - min(values))
        with self._lock:
            self._needs.append(needed / default_lead(nodes))
        return needed

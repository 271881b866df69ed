"""Release code behind the drain barrier, on a thread the caller can walk away from.

Finish and rollback run release code (changed statements, ``code_change``)
while the gate is closed.  Python threads cannot be killed: a pure-Python
loop is interrupted by the watchdog (:mod:`node_agent._deadline`), but code
blocked in a C call (a lock acquired without timeout) never sees that.  So
the whole hold runs on the loader's worker thread, and the caller (the
Finish RPC) waits with a deadline per step.  When a step overruns, the
caller restores the previous version itself, takes the gate over and
reopens it (:meth:`~node_agent.drain.DrainBarrier.take_over`), turns the
collector back on and answers; the stuck thread is left behind, and stops
at its next step if it ever comes back.

Why not the caller's own thread with a worker only for ``code_change``, as
before: each hand-over to a waiting thread costs a wake-up (~120 µs on this
VM, where a woken vCPU leaves its halt), and two of them sat inside the
pause.  Here both are outside it: the caller hands over before the gate
closes and is woken after it reopens; inside, the worker runs the switch
and the migrations back to back.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TypeVar

from node_agent._cow import before_hold
from node_agent._deadline import Abandoned, Progress, Worker, arm, disarm
from node_agent.drain import DrainBarrier, HoldInfo

__all__ = ["TAKEOVER_GRACE_S", "held"]

T = TypeVar("T")

# How long past a step's deadline the caller waits before walking away: the
# watchdog honours a moved deadline within 50 ms, and a step it interrupts
# (a pure-Python loop) is better ended by the worker, which knows exactly
# what it journaled.
TAKEOVER_GRACE_S = 0.25


def held(
    worker: Worker,
    barrier: DrainBarrier,
    drain_timeout: float,
    first_step_s: float,
    body: Callable[[Progress], T],
    *,
    before: Callable[[], None] = lambda: None,
    restore: Callable[[], object],
    at: float = 0.0,
    began: list[float] | None = None,
) -> tuple[T, HoldInfo]:
    """``body(progress)`` inside a hold, on ``worker``; its value and what the hold found.

    ``before`` runs on the worker first (warming what the body will touch:
    the first run of code on a thread faults pages); then, with ``at`` (unix
    time, a fleet's commit instant), the worker waits for that instant, so
    that only the hold itself happens after it.  ``body`` declares its
    steps (``progress.step(seconds, label)``); the first, until the body's
    own first step, gets the drain timeout plus ``first_step_s``.  Raises
    :class:`~node_agent._deadline.Abandoned` (its ``label`` names the step)
    after ``restore()`` undid what the stuck body had done and the gate was
    reopened — in that order, so no request sees half a switch.  ``began``
    gets the unix time the hold began (after the wait for ``at``).
    """

    resumes: list[bool] = []  # whether the hold turned the collector off (it was on)

    def job(progress: Progress) -> tuple[T, HoldInfo]:
        before_hold()  # the staging fork's aftermath settled, while the gate is open
        before()
        wait = max(0.0, at - time.time()) if at else 0.0
        # armed before the instant: arming wakes the watchdog thread, which must not
        # take the GIL from the hold after it
        progress.token = token = arm(wait + drain_timeout + first_step_s)
        try:
            progress.step(wait + drain_timeout + first_step_s, "drain")
            if wait:
                time.sleep(max(0.0, at - time.time()))
            if began is not None:
                began.append(time.time())
            resumes.append(gc.isenabled())
            gc.disable()
            try:
                with barrier.hold(drain_timeout) as hold:
                    return body(progress), hold
            finally:
                if resumes[0]:
                    gc.enable()
        finally:
            disarm(token)

    try:
        return worker.run(job, grace=TAKEOVER_GRACE_S)
    except Abandoned:
        restore()
        barrier.take_over(worker.thread)
        if resumes and resumes[0]:  # the stuck hold turned it off and may never turn it on
            gc.enable()
        raise

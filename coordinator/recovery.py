"""Recovery: a new leader settles the rollout its predecessor left behind.

On winning the election the engine reads the cluster's ``active`` rollout.
No decision means abort (presumed abort): the decision is written ``abort``
and Abort driven.  A commit is finished: Finish is re-driven to the nodes
that have not acknowledged it, then the window is judged (against the
baseline persisted with the rollout) and the remaining waves run.  A live
driver of this coordinator always owns its rollout: recovery never
re-enters one.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from coordinator.errors import Refused
from coordinator.model import Phase, Vote
from coordinator.options import RolloutOptions
from coordinator.twophase import abort_reason, wave_id
from hotfleet.decisions import Decided

if TYPE_CHECKING:
    from coordinator.engine import Engine

log = logging.getLogger("hotfleet.coordinator")

__all__ = ["recover"]


def recover(engine: Engine) -> None:
    """On winning the election: settle the rollout a previous leader left behind."""
    lead = engine._leadership
    if lead is None:
        return
    rid = engine._active_id()
    if not rid:
        return
    with engine._lock:
        driver = engine._driving.get(rid)
    if driver is not None and driver.is_alive():
        return  # a live driver owns it: recovery never re-enters its rollout
    with engine._lock:
        engine._driving[rid] = threading.current_thread()  # this thread drives it now
    try:
        rollout = engine.rollout(rid)
    except Refused:
        engine.client.transaction(
            compare=[lead.fence()],
            success=[engine.client.transactions.delete(engine.keys.active)],
            failure=[],
        )
        return
    options = RolloutOptions(
        **{k: v for k, v in rollout.options.items() if k in RolloutOptions.__dataclass_fields__}
    )
    # presumed abort when undecided (a rollback rollout is never analysed or waved)
    decision = engine.protocol.decide(lead, wave_id(rollout), Decided.ABORT)
    rollout.decision = decision
    log.warning("new leader recovering rollout %s: decision %s", rid, decision)
    if decision is not Decided.COMMIT:
        rollout.phase = Phase.ABORTING
        refused = any(n.vote is Vote.NO for n in rollout.nodes.values())
        rollout.reason = rollout.reason or (
            abort_reason(rollout) + " (settled by a new leader)"
            if refused
            else "the leader changed before the decision was recorded: presumed abort"
        )
        engine._save(lead, rollout)
        engine.driver.abort_wave(lead, rollout, options, dry_run=False)
        return
    if rollout.phase is not Phase.PROVISIONAL:
        rollout.phase = Phase.COMMITTED
        engine._save(lead, rollout)
        if not engine.protocol.finish_all(lead, rollout, options):
            return
    # a new leader has no baseline of its own for the window: the judge says so
    if engine.driver.next_wave(lead, rollout, options):
        engine.driver.drive(lead, rollout, engine._entry_or_stub(rollout.release), options)

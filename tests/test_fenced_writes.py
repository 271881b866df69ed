"""A fenced record write whose first attempt timed out but landed (real etcd).

etcd can apply a transaction and still miss the client's deadline (a slow
etcd just after a restart, a loaded host).  The retry then fails its
revision compare against our *own* write; before this was handled the
driver took it for another writer (``Superseded``) and stopped driving the
rollout, which then stayed in flight with nobody to end it.
"""

from __future__ import annotations

from typing import Any

import etcd3.exceptions
import pytest

from coordinator.fencing import Superseded
from coordinator.model import Phase, Rollout
from tests.fleet import Leader


def _rollout() -> Rollout:
    return Rollout(
        id="r-landed", kind="upgrade", release="shop@2.0.0", release_digest="", targets=[]
    )


def _landing_then_timing_out(leader: Leader) -> list[int]:
    """Make the leadership's next transaction apply in etcd, then raise a client timeout."""
    real = leader.lead.transaction
    calls = [0]

    def transaction(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        result = real(*args, **kw)
        if calls[0] == 1:
            raise etcd3.exceptions.ConnectionTimeoutError("deadline exceeded (applied)")
        return result

    leader.lead.transaction = transaction  # type: ignore[method-assign]
    return calls


def test_a_timed_out_write_that_landed_is_ours_not_another_writers(leader: Leader) -> None:
    rollout = _rollout()
    leader.engine._save(leader.lead, rollout)
    first = rollout.revision
    calls = _landing_then_timing_out(leader)
    rollout.phase = Phase.COMMITTED
    leader.engine._save(leader.lead, rollout)  # retried once; the retry's compare fails
    assert calls[0] == 2
    stored = leader.engine.rollout(rollout.id)
    assert stored.phase is Phase.COMMITTED and rollout.revision == stored.revision > first
    rollout.phase = Phase.PERMANENT  # the driver goes on writing from the revision it holds
    leader.engine._save(leader.lead, rollout)
    assert leader.engine.rollout(rollout.id).phase is Phase.PERMANENT


def test_a_write_by_someone_else_still_supersedes(leader: Leader) -> None:
    rollout = _rollout()
    leader.engine._save(leader.lead, rollout)
    other = leader.engine.rollout(rollout.id)
    other.phase = Phase.ABORTED
    leader.engine._save(leader.lead, other)
    rollout.phase = Phase.COMMITTED
    with pytest.raises(Superseded):
        leader.engine._save(leader.lead, rollout)
    assert leader.engine.rollout(rollout.id).phase is Phase.ABORTED

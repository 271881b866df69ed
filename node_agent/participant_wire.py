"""``hotfleet.v1.NodeAgent``'s mutating RPCs, translated to a :class:`Participant` and back.

One translation for every way a participant is reached: the gRPC servicer
of a real agent, the in-process transport of the coordinator's protocol
tests and the simulated agents of the scale benchmark all call this, so the
wire meaning of a vote or an outcome is defined once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hotfleet._proto.hotfleet.v1 import agent_pb2, common_pb2
from hotfleet.wire import errors_to_proto
from node_agent.participant import Participant, PrepareCall

__all__ = ["WireParticipant"]


class WireParticipant:
    """Protobuf in, protobuf out; the protocol itself is the participant's.

    ``obtain(request)`` fetches and verifies the release a Prepare names
    (see :class:`PrepareCall`); ``epoch()`` is the fence the replies report;
    ``keep(release)`` keeps an unpacked release's sources on the node.
    """

    def __init__(
        self,
        participant: Participant,
        node_id: str,
        obtain: Callable[[agent_pb2.PrepareRequest], Any],
        epoch: Callable[[], int],
        keep: Callable[[Any], None] | None = None,
    ) -> None:
        self.participant = participant
        self._keep = keep or (lambda _release: None)
        self.node_id = node_id
        self._obtain = obtain
        self._epoch = epoch

    def prepare(self, request: agent_pb2.PrepareRequest) -> agent_pb2.PrepareReply:
        wire = request.release
        call = PrepareCall(
            rollout_id=request.rollout_id,
            digest=wire.digest,
            obtain=lambda: self._obtain(request),
            label=f"{wire.name}@{wire.version}" if wire.name else "",
            rollback=request.rollback_target,
            has_sources=bool(wire.modules),
            force=request.force,
        )
        vote = self.participant.prepare(call)
        return agent_pb2.PrepareReply(
            ok=vote.ok,
            errors=errors_to_proto(vote.errors, self.node_id),
            prepare_s=vote.prepare_s,
            changes=[
                common_pb2.ModuleChange(module=c.module, kind=c.kind, detail=c.detail)
                for c in vote.changes
            ],
            warnings=list(vote.warnings),
            epoch_seen=self._epoch(),
            current_release=vote.current_release,
        )

    def unpack(self, request: agent_pb2.PrepareRequest) -> agent_pb2.PrepareReply:
        """An ``Unpack``: the release obtained as a Prepare's is, its sources kept."""
        wire = request.release

        def obtain() -> Any:
            release = self._obtain(request)
            self._keep(release)
            return release

        call = PrepareCall(
            rollout_id="",
            digest=wire.digest,
            obtain=obtain,
            label=f"{wire.name}@{wire.version}" if wire.name else "",
        )
        vote = self.participant.unpack(call)
        return agent_pb2.PrepareReply(
            ok=vote.ok,
            errors=errors_to_proto(vote.errors, self.node_id),
            prepare_s=vote.prepare_s,
            warnings=list(vote.warnings),
            epoch_seen=self._epoch(),
            current_release=vote.current_release,
        )

    def finish(self, request: agent_pb2.FinishRequest) -> agent_pb2.FinishReply:
        outcome = self.participant.finish(request.rollout_id, request.commit_at)
        return agent_pb2.FinishReply(
            ok=outcome.ok,
            errors=errors_to_proto(outcome.errors, self.node_id),
            restored=outcome.restored,
            pause_s=outcome.pause_s,
            release=outcome.release,
            warnings=list(outcome.warnings),
            already_finished=outcome.already,
            epoch_seen=self._epoch(),
            finished_at=outcome.finished_at,
            drain_timed_out=not outcome.drained,
            still_in_flight=outcome.still_in_flight,
            digest=outcome.digest,
            armed_ahead_s=outcome.armed_ahead_s,
        )

    def abort(self, request: agent_pb2.AbortRequest) -> agent_pb2.AbortReply:
        dropped = self.participant.abort(request.rollout_id)
        return agent_pb2.AbortReply(ok=True, dropped=dropped, epoch_seen=self._epoch())

    def rollback(self, request: agent_pb2.RollbackRequest) -> agent_pb2.RollbackReply:
        outcome = self.participant.rollback(request.rollout_id, request.expected_release)
        return agent_pb2.RollbackReply(
            ok=outcome.ok,
            errors=errors_to_proto(outcome.errors, self.node_id),
            pause_s=outcome.pause_s,
            release=outcome.release,
            warnings=list(outcome.warnings),
            epoch_seen=self._epoch(),
        )

    def make_permanent(
        self, request: agent_pb2.MakePermanentRequest
    ) -> agent_pb2.MakePermanentReply:
        done = self.participant.make_permanent(request.release)
        return agent_pb2.MakePermanentReply(
            ok=done.ok,
            errors=errors_to_proto(done.errors, self.node_id),
            permanent_release=done.permanent_release,
            epoch_seen=self._epoch(),
        )

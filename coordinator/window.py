"""The rollback window: judge the upgraded nodes until the release passes, fails or pauses.

After a wave finished, :meth:`Window.analyse` runs the release's smoke checks,
takes each node's baseline (this leader's samples, else those persisted with
the rollout) and judges the window's samples every ``interval_s``
(:class:`~coordinator.analysis.Judge`): a FAIL rolls the nodes back at
once, a PASS at the end of the window promotes, an inconclusive end pauses
(still sampled and judged).  While a window is judged its driver is the
only writer of the rollout record: an operator's promote or rollback is a
request the driver takes between two judgements (:meth:`Window.through_driver`).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coordinator.analysis import RESUMES, Action, Judge, Outcome, Sample, paused_record
from coordinator.errors import Refused
from coordinator.fencing import retry
from coordinator.health import run_smoke_checks
from coordinator.model import Phase, Rollout
from coordinator.options import RolloutOptions
from coordinator.policy import AnalysisPolicy, PolicyError
from hotfleet.protocol import Refusal

if TYPE_CHECKING:
    from coordinator.election import Leadership
    from coordinator.engine import Engine

log = logging.getLogger("hotfleet.coordinator")

__all__ = ["Window"]

REQUEST_TIMEOUT_S = 60.0  # how long an operator's promote/rollback waits for the window's driver


class _WindowClosed(Exception):
    """The window's driver ended before it took an operator request: act directly."""


@dataclass
class OperatorRequest:
    """An operator's promote or rollback of a rollout in its window, for its driver to run."""

    what: str
    run: Callable[[Rollout], Rollout]
    done: Future[Rollout] = field(default_factory=Future)


class Window:
    """Judges a rollout's window and takes the operator's requests for it, one writer."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def through_driver(
        self, rollout_id: str, what: str, run: Callable[[Rollout], Rollout]
    ) -> Rollout | None:
        """Have the live driver of ``rollout_id``'s window run ``run``; None if it has none.

        One writer per rollout record: while a window is judged, its driver
        is the only thread that ends it, so an operator's promote and the
        judge's automatic rollback are taken in order, never raced.
        """
        with self.engine._lock:
            inbox = self.engine._requests.get(rollout_id)
        if inbox is None:
            return None
        request = OperatorRequest(what, run)
        inbox.put(request)
        try:
            return request.done.result(timeout=REQUEST_TIMEOUT_S)
        except _WindowClosed:
            return None  # the window ended meanwhile: the caller acts on the record as it is
        except FutureTimeout:
            raise Refused(
                Refusal.BUSY,
                f"rollout {rollout_id}: its driver did not take the {what} in time; retry",
            ) from None

    def policy(self, release_health: dict[str, Any], options: RolloutOptions) -> AnalysisPolicy:
        """Defaults, then the release's ``[health]``, then the operator's flags."""
        flags = {k: v for k, v in options.health.items() if k != "why"}
        try:
            policy = AnalysisPolicy.from_mapping(release_health)
            policy = AnalysisPolicy.from_mapping(flags, base=policy)
            if options.window_s:  # 0 means no window at all: never analysed
                policy = AnalysisPolicy.from_mapping({"window_s": options.window_s}, base=policy)
        except PolicyError as exc:
            raise Refused(Refusal.INVALID, f"health policy: {exc}") from exc
        return policy

    def analyse(self, lead: Leadership, rollout: Rollout, policy: AnalysisPolicy) -> Action | None:
        """The rollback window: judge every upgraded node until it passes, fails or ends unsure.

        Returns :attr:`Action.PROMOTE` (made permanent by the caller) or
        :attr:`Action.ROLLBACK` (started here), None when someone else ended
        the window (the operator, a stopping engine).

        Paused is not unguarded: an inconclusive window pauses (waiting for
        ``coordctl promote``/``rollback``) but the judge keeps sampling, so a
        regression that shows later (thresholds, crashes, changed code
        failing) still rolls back by itself, and a window that becomes
        conclusive and healthy resumes to permanent.
        """
        upgraded = sorted(n.node for n in rollout.nodes.values() if n.finished)
        waiting = sorted(n.node for n in rollout.nodes.values() if n.wave > rollout.wave)
        baseline_from = rollout.created_at - policy.baseline_s
        entry = self.engine._entry_or_stub(rollout.release)
        members = {n.node_id: n for n in self.engine.nodes()}
        checks = entry.manifest.get("smoke") or []
        events = run_smoke_checks(
            checks, [members[n] for n in upgraded if n in members], policy.smoke_timeout_s
        )
        judge = Judge(policy)
        baseline = self._baseline(lead, rollout, upgraded, baseline_from)
        inbox: queue.SimpleQueue[OperatorRequest] = queue.SimpleQueue()
        with self.engine._lock:
            self.engine._requests[rollout.id] = inbox
        try:
            return self._judge_window(
                lead, rollout, policy, judge, baseline, inbox, upgraded, waiting, events
            )
        finally:
            with self.engine._lock:
                self.engine._requests.pop(rollout.id, None)
            while not inbox.empty():  # whoever asked acts on the record as it is now
                inbox.get_nowait().done.set_exception(_WindowClosed())

    def _take_request(
        self, inbox: queue.SimpleQueue[OperatorRequest], wait_s: float
    ) -> OperatorRequest | None:
        """The next operator request, waiting up to ``wait_s`` (less if the engine stops)."""
        deadline = time.monotonic() + wait_s
        while not self.engine._stopping.is_set():
            try:
                return inbox.get(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return None
        return None

    def _judge_window(
        self,
        lead: Leadership,
        rollout: Rollout,
        policy: AnalysisPolicy,
        judge: Judge,
        baseline: dict[str, list[Sample]],
        inbox: queue.SimpleQueue[OperatorRequest],
        upgraded: list[str],
        waiting: list[str],
        events: list[Any],
    ) -> Action | None:
        sampler = self.engine.sampler
        start = rollout.finished_at
        paused_at: float | None = None
        while True:
            request = self._take_request(inbox, policy.interval_s)
            if request is not None:
                try:
                    request.done.set_result(request.run(self.engine.rollout(rollout.id)))
                except Refused as exc:
                    request.done.set_exception(exc)
                    continue
                except BaseException as exc:
                    request.done.set_exception(exc)
                    raise
                log.info("rollout %s: %s taken from the operator", rollout.id, request.what)
                return None
            if self.engine._stopping.is_set() or sampler is None:
                return None
            if self.engine.rollout(rollout.id).phase is not Phase.PROVISIONAL:
                return None  # promoted, rolled back or aborted by the operator meanwhile
            current, crashes = sampler.samples(upgraded, start)
            members = {n.node_id: n for n in self.engine.nodes()}
            window_events = events + crashes + sampler.lost(upgraded, start, members)
            if self.engine.prometheus is not None:
                window_events += self.engine.prometheus.events()
            peers = sampler.samples(waiting, start)[0] if waiting else None
            verdict = judge.evaluate(
                baseline,
                current,
                window_events,
                peers=peers,
                changed=sampler.changed_code(upgraded, start),
                release=rollout.release,
            )
            elapsed = time.time() - start
            action = verdict.action(policy, window_over=elapsed >= policy.window_s)
            before = rollout.analysis
            rollout.analysis = {
                **verdict.to_json(),
                "elapsed_s": round(elapsed, 3),
                "window_s": policy.window_s,
                "action": action,
            }
            if action is Action.PAUSE:
                paused_at = paused_at or time.time()
                rollout.analysis["paused"] = paused_record(verdict, paused_at)
            if action is Action.WAIT:
                self.engine._save(lead, rollout)
                continue
            if action is Action.PROMOTE:
                if paused_at is not None:
                    rollout.analysis["resumed"] = f"judge passed after a pause: {verdict.reason}"
                self.engine._save(lead, rollout)
            elif action is Action.ROLLBACK:
                failed = verdict.overall is Outcome.FAIL
                why = verdict.reason if failed else f"{verdict.reason} (on_inconclusive = rollback)"
                rollout.reason = f"regression: {why}"
                self.engine._save(lead, rollout)
                log.warning("rollout %s: %s; rolling the fleet back", rollout.id, rollout.reason)
                self.engine.endings.rollback_of(lead, rollout, upgraded, why)
            else:  # Action.PAUSE
                rollout.reason = f"{verdict.reason}; paused: {RESUMES}"
                # saved when what the operator reads changes, not every sample; the
                # save is compare-and-swap: an operator's promote/rollback meanwhile wins
                if not before or before.get("reason") != verdict.reason or "paused" not in before:
                    self.engine._save(lead, rollout)
                continue  # still guarded: sampled and judged until promoted or rolled back
            return action

    def _baseline(
        self, lead: Leadership, rollout: Rollout, nodes: list[str], since: float
    ) -> dict[str, list[Sample]]:
        """Each node's pre-rollout samples: this leader's own, else those persisted with the rollout.

        What this leader sampled itself is written to etcd (once per node), so
        a successor elected inside the window judges it against the same
        baseline instead of pausing for want of one.
        """
        sampler = self.engine.sampler
        own = sampler.samples(nodes, since, rollout.created_at)[0] if sampler is not None else {}
        stored = retry(lambda: self.engine.baselines.load(rollout.id, nodes))
        fresh = {n: s for n, s in own.items() if s and n not in stored}
        if fresh:
            retry(lambda: self.engine.baselines.save(lead, rollout.id, fresh))
        missing = [n for n in nodes if not own.get(n) and n in stored]
        if missing:
            log.info(
                "rollout %s: judging %s against the baseline persisted with the rollout",
                rollout.id,
                ", ".join(missing),
            )
        return {n: own.get(n) or stored.get(n) or [] for n in nodes}

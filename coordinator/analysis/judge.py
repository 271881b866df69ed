"""The judge: is each upgraded node sicker after the upgrade than before it?

:meth:`Judge.evaluate` takes the baseline, the window's samples, its events,
the not-yet-upgraded peers' samples and the changed-code coverage, and
returns a :class:`~coordinator.analysis.verdict.Verdict`.  Per node it adds
events, data sufficiency and host contention to the per-sample bounds of
:mod:`.thresholds` and the statistical tests of :mod:`.significance`; the
judging rules are listed in :mod:`coordinator.analysis`.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from coordinator.analysis.samples import ChangedCode, Event, EventKind, Sample, conclusive_samples
from coordinator.analysis.significance import SignificanceChecks
from coordinator.analysis.stats import wilson_interval
from coordinator.analysis.thresholds import ThresholdChecks
from coordinator.analysis.verdict import Finding, Outcome, Verdict
from coordinator.policy import AnalysisPolicy

__all__ = ["Judge"]


class Judge(ThresholdChecks, SignificanceChecks):
    """Judges a rollback window against a baseline (and peers), per node and metric."""

    def __init__(self, policy: AnalysisPolicy | None = None) -> None:
        self.policy = policy or AnalysisPolicy()

    # ------------------------------------------------------------- entry
    def evaluate(
        self,
        baseline: Mapping[str, Sequence[Sample]],
        current: Mapping[str, Sequence[Sample]],
        events: Iterable[Event] = (),
        peers: Mapping[str, Sequence[Sample]] | None = None,
        changed: Mapping[str, ChangedCode] | None = None,
        release: str = "",
    ) -> Verdict:
        """Judge every node of ``current`` (the upgraded nodes).

        ``baseline``: each node's samples before the upgrade.  ``events``:
        crashes, lease losses, smoke failures of the window.  ``peers``: for a
        wave, samples of the not-yet-upgraded nodes over the same period,
        pooled as a second reference group (latency is judged against them
        instead of the baseline).  ``changed``: each upgraded node's latest
        changed-code coverage; only reports of ``release`` (if given) count.
        """
        findings: list[Finding] = []
        by_node: dict[str, list[Event]] = {}
        for ev in events:
            by_node.setdefault(ev.node, []).append(ev)
        nodes = sorted(set(current) | {n for n in by_node if n not in (peers or {})})
        p = self.policy
        peer_pool: list[Sample] = [s for ss in (peers or {}).values() for s in ss]
        good_peers = [
            c for ss in (peers or {}).values() for c in conclusive_samples(ss, p.min_requests)
        ]
        for node in nodes:
            cur = list(current.get(node, ()))
            findings += self._events(node, by_node.get(node, []), cur)
            findings += self._node(node, list(baseline.get(node, ())), cur, peer_pool, good_peers)
        if not nodes:
            findings.append(
                Finding("", "samples", None, None, "data", None, None, Outcome.INCONCLUSIVE,
                        "no upgraded node has reported health samples")
            )  # fmt: skip
        coverage: dict[str, Any] | None = None
        if changed is not None:
            mine = {
                n: c
                for n, c in changed.items()
                if n in current and (not release or c.release == release)
            }
            more, coverage = self._changed_code(mine, release)
            findings += more
        verdict = self._verdict(findings)
        return dataclasses.replace(verdict, changed_code=coverage) if coverage else verdict

    def _verdict(self, findings: list[Finding]) -> Verdict:
        fails = [f for f in findings if f.verdict is Outcome.FAIL]
        if fails:
            order = {"event": 0, "threshold": 1, "threshold_window": 1, "changed_code": 1}
            first = min(fails, key=lambda f: order.get(f.test, 2))
            more = len(fails) - 1
            others = sorted({f.node for f in fails if f is not first and f.node})
            tail = (
                f" (+{more} more on {', '.join(others)})"
                if more and others
                else (f" (+{more} more)" if more else "")
            )
            return Verdict(Outcome.FAIL, first.message + tail, tuple(findings))
        unsure = [f for f in findings if f.verdict is Outcome.INCONCLUSIVE]
        if unsure:
            more = len(unsure) - 1
            tail = f" (+{more} more inconclusive)" if more else ""
            return Verdict(
                Outcome.INCONCLUSIVE, "inconclusive: " + unsure[0].message + tail, tuple(findings)
            )
        nodes = sorted({f.node for f in findings if f.node})
        samples = min((f.samples for f in findings if f.metric == "error_rate"), default=0)
        return Verdict(
            Outcome.PASS,
            f"{len(nodes)} node(s) healthy on every metric (>= {samples} samples each)",
            tuple(findings),
        )

    # ------------------------------------------------------------ events
    def _events(self, node: str, events: list[Event], cur: Sequence[Sample] = ()) -> list[Finding]:
        out = []
        for ev in events:
            if ev.kind is EventKind.CRASH and not self.policy.fail_on_crash:
                continue
            if ev.kind is EventKind.LEASE_LOST and not self.policy.fail_on_lease_loss:
                continue
            detail = f": {ev.detail}" if ev.detail else ""
            alive = self._answering(ev, cur) if ev.kind is EventKind.LEASE_LOST else ""
            if alive:
                out.append(
                    Finding(node, ev.kind.value, 1.0, 0.0, "event", None, None,
                            Outcome.INCONCLUSIVE, f"{node} {ev.kind.value}{detail}; not a failure: {alive}")
                )  # fmt: skip
                continue
            out.append(
                Finding(node, ev.kind.value, 1.0, 0.0, "event", None, None, Outcome.FAIL,
                        f"{node} {ev.kind.value}{detail}")
            )  # fmt: skip
        return out

    def _answering(self, ev: Event, cur: Sequence[Sample]) -> str:
        """Why a node whose lease expired is not down, or "".

        A lease is a proxy for "the node is alive"; a Health reply is direct
        evidence.  On a saturated host an agent's lease keepalive can miss its
        TTL while the process keeps serving (it re-registers when its session
        comes back).  A node that died stops answering Health when it dies,
        which is at least a lease TTL before its lease is found expired; so a
        node whose latest Health reply, from the same process (no crash
        event), came within ``2 x interval_s`` (1 s at least) of the moment its
        lease was found missing is alive: INCONCLUSIVE while the lease is
        away, never FAIL.  Once it stops answering, the lease loss fails it.
        """
        if not cur or ev.t <= 0:
            return ""
        fresh = max(2.0 * self.policy.interval_s, 1.0)
        age = ev.t - cur[-1].t
        if age > fresh:
            return ""
        return (
            f"it answered Health {max(0.0, age):.1f} s before (the process is up, serving "
            f"{cur[-1].requests} requests in its last sample): a lease keepalive starved, "
            "not a node down"
        )

    # -------------------------------------------------------------- node
    def _node(
        self,
        node: str,
        base: list[Sample],
        cur: list[Sample],
        peer_pool: list[Sample],
        good_peers: list[Sample] | None = None,
    ) -> list[Finding]:
        p = self.policy
        if not cur:
            return [
                Finding(node, "samples", 0.0, float(p.min_samples), "data", None, None,
                        Outcome.INCONCLUSIVE, f"{node} has no health samples since the upgrade")
            ]  # fmt: skip
        out: list[Finding] = []
        # conclusive samples: consecutive intervals merged to >= min_requests each
        good_cur = conclusive_samples(cur, p.min_requests)
        good_base = conclusive_samples(base, p.min_requests)
        enough = len(good_cur) >= p.min_samples
        base_ok = len(good_base) >= p.min_samples
        if not enough:
            out.append(self._thin(node, "samples", cur, good_cur, "too little traffic", "to pass"))
        if not base_ok:
            out.append(self._thin(node, "baseline", base, good_base, "baseline too thin", ""))
        if good_peers is None:
            good_peers = conclusive_samples(peer_pool, p.min_requests)
        # Latency against the nodes still on the old release when there are
        # enough of them: same moment, same host load; the baseline is not.
        by_peers = p.latency_vs_peers and len(good_peers) >= p.min_samples
        out += self._error_rate(node, base, cur, base_ok, enough)
        if by_peers:
            out += self._latency(node, good_peers, cur, True, enough, "peers")
        else:
            out += self._latency(node, good_base, cur, base_ok, enough, "baseline")
        out += self._uncaught(node, base, cur)
        out += self._gauges(node, cur, enough)
        for metric in p.judge_metrics:
            if not (by_peers and metric.startswith("latency")):
                out.append(
                    self._compare(node, metric, good_base, good_cur, "mann_whitney", "baseline")
                )
            if peer_pool:
                out.append(
                    self._compare(
                        node, metric, good_peers, good_cur, "mann_whitney_vs_peers", "peers"
                    )
                )
        contention = self._contention(base, cur)
        if contention:
            # The tail of a saturated host is the scheduler's: with the median
            # unchanged (no p50 finding failed, threshold or Mann-Whitney) and
            # the worker doing no more work per request, a p99 breach is the
            # contention's and does not hold the release back.  A median shift
            # (a sleep, a lock: 2.3.0-slow) stays INCONCLUSIVE: never promoted
            # on this evidence, never rolled back either.
            median_ok = enough and not any(
                f.verdict is Outcome.FAIL and f.metric in ("latency_p50", "latency_mean")
                for f in out
            )
            tail_ok = "; the median did not move: the tail is the host's"
            out = [
                dataclasses.replace(
                    f,
                    verdict=Outcome.PASS
                    if median_ok and f.metric == "latency_p99"
                    else Outcome.INCONCLUSIVE,
                    message=f"{f.message}; not a failure: {contention}"
                    + (tail_ok if median_ok and f.metric == "latency_p99" else ""),
                )
                if f.verdict is Outcome.FAIL and f.metric.startswith("latency")
                else f
                for f in out
            ]
        return out

    def _thin(
        self, node: str, metric: str, samples: list[Sample], good: list[Sample], what: str,
        needed_for: str,
    ) -> Finding:  # fmt: skip
        """INCONCLUSIVE: ``samples`` make fewer than ``min_samples`` conclusive ones (``good``)."""
        p = self.policy
        total = sum(s.requests for s in samples)
        return Finding(
            node, metric, float(len(good)), float(p.min_samples), "data", None, None,
            Outcome.INCONCLUSIVE,
            f"{node} {what}: {total} requests in {len(samples)} samples make {len(good)} of the "
            f"{p.min_samples} samples of >= {p.min_requests} requests needed"
            + (f" {needed_for}" if needed_for else ""),
            samples=len(good),
        )  # fmt: skip

    # --------------------------------------------------------- contention
    def _contention(self, base: list[Sample], cur: list[Sample]) -> str:
        """Why this node's latency cannot be blamed on the release, or "".

        A host whose CPU was saturated for at least half of the window (the
        deploy preparing everywhere at once, a neighbour, a hypervisor) slows
        every request that waits for a core.  The release is to blame only if
        the worker itself does more work per request: its CPU seconds per
        request rose beyond ``cpu_per_request_tolerance``.  Otherwise the
        latency evidence is contention: INCONCLUSIVE, not FAIL.
        """
        p = self.policy
        if p.cpu_saturation is None:
            return ""
        busy = [b for b in (s.host_cpu_busy for s in cur) if b is not None]
        saturated = sum(1 for b in busy if b >= p.cpu_saturation)
        if not busy or saturated * 2 < len(busy):
            return ""
        base_req, cur_req = sum(s.requests for s in base), sum(s.requests for s in cur)
        if base_req <= 0 or cur_req <= 0:
            return ""
        base_cpr = sum(s.cpu_s for s in base) / base_req
        cur_cpr = sum(s.cpu_s for s in cur) / cur_req
        if cur_cpr > base_cpr * (1.0 + p.cpu_per_request_tolerance):
            return ""
        return (
            f"host CPU saturated (>= {p.cpu_saturation:.0%} busy) in {saturated} of {len(busy)} "
            f"samples (median {statistics.median(busy):.0%}) while the worker's CPU per request "
            f"stayed at {cur_cpr * 1e3:.2f} ms (baseline {base_cpr * 1e3:.2f} ms): "
            "contention, not the release"
        )

    # ------------------------------------------------------- changed code
    def _changed_code(
        self, reports: Mapping[str, ChangedCode], release: str
    ) -> tuple[list[Finding], dict[str, Any] | None]:
        """Did the release's changed functions run, and do they raise on most calls?

        Counts are pooled over the upgraded nodes per function (a function on
        5 % of the traffic is judged on the fleet's calls, not one node's
        trickle); the error ratio of the changed code itself is judged on
        the lower bound of its Wilson interval against
        ``changed_code_max_error_rate``.  The minimum-coverage knobs make a
        window that did not exercise the new code INCONCLUSIVE.
        """
        p = self.policy
        need = p.changed_code_min_ran > 0 or p.changed_code_min_calls > 0
        if not reports:
            if not need:
                return [], None
            return [
                Finding("", "changed_code", None, None, "changed_code", None, None,
                        Outcome.INCONCLUSIVE,
                        f"no upgraded node reported changed-code coverage of {release or 'the release'}")
            ], None  # fmt: skip
        totals: dict[str, list[Any]] = {}  # name -> [kind, calls, raised, {node: (calls, raised)}]
        estimated: set[str] = set()  # calls past the first exact ones are sampled estimates
        for node, report in sorted(reports.items()):
            for f in report.functions:
                entry = totals.setdefault(f.name, [f.kind, 0, 0, {}])
                entry[1] += f.calls
                entry[2] += f.raised
                entry[3][node] = (f.calls, f.raised)
                if f.estimated:
                    estimated.add(f.name)
        out: list[Finding] = []
        confidence = 1.0 - p.alpha
        for name, (_kind, calls, raised, per_node) in sorted(totals.items()):
            if p.changed_code_max_error_rate is None or calls <= 0 or raised <= 0:
                continue
            lo, _ = wilson_interval(raised, calls, confidence)
            if lo <= p.changed_code_max_error_rate:
                continue
            worst = max(per_node, key=lambda n: (per_node[n][1], n))
            where = ", ".join(f"{n} {r}/{c}" for n, (c, r) in sorted(per_node.items()) if r)
            out.append(
                Finding(worst, f"changed:{name}", raised / calls, p.changed_code_max_error_rate,
                        "changed_code", None, None, Outcome.FAIL,
                        f"changed function {name} raised on {raised} of "
                        f"{'~' if name in estimated else ''}{calls} calls "
                        f"({raised / calls:.0%}; {confidence:.0%} lower bound {lo:.2f}) > bound "
                        f"{p.changed_code_max_error_rate:g} ({where})", samples=calls)
            )  # fmt: skip
        n = len(totals)
        ran = sorted(k for k, v in totals.items() if v[1] > 0)
        never = sorted(k for k, v in totals.items() if v[1] == 0)
        raising = sorted(k for k, v in totals.items() if v[2] > 0)
        calls_all = sum(v[1] for v in totals.values())
        raised_all = sum(v[2] for v in totals.values())
        summary = {
            "release": release,
            "functions": n,
            "ran": len(ran),
            "calls": calls_all,
            "raised": raised_all,
            "never_ran": never,
            "raising": [
                {"name": k, "calls": totals[k][1], "raised": totals[k][2]} for k in raising
            ],
            # calls of these functions are estimates (sampled); raised counts are exact
            "calls_estimated": sorted(estimated),
            "nodes": sorted(reports),
        }
        share = len(ran) / n if n else 1.0
        short = []
        if share < p.changed_code_min_ran:
            short.append(f"{len(ran)} of {n} ran, policy needs {p.changed_code_min_ran:.0%}")
        if calls_all < p.changed_code_min_calls:
            short.append(f"{calls_all} calls, policy needs {p.changed_code_min_calls}")
        text = (
            f"changed code: {len(ran)} of {n} functions ran "
            f"({'~' if estimated else ''}{calls_all} calls, {raised_all} raised"
            + (f", error ratio {raised_all / calls_all:.2g}" if calls_all else "")
            + ")"
            + (
                f"; never ran: {', '.join(never[:5])}{' ...' if len(never) > 5 else ''}"
                if never
                else ""
            )
        )
        out.append(
            Finding("", "changed_code", share, p.changed_code_min_ran or None, "changed_code",
                    None, None, Outcome.INCONCLUSIVE if short else Outcome.PASS,
                    text + (f" (too little to pass: {'; '.join(short)})" if short else ""),
                    samples=calls_all)
        )  # fmt: skip
        return out, summary

"""Optional metric provider: judge a rollout on a Prometheus query too.

Like Argo Rollouts' Prometheus provider, but nothing requires one: the
leader's own Health sampling is always there.  Each check is a PromQL query
whose first value must stay within bounds for the whole rollback window; a
value outside them is a regression with the query and value as the reason.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from coordinator.analysis import Event, EventKind


@dataclass(frozen=True)
class PrometheusCheck:
    name: str
    query: str
    min: float | None = None
    max: float | None = None

    @classmethod
    def parse(cls, text: str) -> PrometheusCheck:
        """``name=error_ratio,max=0.05,query=sum(rate(...))`` (the query comes last, commas allowed)."""
        fields: dict[str, str] = {}
        rest = text
        while rest and not rest.startswith("query="):
            item, _, rest = rest.partition(",")
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"prometheus check {text!r}: expected key=value, got {item!r}")
            fields[key.strip()] = value.strip()
        if not rest.startswith("query="):
            raise ValueError(f"prometheus check {text!r}: query=... (last) is required")
        unknown = set(fields) - {"name", "min", "max"}
        if unknown:
            raise ValueError(f"prometheus check {text!r}: unknown keys {sorted(unknown)}")
        lo, hi = fields.get("min"), fields.get("max")
        if lo is None and hi is None:
            raise ValueError(f"prometheus check {text!r}: give min=, max= or both")
        return cls(
            fields.get("name", "prometheus"),
            rest[len("query=") :],
            float(lo) if lo else None,
            float(hi) if hi else None,
        )


class PrometheusProvider:
    """Runs the checks against one Prometheus server's HTTP API."""

    def __init__(self, url: str, checks: list[PrometheusCheck], timeout_s: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.checks = checks
        self.timeout_s = timeout_s

    def query(self, promql: str) -> float | None:
        """The first sample of an instant query; ``None`` when the result is empty."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise ValueError(f"prometheus answered {body.get('status')}: {body.get('error', '')}")
        result = body["data"]["result"]
        if body["data"].get("resultType") == "scalar":
            return float(result[1])
        return float(result[0]["value"][1]) if result else None

    def events(self) -> list[Event]:
        """One event per check outside its bounds (an unreachable server is one too)."""
        out = []
        for check in self.checks:
            try:
                value = self.query(check.query)
            except (OSError, ValueError, KeyError, IndexError, urllib.error.URLError) as exc:
                out.append(
                    Event(
                        "prometheus",
                        EventKind.SMOKE_FAILED,
                        f"check {check.name!r}: query failed: {exc}",
                        time.time(),
                    )
                )
                continue
            if value is None:
                continue  # no data: the window's own judge decides on inconclusive
            low = check.min is not None and value < check.min
            high = check.max is not None and value > check.max
            if low or high:
                bound = f"< min {check.min:g}" if low else f"> max {check.max:g}"
                out.append(
                    Event(
                        "prometheus",
                        EventKind.SMOKE_FAILED,
                        f"check {check.name!r}: {check.query} = {value:g} {bound}",
                        time.time(),
                    )
                )
        return out

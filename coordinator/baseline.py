"""The judge's baseline, persisted with the rollout, so a failover does not blind the window.

The judge compares what each upgraded node does in the rollback window with
what it did just before the rollout (its *baseline*).  Those samples live in
the leader's memory (:class:`coordinator.health.HealthSampler`); a leader
elected inside the window has none for the time before it led, so it used to
pause the rollout as "inconclusive: too little traffic" under plenty of
traffic.  The driver therefore writes each node's baseline to
``<prefix>baselines/<rollout>/<node>`` when the window opens (zlib-compressed
compact JSON: a few hundred bytes per node), a successor reads it back, and
the keys go when the rollout ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from coordinator.analysis import Sample
from coordinator.election import Leadership
from hotfleet.etcd_client import EtcdClient, prefix_end
from hotfleet.keys import Keys

__all__ = ["BaselineStore", "decode", "encode"]

log = logging.getLogger("hotfleet.coordinator")

_FIELDS = [f.name for f in dataclasses.fields(Sample)]
_TUPLES = {"latency_bounds_s", "latency_counts"}
MAX_BYTES = 64 * 1024  # one node's baseline; anything larger is not ours


def encode(samples: Sequence[Sample]) -> bytes:
    """``samples`` as compressed JSON (fields that hold their default are left out)."""
    defaults = Sample(t=0.0, duration_s=0.0, requests=0, errors=0)
    rows = [
        {
            name: getattr(s, name)
            for name in _FIELDS
            if getattr(s, name) != getattr(defaults, name) or name in ("t", "duration_s")
        }
        for s in samples
    ]
    return zlib.compress(json.dumps(rows, separators=(",", ":")).encode(), 6)


def decode(raw: bytes) -> list[Sample]:
    """The samples :func:`encode` wrote; ``ValueError`` for anything else."""
    if len(raw) > MAX_BYTES:
        raise ValueError(f"{len(raw)} bytes is not a baseline")
    try:
        rows = json.loads(zlib.decompress(raw, bufsize=MAX_BYTES))
    except (zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"not a compressed baseline: {exc}") from None
    if not isinstance(rows, list):
        raise ValueError("a baseline is a list of samples")
    out = []
    for row in rows:
        if not isinstance(row, dict) or not set(row) <= set(_FIELDS):
            raise ValueError(f"not a sample: {str(row)[:80]}")
        fields: dict[str, Any] = {k: tuple(v) if k in _TUPLES else v for k, v in row.items()}
        try:
            out.append(Sample(**{"requests": 0, "errors": 0, **fields}))
        except TypeError as exc:
            raise ValueError(f"not a sample: {exc}") from None
    return out


class BaselineStore:
    """Reads and writes the baselines of rollouts in etcd."""

    def __init__(self, client: EtcdClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def save(
        self, lead: Leadership, rollout_id: str, baseline: Mapping[str, Sequence[Sample]]
    ) -> None:
        """Write each node's samples, fenced by leadership (a deposed leader writes nothing)."""
        tx = self.client.transactions
        ops = [
            tx.put(self.keys.baseline(rollout_id, node), encode(samples))
            for node, samples in sorted(baseline.items())
            if samples
        ]
        for i in range(0, len(ops), 64):  # etcd's default limit is 128 operations per txn
            lead.guarded_txn(ops[i : i + 64])

    def load(self, rollout_id: str, nodes: Iterable[str]) -> dict[str, list[Sample]]:
        """The stored baseline of each of ``nodes`` that has one (unreadable ones are logged)."""
        wanted = set(nodes)
        out: dict[str, list[Sample]] = {}
        prefix = self.keys.baseline(rollout_id)
        for raw, meta in self.client.get_prefix(prefix):
            node = meta.key.decode()[len(prefix) :]
            if node not in wanted:
                continue
            try:
                out[node] = decode(raw)
            except ValueError as exc:
                log.error("rollout %s: unreadable baseline of %s: %s", rollout_id, node, exc)
        return out

    def drop_op(self, rollout_id: str) -> Any:
        """The deletion of a rollout's baseline, as an operation of the transaction that
        ends the rollout: nobody reads an ended rollout beside its baseline, and a leader
        dying between the two writes leaves none behind."""
        prefix = self.keys.baseline(rollout_id).encode()
        return self.client.transactions.delete(prefix, range_end=prefix_end(prefix))

"""The agent's way to etcd: where it is, how to connect, and one long-lived client for reads.

Why its own module: membership, the fence, the decision watches, release
fetching and reconcile all reach the same etcd with the same settings.
:class:`EtcdLink` holds those settings (checked when the agent is built, not
in a background thread), opens fresh clients for whoever owns a session
(:class:`~node_agent.membership.Membership` closes its own), and owns the one
shared client for reads (blobs, the permanent release, leader epochs,
decisions): opened on first use, closed by :meth:`EtcdLink.close`, which
:meth:`Agent.stop <node_agent.agent.Agent.stop>` calls after everything that
reads through it has stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from hotfleet.etcd_client import EtcdClient, open_client, parse_endpoints

__all__ = ["EtcdLink"]


class EtcdLink:
    """``endpoints`` (comma-separated URLs), per-request ``timeout`` and client ``options``."""

    def __init__(
        self, endpoints: str, *, timeout: float = 3.0, options: Mapping[str, Any] | None = None
    ) -> None:
        parse_endpoints(endpoints)  # fail on a bad URL now, not in a background thread
        self.endpoints = endpoints
        self.timeout = timeout
        self.options = dict(options or {})
        self._lock = threading.Lock()
        self._client: EtcdClient | None = None

    def new_client(self) -> EtcdClient:
        """A client of the caller's own (the caller closes it)."""
        return open_client(self.endpoints, timeout=self.timeout, **self.options)

    def client(self) -> EtcdClient:
        """The shared long-lived client for reads, opened on first use."""
        with self._lock:
            if self._client is None:
                self._client = self.new_client()
            return self._client

    def close(self) -> None:
        """Close the shared client (a later :meth:`client` opens a new one)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

"""pytest fixtures for tests against a real etcd.

* ``etcd_endpoint`` (session): ``$HOTFLEET_ETCD_ENDPOINTS`` if set (a running
  cluster, e.g. in CI containers), else one local :class:`EtcdServer` per test
  process (so each pytest-xdist worker has its own).
* ``etcd_client``: a client to it, closed after the test.
* ``etcd_prefix``: a key prefix unique to the test, deleted afterwards, so
  tests sharing the session etcd never see each other's keys.
* ``leadership``: a real coordinator leadership in ``etcd_prefix`` (no coordinator
  process): its ``epoch`` is one agents verify against etcd and obey, for
  tests that drive agents' mutating RPCs by hand.
* ``etcd_server``: a private server the test may stop, kill and restart
  (etcd failure tests); always local, whatever ``etcd_endpoint`` points at.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.election import Election, Leadership, Session
from hotfleet.etcd_client import EtcdClient, connect
from hotfleet.etcd_server import EtcdServer
from hotfleet.keys import Keys

ENDPOINTS_ENV = "HOTFLEET_ETCD_ENDPOINTS"


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get(ENDPOINTS_ENV)
    if external:
        yield external
        return
    with EtcdServer(tmp_path_factory.mktemp("etcd") / "data") as server:
        yield server.endpoint


@pytest.fixture
def etcd_client(etcd_endpoint: str) -> Iterator[EtcdClient]:
    client = connect(etcd_endpoint)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def etcd_prefix(etcd_client: EtcdClient) -> Iterator[str]:
    prefix = f"/hotfleet-test/{uuid.uuid4().hex}/"
    try:
        yield prefix
    finally:
        etcd_client.delete_prefix(prefix)


@pytest.fixture
def leadership(etcd_client: EtcdClient, etcd_prefix: str) -> Iterator[Leadership]:
    with Session(etcd_client, ttl=10) as session:
        election = Election(etcd_client, Keys(etcd_prefix).election, session)
        yield election.campaign("test-leader", timeout=10)


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()

"""The dev cluster's background traffic: paced, counts failures, stops on request."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from coordinator.traffic import Traffic


class Shop(http.server.BaseHTTPRequestHandler):
    """Answers /price like the example shop; every third request fails like a bad release."""

    hits = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        with Shop.lock:
            Shop.hits += 1
            n = Shop.hits
        assert self.path.startswith("/price?sku=")
        self.send_response(500 if n % 3 == 0 else 200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def shop() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Shop)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_paced_requests_are_counted_and_stop(shop: str) -> None:
    traffic = Traffic([shop], rate=40)
    started = time.monotonic()
    traffic.start()
    try:
        deadline = started + 20
        while sum(traffic.counts()) < 40:
            assert time.monotonic() < deadline, traffic.counts()
            time.sleep(0.02)
        elapsed = time.monotonic() - started
    finally:
        traffic.join()
    ok, failed = traffic.counts()
    assert failed >= 10 and ok >= 2 * failed - 2  # HTTP 500 counts as failed
    # paced: 40 requests at 40/s take about a second, not a burst
    assert elapsed >= 0.8, elapsed
    assert not any(t.is_alive() for t in traffic._threads)  # stopped: nothing more is sent


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        Traffic(["127.0.0.1:1"], rate=0)

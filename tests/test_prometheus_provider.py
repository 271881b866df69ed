"""The optional Prometheus metric provider against a real HTTP server speaking its query API.

The server is a few lines of stdlib ``http.server`` answering
``/api/v1/query`` the way Prometheus does; what is under test is the
provider's parsing, bounds and error reporting.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from coordinator.analysis import EventKind
from coordinator.prometheus import PrometheusCheck, PrometheusProvider

VALUES = {"error_ratio": "0.2", "p99": "0.010", "empty": None}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)["query"][0]
        value = VALUES.get(query, "bad")
        result = [] if value is None else [{"metric": {}, "value": [1.0, value]}]
        body = {"status": "success", "data": {"resultType": "vector", "result": result}}
        if value == "bad":
            body = {"status": "error", "error": f"parse error in {query!r}"}
        data = json.dumps(body).encode()
        self.send_response(200 if value != "bad" else 400)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def prometheus_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_checks_outside_bounds_are_regressions_with_the_query_and_value(
    prometheus_url: str,
) -> None:
    provider = PrometheusProvider(
        prometheus_url,
        [
            PrometheusCheck.parse("name=errors,max=0.05,query=error_ratio"),
            PrometheusCheck.parse("name=latency,max=0.5,query=p99"),
            PrometheusCheck.parse("name=nodata,max=1,query=empty"),
        ],
    )
    (event,) = provider.events()
    assert event.kind is EventKind.SMOKE_FAILED and event.node == "prometheus"
    assert "check 'errors': error_ratio = 0.2 > max 0.05" in event.detail


def test_a_failing_query_is_reported_not_ignored(prometheus_url: str) -> None:
    provider = PrometheusProvider(prometheus_url, [PrometheusCheck.parse("max=1,query=rate(x[")])
    (event,) = provider.events()
    assert "query failed" in event.detail


def test_check_syntax_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"query=\.\.\. \(last\) is required"):
        PrometheusCheck.parse("name=x,max=1")
    with pytest.raises(ValueError, match="give min=, max= or both"):
        PrometheusCheck.parse("name=x,query=up")
    check = PrometheusCheck.parse("name=ratio,min=0.9,query=sum(rate(a[1m])) / sum(rate(b[1m]))")
    assert check.query == "sum(rate(a[1m])) / sum(rate(b[1m]))" and check.min == 0.9

"""The WSGI application: ``shop.app:application``.

Routes (all JSON, each with ``"versions"``):

* ``GET /`` and ``GET /versions`` -- module versions only;
* ``GET /price?sku=apple&qty=2`` -- a quote;
* ``GET /stock`` -- the inventory's state;
* ``GET /stock/low`` -- SKUs below the reorder level (new in v2);
* ``POST /checkout`` with ``{"lines": [{"sku": "apple", "qty": 2}]}``.
"""

import json
import sys
from urllib.parse import parse_qs

from shop import cart, inventory, pricing

VERSION = "2.4"

MODULES = ("shop", "shop.app", "shop.cart", "shop.inventory", "shop.pricing")


def versions() -> dict:
    return {name: getattr(sys.modules.get(name), "VERSION", None) for name in MODULES}


def _json(start_response, status: str, body: dict) -> list:
    body = {**body, "versions": versions()}
    data = json.dumps(body, sort_keys=True).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _read_json(environ) -> dict:
    try:
        size = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        size = 0
    raw = environ["wsgi.input"].read(size) if size else b"{}"
    return json.loads(raw or b"{}")


def application(environ, start_response):
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO", "/")
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if method == "GET" and path in ("/", "/versions"):
        return _json(start_response, "200 OK", {})
    if method == "GET" and path == "/price":
        try:
            q = pricing.quote(query.get("sku", "apple"), int(query.get("qty", "1")))
        except KeyError as exc:
            return _json(start_response, "404 Not Found", {"error": f"unknown sku {exc}"})
        return _json(start_response, "200 OK", q)
    if method == "GET" and path == "/stock":
        return _json(start_response, "500 Internal Server Error", {"error": "stock report renamed"})
    if method == "GET" and path == "/stock/low":
        return _json(start_response, "200 OK", {"low": inventory.INVENTORY.snapshot()["low"]})
    if method == "POST" and path == "/checkout":
        result = cart.checkout(_read_json(environ).get("lines", []))
        return _json(start_response, "200 OK" if result["ok"] else "409 Conflict", result)
    return _json(start_response, "404 Not Found", {"error": f"no route {method} {path}"})

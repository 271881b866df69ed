"""Stock levels: a long-lived stateful object registered for state migration."""

import threading

try:  # registered with hotfleet when it runs under the node agent
    from node_agent import register
except ImportError:  # pragma: no cover - plain python

    def register(obj):
        return obj


VERSION = "1"


class Inventory:
    """v1 state: ``{"stock": {sku: count}}``."""

    def __init__(self, stock):
        self._lock = threading.Lock()
        self.stock = dict(stock)

    def snapshot(self) -> dict:
        with self._lock:
            return {"stock": dict(self.stock)}

    def take(self, sku: str, qty: int) -> bool:
        with self._lock:
            if self.stock.get(sku, 0) < qty:
                return False
            self.stock[sku] -= qty
            return True


INVENTORY = register(Inventory({"apple": 100, "pear": 40, "fig": 10}))

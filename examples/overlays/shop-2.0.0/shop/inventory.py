"""Stock levels: a long-lived stateful object registered for state migration."""

import threading

try:  # registered with hotfleet when it runs under the node agent
    from node_agent import register
except ImportError:  # pragma: no cover - plain python

    def register(obj):
        return obj


VERSION = "2"


class Inventory:
    """v2 state: ``{"items": {sku: {"on_hand": n, "reserved": n}}, "reorder_level": n}``."""

    def __init__(self, stock):
        self._lock = threading.Lock()
        self.items = {sku: {"on_hand": n, "reserved": 0} for sku, n in stock.items()}
        self.reorder_level = 20

    def code_change(self, old_vsn, state, extra):
        """v1 ``stock`` counts <-> v2 ``items`` records (``("down", vsn)`` on rollback)."""
        lock = state.get("_lock") or threading.Lock()
        if isinstance(old_vsn, tuple) and old_vsn[0] == "down":
            return {
                "_lock": lock,
                "stock": {sku: i["on_hand"] + i["reserved"] for sku, i in state["items"].items()},
            }
        if "items" in state:  # already v2-shaped (e.g. from 2.x to 2.y)
            return dict(state)
        return {
            "_lock": lock,
            "items": {sku: {"on_hand": n, "reserved": 0} for sku, n in state["stock"].items()},
            "reorder_level": int((extra or {}).get("reorder_level", 20)),
        }

    def snapshot(self) -> dict:
        with self._lock:
            items = {sku: dict(i) for sku, i in self.items.items()}
            low = sorted(s for s, i in items.items() if i["on_hand"] < self.reorder_level)
            return {"items": items, "low": low, "reorder_level": self.reorder_level}

    def take(self, sku: str, qty: int) -> bool:
        with self._lock:
            item = self.items.get(sku)
            if item is None or item["on_hand"] < qty:
                return False
            item["on_hand"] -= qty
            item["reserved"] += qty
            return True


INVENTORY = register(Inventory({"apple": 100, "pear": 40, "fig": 10}))

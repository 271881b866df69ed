"""Checkout: prices a list of lines and takes them out of stock."""

from shop.inventory import INVENTORY
from shop.pricing import quote

VERSION = "1"


def checkout(lines: list) -> dict:
    quotes = [quote(line["sku"], int(line.get("qty", 1))) for line in lines]
    for q in quotes:
        if not INVENTORY.take(q["sku"], q["qty"]):
            return {"ok": False, "error": f"out of stock: {q['sku']}"}
    return {"ok": True, "lines": quotes, "total": sum(q["total"] for q in quotes)}

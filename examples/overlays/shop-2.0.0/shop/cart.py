"""Checkout: prices a list of lines and reserves them; v2 reports savings."""

from shop.inventory import INVENTORY
from shop.pricing import quote

VERSION = "2"


def checkout(lines: list) -> dict:
    quotes = [quote(line["sku"], int(line.get("qty", 1))) for line in lines]
    for q in quotes:
        if not INVENTORY.take(q["sku"], q["qty"]):
            return {"ok": False, "error": f"out of stock: {q['sku']}"}
    return {
        "ok": True,
        "lines": quotes,
        "total": sum(q["total"] for q in quotes),
        "saved": sum(q["discount"] for q in quotes),
    }

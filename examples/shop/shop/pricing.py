"""Prices in integer cents."""

VERSION = "1"

CATALOG = {"apple": 50, "pear": 75, "fig": 120}
CURRENCY = "EUR"


def unit_price(sku: str) -> int:
    if sku not in CATALOG:
        raise KeyError(sku)
    return CATALOG[sku]


def quote(sku: str, qty: int) -> dict:
    price = unit_price(sku)
    return {"sku": sku, "qty": qty, "unit": price, "total": price * qty, "currency": CURRENCY}

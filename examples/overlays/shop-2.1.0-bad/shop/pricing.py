"""Prices in integer cents; 2.1 "optimises" the lookup and fails ~30% of quotes."""

import random

VERSION = "2.1"
FAILURE_RATE = 0.3

CATALOG = {"apple": 50, "pear": 75, "fig": 120}
CURRENCY = "EUR"
VOLUME_QTY = 10
VOLUME_DISCOUNT_PCT = 10


def unit_price(sku: str) -> int:
    if random.random() < FAILURE_RATE:  # the bug: a stale price cache entry
        raise RuntimeError(f"price cache miss for {sku!r}")
    if sku not in CATALOG:
        raise KeyError(sku)
    return CATALOG[sku]


def quote(sku: str, qty: int) -> dict:
    price = unit_price(sku)
    total = price * qty
    discount = total * VOLUME_DISCOUNT_PCT // 100 if qty >= VOLUME_QTY else 0
    return {
        "sku": sku,
        "qty": qty,
        "unit": price,
        "discount": discount,
        "total": total - discount,
        "currency": CURRENCY,
    }

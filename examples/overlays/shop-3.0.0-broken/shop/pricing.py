"""Prices in integer cents; v2 adds a volume discount."""

VERSION = "3"

CATALOG = {"apple": 50, "pear": 75, "fig": 120}
CURRENCY = "EUR"
VOLUME_QTY = 10
VOLUME_DISCOUNT_PCT = 10


def unit_price(sku: str) -> int:
    if sku not in CATALOG:
        raise KeyError(sku)
    return CATALOG[sku]


def quote(sku: str, qty: int) -> dict
    # the colon above is missing: SyntaxError
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

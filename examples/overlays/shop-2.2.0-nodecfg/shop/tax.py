"""VAT by deployment zone, read once at import from the node's configuration."""

import os

VERSION = "1"

VAT_PCT_BY_ZONE = {"eu-west": 20, "us-east": 0}
ZONE = os.environ.get("SHOP_ZONE", "eu-west")
try:
    VAT_PCT = VAT_PCT_BY_ZONE[ZONE]
except KeyError:
    raise KeyError(f"no VAT table for zone {ZONE!r} (SHOP_ZONE)") from None


def vat(amount: int) -> int:
    return amount * VAT_PCT // 100

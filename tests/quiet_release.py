"""A release whose new code fails quietly: shop 2.0.0 plus a tiered-discount helper that raises.

``quote`` calls the new ``volume_discount`` helper for bulk orders (``qty >=
VOLUME_QTY``) through ``bulk_discount``, which falls back to the flat
discount when the helper raises: no request fails and the app's error rate
does not move, so only changed-code coverage can see the release is broken.
Used by the integration tests and by ``benchmarks/run.py rollback``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hotfleet.release import Release

ROOT = Path(__file__).resolve().parent.parent
RELEASES = ROOT / "examples" / "releases"

_FLAT = "discount = total * VOLUME_DISCOUNT_PCT // 100 if qty >= VOLUME_QTY else 0"
_HELPERS = '''

import random

TIERS = {{"EUR": 12}}


def volume_discount(total: int) -> int:
    """New: tiered volume discounts; a stale tier cache fails {pct} % of lookups."""
    if random.random() < {failure!r}:
        raise KeyError("tier cache miss")
    return total * TIERS["EUR"] // 100


def bulk_discount(total: int) -> int:
    try:
        return volume_discount(total)
    except KeyError:  # degrade quietly to the flat discount: no request fails
        return total * VOLUME_DISCOUNT_PCT // 100
'''


def quiet_release(directory: Path, version: str, failure: float) -> Release:
    """shop ``version`` under ``directory``: 2.0.0 whose new helper raises on ``failure`` of calls."""
    root = directory / f"shop-{version}"
    shutil.copytree(RELEASES / "shop-2.0.0", root)
    toml = root / "release.toml"
    toml.write_text(toml.read_text().replace('version = "2.0.0"', f'version = "{version}"'))
    pricing = root / "shop" / "pricing.py"
    text = pricing.read_text()
    if _FLAT not in text:
        raise RuntimeError(
            f"{pricing}: the flat discount line moved; update tests/quiet_release.py"
        )
    text = text.replace(_FLAT, "discount = bulk_discount(total) if qty >= VOLUME_QTY else 0")
    pricing.write_text(text + _HELPERS.format(failure=failure, pct=round(failure * 100)))
    return Release.from_path(root)

"""The changed-code coverage scenario, importable without pytest (spawned interpreters run it)."""

from __future__ import annotations

import contextlib

from tests.codebase import Codebase

BOOT = {
    "svc": """
        def unchanged(x):
            return x

        def price(x):
            return x * 2

        def formatted(x):
            return x+1

        class Cart:
            def total(self, xs):
                return sum(xs)

            def same(self):
                return 0
    """,
}

V2 = {
    "svc": """
        def unchanged(x):
            return x

        def price(x):
            if x < 0:
                raise ValueError(f"negative {x}")
            return x * 3

        def formatted(x):
            return x + 1

        def discount(x):
            return x - 1

        class Cart:
            def total(self, xs):
                return sum(xs) + 1

            def same(self):
                return 0
    """,
    "plugin": """
        def hello():
            return "hi"
    """,
}


def scenario(cb: Codebase) -> dict[str, object]:
    """Boot, upgrade, exercise; returns what the checks need (also run by other interpreters)."""
    mods = cb.boot(BOOT)
    svc = mods["svc"]
    price, cart_cls = svc.price, svc.Cart
    cart = cart_cls()
    report = cb.upgrade("2", V2)
    names = {c.name.split(".", 1)[1]: c.kind for c in cb.loader.changed_code()}
    for x in range(10):
        assert price(x) == x * 3
    for x in range(-1, -4, -1):
        with contextlib.suppress(ValueError):
            price(x)
    cart.total([1, 2])
    svc.unchanged(1)
    svc.formatted(1)
    identity = svc.price is price and svc.Cart is cart_cls
    during = cb.loader.coverage.report()
    cb.loader.make_permanent()
    price(1)
    after = cb.loader.coverage.report()
    return {
        "report_changed": sorted(n.split(".", 1)[1] for n in report.changed_code),
        "names": names,
        "identity": identity,
        "active": during.active,
        "after_active": after.active,
        "backend": during.backend,
        "counts": {f.name.split(".", 1)[1]: [f.calls, f.raised] for f in during.functions},
        "after_counts": {f.name.split(".", 1)[1]: [f.calls, f.raised] for f in after.functions},
    }


EXPECTED_NAMES = {
    "svc:price": "changed",
    "svc:discount": "added",
    "svc:Cart.total": "changed",
    "plugin:hello": "added",
}


def check(out: dict[str, object]) -> None:
    assert out["names"] == EXPECTED_NAMES  # not unchanged, not formatting-only, not Cart.same
    assert out["report_changed"] == sorted(EXPECTED_NAMES)
    assert out["identity"] is True
    assert out["active"] is True and out["after_active"] is False
    counts = out["counts"]
    assert isinstance(counts, dict)
    assert counts["svc:price"] == [13, 3]
    assert counts["svc:Cart.total"] == [1, 0]
    assert counts["svc:discount"] == [0, 0] and counts["plugin:hello"] == [0, 0]
    assert out["after_counts"] == counts  # frozen at make_permanent: price(1) not counted

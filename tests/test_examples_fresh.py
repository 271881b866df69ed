"""The example releases are generated from their overlays, never edited by hand.

``scripts/gen_examples.py`` builds ``examples/releases/<release>`` from
``examples/overlays/<release>`` (its base plus the files it changes); a
release that drifted from its overlay would make the docs, the demo and the
tests disagree about what a release changes.
"""

from __future__ import annotations

import subprocess
import sys

from tests.agents import ROOT


def test_example_releases_match_their_overlays() -> None:
    check = subprocess.run(
        [sys.executable, "scripts/gen_examples.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr


def test_a_hand_edit_of_a_generated_release_is_caught(tmp_path: object) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_examples
    finally:
        sys.path.pop(0)
    target = gen_examples.OUT / "shop-2.1.0-bad" / "shop" / "pricing.py"
    original = target.read_bytes()
    try:
        target.write_bytes(original + b"# edited by hand\n")
        assert gen_examples.stale() == ["shop-2.1.0-bad/shop/pricing.py: differs from its overlay"]
    finally:
        target.write_bytes(original)
    assert gen_examples.stale() == []

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.codebase import Codebase

pytest_plugins = ["tests.etcd_fixtures", "tests.fleet", "tests.simfleet"]


@pytest.fixture
def cb(tmp_path: Path) -> Iterator[Codebase]:
    code = Codebase(tmp_path / "code")
    try:
        yield code
    finally:
        code.close()

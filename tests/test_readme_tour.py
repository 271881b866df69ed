"""The README's Tour, run line by line exactly as written, on a fresh dev cluster.

Each command line of the Tour block is run by bash from the checkout (the
Tour's release paths are relative to it) with ``HOTFLEET_DEV_DIR`` naming a
private directory, so the cluster is this test's own and the lines need no
change.  A line's exit code must be what its comment says (``exit N``), else
0.  The cluster is stopped by the Tour's own ``dev down``; whatever is left
after a failure is stopped here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator import devcluster
from tests.test_devcluster import stop_cluster

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BUDGET_S = 120.0  # 36 s on an idle 2-core machine; room for a parallel test run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def tour_commands(readme: str) -> list[tuple[str, int]]:
    """``(command line, expected exit code)`` for every line of the Tour's bash block."""
    section = readme.split("\n## Tour", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md: no ```bash block under ## Tour"
    commands: list[tuple[str, int]] = []
    for raw in block.group(1).splitlines():
        command, _, comment = raw.partition("#")
        expected = re.search(r"\bexit (\d+)", comment)
        if command.strip():
            commands.append((command.strip(), 0))
        if expected:  # the comment (maybe on the next line) of the command above
            commands[-1] = (commands[-1][0], int(expected.group(1)))
    return commands


def test_tour_commands_are_read_with_their_exit_codes() -> None:
    commands = tour_commands(README.read_text())
    assert commands[0] == ("coordctl dev up --nodes 3", 0)
    assert commands[-1] == ("coordctl dev down", 0)
    assert [c for c, code in commands if code == 5] == [
        "coordctl upgrade --all --release examples/releases/shop-2.1.0-bad --wait-permanent"
    ]


def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    dev_dir = tmp_path / "tour"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOTFLEET_", "PYTEST_"))}
    env.update(
        HOTFLEET_DEV_DIR=str(dev_dir),
        NO_COLOR="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    started = time.monotonic()
    log: list[str] = []
    try:
        for command, expected in tour_commands(README.read_text()):
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            took = time.monotonic() - started
            log.append(f"[{took:5.1f}s] exit {done.returncode}: {command}")
            assert done.returncode == expected, (
                "\n".join(log) + f"\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr}"
            )
    finally:
        stop_cluster(dev_dir)
    elapsed = time.monotonic() - started
    print("\n".join(log))
    assert elapsed < BUDGET_S, "\n".join(log)
    assert not (dev_dir / devcluster.STATE_FILE).exists()  # the Tour's dev down stopped it

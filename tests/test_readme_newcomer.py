"""The newcomer path: the README's set-up command, run the way a new user runs it.

A copy of the checkout (what ``git clone`` would give, plus uncommitted
work), a shell with no virtualenv active and nothing of hotfleet installed,
the README's set-up block run verbatim: it creates a fresh venv, installs the
project from PyPI (pip's cache is reused, so after the first run this takes
seconds) and runs ``coordctl demo``.  The demo must succeed, report its
numbers, and leave no process behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import devcluster
from coordinator.devcluster import proc_start_time

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 300

pytestmark = pytest.mark.integration


def setup_block(readme: str) -> str:
    """The README's fenced shell block that ends in ``coordctl demo``."""
    for match in re.finditer(r"```(?:bash|sh|console)\n(.*?)```", readme, re.S):
        if "coordctl demo" in match.group(1):
            return match.group(1)
    raise AssertionError("README.md has no ```bash block running `coordctl demo`")


def checkout_copy(target: Path) -> Path:
    """The checkout's files as a clone would have them (no venv, no caches, no build output)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.split(b"\0")
        files = [ROOT / name.decode() for name in listed if name]
    except (OSError, subprocess.SubprocessError):
        files = [
            p
            for p in ROOT.rglob("*")
            if p.is_file()
            and not {".git", ".venv", "__pycache__", ".hotfleet-dev"} & set(p.parts)
            and ".egg-info" not in str(p)
        ]
    for source in files:
        if not source.is_file():  # deleted in the working tree
            continue
        dest = target / source.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
    return target


def newcomer_env(shim: Path) -> dict[str, str]:
    """A login-like environment: no venv active, nothing of hotfleet on the path.

    ``python3`` is the interpreter running these tests (the README asks for
    Python >= 3.11, whatever else ``python3`` means on this machine).
    """
    shim.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    (shim / "python3").symlink_to(os.path.realpath(base))
    venv_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV", "CONDA_PREFIX")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("HOTFLEET_", "PYTEST_", "COV_"))
    }
    env.update(PATH=os.pathsep.join([str(shim), *path]), PIP_PROGRESS_BAR="off", NO_COLOR="1")
    return env


def processes_in(directory: Path) -> list[int]:
    """Live processes running in ``directory`` or naming it on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (str(directory) in cwd or str(directory) in cmdline) and proc_start_time(
            int(entry.name)
        ) is not None:
            found.append(int(entry.name))
    return found


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    clone = tmp_path / "hotfleet"
    try:
        yield clone
    finally:
        with contextlib.suppress(Exception):
            devcluster.down(clone / devcluster.DEFAULT_DIR, out=io.StringIO(), timeout=5)
        if Path("/proc/self").exists():
            for pid in processes_in(clone):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def package_index() -> str:
    """The index pip would use: ``PIP_INDEX_URL``, else pip's configuration, else PyPI."""
    url = os.environ.get("PIP_INDEX_URL", "")
    if not url:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            url = subprocess.run(
                [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
    return url or "https://pypi.org/simple/"


def index_unreachable() -> str:
    """Why the package index cannot be reached ("" when it can): the one reason to skip."""
    url = package_index().rstrip("/") + "/pip/"
    try:
        with urllib.request.urlopen(url, timeout=15):
            return ""
    except (OSError, ValueError) as exc:
        return f"{url}: {exc}"


@pytest.mark.timeout(TIMEOUT_S + 120)
def test_readme_setup_command_runs_the_demo(workspace: Path, tmp_path: Path) -> None:
    unreachable = index_unreachable()
    if unreachable:  # the set-up installs from it: nothing to learn about hotfleet here
        pytest.skip(
            f"the package index is unreachable, so a newcomer cannot install: {unreachable}"
        )
    script = setup_block(README.read_text())
    clone = checkout_copy(workspace)
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=clone,
        env=newcomer_env(tmp_path / "bin"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the README's set-up command took over {TIMEOUT_S}s:\n{output[-6000:]}")
    tail = output[-8000:]
    assert proc.returncode == 0, tail
    assert (clone / ".venv" / "bin" / "coordctl").exists(), tail
    assert "Demo complete." in output, tail
    assert "rolled back automatically" in output, tail
    assert re.search(r"failed requests caused by the upgrades\s+0\b", output), tail
    assert re.search(r"responses mixing two releases\s+0\b", output), tail
    assert re.search(r"time to roll back \(bad release\)\s+\d", output), tail
    assert re.search(r"commit skew .*\s+\d", output), tail
    # the demo cleaned up after itself
    assert not (clone / devcluster.DEFAULT_DIR / devcluster.STATE_FILE).exists()
    if Path("/proc/self").exists():
        assert processes_in(clone) == []

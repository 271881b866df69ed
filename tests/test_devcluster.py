"""``coordctl dev up|status|down``: real processes, driven through the CLI as a user would.

Every test's cluster lives in its own tmp dir; whatever a test started is
stopped at the end even when it fails (``dev down``, then any process whose
command line names the tmp dir), so no test leaves a stray process behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import cli, devcluster
from coordinator.devcluster import Cluster, Member, proc_start_time

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def coordctl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``coordctl ARGS`` in a child process (its children outlive it, as for a user)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HOTFLEET_")}
    full_env.update(PYTHONPATH=str(ROOT), NO_COLOR="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line or working directory contains ``text``.

    (Every process of a dev cluster runs in its directory.)
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (text in cmdline or text in cwd) and proc_start_time(int(entry.name)) is not None:
            found.append(int(entry.name))
    return found


def stop_cluster(directory: Path) -> None:
    """Whatever a test's dev cluster left running: ``dev down``, then SIGKILL to the rest."""
    with contextlib.suppress(Exception):
        devcluster.down(directory, out=io.StringIO(), timeout=5)
    for pid in processes_mentioning(str(directory)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def dev_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "dev"
    try:
        yield directory
    finally:
        stop_cluster(directory)


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process the dev cluster did not start: it must survive ``dev down``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _alive(pid: int) -> bool:
    return proc_start_time(pid) is not None


pytest_linux = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@pytest_linux
def test_up_status_down_stops_exactly_its_processes(
    dev_dir: Path, bystander: subprocess.Popen[bytes]
) -> None:
    up = coordctl("dev", "up", "--nodes", "2", "--dir", str(dev_dir))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "coordinator  leads" in up.stdout
    assert "node-2       registered" in up.stdout
    assert "coordctl dev down" in up.stdout  # how to continue

    state = json.loads((dev_dir / "cluster.json").read_text())
    members = {m["name"]: m for m in state["members"]}
    assert set(members) == {"etcd", "coordinator", "node-1", "node-2", "traffic"}
    assert members["traffic"]["cmd"][-2:] == [members["node-1"]["http"], members["node-2"]["http"]]
    for m in members.values():
        assert _alive(m["pid"]), m
        assert proc_start_time(m["pid"]) == m["start_time"]
        assert Path(m["log"]).is_file()
        # detached: each member leads its own session, away from our terminal
        assert os.getsid(m["pid"]) == m["pid"]
    assert state["coordinator"] == members["coordinator"]["address"]
    assert all(members[n]["http"] for n in ("node-1", "node-2"))
    pids = {m["pid"] for m in members.values()}

    # the shop answers on every node's recorded HTTP port
    import urllib.request

    for node in ("node-1", "node-2"):
        with urllib.request.urlopen(f"http://{members[node]['http']}/versions", timeout=10) as r:
            assert json.loads(r.read())["versions"]["shop.app"] == "1"

    # coordctl finds the coordinator through the state file (no --coordinator)
    nodes = coordctl("nodes", "-o", "json", env={"HOTFLEET_DEV_DIR": str(dev_dir)})
    assert nodes.returncode == 0, nodes.stderr
    registered = {n["node_id"]: n for n in json.loads(nodes.stdout)["items"]}
    assert set(registered) == {"node-1", "node-2"}
    assert registered["node-1"]["labels"] == {"zone": "eu-west"}

    # up again: safe, starts nothing
    again = coordctl("dev", "up", "--nodes", "2", "--dir", str(dev_dir))
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout
    assert {m["pid"] for m in json.loads((dev_dir / "cluster.json").read_text())["members"]} == pids

    status = coordctl("dev", "status", "--dir", str(dev_dir))
    assert status.returncode == 0, status.stderr
    for name in members:
        line = next(ln for ln in status.stdout.splitlines() if ln.startswith(name + " "))
        assert " alive " in line, line

    down = coordctl("dev", "down", "--dir", str(dev_dir))
    assert down.returncode == 0, down.stderr
    assert not (dev_dir / "cluster.json").exists()
    assert (dev_dir / "logs").is_dir()  # logs are kept
    for pid in pids:
        assert not _alive(pid), pid
    assert processes_mentioning(str(dev_dir)) == []
    assert bystander.poll() is None  # untouched

    status = coordctl("dev", "status", "--dir", str(dev_dir))
    assert status.returncode == 1
    assert "no dev cluster" in status.stderr
    assert coordctl("dev", "down", "--dir", str(dev_dir)).returncode == 0  # idempotent


@pytest_linux
def test_up_restarts_a_dead_member(dev_dir: Path) -> None:
    assert coordctl("dev", "up", "--nodes", "1", "--dir", str(dev_dir)).returncode == 0
    state = json.loads((dev_dir / "cluster.json").read_text())
    node = next(m for m in state["members"] if m["name"] == "node-1")
    os.kill(node["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(node["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)

    status = coordctl("dev", "status", "--dir", str(dev_dir))
    assert status.returncode == 1
    assert any(ln.startswith("node-1") and " dead " in ln for ln in status.stdout.splitlines())

    again = coordctl("dev", "up", "--nodes", "1", "--dir", str(dev_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "starting again node-1" in again.stdout
    fresh = json.loads((dev_dir / "cluster.json").read_text())
    new = next(m for m in fresh["members"] if m["name"] == "node-1")
    assert new["pid"] != node["pid"] and _alive(new["pid"])
    assert new["http"] == node["http"]  # same port as before
    assert coordctl("dev", "status", "--dir", str(dev_dir)).returncode == 0
    assert coordctl("dev", "down", "--dir", str(dev_dir)).returncode == 0
    assert processes_mentioning(str(dev_dir)) == []


@pytest_linux
def test_down_never_signals_a_recycled_pid(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    """A recorded pid that now belongs to another process (other start time) is left alone."""
    directory = tmp_path / "dev"
    cluster = Cluster(
        dir=str(directory),
        members=[
            Member(
                name="node-1",
                role="agent",
                cmd=["node-agent"],
                log=str(directory / "logs" / "node-1.log"),
                pid=bystander.pid,
                start_time="1",  # not the bystander's
            )
        ],
    )
    cluster.save()
    assert cluster.members[0].state() == "replaced"
    out = io.StringIO()
    outcome = devcluster.down(directory, out=out, timeout=1)
    assert outcome is not None
    assert "left alone" in outcome["node-1"]
    time.sleep(0.2)
    assert bystander.poll() is None
    assert not (directory / "cluster.json").exists()


def test_default_coordinator_comes_from_the_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOTFLEET_COORDINATOR", raising=False)
    monkeypatch.setenv(devcluster.DIR_ENV, str(tmp_path))
    assert devcluster.default_coordinator() is None
    assert cli.build_parser().parse_args(["nodes"]).coordinator == cli.DEFAULT_COORDINATOR
    Cluster(dir=str(tmp_path), coordinator="127.0.0.1:7654").save()
    assert devcluster.default_coordinator() == "127.0.0.1:7654"
    assert cli.build_parser().parse_args(["nodes"]).coordinator == "127.0.0.1:7654"
    monkeypatch.setenv("HOTFLEET_COORDINATOR", "10.0.0.1:7600")  # the environment wins
    assert cli.build_parser().parse_args(["nodes"]).coordinator == "10.0.0.1:7600"


def test_without_etcd_binary_the_message_points_at_etcd_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTFLEET_ETCD_BIN", str(tmp_path / "no-such-etcd"))
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["dev", "up", "--dir", str(tmp_path / "dev")], out=out, err=err)
    assert code == 1
    assert "--etcd http://" in err.getvalue()
    assert "pip install 'hotfleet[dev]'" in err.getvalue()  # names the extra that ships etcd
    assert not (tmp_path / "dev" / "cluster.json").exists()


def test_unreachable_external_etcd_is_refused_clearly(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(
        ["dev", "up", "--dir", str(tmp_path / "dev"), "--etcd", "http://127.0.0.1:9"],
        out=out,
        err=err,
    )
    assert code == 1
    assert "--etcd http://127.0.0.1:9" in err.getvalue()
    assert not (tmp_path / "dev" / "cluster.json").exists()


def hint_lines(text: str) -> list[str]:
    """The commands a dev-cluster message tells the user to type (comments stripped)."""
    return [
        line.split("#")[0].strip()
        for line in text.splitlines()
        if line.strip().startswith(("coordctl ", f"{devcluster.DIR_ENV}="))
    ]


def test_hints_name_a_cluster_that_is_not_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(devcluster.DIR_ENV, raising=False)
    agent = Member(name="node-1", role="agent", cmd=[], log="x.log", http="127.0.0.1:8081")
    other = tmp_path / "other"
    hints = hint_lines(devcluster.describe(Cluster(dir=str(other), members=[agent])))
    assert len(hints) == 5, hints
    for hint in hints:
        named = f"--dir {other}" in hint or hint.startswith(f"{devcluster.DIR_ENV}={other} ")
        assert named, hint
    default = tmp_path / devcluster.DEFAULT_DIR
    plain = hint_lines(devcluster.describe(Cluster(dir=str(default), members=[agent])))
    assert plain and not any("--dir" in h or devcluster.DIR_ENV in h for h in plain), plain
    # the other messages that name a command
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["dev", "status", "--dir", str(other)], out=out, err=err) == 1
    assert f"coordctl dev up --dir {other}" in err.getvalue()


@pytest_linux
def test_up_next_to_another_cluster_prints_hints_for_itself(dev_dir: Path, tmp_path: Path) -> None:
    """Port 7600 taken and ./.hotfleet-dev pointing elsewhere: the hints still reach this one."""
    import socket

    holder = socket.socket()
    with contextlib.suppress(OSError):  # taken already (another cluster): the same situation
        holder.bind(("127.0.0.1", devcluster.COORDINATOR_PORT))
        holder.listen()
    elsewhere = tmp_path / "cwd"
    Cluster(dir=str(elsewhere / devcluster.DEFAULT_DIR), coordinator="127.0.0.1:9").save()
    try:
        up = coordctl("dev", "up", "--nodes", "1", "--dir", str(dev_dir), cwd=elsewhere)
    finally:
        holder.close()
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"port {devcluster.COORDINATOR_PORT} is taken" in up.stdout, up.stdout
    (nodes_hint,) = [h for h in hint_lines(up.stdout) if h.endswith("coordctl nodes")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTFLEET_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ran = subprocess.run(
        ["bash", "-c", nodes_hint],
        cwd=elsewhere,
        env={**env, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr  # not the cluster ./.hotfleet-dev names
    assert "node-1" in ran.stdout


def test_without_the_example_shop_nothing_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devcluster, "EXAMPLES", tmp_path / "no-examples")
    directory = tmp_path / "dev"
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["dev", "up", "--dir", str(directory)], out=out, err=err) == 1
    assert "the example shop is not at" in err.getvalue() and "reinstall" in err.getvalue()
    assert not (directory / "cluster.json").exists()
    assert processes_mentioning(str(directory)) == []  # not even etcd was started

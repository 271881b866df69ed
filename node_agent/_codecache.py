"""A host-level cache of compiled code: sibling workers of one host compile a release once.

A host running 8 gunicorn workers prepares 8 times at the same instant on the
same cores; compiling the release (and, on 3.11, its counting twins, see
:mod:`node_agent._prologue`) is most of a prepare's CPU.  Compiling is a pure
function of the source, the interpreter and our own transform, so the result
is kept as marshalled code in a cache directory and reused:

* **key** = sha256 of (kind, the source's sha256, ``sys.version``, the bytecode
  magic number, :data:`FORMAT`): another interpreter or another transform
  never reads an entry it did not write;
* **entry** = ``MAGIC`` + sha256(payload) + payload (``marshal``), written to a
  temporary file and renamed into place (atomic), **verified on read** (a
  torn, truncated or corrupted entry is a miss, and is removed);
* **one compile per host**: a miss takes an exclusive ``flock`` on the key's
  lock file (one of 16 stripes), looks again, compiles, writes, unlocks; siblings that missed at
  the same instant wait for it (bounded by :data:`LOCK_WAIT_S`, then compile
  themselves) and read its entry;
* **written only when a sibling can read it**: every cache user holds an
  ``flock`` on a member file of its own under ``.members/``; a process that
  finds no other live member (a single-worker host, ``node-agent`` alone)
  keeps what it compiled to itself, and saves the write (measured ~0.3-0.6
  ms of CPU per module on this VM: creating a file dominates).  A member
  killed without cleaning up is found out by its lock, which the kernel
  freed, and its file removed;
* code objects carry their file name: an entry written by a worker whose code
  path differs is rewritten to this worker's name on read (``code.replace``);
* **trust**: the directory is this user's (created ``0700``; one owned by
  someone else or writable by group or others is refused and the cache is
  off), since loading code from it is running it.  Nothing is executed in
  this process by reading an entry: it yields code objects, which the loader
  treats exactly as a fresh ``compile`` (nothing of the release runs before
  finish, except in the staging process).

``HOTFLEET_CODE_CACHE`` names the directory (``off`` disables it); the
default is ``<tmp>/hotfleet-code-<uid>``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import marshal
import os
import stat
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["CodeCache", "default_cache", "retarget"]

FORMAT = b"hotfleet-codecache-1"
MAGIC = b"HFCC\x01"
LOCK_WAIT_S = 5.0  # a sibling compiling longer than this: compile ourselves
LOCK_STRIPES = 16  # lock files per cache directory (see CodeCache._stripe)
MAX_ENTRIES = 4000  # pruned (oldest first) past this, at most once per process start
MEMBERS = ".members"  # one locked file per live cache user (see CodeCache._shared)
SIBLINGS_TTL_S = 2.0  # how long an answer of _shared() is reused (a prepare's many gets)
ENV = "HOTFLEET_CODE_CACHE"

_INTERPRETER = hashlib.sha256(
    b"\0".join([FORMAT, sys.version.encode(), importlib.util.MAGIC_NUMBER])
).digest()


def retarget(code: types.CodeType, filename: str) -> types.CodeType:
    """``code`` and every code object nested in it, with ``co_filename`` = ``filename``."""
    if code.co_filename == filename:
        return code
    consts = tuple(
        retarget(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    return code.replace(co_filename=filename, co_consts=consts)


class CodeCache:
    """Marshalled results of pure compile steps, shared by the processes of one user on a host."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self.waited_s = 0.0  # time spent waiting for a sibling's compile
        self._lock = threading.Lock()
        self._member: tuple[int, int, str] | None = None  # (pid, locked fd, file name)
        self._shared_seen = (-1e9, False)  # (when, whether a sibling was alive)
        self._writing = 0  # > 0: inside writing(), every miss is written
        self._check_directory()
        self._prune()
        self._join()

    # ---------------------------------------------------------------- public
    def get(
        self, kind: str, digest: str, make: Callable[[], Any], *, deadline_s: float = LOCK_WAIT_S
    ) -> Any:
        """The marshallable value ``make()`` returns for ``(kind, digest)``, once per host.

        ``make`` must be a pure function of the source whose sha256 is
        ``digest`` (and of the interpreter); what it raises propagates and
        nothing is stored.
        """
        key = hashlib.sha256(_INTERPRETER + kind.encode() + b"\0" + digest.encode()).hexdigest()
        path = self.directory / key
        found = self._read(path)
        if found is not None:
            self._count(hit=True)
            return found[0]
        with self._locked(self._stripe(key), deadline_s):
            found = self._read(path)  # a sibling wrote it while we waited
            if found is not None:
                self._count(hit=True)
                return found[0]
            value = make()
            if self._writing or self._shared():
                self._write(path, value)
        self._count(hit=False)
        return value

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Write every miss, whether or not a sibling lives now: for work done ahead
        of its use (staging a pushed release), read later by this process or by a
        sibling that starts in the meantime."""
        with self._lock:
            self._writing += 1
        try:
            yield
        finally:
            with self._lock:
                self._writing -= 1

    def claim(self, name: str) -> bool:
        """True for the first process of the host to claim ``name`` (a file made with
        ``O_EXCL``), False for every later one: one sibling does a host's share of work
        (per interpreter, as the entries are).

        A claimer that dies leaves the claim: the work is then done when it is
        needed, as if nobody had claimed it.  Claims are pruned with the entries.
        """
        try:
            fd = os.open(
                self.directory
                / f"claim-{hashlib.sha256(_INTERPRETER + name.encode()).hexdigest()}",
                os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError:
            return False
        os.close(fd)
        return True

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "waited_s": self.waited_s}

    # --------------------------------------------------------------- helpers
    def _count(self, *, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def _join(self) -> None:
        """Hold a member file of our own, locked for as long as this process lives.

        Locked before it is visible (made aside, then renamed in), so no
        sibling ever takes a new member's unlocked file for a dead one.
        """
        members = self.directory / MEMBERS
        name = f"{os.getpid()}-{id(self):x}-{os.urandom(4).hex()}"
        aside = self.directory / f".member-{name}"
        try:
            members.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(aside, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            self._member = None  # unknown: then we write, as if shared
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(aside, members / name)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(aside)
            self._member = None
            return
        self._member = (os.getpid(), fd, name)

    def _shared(self) -> bool:
        """Whether another live process (or cache instance) uses this directory.

        Reused for :data:`SIBLINGS_TTL_S`.  After a fork the inherited member
        is the parent's: the child joins anew.
        """
        member = self._member
        if member is not None and member[0] != os.getpid():
            self._join()  # and forget the parent's answer: its siblings are not ours
            self._shared_seen = (-1e9, False)
            member = self._member
        if member is None:
            return True
        now = time.monotonic()
        seen_at, shared = self._shared_seen
        if now - seen_at < SIBLINGS_TTL_S:
            return shared
        shared = False
        members = self.directory / MEMBERS
        try:
            names = [n for n in os.listdir(members) if n != member[2]]
        except OSError:
            names, shared = [], True
        for name in names:
            try:
                fd = os.open(members / name, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                shared = True  # its holder lives
            except OSError:
                pass
            else:  # nobody holds it: its process is gone
                with contextlib.suppress(OSError):
                    os.unlink(members / name)
            finally:
                os.close(fd)
            if shared:
                break
        self._shared_seen = (now, shared)
        return shared

    def _check_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.directory.lstat()  # a symlink planted in a shared /tmp is refused too
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(
                f"code cache {self.directory} is not a directory of this user (or a symlink)"
            )
        if st.st_mode & 0o022:
            raise PermissionError(
                f"code cache {self.directory} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}): refused"
            )

    @staticmethod
    def _read(path: Path) -> tuple[Any] | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        head = len(MAGIC) + 32
        if (
            len(data) < head
            or data[: len(MAGIC)] != MAGIC
            or hashlib.sha256(data[head:]).digest() != data[len(MAGIC) : head]
        ):
            with contextlib.suppress(OSError):
                path.unlink()  # torn or corrupted: recompiled by whoever needs it
            return None
        try:
            return (marshal.loads(data[head:]),)
        except (EOFError, ValueError, TypeError):
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def _stripe(self, key: str) -> Path:
        """The lock file of ``key``: one of :data:`LOCK_STRIPES`, created once per directory.

        Not one per key: creating a file costs a first worker ~0.1-0.5 ms of
        CPU per module, and siblings prepare the same release in the same
        order, so keys that share a stripe are rarely wanted at once.
        """
        return self.directory / f".lock-{int(key[:4], 16) % LOCK_STRIPES:02d}"

    def _write(self, path: Path, value: Any) -> None:
        try:
            payload = marshal.dumps(value)
        except ValueError:
            return  # not marshallable: used, not kept
        data = MAGIC + hashlib.sha256(payload).digest() + payload
        # the key's stripe lock is held: a name of our own needs no random retries
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def _locked(self, lock_path: Path, deadline_s: float) -> Any:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError:
            yield
            return
        held = False
        try:
            t0 = time.monotonic()
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                    break
                except BlockingIOError:
                    if time.monotonic() - t0 > deadline_s:
                        break  # a stuck sibling: compile without it
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)
            waited = time.monotonic() - t0
            with self._lock:
                self.waited_s += waited
            yield
        finally:
            if held:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _prune(self) -> None:
        try:
            entries = [p for p in self.directory.iterdir() if not p.name.startswith(".")]
        except OSError:
            return
        if len(entries) <= MAX_ENTRIES:
            return

        def mtime(p: Path) -> float:
            try:
                return p.stat().st_mtime
            except OSError:
                return 0.0

        for p in sorted(entries, key=mtime)[: len(entries) - MAX_ENTRIES // 2]:
            with contextlib.suppress(OSError):
                p.unlink()


def default_cache() -> CodeCache | None:
    """The host's cache as ``HOTFLEET_CODE_CACHE`` says (``off``: none); None if unusable."""
    where = os.environ.get(ENV, "")
    if where.lower() in {"off", "0", "no", "false"}:
        return None
    directory = where or os.path.join(tempfile.gettempdir(), f"hotfleet-code-{os.getuid()}")
    try:
        return CodeCache(directory)
    except OSError as exc:
        print(f"hotfleet: code cache off: {exc}", file=sys.stderr)
        return None

"""A steady HTTP load from its own process: ``python -m tests.load URL [THREADS]``.

Each thread sends ``GET URL`` in a loop (real HTTP, a new connection per
request) until stdin is closed; then one JSON line goes to stdout: counts of
good and failed requests, the versions seen, and any response whose modules
mixed versions of two releases.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter


def main() -> int:
    url = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    stop = threading.Event()
    lock = threading.Lock()
    ok = 0
    failures: list[str] = []
    seen: Counter[str] = Counter()
    mixed: list[dict[str, str]] = []

    def worker() -> None:
        nonlocal ok
        while not stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    body = json.loads(resp.read())
            except (urllib.error.URLError, OSError, ValueError) as exc:
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            versions = {k: v for k, v in body["versions"].items() if k != "shop"}
            key = ",".join(f"{k}={v}" for k, v in sorted(versions.items()))
            with lock:
                ok += 1
                seen[key] += 1
                if len(set(versions.values())) != 1:
                    mixed.append(versions)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    print("load started", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    stop.set()
    for t in pool:
        t.join(15)
    print(
        json.dumps({"ok": ok, "failed": failures, "seen": dict(seen), "mixed": mixed}), flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

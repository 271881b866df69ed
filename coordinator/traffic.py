"""``python -m coordinator.traffic``: steady background requests to the dev cluster's shop.

A rollout's analysis compares each node's health during the rollback window
with the baseline before it; a dev cluster nobody sends requests to has
neither, so every window ends *inconclusive* and the rollout pauses.
``coordctl dev up`` therefore starts this process next to the workers (on by
default, ``--no-traffic`` to skip it): a few paced ``GET /price`` requests a
second to every node, spread over the SKUs and quantities the shop prices,
so the analysis has samples to judge and a bad release is caught by its
errors.  It runs until SIGTERM (``dev down``) and logs a one-line count of
good and failed responses every ``--report`` seconds.

::

    python -m coordinator.traffic --rate 40 127.0.0.1:8081 127.0.0.1:8082
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

__all__ = ["READY", "Traffic", "main"]

READY = "hotfleet-traffic ready"
SKUS = ("apple", "fig", "pear")
THREADS_PER_TARGET = 2  # one slow response does not stall the node's rate


class Traffic:
    """Paced request threads, ``rate`` requests per second to each target."""

    def __init__(self, targets: Sequence[str], rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.targets = list(targets)
        self.rate = rate
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for target in self.targets:
            for index in range(THREADS_PER_TARGET):
                thread = threading.Thread(
                    target=self._run, args=(target, index), name=f"traffic-{target}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def join(self, timeout: float = 15.0) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, target: str, index: int) -> None:
        interval = THREADS_PER_TARGET / self.rate
        due = time.monotonic() + interval * index / THREADS_PER_TARGET
        n = index
        while not self.stop.is_set():
            n += THREADS_PER_TARGET
            url = f"http://{target}/price?sku={SKUS[n % len(SKUS)]}&qty={1 + n % 12}"
            good = False
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    resp.read()
                    good = resp.status == 200
            except (urllib.error.URLError, OSError, ValueError):
                good = False  # an HTTP 500 of a bad release lands here too
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.failed += 1
            # paced, not a closed loop: a slow node gets no burst afterwards
            due = max(due + interval, time.monotonic())
            self.stop.wait(max(0.0, due - time.monotonic()))

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.ok, self.failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator.traffic",
        description="Steady GET /price requests to every target until SIGTERM.",
        allow_abbrev=False,
    )
    parser.add_argument("targets", nargs="+", metavar="HOST:PORT")
    parser.add_argument(
        "--rate", type=float, default=40.0, help="requests per second to each target"
    )
    parser.add_argument(
        "--report", type=float, default=30.0, metavar="S", help="log the counts every S seconds"
    )
    args = parser.parse_args(argv)
    try:
        traffic = Traffic(args.targets, args.rate)
    except ValueError as exc:
        parser.error(str(exc))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: traffic.stop.set())
    traffic.start()
    print(f"{READY} targets={len(traffic.targets)} rate={args.rate:g}", flush=True)
    while not traffic.stop.wait(args.report):
        ok, failed = traffic.counts()
        print(f"traffic: {ok} ok, {failed} failed so far", flush=True)
    traffic.join()
    ok, failed = traffic.counts()
    print(f"traffic stopped: {ok} ok, {failed} failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

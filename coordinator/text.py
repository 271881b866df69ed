"""Plain-text building blocks of coordctl's output: colour, aligned tables, short values.

No dependency: a :class:`Style` colours only when the stream is a terminal
and ``NO_COLOR`` is unset; :func:`table` aligns columns kubectl style
(colour codes do not count towards a column's width); :func:`duration`,
:func:`age` and :func:`short` are how times and digests read everywhere in
coordctl, the dev cluster and the demo.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

__all__ = ["PLAIN", "Style", "age", "duration", "labels_text", "nodes_list", "short", "table"]


class Style:
    """ANSI styling, a no-op unless enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: TextIO) -> Style:
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty and isatty())
        return cls(tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb")

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and text else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def phase(self, phase: str) -> str:
        if phase in ("permanent", "provisional", "dry_run", "pass"):
            return self.green(phase)
        if phase in ("aborted", "rolled_back", "aborting", "fail"):
            return self.red(phase)
        return self.yellow(phase)


PLAIN = Style(False)


def _visible_len(text: str) -> int:
    out, i = 0, 0
    while i < len(text):
        if text[i] == "\x1b":
            end = text.find("m", i)
            i = end + 1 if end != -1 else len(text)
            continue
        out += 1
        i += 1
    return out


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    empty: str = "",
    no_headers: bool = False,
) -> str:
    """Aligned columns; the last column is never padded (it may be long, e.g. a detail).

    ``no_headers`` drops the header line (kubectl's ``--no-headers``) so a
    script can pipe rows into ``awk``/``cut``; an empty list then prints
    nothing rather than the human ``empty`` sentence.
    """
    body = [["" if c is None else str(c) for c in row] for row in rows]
    if not body and (empty or no_headers):
        return "" if no_headers else empty
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row[: len(headers)]):
            first = cell.split("\n", 1)[0]
            widths[i] = max(widths[i], _visible_len(first))
    lines = []
    for row in body if no_headers else [list(headers), *body]:
        cells = row + [""] * (len(headers) - len(row))
        parts = []
        continuation: list[str] = []
        for i, cell in enumerate(cells):
            first, *rest = cell.split("\n")
            if i == len(cells) - 1:
                parts.append(first)
                continuation = rest
            else:
                parts.append(first + " " * (widths[i] - _visible_len(first)))
        lines.append("  ".join(parts).rstrip())
        indent = " " * (sum(widths[:-1]) + 2 * (len(widths) - 1))
        lines.extend((indent + extra).rstrip() for extra in continuation)
    return "\n".join(lines)


# ------------------------------------------------------------------ helpers
def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    if seconds < 120:
        return f"{seconds:.2f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def age(timestamp: float | None, now: float | None = None) -> str:
    if not timestamp:
        return "-"
    delta = max(0.0, (now or time.time()) - timestamp)
    if delta < 120:
        return f"{delta:.0f}s"
    if delta < 7200:
        return f"{delta / 60:.0f}m"
    if delta < 172800:
        return f"{delta / 3600:.0f}h"
    return f"{delta / 86400:.0f}d"


def short(digest: str | None, n: int = 12) -> str:
    return (digest or "")[:n] or "-"


def labels_text(labels: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "-"


def nodes_list(nodes: Sequence[str], limit: int = 6) -> str:
    nodes = sorted(nodes)
    if len(nodes) <= limit:
        return ",".join(nodes)
    return ",".join(nodes[:limit]) + f",… (+{len(nodes) - limit})"

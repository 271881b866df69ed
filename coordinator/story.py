"""How ``coordctl demo`` tells its story: numbered steps, wrapped notes, ✔ and ✘ lines.

Apart from :mod:`coordinator.demo` so that the story there reads as the steps
it takes and the numbers it measures, not as text layout.
"""

from __future__ import annotations

import re
import textwrap
import time
from typing import TextIO

from coordinator.render import Style

__all__ = ["Story"]

WIDTH = 96


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class Story:
    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.style = Style.for_stream(out)
        self.started = time.monotonic()
        self.step_no = 0

    def __call__(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def heading(self, title: str, total: int = 7) -> None:
        self.step_no += 1
        self()
        line = f"== Step {self.step_no}/{total}: {title} "
        self(self.style.bold(line + "=" * max(3, WIDTH - len(line))))

    def _wrapped(self, mark: str, text: str) -> None:
        lines = textwrap.wrap(text, WIDTH - 5, break_on_hyphens=False) or [""]
        self(f"   {mark}{lines[0]}")
        for line in lines[1:]:
            self(f"   {' ' * len(_plain(mark))}{line}")

    def note(self, text: str) -> None:
        self._wrapped("", text)

    def good(self, text: str) -> None:
        self._wrapped(self.style.green("✔") + " ", text)

    def bad(self, text: str) -> None:
        self._wrapped(self.style.red("✘") + " ", text)

    def block(self, text: str) -> None:
        for line in text.splitlines():
            self(f"   {line}")

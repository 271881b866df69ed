#!/usr/bin/env python3
"""Regenerate the example releases in ``examples/releases`` from one source.

The example shop's releases differ from each other by a file or two, so each
is written as an *overlay* in ``examples/overlays/<release>/``: a ``BASE``
file naming the release it builds on (``shop`` is the boot code in
``examples/shop``), its ``release.toml``, and only the files it changes.
This script is the only producer of ``examples/releases`` (committed, so
users, the demo and the wheel read plain bundles); ``--check`` (run by
``tests/test_examples_fresh.py``) keeps them from drifting from the
overlays.  Edit an overlay, never a generated release.

Usage::

    python scripts/gen_examples.py           # regenerate in place
    python scripts/gen_examples.py --check   # exit 1 naming what is stale
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BOOT = EXAMPLES / "shop"
OVERLAYS = EXAMPLES / "overlays"
OUT = EXAMPLES / "releases"
ROOT_BASE = "shop"


def _files(directory: Path, *, skip: tuple[str, ...] = ()) -> dict[Path, bytes]:
    return {
        p.relative_to(directory): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.name not in skip
    }


def build(name: str, seen: tuple[str, ...] = ()) -> dict[Path, bytes]:
    """The files of release ``name``: its base's, then its own overlay on top."""
    if name in seen:
        raise SystemExit(f"gen_examples: BASE cycle: {' -> '.join((*seen, name))}")
    overlay = OVERLAYS / name
    base = (overlay / "BASE").read_text().strip()
    files = _files(BOOT) if base == ROOT_BASE else build(base, (*seen, name))
    files.pop(Path("release.toml"), None)  # every release declares its own
    files.update(_files(overlay, skip=("BASE",)))
    return files


def generate(out: Path) -> None:
    for overlay in sorted(OVERLAYS.iterdir()):
        target = out / overlay.name
        for rel, data in build(overlay.name).items():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (target / rel).write_bytes(data)


def stale() -> list[str]:
    """What differs between the committed releases and a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        problems = []
        want = {d.name for d in fresh.iterdir()}
        have = {d.name for d in OUT.iterdir() if d.is_dir()}
        problems += [f"{n}: missing" for n in sorted(want - have)]
        problems += [f"{n}: no overlay in examples/overlays" for n in sorted(have - want)]
        for name in sorted(want & have):
            new, old = _files(fresh / name), _files(OUT / name)
            for rel in sorted(set(new) | set(old)):
                if new.get(rel) != old.get(rel):
                    problems.append(f"{name}/{rel}: differs from its overlay")
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="report stale releases, change nothing"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        for line in problems:
            print(f"stale: {line}", file=sys.stderr)
        if problems:
            print("run: python scripts/gen_examples.py", file=sys.stderr)
        return 1 if problems else 0
    shutil.rmtree(OUT, ignore_errors=True)
    generate(OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

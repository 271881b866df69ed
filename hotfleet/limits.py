"""How big anything hotfleet reads from outside may be, and the checks that enforce it.

Every bundle, manifest, wire message and etcd record is input from someone
else; without bounds a 510 KB zip inflates into 512 MiB of module, 200 000
archive members take a minute to walk, a 1 KB ``[[[[...`` exhausts the
interpreter's stack and a stream of pushes fills etcd until the operator
cannot even write a rollback.  The bounds sit far above any real release
(a large service has a few thousand modules of a few hundred KB) and far
below what hurts a node, and each check runs *before* the costly step it
guards: counting before walking, declared sizes before inflating, reading
at most ``limit + 1`` bytes so a lying header cannot make us read more.
"""

from __future__ import annotations

import json
import tomllib
from typing import IO, Any, Final

__all__ = [
    "MAX_BUNDLE_BYTES",
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "MAX_FILE_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_MODULES",
    "MAX_PREPARE_MESSAGE_BYTES",
    "MAX_STORE_BYTES",
    "TooDeep",
    "TooLarge",
    "check_depth",
    "loads_json",
    "loads_toml",
    "read_at_most",
]

MiB: Final = 1024 * 1024

#: Bytes a bundle may hold: the archive file, and everything it would inflate to.
MAX_BUNDLE_BYTES: Final = 64 * MiB
#: Bytes of one module source.
MAX_FILE_BYTES: Final = 4 * MiB
#: Bytes of ``release.toml``, of a wire manifest's JSON fields, of an etcd record.
MAX_MANIFEST_BYTES: Final = 1 * MiB
#: Members of an archive (or files and directories of a bundle directory), junk included.
MAX_ENTRIES: Final = 20_000
#: Modules of one release.
MAX_MODULES: Final = 10_000
#: Nesting of arrays and tables in release.toml, ``extra``, smoke checks, health, JSON.
MAX_DEPTH: Final = 32
#: The largest Prepare (or other) request an agent's gRPC server accepts: a
#: manifest names modules by digest, so even MAX_MODULES entries fit easily.
MAX_PREPARE_MESSAGE_BYTES: Final = 16 * MiB
#: Blob bytes the etcd content store may hold (etcd's default quota is 2 GiB;
#: the rest is for rollouts, membership and the operator's way out).
MAX_STORE_BYTES: Final = 1024 * MiB


class TooLarge(ValueError):
    """Input over one of the limits above; the message says which and by how much."""


class TooDeep(ValueError):
    """Arrays or tables nested deeper than :data:`MAX_DEPTH`."""


def read_at_most(stream: IO[bytes], limit: int, what: str) -> bytes:
    """Read ``stream`` whole, but never more than ``limit + 1`` bytes.

    A compressed member whose header lies about its size is caught here,
    after inflating at most one byte more than allowed.
    """
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{what} is larger than the {_size(limit)} limit")
    return data


def check_depth(value: Any, what: str, limit: int = MAX_DEPTH) -> None:
    """Refuse ``value`` if its lists/dicts nest deeper than ``limit`` (iteratively: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= limit:
            raise TooDeep(f"{what} nests arrays/tables deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children)


def loads_json(text: str | bytes, what: str, max_bytes: int = MAX_MANIFEST_BYTES) -> Any:
    """``json.loads`` bounded in size and nesting; any failure is a ``ValueError`` naming ``what``.

    ``json`` recurses once per nesting level: a deep document raises
    ``RecursionError`` inside it, which becomes :class:`TooDeep` here, and a
    document that parses is then held to :data:`MAX_DEPTH`.
    """
    if len(text) > max_bytes:
        raise TooLarge(f"{what} is {_size(len(text))}, more than the {_size(max_bytes)} limit")
    try:
        value = json.loads(text)
    except RecursionError:
        raise TooDeep(f"{what} nests arrays/objects deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    check_depth(value, what)
    return value


def loads_toml(text: str, what: str) -> dict[str, Any]:
    """``tomllib.loads`` held to :data:`MAX_DEPTH`; ``tomllib.TOMLDecodeError`` passes through."""
    try:
        document = tomllib.loads(text)
    except RecursionError:
        raise TooDeep(f"{what} nests arrays/tables deeper than {MAX_DEPTH} levels") from None
    check_depth(document, what)
    return document


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"

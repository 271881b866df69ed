"""Machine-readable ``coordctl`` output: versioned documents as JSON or YAML.

Every ``-o json`` / ``-o yaml`` document is one object carrying
``schema_version`` and ``document`` (what it is), so a script can tell
which shape it holds and a later coordctl can change the shape without
breaking it silently (``kind`` is not used: a rollout record has its own
``kind``, upgrade or rollback):

* a single record (``Rollout``, ``Release``) is the record's own keys plus
  those two;
* a list (``NodeList``, ``RolloutList``, ``ReleaseList``) has ``items``;
* ``coordctl modules`` is ``FleetModules`` with ``modules`` and ``drift``;
* a failure is ``Error`` with ``error: {code, message, exit_code, errors,
  coordinator}``.

YAML is written here (no PyYAML dependency): the documents hold only JSON
values, and every string is emitted double-quoted with JSON escapes, which
YAML 1.2 reads back as the same string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FORMATS", "SCHEMA_VERSION", "document", "dumps", "list_document", "to_yaml"]

SCHEMA_VERSION = 1
FORMATS = ("table", "wide", "json", "yaml")


def document(name: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """A single record as a versioned document."""
    return {**record, "schema_version": SCHEMA_VERSION, "document": name}


def list_document(name: str, items: Sequence[Any]) -> dict[str, Any]:
    """A list of records as a versioned document with ``items``."""
    return {"schema_version": SCHEMA_VERSION, "document": name, "items": list(items)}


def dumps(data: Any, fmt: str) -> str:
    """``data`` as ``json`` (indented, sorted keys) or ``yaml``."""
    if fmt == "yaml":
        return to_yaml(data)
    return json.dumps(data, indent=2, sort_keys=True)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(str(value), ensure_ascii=False)


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_YAML_WORDS = frozenset({"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"})


def _key(key: Any) -> str:
    text = str(key)
    if _PLAIN_KEY.match(text) and text.lower() not in _YAML_WORDS:
        return text
    return _scalar(text)


def to_yaml(data: Any) -> str:
    """Block-style YAML for JSON values, keys sorted like the JSON output."""
    return "\n".join(_yaml_lines(data, 0)) or "null"


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, Mapping):
        if not value:
            return [pad + "{}"]
        lines = []
        for key in sorted(value, key=str):
            item = value[key]
            head = f"{pad}{_key(key)}:"
            if isinstance(item, Mapping | list | tuple) and item:
                lines.append(head)
                lines.extend(_yaml_lines(item, indent + 2))
            else:
                lines.append(f"{head} {_yaml_lines(item, 0)[0]}")
        return lines
    if isinstance(value, list | tuple):
        if not value:
            return [pad + "[]"]
        lines = []
        for item in value:
            # "- " takes the place of the first line's indentation
            nested = _yaml_lines(item, indent + 2)
            lines.append(f"{pad}- {nested[0].lstrip()}")
            lines.extend(nested[1:])
        return lines
    return [pad + _scalar(value)]

"""Conversions between hotfleet's in-memory types and the ``hotfleet.v1`` messages.

Shared by the node agent (which receives manifests and answers errors) and
the coordinator (which sends manifests and aggregates errors), so both sides
agree on one mapping.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from hotfleet._proto.hotfleet.v1 import common_pb2
from hotfleet.errors import ModuleError, Reason
from hotfleet.limits import MAX_MODULES, TooLarge, loads_json
from hotfleet.release import Release

DATA = "data"  # the instruction that marks a data file's entry on the wire

__all__ = [
    "errors_from_proto",
    "errors_to_proto",
    "manifest_from_proto",
    "manifest_to_proto",
    "release_to_proto",
]


def manifest_to_proto(manifest: Mapping[str, Any]) -> common_pb2.ReleaseManifest:
    """A :meth:`Release.to_manifest` dict as a ``ReleaseManifest`` message.

    The manifest's ``problems`` (e.g. a stray ``name_mismatch`` table) have
    no field on the wire: the sender refuses such a release before sending it.
    Data files travel as module entries with no name and the instruction
    ``data``: an agent that predates data files refuses such an entry (its
    path is not a ``.py`` file) rather than dropping it.
    """
    smoke = manifest.get("smoke") or []
    health = manifest.get("health") or {}
    return common_pb2.ReleaseManifest(
        name=manifest["name"],
        version=manifest["version"],
        digest=manifest.get("digest") or "",
        modules=[
            common_pb2.ModuleEntry(
                name=m["name"],
                path=m["path"],
                digest=m["digest"],
                is_package=bool(m.get("is_package")),
                instruction=m.get("instruction") or "",
                extra_json="" if m.get("extra") is None else json.dumps(m["extra"]),
                depends=list(m.get("depends") or ()),
            )
            for m in manifest.get("modules", [])
        ]
        + [
            common_pb2.ModuleEntry(path=d["path"], digest=d["digest"], instruction=DATA)
            for d in manifest.get("data", [])
        ],
        smoke_json=json.dumps(smoke) if smoke else "",
        health_json=json.dumps(health) if health else "",
    )


def release_to_proto(release: Release) -> common_pb2.ReleaseManifest:
    return manifest_to_proto(release.to_manifest())


def manifest_from_proto(message: common_pb2.ReleaseManifest) -> dict[str, Any]:
    """The manifest dict :meth:`Release.from_manifest` reads.

    Raises ``ValueError`` naming the field for bad, oversized or too deeply
    nested JSON, and for more modules than a release may hold (checked before
    any field is decoded).
    """
    if len(message.modules) > MAX_MODULES:
        raise TooLarge(
            f"release {message.name}@{message.version} has {len(message.modules)} modules,"
            f" more than the limit of {MAX_MODULES}"
        )
    data = [{"path": e.path, "digest": e.digest} for e in message.modules if e.instruction == DATA]
    return {
        **({"data": data} if data else {}),
        "name": message.name,
        "version": message.version,
        **({"digest": message.digest} if message.digest else {}),
        "modules": [
            {
                "name": e.name,
                "path": e.path,
                "digest": e.digest,
                "is_package": e.is_package,
                "instruction": e.instruction or "update",
                "extra": loads_json(e.extra_json, f"{e.name or e.path}: extra_json")
                if e.extra_json
                else None,
                "depends": list(e.depends),
            }
            for e in message.modules
            if e.instruction != DATA
        ],
        "smoke": loads_json(message.smoke_json, "smoke_json") if message.smoke_json else [],
        "health": loads_json(message.health_json, "health_json") if message.health_json else {},
    }


def errors_to_proto(errors: Iterable[ModuleError], node: str = "") -> list[common_pb2.ModuleError]:
    """Per-module errors for a reply; ``node`` fills in entries that have none."""
    return [
        common_pb2.ModuleError(
            node=e.node or node, module=e.module, reason=e.reason.value, detail=e.detail
        )
        for e in errors
    ]


def errors_from_proto(errors: Iterable[common_pb2.ModuleError]) -> list[ModuleError]:
    out = []
    for e in errors:
        try:
            reason = Reason(e.reason)
        except ValueError:
            reason = Reason.BAD_RELEASE
        out.append(ModuleError(e.module, reason, e.detail, e.node))
    return out

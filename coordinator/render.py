"""Human output for ``coordctl``: tables, rollout reports, live progress, module drift.

Plain text with no dependency: tables are aligned columns (kubectl style),
colour only when the stream is a terminal and ``NO_COLOR`` is unset, and live
progress prints one line per event, so logs of a CI job read the same as a
terminal (a terminal also gets a one-line summary redrawn in place).
Everything here works on the JSON records the coordinator serves, so the
CLI can render records from a newer coordinator that has extra keys.

This module holds the fleet's tables (nodes, releases, modules and their
drift) and re-exports the rest: the text primitives (:mod:`coordinator.text`),
rollout reports (:mod:`coordinator.render_rollout`) and live progress
(:mod:`coordinator.progress`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from coordinator.progress import Progress, summary
from coordinator.render_rollout import (
    TERMINAL_PHASES,
    analysis_table,
    collect_errors,
    drain_note,
    errors_table,
    max_wave_skew,
    node_notes,
    rollout_detail,
    rollouts_table,
    wave_skews,
)
from coordinator.text import PLAIN, Style, age, duration, labels_text, nodes_list, short, table

__all__ = [
    "PLAIN",
    "TERMINAL_PHASES",
    "Progress",
    "Style",
    "age",
    "analysis_table",
    "collect_errors",
    "drain_note",
    "drift",
    "duration",
    "errors_table",
    "max_wave_skew",
    "modules_table",
    "node_notes",
    "nodes_table",
    "release_detail",
    "releases_table",
    "rollout_detail",
    "rollouts_table",
    "short",
    "summary",
    "table",
    "wave_skews",
]


# ------------------------------------------------------------------ tables
def nodes_table(
    nodes: Sequence[Mapping[str, Any]],
    style: Style = PLAIN,
    *,
    wide: bool = False,
    no_headers: bool = False,
) -> str:
    """One row per node; ``wide`` adds the HTTP address, pid and the epoch it has seen.

    SYNC says whether the node runs what the fleet wants of it (the leader's
    convergence loop): ``ok``, ``catching up``, or the release it should run.
    When nodes carry a ``host`` label (several workers per host, e.g. under
    gunicorn: :mod:`node_agent.gunicorn`), a HOST column comes first and the
    rows are grouped by host.
    """
    by_host = any(_host(n) for n in nodes)
    if by_host:
        nodes = sorted(nodes, key=lambda n: (_host(n), str(n.get("node_id", ""))))
    rows = []
    for n in nodes:
        state = str(n.get("state", ""))
        row = [
            n.get("node_id", ""),
            style.yellow(state) if state not in ("ready", "idle") else state,
            n.get("current_release") or "-",
            _sync(n, style),
            n.get("permanent_release") or "-",
            n.get("previous_release") or "-",
            n.get("address") or "-",
        ]
        if wide:
            row += [n.get("http_address") or "-", n.get("pid") or "-", n.get("epoch_seen") or 0]
        row = [*row, age(n.get("started_at")), labels_text(n.get("labels"))]
        rows.append([_host(n) or "-", *row] if by_host else row)
    headers = ["NODE", "STATE", "RELEASE", "SYNC", "PERMANENT", "PREVIOUS", "ADDRESS"]
    if wide:
        headers += ["HTTP", "PID", "EPOCH"]
    if by_host:
        headers = ["HOST", *headers]
    return table(
        [*headers, "UP", "LABELS"], rows, empty="no nodes registered", no_headers=no_headers
    )


def _host(node: Mapping[str, Any]) -> str:
    labels = node.get("labels")
    return str(labels.get("host") or "") if isinstance(labels, Mapping) else ""


def _sync(node: Mapping[str, Any], style: Style) -> str:
    convergence = node.get("convergence") or ""
    if convergence == "converged":
        return "ok"
    if convergence == "catching_up":
        return style.yellow("catching up")
    if convergence == "drifting":
        return style.yellow(f"wants {node.get('desired_release') or 'boot code'}")
    return "-"


def unpacked(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the nodes said to an unpack (:mod:`coordinator.unpack`): one line per answer,
    with its nodes; every module a Prepare would refuse, per node."""
    if not rows:
        return ["unpacked on no node (none registered)"]
    by_answer: dict[tuple[bool, str], list[str]] = {}
    slowest: dict[tuple[bool, str], float] = {}
    for row in rows:
        key = (bool(row.get("done")), str(row.get("detail") or ""))
        by_answer.setdefault(key, []).append(str(row.get("node")))
        slowest[key] = max(slowest.get(key, 0.0), float(row.get("seconds") or 0))
    lines = []
    for (done, detail), nodes in sorted(by_answer.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        head = f"unpacked on {len(nodes)} node(s)" if done else f"not unpacked on {len(nodes)}"
        took = f", {duration(slowest[done, detail])} at most" if done else ""
        lines.append(f"{head}{took}: {detail}  [{nodes_list(nodes)}]")
    for row in rows:
        for error in row.get("errors") or []:
            lines.append(f"  a prepare would refuse it on {row.get('node')}: {error}")
    return lines


def releases_table(releases: Sequence[Mapping[str, Any]], *, no_headers: bool = False) -> str:
    rows = [
        [
            r.get("name", ""),
            r.get("version", ""),
            short(r.get("digest")),
            r.get("modules", ""),
            "yes" if r.get("signed") else "no",
            age(r.get("pushed_at")),
        ]
        for r in sorted(releases, key=lambda r: (r.get("name", ""), r.get("pushed_at") or 0))
    ]
    return table(
        ["NAME", "VERSION", "DIGEST", "MODULES", "SIGNED", "PUSHED"],
        rows,
        empty="no releases pushed",
        no_headers=no_headers,
    )


def release_detail(entry: Mapping[str, Any]) -> str:
    manifest = entry.get("manifest") or {}
    signer = entry.get("signer") or ""
    lines = [
        f"Release:  {entry.get('label') or entry.get('name', '') + '@' + entry.get('version', '')}",
        f"Digest:   {entry.get('digest', '')}",
        f"Signed:   {'yes' + (f' by {signer}' if signer else '') if entry.get('signed') else 'no'}",
        f"Pushed:   {age(entry.get('pushed_at'))} ago",
        "",
    ]
    modules = manifest.get("modules") or []
    lines.append(
        table(
            ["MODULE", "PATH", "DIGEST", "INSTRUCTION", "DEPENDS"],
            (
                [
                    m.get("name", ""),
                    m.get("path", ""),
                    short(m.get("digest")),
                    m.get("instruction") or "update",
                    ",".join(m.get("depends") or ()) or "-",
                ]
                for m in modules
            ),
            empty="(manifest not available)",
        )
    )
    for check in manifest.get("smoke") or []:
        lines.append(f"smoke check: {check}")
    if manifest.get("health"):
        lines.append(f"health policy: {manifest['health']}")
    return "\n".join(lines)


# ------------------------------------------------------------------ modules
def drift(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """Modules whose loaded digest differs across nodes: ``{module: {digest: [nodes]}}``."""
    by_module: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        digest = row.get("loaded_digest") or ""
        by_module.setdefault(row.get("module", ""), {}).setdefault(digest, []).append(
            row.get("node", "")
        )
    return {
        module: {d: sorted(n) for d, n in digests.items()}
        for module, digests in sorted(by_module.items())
        if len(digests) > 1
    }


def modules_table(
    rows: Sequence[Mapping[str, Any]], *, per_node: bool = False, style: Style = PLAIN
) -> str:
    if not rows:
        return "no modules reported"
    drifting = drift(rows)
    if per_node:
        body = [
            [
                r.get("node", ""),
                r.get("module", ""),
                _module_state(r, style),
                r.get("release") or "-",
                short(r.get("loaded_digest")),
                short(r.get("disk_digest")),
            ]
            for r in sorted(rows, key=lambda r: (r.get("node", ""), r.get("module", "")))
        ]
        return table(["NODE", "MODULE", "STATE", "RELEASE", "LOADED", "ON DISK"], body)
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for r in rows:
        key = (
            r.get("module", ""),
            r.get("loaded_digest") or "",
            r.get("state", ""),
            r.get("release") or "",
        )
        groups.setdefault(key, []).append(r.get("node", ""))
    body = []
    last_module = None
    for (module, digest, state, release), nodes in sorted(groups.items()):
        marker = style.red("DRIFT") if module in drifting else ""
        body.append(
            [
                module if module != last_module else "",
                short(digest),
                _module_state({"state": state}, style),
                release or "-",
                len(nodes),
                (marker + " " if marker and module != last_module else "") + nodes_list(nodes),
            ]
        )
        last_module = module
    text = table(["MODULE", "LOADED", "STATE", "RELEASE", "COUNT", "NODES"], body)
    if drifting:
        text += "\n\n" + style.yellow(
            f"{len(drifting)} module(s) run different code on different nodes: "
            + ", ".join(drifting)
        )
    return text


def _module_state(row: Mapping[str, Any], style: Style) -> str:
    state = str(row.get("state", ""))
    return state if state in ("loaded", "not_loaded") else style.yellow(state)

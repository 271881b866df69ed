"""Logging flags every hotfleet daemon shares: ``--log-level`` and ``--log-format``.

``--log-format json`` writes one JSON object per line (``ts``, ``level``,
``logger``, ``message``, plus ``exc`` with the traceback when there is one)
so a log shipper can index fleet events without parsing free text;
``text`` (the default) stays readable in a terminal.  Levels are accepted
in any case (``debug``, ``DEBUG``), and a wrong one is a usage error naming
the valid levels, never a traceback at start-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "add_arguments", "configure", "level_arg"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def level_arg(text: str) -> str:
    """``debug`` or ``DEBUG`` (argparse type); anything else names the valid levels."""
    level = text.strip().upper()
    if level == "WARN":
        level = "WARNING"
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}; one of {', '.join(x.lower() for x in LEVELS)}"
        )
    return level


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the fields a log pipeline needs, nothing more."""

    def __init__(self, node: str = "") -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if self.node:
            data["node"] = self.node
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format``, defaulting to HOTFLEET_LOG_LEVEL/_FORMAT."""
    parser.add_argument(
        "--log-level",
        type=level_arg,
        default=os.environ.get("HOTFLEET_LOG_LEVEL") or "INFO",  # argparse applies the type
        metavar="LEVEL",
        help="debug, info, warning, error (env HOTFLEET_LOG_LEVEL; default info)",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=os.environ.get("HOTFLEET_LOG_FORMAT") or "text",
        help="text (default) or json: one JSON object per line (env HOTFLEET_LOG_FORMAT)",
    )


def configure(level: str, fmt: str = "text", node: str = "") -> None:
    """Route the root logger to stderr at ``level`` in ``fmt`` (replacing earlier handlers).

    ``node``: a node agent's id, in every line (``[n1]`` in text, ``"node"`` in JSON).
    """
    text = TEXT_FORMAT.replace("%(message)s", f"[{node}] %(message)s") if node else TEXT_FORMAT
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(node) if fmt == "json" else logging.Formatter(text))
    logging.basicConfig(level=level, handlers=[handler], force=True)

"""What an operator asks of one rollout: the flags of ``coordctl upgrade`` and ``rollback``.

Recorded with the rollout (its ``options``), so a new leader that recovers
the rollout drives it as it was asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RolloutOptions"]


@dataclass
class RolloutOptions:
    dry_run: bool = False
    allow_missing: bool = False
    timeout_s: float = 30.0
    concurrency: int = 32
    force: bool = False
    window_s: float | None = None  # rollback window; None = the policy's; 0 = permanent at once
    health: dict[str, Any] = field(default_factory=dict)  # analysis policy overrides (flags)
    waves: list[str] = field(default_factory=list)  # cumulative sizes: ["1", "25%", "100%"]
    allow_downgrade: bool = False  # asked for explicitly, recorded with the rollout

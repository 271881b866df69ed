"""hotfleet: what the node agent and the coordinator share.

The public surface is deliberately small: the release bundle format and the
structured errors.  Everything else is an implementation detail of
``node_agent`` or ``coordinator``.
"""

from hotfleet.errors import HotfleetError, ModuleError, Reason, ReleaseError

__all__ = ["HotfleetError", "ModuleError", "Reason", "ReleaseError"]
__version__ = "0.1.0"

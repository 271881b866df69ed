"""The agent's signing policy: which release-signing keys it trusts and what it demands of a release.

Why its own module: whether this process may load a release is one rule,
applied the same way to a Prepare (:mod:`node_agent.fetch`) and to the
release reconcile finds in etcd (:mod:`node_agent.reconcile`), and it is
checked before a byte of source is fetched.

Outside dev mode the agent needs at least one trusted ed25519 key
(``trusted_keys``, ``node-agent --trust-key``) and refuses to start without
one; every release must carry a signature valid over its digest by one of
them, naming this fleet (:func:`hotfleet.signing.verify_release`), or it is
refused with ``unsigned`` / ``bad_signature``.  In dev mode an unsigned
release is accepted, but a signature that is present is verified when
trusted keys are configured.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hotfleet.errors import HotfleetError
from hotfleet.signing import DEFAULT_FLEET, load_public_keys, verify_release

__all__ = ["SigningPolicy", "TrustedKeys"]

log = logging.getLogger("node_agent.agent")

# key id -> key, or the paths of public key files (one path alone is accepted too)
TrustedKeys = Mapping[str, Ed25519PublicKey] | Iterable[str | os.PathLike[str]] | None


def _load(trusted_keys: TrustedKeys | str | os.PathLike[str]) -> dict[str, Ed25519PublicKey]:
    if isinstance(trusted_keys, Mapping):
        return dict(trusted_keys)
    if isinstance(trusted_keys, str | os.PathLike):
        return load_public_keys([trusted_keys])
    return load_public_keys(trusted_keys or ())


class SigningPolicy:
    """The keys ``node_id`` trusts and whether it is in ``dev`` mode; raises ``ValueError``
    when built outside dev mode without a key."""

    def __init__(
        self,
        trusted_keys: TrustedKeys,
        *,
        node_id: str,
        dev: bool = False,
        fleet: str = DEFAULT_FLEET,
    ) -> None:
        self.keys = _load(trusted_keys)
        self.node_id = node_id
        self.dev = dev
        self.fleet = fleet  # release signatures must name it (hotfleet.signing)
        if not dev and not self.keys:
            raise ValueError(
                "refusing to start without a trusted release-signing key: outside dev mode "
                "every release must carry an ed25519 signature that the agent verifies before "
                "it prepares anything. Give trusted_keys=[path to release-signing.pub] "
                "(node-agent --trust-key PATH; make one with `python -m hotfleet.signing "
                "keygen DIR`), or dev=True for an insecure development setup"
            )

    def check(self, digest: str, signature_hex: str, signer: str, label: str) -> None:
        """Apply the policy to a release; raise :class:`HotfleetError` to refuse it.

        Outside dev mode a valid signature by a trusted key is required; in
        dev mode an unsigned release passes, a signed one is verified if
        trusted keys are configured.
        """
        if not signature_hex and self.dev:
            log.warning("dev mode: accepting the unsigned release %s", label or digest)
            return
        if signature_hex and not self.keys:  # dev mode only: non-dev requires keys
            log.warning(
                "dev mode: release %s is signed by %s but no trusted key is configured; "
                "signature not verified",
                label or digest,
                signer or "?",
            )
            return
        try:
            verify_release(
                digest, signature_hex, signer, self.keys, release=label, fleet=self.fleet
            )
        except HotfleetError as exc:
            log.error(
                "node %s refuses release %s: %s",
                self.node_id,
                label or digest,
                "; ".join(map(str, exc.errors)),
            )
            raise

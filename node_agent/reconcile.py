"""Reconcile at start: a node boots into the fleet's release before it registers.

Why its own module: this is the one path by which a node changes its code
without a coordinator asking (a restarted or new worker must serve what the
fleet serves before it takes traffic), so it is kept apart from the 2PC and
reads only records a leader wrote and signed.  Called by the membership
thread for every new etcd session until it has run once: first the
permanent release (``desired/<node>`` or ``releases/permanent``), then, if
a rollout in its window lists this node among its ``targets``
(``releases/current``), that release on top, provisional.  An etcd outage
while fetching raises :class:`SourcesUnavailable` (the membership thread
retries); anything wrong with the records is logged and leaves the boot code
serving (``reconcile_failed``), never a retry loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from hotfleet import transient
from hotfleet.errors import HotfleetError, ModuleError, Reason
from hotfleet.etcd_client import EtcdClient, read_together
from hotfleet.keys import Keys
from hotfleet.limits import MAX_MODULES, MAX_PREPARE_MESSAGE_BYTES, loads_json
from hotfleet.release import Release, is_module_name
from node_agent.errors import FinishError, LoaderStateError, PrepareError
from node_agent.loader import Loader, ReleaseInfo
from node_agent.participant import Participant, State, refusal

__all__ = ["Reconciler", "SourcesUnavailable"]

log = logging.getLogger("node_agent.agent")

_err = refusal


class SourcesUnavailable(HotfleetError, transient.Outage):
    """Some module sources could not be fetched (etcd unreachable); worth retrying."""


class Reconciler:
    """Runs the start-up reconcile once (``done``); ``errors`` say why it failed, if it did."""

    def __init__(
        self,
        node_id: str,
        keys: Keys,
        loader: Loader,
        participant: Participant,
        *,
        verify: Callable[[str, str, str, str], None],
        fetch: Callable[[Mapping[str, Any]], Release],
        done: bool = False,
    ) -> None:
        self.node_id = node_id
        self.keys = keys
        self.loader = loader
        self.participant = participant
        self._verify = verify
        self._fetch = fetch
        self.done = done
        self.errors: list[ModuleError] = []

    def __call__(self, client: EtcdClient) -> None:
        """Bring the boot code to the fleet's release (once, before registering).

        First the permanent release (what every node boots into), then, if a
        rollout in its window lists this node among its ``targets``
        (``releases/current``), that release on top of it, provisional: so a
        node that restarts inside a window serves what the rest of the fleet
        serves, and holds the permanent one as its in-memory backup.
        """
        if self.done:
            return
        # one revision: a window turning permanent writes both records in one transaction,
        # and a node reading them apart could boot the old release and miss the window
        (override, permanent, current), _ = read_together(
            client, (self.keys.desired_of(self.node_id), self.keys.permanent, self.keys.current)
        )
        self._permanent(self._record(client, override, permanent))
        if self.done and self.participant.state is not State.RECONCILE_FAILED:
            self._current(current)

    def _current(self, raw: bytes | None) -> None:
        if raw is None:
            return
        with self.participant.lock:
            try:
                record = loads_json(raw, self.keys.current)
                targets = record.get("targets")
                if not isinstance(targets, list) or self.node_id not in targets:
                    return
                manifest = record["manifest"]
                if not isinstance(manifest, Mapping):
                    raise TypeError(f"'manifest' is {type(manifest).__name__}, not an object")
                target = ReleaseInfo(manifest["name"], manifest["version"], record["digest"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("unreadable %s, not loading it: %s", self.keys.current, exc)
                return
            if self.loader.current_release == target:
                return
            self.participant.set_state(State.RECONCILING, publish=False)
            log.info("loading %s, the release of the rollout in its window", target.label)
            try:
                self._verify(
                    target.digest,
                    str(record.get("signature") or ""),
                    str(record.get("signer") or ""),
                    target.label,
                )
                release = self._fetch(manifest)
                prepared = self.loader.prepare(release)
                report = self.loader.finish(prepared)
            except SourcesUnavailable:
                self.participant.settle()
                raise
            except (HotfleetError, PrepareError, FinishError, LoaderStateError) as exc:
                # the leader's convergence loop tries again (and shows it as drifting)
                log.error(
                    "cannot load %s (the fleet's current release): %s",
                    target.label,
                    "; ".join(map(str, exc.errors)),
                )
                self.participant.settle()
                return
            log.info("now %s, provisional (pause %.2f ms)", target.label, report.pause_s * 1000)
            self.participant.settle()

    def _record(
        self, client: EtcdClient, raw: bytes | None, permanent: bytes | None
    ) -> bytes | None:
        """This node's permanent release record: its own (``desired/<node>``, ``raw``) or
        the fleet's (``permanent``).

        A rollout for some nodes only (``--nodes``, ``--selector``) makes its
        release permanent on those nodes alone; the release record then comes
        from the pushed entry.  An override naming no release means the boot
        code: nothing to load.
        """
        if raw is None:
            return permanent
        try:
            label = str(loads_json(raw, self.keys.desired_of(self.node_id))["release"])
            if not label:
                return None
            name, _, version = label.partition("@")
            pushed, _ = client.get(self.keys.release(name, version))
            if pushed is None:
                raise KeyError(f"{label} is not in the store")
            entry = loads_json(pushed, self.keys.release(name, version))
            record = {k: entry.get(k, "") for k in ("digest", "manifest", "signature", "signer")}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error(
                "unreadable %s, using the fleet's permanent release: %s",
                self.keys.desired_of(self.node_id),
                exc,
            )
            return permanent
        return json.dumps({"release": label, **record}).encode()

    def _permanent(self, raw: bytes | None) -> None:
        if raw is None:
            self.done = True
            self.participant.settle()
            return
        with self.participant.lock:
            try:
                # a record holds a whole manifest: bounded like a Prepare, not a field
                record = loads_json(raw, self.keys.permanent, MAX_PREPARE_MESSAGE_BYTES)
                manifest = record["manifest"]
                if not isinstance(manifest, Mapping):
                    raise TypeError(f"'manifest' is {type(manifest).__name__}, not an object")
                target = ReleaseInfo(manifest["name"], manifest["version"], record["digest"])
                signature = str(record.get("signature") or "")
                signer = str(record.get("signer") or "")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("unreadable %s, not reconciling: %s", self.keys.permanent, exc)
                self.done = True
                self.participant.settle()
                return
            try:  # before the record is believed, even as a mere label of the boot code
                _check_permanent_manifest(manifest, target)
                self._verify(target.digest, signature, signer, target.label)
            except HotfleetError as exc:
                self._failed(target, exc.errors)
                return
            if self.loader.permanent_release == target or self._boot_code_is(manifest):
                self.loader.current_release = self.loader.current_release or target
                self.loader.permanent_release = target
                log.info("boot code is the permanent release %s", target.label)
                self.done = True
                self.participant.settle()
                return
            self.participant.set_state(State.RECONCILING, publish=False)
            log.info("reconciling boot code to the permanent release %s", target.label)
            try:
                release = self._fetch(manifest)
                if release.digest != target.digest:
                    raise HotfleetError(
                        [
                            _err(
                                "*",
                                f"permanent record digest {target.digest} != content digest "
                                f"{release.digest}",
                                Reason.DIGEST_MISMATCH,
                            )
                        ]
                    )
            except SourcesUnavailable:
                self.participant.set_state(State.STARTING, publish=False)
                raise  # etcd trouble: the membership thread retries with backoff
            except HotfleetError as exc:
                self._failed(target, exc.errors)
                return
            try:
                prepared = self.loader.prepare(release)
                report = self.loader.finish(prepared)
                self.loader.make_permanent()
            except (PrepareError, FinishError, LoaderStateError) as exc:
                self._failed(target, exc.errors)
                return
            log.info("reconciled to %s (pause %.2f ms)", target.label, report.pause_s * 1000)
            self.done = True
            self.participant.settle()

    def _failed(self, target: ReleaseInfo, errors: list[ModuleError]) -> None:
        self.errors = [e.on_node(self.node_id) for e in errors]
        log.error(
            "cannot reconcile to the permanent release %s; serving the boot code: %s",
            target.label,
            "; ".join(map(str, self.errors)),
        )
        self.done = True
        self.participant.set_state(State.RECONCILE_FAILED, publish=False)

    def _boot_code_is(self, manifest: Mapping[str, Any]) -> bool:
        """Whether the boot code already is ``manifest`` (unchecked input: anything odd is no)."""
        modules = manifest.get("modules")
        if not isinstance(modules, list) or len(modules) > MAX_MODULES:
            return False
        for m in modules:
            if not isinstance(m, Mapping) or not is_module_name(m.get("name")):
                return False
            status = self.loader.status(m["name"])
            have = status.loaded_digest or status.disk_digest
            if have != m["digest"]:
                return False
        return True


def _check_permanent_manifest(manifest: Mapping[str, Any], target: ReleaseInfo) -> None:
    """Refuse a permanent record that is empty or whose manifest is not the digest it names.

    The record's signature covers its digest; this ties the manifest (what a
    booting node compares its code with, module by module) to that digest,
    and an empty module list would make any boot code "be" the release.
    """
    if not manifest.get("modules"):
        raise HotfleetError([_err("*", f"the permanent record of {target.label} lists no modules")])
    rebuilt = Release.from_manifest(manifest, lambda _digest: b"").digest
    if rebuilt != target.digest:
        detail = f"the permanent record names digest {target.digest} but its manifest is {rebuilt}"
        raise HotfleetError([_err("*", detail, Reason.DIGEST_MISMATCH)])

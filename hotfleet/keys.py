"""The cluster's etcd key layout, in one place.

Everything hotfleet keeps in etcd lives under one prefix (``/hotfleet/`` by
default), so several clusters can share an etcd and a cluster can be wiped
with one range delete.  Agents and coordinators both build keys here.

``nodes/<id>``                      agent membership (on the agent's lease)
``blobs/<sha256>/...``              module sources by digest
``releases/<name>/<version>``       a pushed release: ``{"label", "digest", "manifest", "pushed_at"}``
``releases/permanent``              the fleet's permanent release (agents boot into it)
``releases/current``                the release of a rollout in its window, and its ``targets``
``desired/<id>``                    ``{"release": label}``: a node's permanent release when a
                                    rollout for some nodes only made it permanent there
``catchups/<id>``                   the leader's last catch-up of a node to its desired release
``election/<lease>``                coordinator candidates (the lowest create revision leads)
``rollouts/<id>``                   a rollout record (JSON, written by the leader only)
``rollouts/<id>/decision``          ``commit`` | ``abort``: the 2PC commit point, written once
``baselines/<id>/<node>``           the judge's pre-upgrade samples of a node (compressed JSON),
                                    so a new leader judges the window; removed when it ends
``active``                          the id of the rollout in progress (one per cluster)
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "/hotfleet/"


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.endswith("/"):
            object.__setattr__(self, "prefix", self.prefix + "/")

    @property
    def nodes(self) -> str:
        return f"{self.prefix}nodes/"

    def node(self, node_id: str) -> str:
        return f"{self.nodes}{node_id}"

    @property
    def blobs(self) -> str:
        return f"{self.prefix}blobs/"

    @property
    def releases(self) -> str:
        return f"{self.prefix}releases/"

    def release(self, name: str, version: str) -> str:
        return f"{self.releases}{name}/{version}"

    @property
    def permanent(self) -> str:
        return f"{self.releases}permanent"

    @property
    def current(self) -> str:
        return f"{self.releases}current"

    @property
    def desired(self) -> str:
        return f"{self.prefix}desired/"

    def desired_of(self, node_id: str) -> str:
        return f"{self.desired}{node_id}"

    @property
    def catchups(self) -> str:
        return f"{self.prefix}catchups/"

    def catchup(self, node_id: str) -> str:
        return f"{self.catchups}{node_id}"

    @property
    def election(self) -> str:
        return f"{self.prefix}election/"

    @property
    def rollouts(self) -> str:
        return f"{self.prefix}rollouts/"

    def rollout(self, rollout_id: str) -> str:
        return f"{self.rollouts}{rollout_id}"

    def decision(self, rollout_id: str) -> str:
        return f"{self.rollouts}{rollout_id}/decision"

    @property
    def baselines(self) -> str:
        return f"{self.prefix}baselines/"

    def baseline(self, rollout_id: str, node_id: str = "") -> str:
        """The judge's baseline of one node for one rollout (``node_id=""``: the rollout's prefix)."""
        return f"{self.baselines}{rollout_id}/{node_id}"

    @property
    def active(self) -> str:
        return f"{self.prefix}active"

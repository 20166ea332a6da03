"""Cluster membership: who votes, who only listens, and where each node lives.

A configuration entry (``ENTRY_CONFIG``) carries a whole ``Membership``, not a delta, so the
configuration in force is simply the newest one in the log (or in the snapshot the log starts
from). Changes are single-server (Raft thesis §4.1): each new configuration differs from the
one before by one node, so any majority of the old and any majority of the new configuration
overlap, and no joint-consensus phase is needed. Why single-server: it is simpler to reason
about and to operate (one command, one entry), and a demanding user loses nothing, since
replacing a machine is "add learner, promote, remove" either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum

from raftfast.limits import MAX_MEMBERS, check_node_id

_FORMAT = 1


class ChangeKind(StrEnum):
    ADD_LEARNER = "add-learner"  # a new node that receives the log but neither votes nor counts
    PROMOTE = "promote"  # learner -> voter
    DEMOTE = "demote"  # voter -> learner
    REMOVE = "remove"  # voter or learner leaves


@dataclass(frozen=True)
class Membership:
    """Voters and learners, each ``id -> address`` (the address may be "" in tests)."""

    voters: dict[str, str] = field(default_factory=dict)
    learners: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_voters(cls, ids, address: str = "") -> Membership:
        return cls({i: address for i in ids})

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.voters or node_id in self.learners

    def __hash__(self) -> int:
        return hash(self.encode())

    def members(self) -> dict[str, str]:
        """Everyone the leader replicates to: voters and learners."""
        return {**self.voters, **self.learners}

    def role_of(self, node_id: str) -> str:
        if node_id in self.voters:
            return "voter"
        return "learner" if node_id in self.learners else ""

    def encode(self) -> bytes:
        """Deterministic bytes (sorted keys): equal memberships encode equally everywhere."""
        return json.dumps(
            {"format": _FORMAT, "voters": self.voters, "learners": self.learners},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Membership:
        """Raises ValueError on anything that is not a membership we wrote."""
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"bad membership encoding: {exc}") from None
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
            raise ValueError("bad membership encoding: unknown format")
        voters, learners = obj.get("voters"), obj.get("learners")
        for group in (voters, learners):
            if not isinstance(group, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in group.items()
            ):
                raise ValueError("bad membership encoding: members must map ids to addresses")
        if set(voters) & set(learners):
            raise ValueError("bad membership encoding: a node is both voter and learner")
        return cls(dict(voters), dict(learners))

    def change(self, kind: ChangeKind, node_id: str, address: str = "") -> Membership:
        """The configuration after one single-server change; ValueError if it is not allowed."""
        kind = ChangeKind(kind)
        check_node_id(node_id)
        voters, learners = dict(self.voters), dict(self.learners)
        if kind == ChangeKind.ADD_LEARNER:
            if node_id in self:
                raise ValueError(f"{node_id} is already a {self.role_of(node_id)}")
            if len(self.members()) >= MAX_MEMBERS:
                raise ValueError(f"a cluster has at most {MAX_MEMBERS} members")
            if not address:
                raise ValueError(f"adding {node_id} needs its address")
            if address in self.members().values():
                raise ValueError(f"address {address} is already used by another member")
            learners[node_id] = address
        elif kind == ChangeKind.PROMOTE:
            if node_id not in learners:
                raise ValueError(f"{node_id} is not a learner")
            voters[node_id] = learners.pop(node_id)
        elif kind == ChangeKind.DEMOTE:
            if node_id not in voters:
                raise ValueError(f"{node_id} is not a voter")
            if len(voters) == 1:
                raise ValueError(f"{node_id} is the last voter")
            learners[node_id] = voters.pop(node_id)
        else:
            if node_id not in self:
                raise ValueError(f"{node_id} is not a member")
            if node_id in voters and len(voters) == 1:
                raise ValueError(f"{node_id} is the last voter; a cluster needs one")
            voters.pop(node_id, None)
            learners.pop(node_id, None)
        return Membership(voters, learners)

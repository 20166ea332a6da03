"""The driver's membership part: changes proposed through the Admin service (add, promote,
demote, remove; one at a time, each waited for until committed), joining a cluster with
``--join``, whom the transport talks to, and shutting down once a committed configuration
leaves this node out.

``MembershipMixin`` is a part of ``Driver`` (raftfast/server/driver.py): it uses the driver's
``raw``, ``settings``, ``transport`` and wake-up and wait helpers.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from raftfast.address import ADDRESS_FORM, is_address, member_at_same_place
from raftfast.core.membership import ChangeKind, Membership
from raftfast.core.types import Role
from raftfast.errors import (
    AddressTakenError,
    ChangeInProgressError,
    NotLeaderError,
    RaftfastError,
)
from raftfast.limits import check_node_id
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.server.incarnations import Incarnations
from raftfast.server.lease import LeaderLease

log = logging.getLogger("raftfast.node")

_DONE_NOTE = {
    ChangeKind.PROMOTE: "a voter",
    ChangeKind.DEMOTE: "a learner",
    ChangeKind.REMOVE: "removed",
}

# Join answers that retrying cannot change: another cluster, a certificate of another name, a
# bad id or address.
_JOIN_REFUSED = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
)


class MembershipMixin:
    """Membership changes, joining and removal (a part of ``Driver``)."""

    # (set up by Driver.__init__)
    _membership: Membership | None
    _known_addresses: dict[str, str]
    _book: dict[str, str] | None
    _joining: bool
    removed: bool
    _committed_members: set[str]
    applied_index: int
    _removed_ids: dict[str, int]
    _adding: asyncio.Lock  # (add_member's)
    _lease: LeaderLease
    incarnations: Incarnations

    def peer_address_of(self, node_id: str) -> str | None:
        """Where ``node_id`` serves peers (its address in the configuration)."""
        return self._address_book().get(node_id) or self.settings.peers.get(node_id)

    def address_of(self, node_id: str) -> str | None:
        """Where ``node_id`` serves clients (for the leader hints clients follow), if known:
        as it told us, or its peer address if ports are shared here (they are cluster-wide)."""
        if node_id == self.id:
            return self.settings.listen
        told = self.transport.client_address_of(node_id) if self.transport else ""
        if told:
            return told
        return None if self.settings.peer_listen else self.peer_address_of(node_id)

    def _members_pb(self, st) -> list[pb.Member]:
        m = st.membership
        return [
            pb.Member(
                id=nid,
                address=addr,
                role=m.role_of(nid),
                match_index=st.progress.get(nid, (0, 0))[0],
                client_address=self.address_of(nid) or "",
            )
            for nid, addr in sorted(m.members().items())
        ]

    def members(self, require_leader: bool = True) -> pb.MembersResponse:
        """The configuration as the leader sees it (with each member's replication progress);
        ``require_leader=False``: as this node sees it."""
        if require_leader:
            self._check_leader()
        st = self.raw.status()
        return pb.MembersResponse(
            members=self._members_pb(st),
            leader=st.leader,
            config_index=st.config_index,
            committed=st.config_index <= st.commit_index,
            cluster_id=self.settings.cluster_id,
            commit_index=st.commit_index,
        )

    async def add_member(
        self, node_id: str, address: str, learner: bool, timeout: float
    ) -> pb.MembersResponse:
        """Add ``node_id`` as a learner; unless ``learner``, promote it once it caught up.
        Idempotent: adding a member again with the same address just carries on."""
        check_node_id(node_id)  # (the services check both first; an embedded node's caller
        if not is_address(address):  # reaches this directly)
            raise ValueError(f"bad address {address[:300]!r} (want {ADDRESS_FORM})")
        deadline = asyncio.get_running_loop().time() + timeout
        was_voter = node_id in self.raw.membership.voters
        existed = node_id in self.raw.membership.members()
        if not existed:
            self._check_leader()  # (before any name is looked up: the leader's to do)
            # One add at a time from its lookup to its commit: two at once, at two spellings
            # of one place, were both let in (each looked at the members before the other).
            try:
                async with asyncio.timeout(max(0.0, deadline - asyncio.get_running_loop().time())):
                    await self._adding.acquire()
            except TimeoutError:
                raise TimeoutError(f"add {node_id}: another add was still under way") from None
            try:
                current = self.raw.membership.members()
                if node_id not in current:
                    taken = await member_at_same_place(address, current)
                    if taken is not None:
                        raise AddressTakenError(
                            f"address {address} reaches {taken}'s ({current[taken]}): it is "
                            "another member's already"
                        )
                    await self._change(ChangeKind.ADD_LEARNER, node_id, address, deadline)
            finally:
                self._adding.release()
        current = self.raw.membership.members()
        if node_id in current:
            if current[node_id] != address:
                raise ValueError(f"{node_id} is already a member, at {current[node_id]}")
            await self._configuration_committed(deadline, f"add {node_id}")
        if not learner and node_id not in self.raw.membership.voters:
            await self._wait_caught_up(node_id, deadline)
            await self._change(ChangeKind.PROMOTE, node_id, "", deadline)
        listing = self.members()
        if existed and (learner or was_voter):  # (a retry, say: as the other changes say)
            role = "a voter" if was_voter else "a learner"
            listing.note = f"{node_id} is already {role} at {address}: nothing to do"
        return listing

    async def change_member(self, kind: ChangeKind, node_id: str, timeout: float):
        """Promote, demote or remove ``node_id``; returns once the change is committed."""
        deadline = asyncio.get_running_loop().time() + timeout
        m = self.raw.membership
        done = {
            ChangeKind.PROMOTE: node_id in m.voters,
            ChangeKind.DEMOTE: node_id in m.learners,
            ChangeKind.REMOVE: node_id not in m,
        }[kind]
        if (
            kind == ChangeKind.REMOVE
            and done
            and node_id not in self._removed_ids
            and node_id not in self.raw.membership_at(self.raw.commit_index)
        ):
            # (never a member, or removed before what this node's log holds: a typo in a
            # replacement looked like a success; a retry of a removal just done, or still to
            # commit, still is one)
            raise ValueError(f"{node_id!r} is not a member")
        if done:
            # Already so (perhaps thanks to an earlier attempt of this very call): say so,
            # once that is committed.
            await self._configuration_committed(deadline, f"{kind.value} {node_id}")
            listing = self.members()
            listing.note = f"{node_id} is already {_DONE_NOTE[kind]}: nothing to do"
            return listing
        if kind == ChangeKind.PROMOTE and node_id in m.learners:
            # A voter far behind would stall writes (it counts toward the quorum at once).
            await self._wait_caught_up(node_id, deadline)
        await self._change(kind, node_id, "", deadline)
        # If we removed ourselves we stepped down once it committed: answer with what we know.
        return self.members(require_leader=self.raw.role == Role.LEADER)

    async def _configuration_committed(self, deadline: float, what: str) -> None:
        """Until the latest configuration is committed and applied here: a change it already
        holds (an earlier attempt's, another caller's) is not "done" before that, since a new
        leader could still drop it (a retry answered "nothing to do" at an uncommitted one)."""
        index = self.raw.config_index
        if index > self.applied_index:
            self._check_leader()
            await self._wait_applied_as_leader(index, deadline, what)

    async def _change(self, kind: ChangeKind, node_id: str, address: str, deadline: float):
        """Propose one change and wait until it is committed and applied here."""
        raw = self.raw
        while True:
            self._check_leader()
            try:
                self._lease.spoil(raw.term)  # (a new voter never heard us: it votes at once)
                index = self.raw.propose_change(kind, node_id, address)
                break
            except ChangeInProgressError:
                # Wait for the earlier change (or this leader's no-op) to commit, then retry.
                await self._wait_applied_as_leader(raw.last_index, deadline, "earlier change")
        self._wake.set()
        log.info("node %s proposed %s %s at %d", self.id, kind.value, node_id, index)
        await self._wait_applied_as_leader(index, deadline, f"{kind.value} {node_id}")

    async def _wait_applied_as_leader(self, index: int, deadline: float, what: str) -> None:
        """Until ``index`` (an entry of our current term) is applied here. NotLeaderError if we
        lose leadership first: whether it commits is then up to the next leader, which the
        client retries at (changes are idempotent). A leader whose own removal commits steps
        down in the same Ready that applies it, so it still sees the entry applied."""
        loop = asyncio.get_running_loop()
        term = self.raw.term
        applied = asyncio.ensure_future(self.wait_applied(index))
        try:
            while not applied.done():
                raw = self.raw
                committed_here = raw.commit_index >= index and raw.term_at(index) == term
                if (raw.role != Role.LEADER or raw.term != term) and not committed_here:
                    # (a leader whose own removal just committed has stepped down: the entry
                    # is committed and applied with the next Ready; wait for that)
                    raise NotLeaderError(
                        f"leadership lost before {what} committed", raw.leader or None
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"{what}: not committed before the deadline")
                await asyncio.wait({applied}, timeout=min(remaining, self.settings.tick_ms / 1000))
            applied.result()
        finally:
            applied.cancel()

    async def _wait_caught_up(self, node_id: str, deadline: float) -> None:
        """Until the learner holds everything committed when we started waiting."""
        loop = asyncio.get_running_loop()
        target = self.raw.commit_index
        while True:
            self._check_leader()
            match = self.raw.match_index(node_id)
            if match is None:
                raise ValueError(f"{node_id} is no longer a member")
            if match >= target:
                return
            if loop.time() >= deadline:
                if match == 0:  # (never answered: most often, not started yet)
                    address = self.raw.membership.members().get(node_id, "its address")
                    raise TimeoutError(
                        f"{node_id} is a learner but has not answered at {address}: start it "
                        f"(raftfast-node --id {node_id} --join <a member's address>, serving "
                        f"peers at {address}), then: raftfast member promote {node_id}"
                    )
                raise TimeoutError(
                    f"{node_id} is a learner but has not caught up yet (has {match} of "
                    f"{target}); promote it later with: raftfast member promote {node_id}"
                )
            await asyncio.sleep(self.settings.tick_ms / 1000)

    def _address_book(self) -> dict[str, str]:
        """Whom the transport talks to: the members of the configuration committed here and
        of every newer one (a node being removed is still needed until its removal commits),
        and, while we are not a member, the members the cluster told us about when we joined."""
        raw = self.raw
        book = raw.peers_in_play()
        if self.id in raw.membership:
            return book
        return {**self._known_addresses, **book}

    def _accepts_from(self, src: str) -> bool:
        """Peer traffic we take: anyone with our cluster id (a member added recently may lead
        before we learn of it) except nodes whose removal we applied: they are told so."""
        return src not in self._removed_ids

    def _check_incarnation(self, src: str, incarnation: int) -> str | None:
        """Why a peer's frame is refused for its incarnation (raftfast/server/incarnations.py),
        or None. Only members are remembered: frames of ids we do not know yet are taken (one
        added recently may lead already) but would otherwise let a stranger make us write a
        file per made-up id."""
        if src not in self.raw.membership:
            return None
        return self.incarnations.check(src, incarnation)

    def _on_refused(self, peer: str, removed_at: int) -> None:
        """``peer`` applied a committed configuration (at ``removed_at``) that removed a node
        with our id. Stop, unless we know a newer configuration (our id was added back since:
        the peer lags), or we are still joining (an older node with our id was removed)."""
        raw = self.raw
        if self.removed or self._joining:
            return
        newer_than_ours = removed_at > raw.config_index
        leaving = self.id not in raw.membership and any(self.id in m for _, m in raw.configs())
        if newer_than_ours or leaving:
            self._shut_down_removed(f"{peer} says this node was removed at index {removed_at}")

    def _follow_membership(self) -> None:
        """Point the transport at the peers in play (they change on append and on commit)."""
        membership = self.raw.membership
        if membership is not self._membership:
            if self._membership is not None:
                log.info(
                    "node %s configuration now: voters %s, learners %s (index %d)",
                    self.id,
                    sorted(membership.voters) or "none",
                    sorted(membership.learners) or "none",
                    self.raw.config_index,
                )
            self._membership = membership
        book = self._address_book()
        if book != self._book:
            self._book = book
            self.transport.set_peers(book)

    async def _join(self) -> None:
        """``--join``: ask the cluster to add us (as a learner, promoted once caught up), over
        the peer port: first where its members are (so that we can answer the leader), then
        the change itself, at the leader (followers point us at it)."""
        s = self.settings
        backoff = 0.2
        target = s.join
        self._joining = True
        request = pb.JoinRequest(
            cluster_id=s.cluster_id,
            id=s.id,
            address=s.peer_address,
            state_machine=self.app.served,
            machine=self.app.identity,
            learner=s.join_as_learner,
        )
        while not self.stopping:
            channel = self.transport.channel(target)
            try:
                stub = pb_grpc.PeerStub(channel)
                listing = await stub.Join(
                    pb.JoinRequest(cluster_id=s.cluster_id, id=s.id, list_only=True), timeout=30
                )
                self._known_addresses = {m.id: m.address for m in listing.members}
                self._follow_membership()
                log.info("node %s asks %s to add it at %s", s.id, target, s.peer_address)
                answer = await stub.Join(request, timeout=600.0)
                self._joining = False
                # (the role the leader gave: one of an earlier release knows no --learner)
                role = next((m.role for m in answer.members if m.id == s.id), "")
                role = role or ("learner" if s.join_as_learner else "voter")
                log.info("node %s joined the cluster as a %s", s.id, role)
                if s.join_as_learner and role != "learner":
                    log.warning(
                        "node %s asked to join as a learner, but the leader made it a %s (a "
                        "leader of an earlier release does not know --learner): make it one "
                        "with `raftfast member demote %s`",
                        s.id,
                        role,
                        s.id,
                    )
                return
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details()
                if code in _JOIN_REFUSED:
                    self.failed = RaftfastError(f"{target} refused the join: {details}")
                    log.critical("node %s cannot join: %s", s.id, self.failed)
                    asyncio.get_running_loop().call_soon(lambda: asyncio.create_task(self.stop()))
                    return
                leader = dict(exc.trailing_metadata() or ()).get("leader-address", "")
                if code == grpc.StatusCode.UNAVAILABLE and leader and leader != target:
                    target = leader
                    continue
                log.warning("node %s: join attempt failed (%s); retrying", s.id, details)
                target = s.join  # (a leader we were pointed at may be gone: ask again)
            finally:
                await channel.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _config_committed(self, index: int, membership: Membership) -> None:
        """A configuration committed. If it left us out (and we were in one before), we are
        done: shut down once our last messages (the hand-over to a new leader) are out."""
        members = set(membership.members())
        were_in = self.id in self._committed_members
        for gone in self._committed_members - members:
            self._removed_ids[gone] = index
        # (a removed id may come back anew; one added is new: what we knew of it is gone)
        self.incarnations.configuration(index, self._committed_members ^ members)
        for back in members & self._removed_ids.keys():
            del self._removed_ids[back]
        self._committed_members = members
        raw = self.raw
        if self.id in membership or self.removed or self._joining:
            return  # (joining: an earlier node with our id may have been removed long ago)
        if self.id in raw.membership or any(self.id in m for at, m in raw.configs() if at > index):
            return  # added back since
        if not were_in and not any(self.id in m for at, m in raw.configs() if at < index):
            # We were never a member before it (we are joining, catching up). (The log's
            # configurations alone do not say: a snapshot installed while the commits before
            # it were held for the one restored had replaced them: a review.)
            return
        self._shut_down_removed(f"the configuration at index {index} leaves it out")

    def _shut_down_removed(self, why: str) -> None:
        self.removed = True
        log.warning("node %s was removed from the cluster (%s); shutting down", self.id, why)
        delay = self.settings.election_ticks * self.settings.tick_ms / 1000
        asyncio.get_running_loop().call_later(delay, lambda: asyncio.create_task(self.stop()))

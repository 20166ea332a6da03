"""Which life of its data directory each peer speaks from: a node that lost its log must not
vote or count towards a commit under its old id.

Raft's safety rests on what each voter has written down (its log, its vote). A node whose data
directory was wiped (a new disk, an operator's ``rm -rf``) and that starts again under its old
id with its first-start flags knows none of it: it would grant its vote to any candidate and
acknowledge entries as if it had always held them, so a write acknowledged by it and the old
leader could be lost (`/tmp/hunt_ops/wipe_loss.py` lost one). etcd refuses such a member at its
start ("member has already been bootstrapped"); here its peers refuse it.

Each data directory gets a random *incarnation* when a node first starts on it, and every peer
frame carries the sender's (``pb.Frame.incarnation``). A node remembers the incarnation of each
member it has heard from (in ``incarnations.json``, next to the log, written before the first
frame is taken; ids that are no members are not remembered: ``MembershipMixin``) and refuses
frames of a member that comes back with another one: FAILED_PRECONDITION,
and an error in its log saying what to do (remove the member, add it back, start it with
``--join``). Removing or adding a member forgets its incarnation, so that the id can be used
again: once, when that configuration is first applied (``through``, kept in the file, is the
newest configuration index done: a restart re-applies its log, and forgetting again then would
let a wiped member that joined since back in). A snapshot from the leader may hide a removal and
a re-addition of the same id: installing one newer than ``through`` forgets every peer (each is
heard again at once). Frames without one (a raftfast from before this) are taken, as before.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Iterable

from raftfast.errors import CorruptionError
from raftfast.storage.fsutil import read_small_file, write_file_atomically
from raftfast.transport.grpc import NEW_DATA_DIRECTORY

__all__ = ["FILE", "Incarnations"]

log = logging.getLogger("raftfast.node")

FILE = "incarnations.json"
MAX_FILE_BYTES = 1 << 20  # (a few dozen bytes a member; more is not a file we wrote)
_LOG_EVERY_S = 60.0  # a refused peer reconnects all the time: one error a minute each


class Incarnations:
    """This node's incarnation (``own``) and the ones its peers were last heard with."""

    def __init__(self, data_dir: str, fsync: bool = True) -> None:
        self.path = os.path.join(data_dir, FILE)
        self._fsync = fsync
        self._logged: dict[str, float] = {}
        self.peers: dict[str, int] = {}
        self.through = 0  # the newest configuration index whose changes were applied here
        if os.path.exists(self.path):
            self.own, self.peers, self.through = self._load()
        else:
            # A new directory (or a log from before incarnations: nobody knows ours yet). Not
            # "whenever the log is empty": a node that only ever pre-voted was heard already.
            self.own = secrets.randbelow(2**63 - 1) + 1
            self._save()

    def check(self, src: str, incarnation: int) -> str | None:
        """Why frames of ``src`` speaking from ``incarnation`` are refused, or None; the first
        one heard from a peer is remembered (durably) before its frame is taken."""
        known = self.peers.get(src)
        if known == incarnation or not incarnation:
            return None
        if known is None:
            self.peers[src] = incarnation
            try:
                self._save()
            except OSError as exc:  # (not taken before it is written down)
                del self.peers[src]
                return f"cannot record the incarnation of {src}: {exc.strerror or exc}"
            return None
        why = (
            f"{src} {NEW_DATA_DIRECTORY} (incarnation {incarnation:x}, known as "
            f"{known:x}): it lost its log, so it may neither vote nor acknowledge entries. If its "
            f"data is gone for good: raftfast member remove {src}, then member add {src} and "
            "start it with --join (docs/operations.md)"
        )
        now = time.monotonic()
        if now - self._logged.get(src, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged[src] = now
            log.error("refusing %s", why)
        return why

    def configuration(self, index: int, changed: Iterable[str]) -> None:
        """The configuration at ``index`` was applied; ``changed``: the ids it removed or added
        (they may come back anew). Nothing, if it was applied here before (a restart)."""
        if index <= self.through:
            return
        for nid in changed:
            self.peers.pop(nid, None)
        self.through = index
        self._save()

    def snapshot_installed(self, index: int) -> None:
        """A snapshot up to ``index`` from the leader replaced our state (and the
        configurations in it, which we never applied one by one)."""
        if index > self.through:
            self.peers.clear()
            self.through = index
            self._save()

    def forget_all(self) -> None:
        self.peers.clear()
        self._save()

    def _load(self) -> tuple[int, dict[str, int], int]:
        try:
            data = json.loads(read_small_file(self.path, MAX_FILE_BYTES))
            own, peers, through = data["own"], data["peers"], data.get("through", 0)
            if not (isinstance(own, int) and 0 < own < 2**63 and isinstance(peers, dict)):
                raise ValueError("bad values")
            if not (isinstance(through, int) and 0 <= through < 2**64):
                raise ValueError("bad through")
            if not all(isinstance(v, int) and 0 < v < 2**64 for v in peers.values()):
                raise ValueError("bad peer values")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CorruptionError(
                f"{self.path} cannot be read ({exc}): restore it from a backup of this "
                "directory, or remove this node's data and add it back (docs/operations.md)",
                self.path,
                0,
            ) from None
        return own, {str(k): v for k, v in peers.items()}, through

    def _save(self) -> None:
        state = {"own": self.own, "peers": self.peers, "through": self.through}
        write_file_atomically(self.path, json.dumps(state, sort_keys=True).encode(), self._fsync)

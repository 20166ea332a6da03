"""What a node serves on top of the replicated log: the KV store (with its own service and its
space quota) or any other ``StateMachine`` (behind the generic Propose/Query service, with
exactly-once around it). The driver asks its application for these and knows nothing of KV.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from raftfast.etcd.api import EtcdAPI
from raftfast.etcd.errors import EtcdError
from raftfast.etcd.services import SERVICE_NAMES as ETCD_SERVICE_NAMES
from raftfast.etcd.services import add_etcd_services
from raftfast.etcd.watch import WatchService
from raftfast.exactly_once import ExactlyOnce
from raftfast.kv.fsm import KVStateMachine
from raftfast.kv.quota import Quota
from raftfast.proto import raftfast_pb2 as pb
from raftfast.security.roles import Authorizer
from raftfast.server.handlers import register
from raftfast.server.kv_service import KVService, add_kv_service
from raftfast.server.machine_identity import identity_of
from raftfast.server.machine_service import MachineService, StatusOnly
from raftfast.statemachine import StateMachine

if TYPE_CHECKING:
    from raftfast.server.driver import Driver

__all__ = ["KVApp", "MachineApp", "app_for"]

log = logging.getLogger("raftfast.node")


class MachineApp:
    """A user's state machine: commands framed with a client id and sequence (exactly-once),
    served by the StateMachine service (Propose, Query); the KV service answers Status only."""

    quota: Quota | None = None
    # the client services it adds (for health checking and reflection)
    service_names = ("raftfast.v1.StateMachine", "raftfast.v1.KV")
    sessions_open = 0  # (no Session stream)

    def __init__(self, driver: Driver, state_machine: StateMachine) -> None:
        self.driver = driver
        self.fsm: StateMachine = ExactlyOnce(state_machine)
        # what its snapshots name it by (--state-machine; None: an object handed to an
        # embedded node, which names none)
        self.state_machine_name: str | None = driver.settings.state_machine or None
        # what it serves, as a joining node says: JoinRequest.state_machine, all an earlier
        # release's leader compares, and JoinRequest.machine, in full
        self.served = f"machine:{type(state_machine).__qualname__}"
        self.identity = identity_of(state_machine)

    def add_services(self, server: grpc.aio.Server, authorizer: Authorizer | None) -> None:
        register(
            server, pb, "StateMachine", MachineService(self.driver, authorizer), reads=("Query",)
        )
        register(server, pb, "KV", StatusOnly(self.driver), reads=("Status",))

    def alarms_raised(self) -> frozenset[bytes]:
        return frozenset()

    def applied(self) -> None:
        """After every apply: nothing to tell."""

    async def forwarded(self, method: str, request: bytes) -> bytes:
        raise EtcdError(grpc.StatusCode.UNIMPLEMENTED, "this node serves no etcd API")

    async def run(self) -> None:
        """Background work while the node runs: none."""

    def alarm_reported(self, src: str, why: str) -> str | None:
        return "this node's state machine has no quota"

    def disk_full(self, why: str) -> None:
        """A snapshot found no room on this node's disk: no alarm to raise (the node logs it)."""

    def status_fields(self) -> dict:
        return {}


class KVApp:
    """The KV store: its service (which dedups its own commands) and the space quota, whose
    NOSPACE alarm any member's nearly full disk raises; beside it, etcd's v3 API over the
    store's etcd keyspace (raftfast.etcd)."""

    service_names = ("raftfast.v1.KV", *ETCD_SERVICE_NAMES)  # the client services it adds
    state_machine_name = ""  # (what its snapshots name it by: --state-machine's "")
    served = "kv"  # (what it serves, as a joining node says: JoinRequest.state_machine)
    identity = ""  # (JoinRequest.machine: a user's state machine's only)

    def __init__(self, driver: Driver, state_machine: KVStateMachine) -> None:
        self.driver = driver
        self.fsm: KVStateMachine = state_machine
        self.quota: Quota | None = Quota(driver)
        self._service: KVService | None = None
        self.etcd: EtcdAPI | None = None
        self._watch: WatchService | None = None
        self._reporting: asyncio.Task | None = None  # (a follower asking for NOSPACE)

    def add_services(self, server: grpc.aio.Server, authorizer: Authorizer | None) -> None:
        self._service = add_kv_service(server, self.driver, authorizer, self.quota)
        self.etcd = EtcdAPI(self.driver)
        self._watch = add_etcd_services(server, self.etcd)

    def applied(self) -> None:
        """After every apply: the etcd watchers look for new events, and the requests this
        member forwarded wait for its state to catch up (EtcdAPI._caught_up)."""
        if self.etcd is not None:
            self.etcd.applied.set()
        if self._watch is not None and self._watch.streams:
            self._watch.notify()

    async def forwarded(self, method: str, request: bytes) -> tuple[bytes, int]:
        """An etcd request a follower handed to us (the leader): the answer, and our applied
        index once answered (the follower answers its client once it applied as far)."""
        if self.etcd is None:
            raise EtcdError(grpc.StatusCode.UNAVAILABLE, "etcdserver: server not started")
        answer = await self.etcd.handle_forwarded(method, request)
        return answer, self.driver.applied_index

    @property
    def kv_service(self) -> KVService | None:
        """The KV service, once added (its Session streams also run over TCP)."""
        return self._service

    @property
    def sessions_open(self) -> int:
        """Session streams open now (for the metrics)."""
        return self._service.sessions_open if self._service is not None else 0

    def alarms_raised(self) -> frozenset[bytes]:
        """The alarms raised now (for the metrics; from any thread)."""
        for _ in range(10):
            try:
                return frozenset(self.fsm.alarms)
            except RuntimeError:  # (changed size while copied, in the loop's thread)
                continue
        return frozenset()

    async def run(self) -> None:
        """Every second: if this node's disk is nearly full, the NOSPACE alarm is raised (by
        the leader, which a follower asks), before the log cannot grow any more. Meanwhile the
        etcd API's leases expire and its history is compacted (on the leader)."""
        lessor = asyncio.get_running_loop().create_task(self.etcd.lessor.run())
        try:
            await self._watch_disk()
        finally:
            lessor.cancel()

    async def _watch_disk(self) -> None:
        driver, quota = self.driver, self.quota
        while not driver.stopping:
            await asyncio.sleep(1.0)
            why = quota.disk_short()
            if why is not None:
                self.disk_full(why)

    def disk_full(self, why: str) -> None:
        """This node's disk is (nearly) full, or a snapshot found no room on it: NOSPACE,
        raised by the leader, which a follower asks (one report at a time)."""
        driver, quota = self.driver, self.quota
        if quota is None or quota.raised():
            return
        if driver.is_leader:
            quota.raise_alarm(why)
        elif driver.raw.leader and self._reporting is None:
            report = driver.transport.report_alarm(driver.raw.leader, why)
            self._reporting = asyncio.get_running_loop().create_task(report)
            self._reporting.add_done_callback(self._reported)

    def _reported(self, task: asyncio.Task) -> None:
        self._reporting = None
        if not task.cancelled() and task.exception() is not None:
            log.info("NOSPACE report failed: %s", task.exception())

    def alarm_reported(self, src: str, why: str) -> str | None:
        """A member says its disk is nearly full: raise NOSPACE (why not, if we cannot)."""
        if not self.driver.is_leader:
            return "not the leader"
        if src not in self.driver.raw.membership:
            return f"{src} is not a member"
        self.quota.raise_alarm(f"{src} reports: {why}")
        return None

    def status_fields(self) -> dict:
        alarms = self.quota.alarms()
        return {"alarms": alarms.alarms, "state_bytes": alarms.state_bytes}


def app_for(driver: Driver, state_machine: StateMachine | None) -> KVApp | MachineApp:
    """The application serving ``state_machine`` (None: a new KV store)."""
    if state_machine is None:
        state_machine = KVStateMachine()
    if isinstance(state_machine, KVStateMachine):
        return KVApp(driver, state_machine)
    return MachineApp(driver, state_machine)

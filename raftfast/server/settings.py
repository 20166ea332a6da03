"""Settings of one raftfast-node process (filled by the CLI from flags, TOML and environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from raftfast.address import ADDRESS_FORM, is_address
from raftfast.etcd.lessor import parse_retention
from raftfast.limits import MAX_ID_BYTES, check_node_id
from raftfast.security.roles import load_roles
from raftfast.security.tls import TLSFiles, certificate_name, read_pem
from raftfast.transport import PEER_STREAMS

READ_MODES = ("linearizable", "lease", "stale")
LOG_FORMATS = ("text", "json")
# A request becomes one log entry, which must fit one peer message (64 MiB) with room to spare.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
MIN_QUOTA_BYTES = 64 * 1024
MAX_CLIENT_CONNECTIONS = 65536
MAX_SETTING = 2**63 - 1  # any number a setting holds (what protobuf and the formats carry)
MAX_TICK_MS = 10_000
MAX_ELECTION_MS = 50_000  # etcd's bound on its election timeout


# (the annotations are strings: ``from __future__ import annotations``)
_TYPES = {"str": str, "int": int, "bool": bool, "dict[str, str]": dict}
_TYPE_NAMES = {str: "a str", int: "an int", bool: "a bool (True or False)", dict: "a dict"}


@dataclass
class NodeSettings:
    id: str
    listen: str  # host:port this node serves clients on (and peers, unless peer_listen)
    peers: dict[str, str]  # node id -> the host:port peers dial, including this node
    data_dir: str
    cluster_id: str = "raftfast"
    fsync: bool = True  # False is UNSAFE: acknowledged writes can be lost on power failure
    read_mode: str = "linearizable"
    tick_ms: int = 25
    election_ticks: int = 12  # 300-450 ms with the default tick
    heartbeat_ticks: int = 2  # 50 ms
    max_key_bytes: int = 4 * 1024
    max_value_bytes: int = 1024 * 1024
    # Largest client request (a put, a Session frame, a put_many): etcd's default. The same on
    # every node, like the key and value limits.
    max_request_bytes: int = 1536 * 1024
    # gRPC connections at once on the client port, and on the peer port: past it, new ones are
    # closed at once (each is a descriptor: a stranger opening connections must not take all).
    max_client_connections: int = 4096
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object per line (raftfast/server/logs.py)
    # host:port serving Prometheus metrics at /metrics (raftfast/server/metrics.py); "" = off
    metrics_listen: str = ""
    wal_segment_bytes: int = 64 * 1024 * 1024  # advanced: WAL segment size before rotation
    snapshot_entries: int = 100_000  # snapshot the state machine every N applied entries
    snapshot_keep: int = 10_000  # entries kept behind a snapshot for followers that lag a little
    # advanced: snapshot also when the log held in memory passes this (big values rewritten)
    snapshot_log_bytes: int = 32 * 1024 * 1024
    join: str = ""  # host:port of a member: this node joins that cluster (no bootstrap peers)
    # One-shot flags (never read from a file, never stored): start as the only voter (quorum
    # lost), or start a new cluster from a backup file.
    force_new_cluster: bool = False
    restore: str = ""
    join_as_learner: bool = False  # with join: added as a learner, and never promoted
    # The replication stream: "tcp" (plain TCP where the peer offers it, on peer_stream_port of
    # the listen host, 0 = any free port; peers learn it over gRPC) or "grpc" (HTTP/2 only).
    peer_stream: str = "tcp"
    peer_stream_port: int = 0
    # The clients' Session stream: "tcp" (also on client_stream_port of the listen host, 0 =
    # any free port; clients learn it from Status) or "grpc" (the Session RPC only).
    client_stream: str = "tcp"
    client_stream_port: int = 0
    # Peers on a port of their own (required with TLS): the Peer service listens here, and
    # the replication stream on this host. "" = on ``listen``, with the clients.
    peer_listen: str = ""
    # TLS with etcd's names. Clients: the node's certificate and key; with client_cert_auth,
    # clients must present a certificate signed by trusted_ca_file. Peers: always both ways.
    cert_file: str = ""
    key_file: str = ""
    trusted_ca_file: str = ""
    client_cert_auth: bool = False
    peer_cert_file: str = ""
    peer_key_file: str = ""
    peer_trusted_ca_file: str = ""
    auth_roles: str = ""  # a TOML file mapping client certificate names to roles
    # "package.module:Class": a state machine of the user's instead of the KV store
    state_machine: str = ""
    # Past this many bytes of state (keys and values), writes are refused (a NOSPACE alarm).
    quota_backend_bytes: int = 2 * 1024 * 1024 * 1024
    # The etcd API's history (raftfast.etcd.lessor): keep the newest N revisions ("revision")
    # or a duration's worth ("periodic": 1h, 30m, or hours); "0": keep all (memory grows).
    auto_compaction_mode: str = "revision"
    auto_compaction_retention: str = "100000"
    extra: dict[str, str] = field(default_factory=dict)

    def _check_types(self) -> None:
        """Each setting of its declared type: raftfast.Node passes its keywords as given
        (``fsync="no"`` would have been true, ``data_dir=None`` a traceback at start). A path
        (``pathlib.Path``) is taken for a str, 0 and 1 for a bool."""
        for setting in fields(self):
            value = getattr(self, setting.name)
            kind = _TYPES[setting.type]
            if kind is str and isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif kind is bool and type(value) is int and value in (0, 1):
                value = bool(value)
            setattr(self, setting.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TypeError(
                    f"setting {setting.name} must be {_TYPE_NAMES[kind]}, not "
                    f"{type(value).__name__} ({value!r:.60})"
                )
        for name, mapping in (("peers", self.peers), ("extra", self.extra)):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
                raise TypeError(f"setting {name} must map strings to strings")

    @property
    def peer_address(self) -> str:
        """Where this node serves peers."""
        return self.peer_listen or self.listen

    @property
    def client_tls(self) -> TLSFiles | None:
        """The client port's certificate and the CA clients must be signed by (if checked)."""
        if not self.cert_file:
            return None
        return TLSFiles(self.trusted_ca_file or None, self.cert_file, self.key_file)

    @property
    def peer_tls(self) -> TLSFiles | None:
        if not self.peer_cert_file:
            return None
        return TLSFiles(self.peer_trusted_ca_file, self.peer_cert_file, self.peer_key_file)

    def shared_ca_warning(self) -> str | None:
        """A warning if the peer CA is the clients' CA (one path, or the same bytes): then a
        client certificate named like a node can speak as that node (docs/security.md)."""
        client_ca, peer_ca = self.trusted_ca_file, self.peer_trusted_ca_file
        if not (client_ca and peer_ca):
            return None
        same = os.path.realpath(client_ca) == os.path.realpath(peer_ca)
        if not same:
            try:
                same = read_pem(client_ca, "CA") == read_pem(peer_ca, "CA")
            except ValueError:  # (validate() read them; one changed since: say nothing)
                return None
        if not same:
            return None
        return (
            f"--peer-trusted-ca-file {peer_ca} is the clients' CA (--trusted-ca-file "
            f"{client_ca}): a client certificate whose name is a node id can speak as that "
            "node on the peer port; give peers a CA of their own (docs/security.md)"
        )

    def validate(self) -> None:
        """Raise ValueError with a one-line message for anything a node cannot start with
        (TypeError for a setting of another type)."""
        self._check_types()
        if not self.id:
            raise ValueError("--id must not be empty")
        check_node_id(self.id)
        if self.id not in self.peers:
            raise ValueError(f"--peers must include this node's id {self.id!r}")
        for nid, addr in self.peers.items():
            if not nid or not is_address(addr):
                raise ValueError(f"bad peer address {nid}={addr!r} (want ID=HOST:PORT)")
            check_node_id(nid)
        _check_one_member_per_address(self.peers)
        if not self.cluster_id or len(self.cluster_id.encode()) > MAX_ID_BYTES:
            raise ValueError(f"--cluster-id must be 1 to {MAX_ID_BYTES} bytes")
        if self.peer_stream not in PEER_STREAMS:
            raise ValueError(f"--peer-stream must be one of {', '.join(PEER_STREAMS)}")
        if not 0 <= self.peer_stream_port < 65536:
            raise ValueError("--peer-stream-port must be 0 (any free port) or a port number")
        if self.client_stream not in PEER_STREAMS:
            raise ValueError(f"--client-stream must be one of {', '.join(PEER_STREAMS)}")
        if not 0 <= self.client_stream_port < 65536:
            raise ValueError("--client-stream-port must be 0 (any free port) or a port number")
        if self.read_mode not in READ_MODES:
            raise ValueError(f"--read-mode must be one of {', '.join(READ_MODES)}")
        if self.tick_ms < 1 or not 1 <= self.heartbeat_ticks < self.election_ticks:
            raise ValueError("need tick_ms >= 1 and 1 <= heartbeat_ticks < election_ticks")
        if self.tick_ms > MAX_TICK_MS or self.tick_ms * self.election_ticks > MAX_ELECTION_MS:
            raise ValueError(
                f"need tick_ms <= {MAX_TICK_MS} and an election timeout (tick_ms x "
                f"election_ticks) of at most {MAX_ELECTION_MS} ms, got {self.tick_ms} x "
                f"{self.election_ticks}"
            )
        if self.snapshot_entries < 1 or self.snapshot_keep < 0 or self.snapshot_log_bytes < 1:
            raise ValueError(
                "need snapshot_entries >= 1, snapshot_keep >= 0 and snapshot_log_bytes >= 1"
            )
        if self.max_key_bytes < 1 or self.max_value_bytes < 0:
            raise ValueError("key and value limits must be positive")
        if not 1024 <= self.max_request_bytes <= MAX_REQUEST_BYTES:
            raise ValueError(f"--max-request-bytes must be in [1024, {MAX_REQUEST_BYTES}]")
        if not 1 <= self.max_client_connections <= MAX_CLIENT_CONNECTIONS:
            raise ValueError(f"--max-client-connections must be in [1, {MAX_CLIENT_CONNECTIONS}]")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.metrics_listen and not is_address(self.metrics_listen):
            raise ValueError(
                f"--metrics-listen: bad address {self.metrics_listen!r} (want {ADDRESS_FORM})"
            )
        parse_retention(self.auto_compaction_mode, self.auto_compaction_retention)
        if self.quota_backend_bytes < MIN_QUOTA_BYTES:
            raise ValueError(f"--quota-backend-bytes must be at least {MIN_QUOTA_BYTES}")
        for name, value in vars(self).items():
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SETTING:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be at most {MAX_SETTING}, got {value}")
        self._validate_security()

    def _validate_security(self) -> None:
        if self.peer_listen and not is_address(self.peer_listen):
            raise ValueError(
                f"--peer-listen: bad address {self.peer_listen!r} (want {ADDRESS_FORM})"
            )
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("--cert-file and --key-file go together")
        if self.client_cert_auth and not (self.cert_file and self.trusted_ca_file):
            raise ValueError("--client-cert-auth needs --cert-file, --key-file, --trusted-ca-file")
        if self.trusted_ca_file and not self.client_cert_auth:
            raise ValueError("--trusted-ca-file checks client certificates: add --client-cert-auth")
        peer_files = (self.peer_cert_file, self.peer_key_file, self.peer_trusted_ca_file)
        if any(peer_files) and not all(peer_files):
            raise ValueError(
                "peer TLS needs --peer-cert-file, --peer-key-file and --peer-trusted-ca-file"
            )
        if self.auth_roles and not self.client_cert_auth:
            raise ValueError("--auth-roles names client certificates: add --client-cert-auth")
        if (self.cert_file or self.peer_cert_file) and self.peer_address == self.listen:
            raise ValueError(
                "with TLS, peers need a port of their own: --peer-listen HOST:PORT (and --peers "
                "naming every node's peer address)"
            )
        for files in (self.client_tls, self.peer_tls):
            if files is not None:
                files.read()  # ValueError naming a file that is missing or not PEM
        if self.peer_cert_file:
            # Peers take a member's messages only under a certificate of its name: a node
            # started with another's ran, refused by all, and said nothing of why.
            name = certificate_name(self.peer_cert_file)
            if name != self.id:
                raise ValueError(
                    f"--peer-cert-file {self.peer_cert_file} is a certificate for "
                    f"{'no name' if name is None else repr(name[:100])} (its common name), "
                    f"not for this node {self.id!r}: peers would refuse every message from it"
                )
        if self.auth_roles:
            load_roles(self.auth_roles)


def _check_one_member_per_address(peers: dict[str, str]) -> None:
    """Two members at one address cannot both serve: MemberAdd's rule (raftfast.core.membership)
    at start, where a typo in --peers would otherwise start a cluster that never works."""
    owner: dict[str, str] = {}
    for nid, addr in peers.items():
        if addr in owner:
            raise ValueError(
                f"--peers: {owner[addr]} and {nid} have the same address {addr}; each member "
                "needs its own"
            )
        owner[addr] = nid

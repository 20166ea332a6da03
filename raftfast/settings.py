"""Settings of one raftfast-node process (filled by the CLI from flags, TOML and environment)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raftfast.address import is_address

READ_MODES = ("linearizable", "lease", "stale")
PEER_STREAMS = ("tcp", "grpc")


@dataclass
class NodeSettings:
    id: str
    listen: str  # host:port this node serves peers and clients on
    peers: dict[str, str]  # node id -> host:port, including this node
    data_dir: str
    cluster_id: str = "raftfast"
    fsync: bool = True  # False is UNSAFE: acknowledged writes can be lost on power failure
    read_mode: str = "linearizable"
    tick_ms: int = 50
    election_ticks: int = 10  # 500 ms with the default tick
    heartbeat_ticks: int = 1
    max_key_bytes: int = 4 * 1024
    max_value_bytes: int = 1024 * 1024
    log_level: str = "INFO"
    wal_segment_bytes: int = 64 * 1024 * 1024  # advanced: WAL segment size before rotation
    snapshot_entries: int = 100_000  # snapshot the state machine every N applied entries
    snapshot_keep: int = 10_000  # entries kept behind a snapshot for followers that lag a little
    join: str = ""  # host:port of a member: this node joins that cluster (no bootstrap peers)
    # The replication stream: "tcp" (plain TCP where the peer offers it, on peer_stream_port of
    # the listen host, 0 = any free port; peers learn it over gRPC) or "grpc" (HTTP/2 only).
    peer_stream: str = "tcp"
    peer_stream_port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError with a one-line message for anything a node cannot start with."""
        if not self.id:
            raise ValueError("--id must not be empty")
        if self.id not in self.peers:
            raise ValueError(f"--peers must include this node's id {self.id!r}")
        for nid, addr in self.peers.items():
            if not nid or not is_address(addr):
                raise ValueError(f"bad peer address {nid}={addr!r} (want ID=HOST:PORT)")
        if self.peer_stream not in PEER_STREAMS:
            raise ValueError(f"--peer-stream must be one of {', '.join(PEER_STREAMS)}")
        if not 0 <= self.peer_stream_port < 65536:
            raise ValueError("--peer-stream-port must be 0 (any free port) or a port number")
        if self.read_mode not in READ_MODES:
            raise ValueError(f"--read-mode must be one of {', '.join(READ_MODES)}")
        if self.tick_ms < 1 or not 1 <= self.heartbeat_ticks < self.election_ticks:
            raise ValueError("need tick_ms >= 1 and 1 <= heartbeat_ticks < election_ticks")
        if self.snapshot_entries < 1 or self.snapshot_keep < 0:
            raise ValueError("need snapshot_entries >= 1 and snapshot_keep >= 0")
        if self.max_key_bytes < 1 or self.max_value_bytes < 0:
            raise ValueError("key and value limits must be positive")

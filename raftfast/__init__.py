"""raftfast: a Raft consensus node for Python with compiled hot paths."""

from raftfast._accel import COMPILED
from raftfast.client import Client, SyncClient, TLSFiles
from raftfast.errors import (
    BatchError,
    ClusterUnavailableError,
    CompactedError,
    CorruptionError,
    DeadlineExceededError,
    InvalidArgumentError,
    LogError,
    NoSpaceError,
    NotLeaderError,
    PermissionDeniedError,
    RaftfastError,
    RequestFailedError,
    StorageError,
    UnavailableError,
)

__all__ = [
    "COMPILED",
    "Client",
    "SyncClient",
    "TLSFiles",
    "BatchError",
    "ClusterUnavailableError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "RequestFailedError",
    "CompactedError",
    "CorruptionError",
    "LogError",
    "NoSpaceError",
    "NotLeaderError",
    "PermissionDeniedError",
    "RaftfastError",
    "StorageError",
    "UnavailableError",
]
__version__ = "0.1.0"

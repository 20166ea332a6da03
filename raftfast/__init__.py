"""raftfast: a Raft consensus node for Python with compiled hot paths."""

from raftfast._accel import COMPILED
from raftfast.errors import (
    BatchError,
    CompactedError,
    CorruptionError,
    LogError,
    NotLeaderError,
    RaftfastError,
    StorageError,
    UnavailableError,
)

__all__ = [
    "COMPILED",
    "BatchError",
    "CompactedError",
    "CorruptionError",
    "LogError",
    "NotLeaderError",
    "RaftfastError",
    "StorageError",
    "UnavailableError",
]
__version__ = "0.1.0"

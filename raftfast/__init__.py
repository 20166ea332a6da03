"""raftfast: a Raft consensus node for Python with compiled hot paths.

The names that need gRPC (the clients, the node) are imported on first use, so that the pure
core (``raftfast.core``) and the storage work where gRPC is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from raftfast._accel import COMPILED
from raftfast._version import __version__
from raftfast.errors import (
    BatchError,
    ClusterUnavailableError,
    CommandError,
    CompactedError,
    CorruptionError,
    DeadlineExceededError,
    InvalidArgumentError,
    LockLostError,
    LogError,
    NoSpaceError,
    NotLeaderError,
    PermissionDeniedError,
    RaftfastError,
    RequestFailedError,
    StorageError,
    UnavailableError,
)
from raftfast.objects import (
    Objects,
    ReplCounter,
    ReplDict,
    ReplList,
    ReplLock,
    ReplQueue,
    ReplSet,
    readonly,
    replicated,
)
from raftfast.statemachine import StateMachine

__all__ = [
    "COMPILED",
    "__version__",
    "StateMachine",
    "Objects",
    "ReplCounter",
    "ReplDict",
    "ReplList",
    "ReplLock",
    "ReplQueue",
    "ReplSet",
    "readonly",
    "replicated",
    "Client",
    "SyncClient",
    "TLSFiles",
    "Node",
    "SyncNode",
    "BatchError",
    "ClusterUnavailableError",
    "CommandError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "LockLostError",
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

_LAZY = {  # name -> module it lives in
    "Client": "raftfast.client",
    "SyncClient": "raftfast.client",
    "TLSFiles": "raftfast.security.tls",
    "Node": "raftfast.server.embedded",
    "SyncNode": "raftfast.server.embedded",
}

if TYPE_CHECKING:
    from raftfast.client import Client, SyncClient
    from raftfast.security.tls import TLSFiles
    from raftfast.server.embedded import Node, SyncNode


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'raftfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

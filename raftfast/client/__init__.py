"""The client side: ``Client`` and ``SyncClient`` (``client.py``), and the ``raftfast``
command (``cli.py``)."""

from raftfast.client.client import (
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT,
    READ_MODES,
    BytesLike,
    Client,
    ReadModeLike,
    SyncClient,
    TLSFiles,
    message_to_dict,
    parse_endpoints,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_TIMEOUT",
    "READ_MODES",
    "BytesLike",
    "Client",
    "ReadModeLike",
    "SyncClient",
    "TLSFiles",
    "message_to_dict",
    "parse_endpoints",
]
